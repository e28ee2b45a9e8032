"""What every stage shares (the output folder, settings, device, random streams, checkpoint), how a run
starts or resumes, and the models it starts from: new, or warm-started from a base."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from dualanodiff.devices import resolve_device
from dualanodiff.errors import UserError
from dualanodiff.io import atomic_write_bytes
from dualanodiff.model.base import build_base, load_base_model
from dualanodiff.pretrain import stage
from dualanodiff.pretrain.data import Data, render_corpus, tokenizer_words
from dualanodiff.pretrain.options import PretrainOptions
from dualanodiff.synthetic import FAMILIES, HELD_OUT

CHECKPOINT = "checkpoint/state.pt"


@dataclass
class Models:
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters()) + list(self.text_encoder.parameters())


@dataclass
class _Run:
    """What every stage shares: where to write, settings, device, the random stream, the clock, the log."""

    out: Path
    options: PretrainOptions
    settings: dict
    device: torch.device
    mixed: bool  # bf16 autocast
    generator: torch.Generator | None  # on the device, made once the data is rendered
    host_generator: torch.Generator  # on the CPU: draws the host needs (crop offsets) without a device sync
    log: Callable[[str], None]
    started: float
    deadline: float | None
    state: dict | None  # the checkpoint resumed from
    history: dict = field(default_factory=lambda: {"vae_loss": [], "unet_loss": [], "decoder_loss": [], "seconds": {}})
    steps: dict = field(default_factory=lambda: {"vae": 0, "unet": 0, "decoder": 0})
    plans: dict = field(default_factory=dict)  # stage -> planned steps under a time budget
    stopped: dict = field(default_factory=dict)  # stage -> why it stopped before its step count
    stop: Callable[[], int] = lambda: 0  # a SIGINT/SIGTERM received (`deferred_signals`): stop at the next step

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.mixed else nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def checkpoint(self, **parts) -> None:
        state = {
            "settings": self.settings, "generator": self.generator.get_state(), "generator_device": self.device.type,
            "host_generator": self.host_generator.get_state(),
            "history": self.history, "vae_step": self.steps["vae"], "unet_step": self.steps["unet"],
            "decoder_step": self.steps["decoder"],
            "plans": self.plans, **parts,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.out / CHECKPOINT, buffer.getvalue())


def _prepare_out(out: Path, resume: bool, force: bool) -> dict | None:
    """Check what may be written to `out`; return the checkpoint to resume from, if any."""
    checkpoint = out / CHECKPOINT
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; pick another folder")
    if resume and checkpoint.is_file():
        return torch.load(checkpoint, weights_only=True, map_location="cpu")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / "training.json").is_file() or checkpoint.parent.is_dir()
        if resume:
            raise UserError(f"--out {out}: no checkpoint to resume ({checkpoint} missing); drop --resume or pass --force")
        if not force:
            raise UserError(f"--out {out}: folder is not empty; pick another folder, --resume a run or --force to restart")
        if not ours:
            raise UserError(f"--out {out}: --force only replaces a pretrain-base folder, and this is not one; pick another")
        shutil.rmtree(out)
    return None


def _start_run(out, resolution, seed, options, resume, force, device, time_budget, log) -> _Run:
    """Validate the request, claim `out`, pick the device and restore the checkpoint's counters."""
    started = stage._now()
    if resolution % 4 or resolution < 16:
        raise UserError(f"--resolution {resolution}: must be a multiple of 4, at least 16; use 128")
    if options.storage not in ("fp16", "fp32"):
        raise UserError(f"storage {options.storage!r}: choose fp16 or fp32")
    unknown = [name for name in options.families if name not in FAMILIES]
    if unknown:
        raise UserError(f"families {unknown}: unknown; choose from {sorted(FAMILIES)}")
    if time_budget is not None and time_budget <= 0:
        raise UserError(f"--time-budget {time_budget}: must be a positive number of seconds")
    target = resolve_device(device)
    settings = {"resolution": resolution, "seed": seed, "options": dataclasses.asdict(options)}
    state = _prepare_out(out, resume, force)
    if state is not None and json.loads(json.dumps(state["settings"])) != json.loads(json.dumps(settings)):
        raise UserError(f"--out {out}: its checkpoint was made with other settings ({state['settings']}); "
                        "repeat those settings (the same --preset) or start another folder")
    if state is not None and state.get("generator_device", "cpu") != target.type:
        raise UserError(f"--out {out}: this run was checkpointed on {state['generator_device']}; resume it there "
                        f"(--device {state['generator_device']})")
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, options, settings, target, target.type == "cuda", None, torch.Generator().manual_seed(seed + 1),
               log, started, None if time_budget is None else started + time_budget, state)
    if state is not None:
        run.host_generator.set_state(state["host_generator"])
        run.history, run.plans = state["history"], state.get("plans", {})
        run.steps = {"vae": state["vae_step"], "unet": state["unet_step"], "decoder": state["decoder_step"]}
        log(f"resuming at VAE step {run.steps['vae']}, UNet step {run.steps['unet']}"
            + (f", decoder step {run.steps['decoder']}" if run.steps["decoder"] else ""))
    return run


