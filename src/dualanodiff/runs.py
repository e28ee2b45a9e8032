"""`RunFolder`: the one place that knows a training run's folder layout::

    RUN/config.yaml                 the whole Config the run was trained with (split included)
        adapters.safetensors        the trained set (both LoRA sets, SAIM, BCM, text LoRA, learned words)
        decoder.safetensors         the VAE decoder refined on the category (train.decoder_steps > 0)
        category.safetensors        the LoRA that adapted the base's UNet to the category (train.category_steps > 0)
        loss.csv, loss.png          one row per step
        backgrounds/<stem>.png      the few-shot backgrounds (1 - M_f) * I, BCM's input at generation time
        checkpoints/step-NNNNNN/    adapters.safetensors + optimizer.pt + state.pt

Everything that reads or writes a run goes through it: training, the pipeline, run-all, the demo, the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dualanodiff.config import Config
from dualanodiff.data import natural_key
from dualanodiff.errors import UserError


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    adapters = property(lambda self: self.root / "adapters.safetensors")
    decoder = property(lambda self: self.root / "decoder.safetensors")
    category = property(lambda self: self.root / "category.safetensors")
    loss_csv = property(lambda self: self.root / "loss.csv")
    loss_png = property(lambda self: self.root / "loss.png")
    backgrounds = property(lambda self: self.root / "backgrounds")
    checkpoints = property(lambda self: self.root / "checkpoints")

    # the files of one checkpoint folder
    CHECKPOINT_ADAPTERS = "adapters.safetensors"
    OPTIMIZER = "optimizer.pt"
    STATE = "state.pt"

    def is_run(self) -> bool:
        """A run has been started here (its config is written before the first step)."""
        return self.config.is_file()

    def load_config(self) -> Config:
        """The run's saved config, or a `UserError` saying this is not a run."""
        if not self.is_run():
            raise UserError(f"{self.root}: not a training run (config.yaml missing); pass the --out folder of "
                            "`dualanodiff train`")
        return Config.of_run(self.config)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def all_checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest first (temporary ones being written are not among them)."""
        return sorted(self.checkpoints.glob("step-*"))

    def latest_checkpoint(self) -> Path | None:
        found = self.all_checkpoints()
        return found[-1] if found else None

    def background_paths(self) -> list[Path]:
        return sorted(self.backgrounds.glob("*.png"), key=lambda p: natural_key(p.name))

    def trained_steps(self) -> int:
        """Steps of the run's finished training (0 while adapters.safetensors is not written)."""
        import torch

        checkpoint = self.latest_checkpoint() if self.adapters.is_file() else None
        return torch.load(checkpoint / self.STATE, map_location="cpu")["step"] if checkpoint else 0
