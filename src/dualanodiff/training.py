"""Few-shot training of DualAnoDiff on one defect type (paper eq. 4/6), resumable bit-exactly.

Targets per training pair, computed in ``[-1, 1]`` space: the image ``I``, the anomaly part ``I * M``
(mid-grey outside the defect) and the background ``(1 - M_f) * I`` (mid-grey on the object). Their VAE
latent distributions are encoded once for every flip variant; each step draws pairs, latents, the
timestep (shared by a pair's rows) and independent noise from one seeded `torch.Generator` whose state
is checkpointed with the optimizer, so an interrupted and resumed run equals an uninterrupted one.

A run folder holds::

    config.yaml                 every setting, including the few-shot split's file stems
    adapters.safetensors        the trainable set after the last step (LoRA, SAIM, BCM, gamma, text LoRA)
    loss.csv, loss.png          one row per step: step, loss_global, loss_anomaly
    backgrounds/<stem>.png      the few-shot backgrounds (1 - M_f) * I, for BCM at generation time
    checkpoints/step-NNNNNN/    adapters.safetensors + optimizer.pt + state.pt (last `keep_checkpoints`)
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from PIL import Image

from dualanodiff.config import Config
from dualanodiff.data import Pair, few_shot_split, foreground_mask, load_image, load_mask, open_category
from dualanodiff.devices import DTYPES, cast_frozen, resolve_device
from dualanodiff.errors import UserError
from dualanodiff.io import atomic_write_bytes, atomic_write_text, save_png
from dualanodiff.model.base import load_base_model
from dualanodiff.model.dual import DualAnoDiffModel

ADAPTERS = "adapters.safetensors"
LOSS_COLUMNS = ("step", "loss_global", "loss_anomaly")


@dataclass
class TrainingSet:
    """VAE latent distributions of the few-shot targets: (examples, 3 targets, C, h, w) mean and std."""

    mean: torch.Tensor
    std: torch.Tensor
    stems: list[str]
    backgrounds: list[np.ndarray]  # (1 - M_f) * I at training size, uint8, one per pair

    def sample(self, indices: torch.Tensor, generator: torch.Generator, scaling: float) -> torch.Tensor:
        noise = torch.randn(self.mean[indices].shape, generator=generator)
        return (self.mean[indices] + self.std[indices] * noise) * scaling


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127


def to_model_range(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """3xHxW float in [-1, 1] -> HxWx3 uint8."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def training_targets(image: np.ndarray, mask: np.ndarray, foreground: np.ndarray) -> torch.Tensor:
    """(3, 3, H, W) in [-1, 1]: image I, anomaly part I*M, background (1-M_f)*I."""
    pixels = to_model_range(image)
    part = pixels * torch.from_numpy(mask).float()
    background = pixels * (1 - torch.from_numpy(foreground).float())
    return torch.stack([pixels, part, background])