def _build_models(run: _Run, resolution: int, seed: int) -> Models:
    """The device's random stream (restored on resume) and the models on the device. It comes after the
    data, whose worker processes are forked: a process that has started CUDA should not fork."""
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    run.generator = torch.Generator(device=run.device).manual_seed(seed)
    if run.state is not None:
        run.generator.set_state(run.state["generator"])
    arch = run.options.architecture
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, unet, vae, text_encoder = build_base(arch, resolution, tokenizer_words(arch, run.options.families))
    if run.options.init_from:
        tokenizer, unet, vae, text_encoder = warm_start(unet, run.options.init_from)
    models = Models(tokenizer, unet.to(run.device), vae.to(run.device), text_encoder.to(run.device))
    if run.state is not None:
        models.vae.load_state_dict(run.state["vae"])
    return models


def warm_start(unet: UNet2DConditionModel, spec: str) -> tuple[CLIPTokenizer, UNet2DConditionModel, AutoencoderKL,
                                                                CLIPTextModel]:
    """`unet` seeded with the base `spec`'s UNet weights, and that base's tokenizer, VAE and text encoder.

    Every weight of the base must fit the new UNet by name and shape; the new UNet's own extra weights
    (attention blocks the base lacks) keep their initialisation, with each block's output projection zeroed
    so the block adds nothing at first and the warm-started UNet computes what the base did."""
    base = load_base_model(spec)
    try:
        missing, unexpected = unet.load_state_dict(base.unet.state_dict(), strict=False)
    except RuntimeError as exc:
        raise UserError(f"init_from {spec}: its UNet does not fit this architecture ({str(exc).splitlines()[1].strip()}); "
                        "use the architecture it was trained with plus attention levels") from None
    if unexpected:
        raise UserError(f"init_from {spec}: weights {unexpected[:3]} have no place in this architecture")
    new_blocks = {key.split(".proj_out")[0] for key in missing if ".proj_out." in key}
    if any(not any(key.startswith(block) for block in new_blocks) for key in missing):
        raise UserError(f"init_from {spec}: this architecture differs beyond added attention blocks")
    with torch.no_grad():
        for block in new_blocks:
            projection = unet.get_submodule(f"{block}.proj_out")
            projection.weight.zero_()
            projection.bias.zero_()
    base.unet.to("meta")  # its weights now live in `unet`
    return base.tokenizer, unet, base.vae, base.text_encoder.requires_grad_(True).train()


def _render_data(run: _Run, resolution: int, seed: int, workers: int) -> Data:
    tick = time.perf_counter()
    opts = run.options
    data = Data(
        render_corpus(seed, 0, opts.train_images, resolution, opts.families, workers),
        render_corpus(seed, 1, opts.heldout_images, resolution, opts.families, workers),
        render_corpus(seed, 2, opts.heldout_images, resolution, (HELD_OUT,), workers),
    )
    run.history["seconds"]["data"] = time.perf_counter() - tick
    run.log(f"rendered {len(data.train)} training and {len(data.heldout)} + {len(data.unseen)} held-out images "
            f"in {run.history['seconds']['data']:.0f} s")
    return data