def flip_variants(targets: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    """The official augmentation: random horizontal and vertical flips, enumerated once."""
    if not flips:
        return [targets]
    return [targets, targets.flip(-1), targets.flip(-2), targets.flip(-1, -2)]


@torch.no_grad()
def encode_training_set(
    model: DualAnoDiffModel, pairs: list[Pair], kind: str, resolution: int, flips: bool, u2net: str = ""
) -> TrainingSet:
    variants, backgrounds = [], []
    for pair in pairs:
        image = load_image(pair.image)
        mask = load_mask(pair.mask, image.shape[:2])
        fg = foreground_mask(image, kind, u2net or None)
        image, mask, fg = resize_image(image, resolution), resize_mask(mask, resolution), resize_mask(fg, resolution)
        targets = training_targets(image, mask, fg)
        backgrounds.append(to_uint8(targets[2]))
        variants += flip_variants(targets, flips)
    means, stds = [], []
    for targets in variants:
        dist = model.vae.encode(targets.to(model.vae.device, model.vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return TrainingSet(torch.stack(means), torch.stack(stds), [p.stem for p in pairs], backgrounds)


def prepare_run(cfg: Config, out: Path, resume: bool, force: bool) -> Config:
    """Check the run folder: a fresh one, an existing run to resume, or one to replace with --force."""
    out = Path(out)
    existing = out.exists() and any(out.iterdir())
    if resume:
        if not (out / "config.yaml").is_file():
            raise UserError(f"{out}: no run to resume here (config.yaml missing); drop --resume to start one")
        saved = Config.from_yaml(out / "config.yaml")
        saved.train.steps = cfg.train.steps
        return saved
    if existing and not force:
        raise UserError(f"{out}: a run already exists here; pass --resume to continue it or --force to replace it")
    if existing:
        shutil.rmtree(out)
    return cfg


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def read_loss_rows(path: Path, up_to: int) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to]


def write_loss(out: Path, rows: list[dict]) -> None:
    """loss.csv (atomic) and loss.png: the per-step losses of both branches."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, LOSS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "loss.csv", buffer.getvalue())
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for key, label in (("loss_global", "global branch"), ("loss_anomaly", "anomaly branch")):
        values = np.array([float(r[key]) for r in rows])
        window = max(1, len(values) // 20)
        ax.plot(steps, values, alpha=0.25)
        ax.plot(steps, np.convolve(values, np.ones(window) / window, mode="same"), label=f"{label} (moving mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE on noise")
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    atomic_write_bytes(out / "loss.png", image.getvalue())


def save_checkpoint(out: Path, model: DualAnoDiffModel, optimizer, generators: list[torch.Tensor], step: int, keep: int) -> Path:
    """Write checkpoints/step-N atomically (temporary folder, then rename) and prune old ones."""
    folder = out / "checkpoints" / f"step-{step:06d}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_trainable(tmp / ADAPTERS)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "generators": generators}, tmp / "state.pt")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    for old in sorted((out / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def _on_main_process(accelerator, work: Callable[[], Config]) -> Config:
    """Run `work` (which may delete or read the run folder) on the main process only; every process gets
    its result or its `UserError`."""
    from accelerate.utils import broadcast_object_list

    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome = [work()]
        except UserError as exc:
            outcome = [exc]
    broadcast_object_list(outcome)
    if isinstance(outcome[0], UserError):
        raise outcome[0]
    return outcome[0]


def make_accelerator(mixed_precision: str, device: str):
    """A fresh Accelerator for each run: accelerate keeps process-wide state, yet one process may train
    several runs with different precisions (demo ablations, tests). A launched process group is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    resolved = resolve_device(device)
    if resolved.index is not None:
        raise UserError(f"--device {device}: training takes auto, cpu or cuda; pick GPUs with CUDA_VISIBLE_DEVICES")
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    return Accelerator(mixed_precision=mixed_precision, cpu=resolved.type == "cpu")  # multi-process CPU needs cpu=True


def train(
    cfg: Config,
    out: Path,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Train on the few-shot split of `cfg.data.defect`; returns the run folder. See the module docstring."""
    out = Path(out)
    saved = out / "config.yaml"
    settings = Config.from_yaml(saved).train if resume and saved.is_file() else cfg.train  # a resumed run keeps its own
    accelerator = make_accelerator(settings.mixed_precision, settings.device)
    main = accelerator.is_main_process  # under `accelerate launch` only the main process writes and logs
    log = log if main else (lambda message: None)
    cfg = _on_main_process(accelerator, lambda: prepare_run(cfg, out, resume, force))
    if cfg.train.steps < 1:
        raise UserError(f"--steps {cfg.train.steps}: must be at least 1")
    category = open_category(cfg.data.data)
    if cfg.data.defect not in category.defects:
        raise UserError(
            f"--defect {cfg.data.defect!r}: not a defect type of {category.root}; choose one of {sorted(category.defects)}"
        )
    train_pairs, test_pairs = few_shot_split(category.defects[cfg.data.defect], cfg.data.split_rounding)
    kind = category.kind if cfg.data.foreground == "auto" else cfg.data.foreground
    cfg.split = {"train": [p.stem for p in train_pairs], "test": [p.stem for p in test_pairs]}

    torch.manual_seed(cfg.train.seed)
    base = load_base_model(cfg.model.base_model)
    cfg.data.resolution = cfg.data.resolution or base.resolution
    if cfg.data.resolution % (8 * base.vae_scale_factor):
        raise UserError(f"data.resolution {cfg.data.resolution}: must be a multiple of {8 * base.vae_scale_factor}")
    model = DualAnoDiffModel(base, cfg.model)
    if cfg.train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.to(accelerator.device)
    if cfg.train.mixed_precision != "no":
        cast_frozen(model, DTYPES[cfg.train.mixed_precision])
    data = encode_training_set(model, train_pairs, kind, cfg.data.resolution, cfg.data.flips, cfg.data.u2net_weights)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rank, processes = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(cfg.train.seed + rank)  # each process draws its own batches
    step, rows = 0, []
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        model.load_trainable(checkpoint / ADAPTERS)
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu"))
        state = torch.load(checkpoint / "state.pt", map_location="cpu")
        step = state["step"]
        if len(state["generators"]) != processes:
            raise UserError(
                f"{checkpoint}: saved by {len(state['generators'])} process(es), resumed with {processes}; "
                "resume with the same number of processes"
            )
        generator.set_state(state["generators"][rank])
        rows = read_loss_rows(out / "loss.csv", step)
        log(f"resuming {out} from step {step}")
    if step >= cfg.train.steps:
        raise UserError(f"{out}: already trained for {step} steps; pass a larger --steps to continue")

    if main:
        cfg.to_yaml(out / "config.yaml")
        for stem, background in zip(data.stems, data.backgrounds):
            save_png(out / "backgrounds" / f"{stem}.png", background)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = base.scheduler
    scaling = base.vae.config.scaling_factor
    bcm = cfg.model.bcm
    last_good = checkpoint

    def checkpoint_now() -> Path:
        generators = gather_object([generator.get_state()])  # every process's RNG, for an exact resume
        if main:
            write_loss(out, rows)
            save_checkpoint(out, model, optimizer, generators, step, cfg.train.keep_checkpoints)
        accelerator.wait_for_everyone()
        return out / "checkpoints" / f"step-{step:06d}"

    model.train()
    try:
        while step < cfg.train.steps:
            indices = torch.randint(len(data.mean), (cfg.train.batch_size,), generator=generator)
            latents = data.sample(indices, generator, scaling)  # (B, 3, C, h, w)
            timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(indices),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            noisy = _add_noise(scheduler, latents, noise, timesteps)
            target = noise if scheduler.config.prediction_type == "epsilon" else _velocity(scheduler, latents, noise, timesteps)
            device = accelerator.device
            with accelerator.autocast():
                eps_global, eps_anomaly = ddp_model(
                    noisy[:, 0].to(device), noisy[:, 1].to(device), timesteps.to(device),
                    noisy[:, 2].to(device) if bcm else None,
                )
                loss_global = F.mse_loss(eps_global.float(), target[:, 0].to(device))
                loss_anomaly = F.mse_loss(eps_anomaly.float(), target[:, 1].to(device))
                loss = loss_global + loss_anomaly
            mean_losses = accelerator.reduce(torch.stack([loss_global, loss_anomaly]).detach(), "mean")
            if not torch.isfinite(mean_losses).all():  # decided on the mean, so all processes stop together
                if main:
                    write_loss(out, rows)
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise UserError(
                    f"{out}: loss became {mean_losses.sum().item()} at step {step + 1}; stopped, {where}; "
                    "lower train.lr or use fp32"
                )
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses = dict(zip(LOSS_COLUMNS[1:], mean_losses.tolist()))
            rows.append({"step": step, **{k: f"{v:.6f}" for k, v in losses.items()}})
            if step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                last_good = checkpoint_now()
            if progress is not None and main:
                progress(step, cfg.train.steps, losses)
    except KeyboardInterrupt:
        if step > 0:
            checkpoint_now()
            log(f"interrupted at step {step}; checkpoint saved, continue with --resume")
        raise
    checkpoint_now()
    if main:
        model.save_trainable(out / ADAPTERS)
    accelerator.wait_for_everyone()
    return out


def _add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion of all targets of a pair at the pair's timestep."""
    flat_t = timesteps.repeat_interleave(latents.shape[1])
    return scheduler.add_noise(latents.flatten(0, 1), noise.flatten(0, 1), flat_t).view_as(latents)


def _velocity(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    flat_t = timesteps.repeat_interleave(latents.shape[1])
    return scheduler.get_velocity(latents.flatten(0, 1), noise.flatten(0, 1), flat_t).view_as(latents)
