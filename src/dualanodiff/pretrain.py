"""Pretrain the project's own small Stable-Diffusion-shaped base model (``dualanodiff pretrain-base``).

The package downloads no weights, yet DualAnoDiff tunes LoRA branches on top of a
*frozen pretrained* base. So the project trains its own, with SD's recipe at a small size, in stages:

1. **data**: the pretraining world of `dualanodiff.synthetic` (every family but the held-out one): normal
   and defective images, defect-only part images I*M and backgrounds (1 - M_f) * I, both on mid-grey as
   DualAnoDiff's anomaly branch and BCM see them, captioned "a nut", "a nut with hole", "hole",
   "a nut background"; a held-out stream of the same families and one of the held-out category;
2. **VAE**: an ``AutoencoderKL`` (down-factor 4: 128 px -> 32x32x4 latents) for reconstruction (L1 +
   image-gradient L1 + colour L1 + a small KL), then its latent ``scaling_factor`` = 1 / std of the
   training latents, as SD does;
3. **UNet**: a ``UNet2DConditionModel`` and a ``CLIPTextModel`` together, from scratch, with SD's epsilon
   objective (min-SNR weighted) on the frozen VAE's latents, 10 % empty captions for classifier-free
   guidance, and an exponential moving average of their weights, which is what gets saved;
4. **measure**: held-out denoising MSE by timestep bucket (seen families and the unseen category) and VAE
   PSNR on all images, per kind, on flat grey and on the defect and grey regions of part images;
5. **export**: a diffusers directory (unet, vae, text_encoder, tokenizer, scheduler, model_index.json;
   fp16 weights in files of at most ``shard_mib`` MiB) that `load_base_model(DIR)` and
   ``StableDiffusionPipeline.from_pretrained(DIR)`` load, with ``training.json`` (settings, data, steps,
   device, wall time, losses, held-out figures), ``samples.png`` (a row per family) and
   ``reconstructions.png`` beside it.

Compute: on a GPU when there is one (bf16 autocast, fused AdamW), else on the CPU (fp32). ``PRESETS`` name
the settings for each (``gpu``, ``cpu``, ``v1``: the earlier shipped architecture, ``tiny``: tests).
With a ``time_budget`` each training stage stops by the wall clock: after a few timed steps it plans how
many steps fit (the VAE's learning-rate schedule follows that plan) and it never starts a step past its
deadline.

Everything else follows from (resolution, seed, options): a seeded ``torch.Generator`` on the training
device drives every random draw, its state is checkpointed with the models and optimisers, so a resumed
run continues exactly where it stopped (on the same kind of device). Example::

    record = pretrain_base(Path("base"), steps_vae=2400, steps_unet=5500, options=PRESETS["cpu"].options)
    print(record["heldout"]["vae_psnr_db"])
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import multiprocessing
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTokenizer

from dualanodiff.decoder import encode_latents, reconstruction_loss
from dualanodiff.devices import resolve_device
from dualanodiff.errors import UserError
from dualanodiff.evaluation.metrics import psnr
from dualanodiff.images import as_batch, batch_to_model_range, to_uint8
from dualanodiff.io import atomic_write_bytes, atomic_write_text, save_png
from dualanodiff.model.base import (
    ARCHITECTURES,
    IDENTIFIER_WORDS,
    VOCAB_WORDS,
    Architecture,
    base_folder,
    build_base,
    load_base_model,
    sd_scheduler,
)
from dualanodiff.progress import Bars, no_bars
from dualanodiff.signals import Stopped, deferred_signals
from dualanodiff.synthetic import (
    FAMILIES,
    HELD_OUT,
    PRETRAIN_FAMILIES,
    WORLD_KINDS,
    WORLD_MIX,
    hue_rotation,
    thing_name,
    world_item,
    world_words,
)

__all__ = ["Architecture", "PretrainOptions", "Preset", "PRESETS", "pretrain_base", "measure_base", "profile_unet_step"]

CHECKPOINT = "checkpoint/state.pt"
BASE_FILES = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")
TIMESTEP_BUCKETS = ((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000))
_now = time.monotonic  # the clock of time budgets (tests replace it)


@dataclass(frozen=True)
class PretrainOptions:
    """Everything besides resolution, seed and step counts that a run is reproducible from."""

    architecture: Architecture = ARCHITECTURES["v2"]
    families: tuple[str, ...] = PRETRAIN_FAMILIES  # the held-out category is not among them
    train_images: int = 4000
    heldout_images: int = 64
    vae_batch: int = 8
    vae_crop: int = 64  # the VAE is fully convolutional: it trains on crops, 4x cheaper at 128 px
    vae_lr: float = 8e-4
    kl_weight: float = 1e-5  # per latent element, against a per-pixel L1
    unet_batch: int = 12
    unet_lr: float = 3e-4
    warmup: int = 200
    empty_caption: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 200  # 0: only at the end of each stage
    log_every: int = 50
    sample_steps: int = 50  # DDIM steps for samples.png
    samples_per_prompt: int = 2
    guidance: float = 3.0
    vae_share: float = 0.2  # under a time budget: the VAE stage's share of the training time
    storage: str = "fp16"  # weights as saved: fp16 (half the size) or fp32
    shard_mib: int = 15  # largest weight file written
    # warm start: a base ('tiny' or a directory) whose VAE, tokenizer and text encoder are kept and whose UNet
    # weights seed the architecture's UNet (new attention blocks start as the identity); no VAE stage then
    init_from: str = ""
    # decoder refinement (after the VAE stage; the encoder, and so the latents a UNet learns or learned, stay as
    # they are): half of each batch part images, whose defect pixels weigh 1 + defect_weight in the L1 term
    decoder_lr: float = 2e-4
    defect_weight: float = 9.0
    # share of the decoder's rows recoloured at random (hue turned about the grey axis, saturation raised up to
    # 2x; grey stays grey): the world's objects are brown, metal or muted (its colour jitter turns the hue of
    # 15 % of its images, saturation at most 1.5x), and the decoder draws the held-out bottle's green as
    # dark grey although its latents tell the two apart
    decoder_recolour: float = 0.0


@dataclass(frozen=True)
class Preset:
    """Named settings: options and the default step counts (maxima under a time budget)."""

    options: PretrainOptions
    steps_vae: int
    steps_unet: int
    about: str
    steps_decoder: int = 0


_GPU = PretrainOptions(
    train_images=24000, heldout_images=256, vae_batch=32, vae_lr=1e-3, unet_batch=128, unet_lr=4e-4, warmup=500,
    ema_decay=0.9995, checkpoint_every=0, log_every=500, samples_per_prompt=4,
)
# the shipped base trained on: its architecture, VAE and tokenizer, stored in fp32 as it is
_GPU_V1 = dataclasses.replace(_GPU, architecture=ARCHITECTURES["v1"], init_from="tiny", train_images=32000,
                              unet_lr=2e-4, warmup=200, storage="fp32")
PRESETS: dict[str, Preset] = {
    "gpu": Preset(
        _GPU, steps_vae=8000, steps_unet=40000,
        about="the v2 architecture at batch 128 on one GPU (bf16); with --time-budget the steps are maxima",
    ),
    "gpu-small": Preset(
        dataclasses.replace(_GPU, architecture=ARCHITECTURES["v2-small"]), steps_vae=8000, steps_unet=40000,
        about="the v2-small architecture (v2-cpu's UNet, v2's VAE) at batch 128 on one GPU: a base whose few-shot "
              "training stays CPU-cheap",
    ),
    "gpu-v1": Preset(
        _GPU_V1,
        steps_vae=0, steps_unet=40000,
        about="the shipped base trained on from its weights on the wider world at batch 128 on one GPU (bf16): "
              "its architecture, so the demo's CPU cost, and its VAE (refined decoder) stay as they are",
    ),
    # the v1 UNet's step at batch 128 on an H100 is launch-bound, so 8x the batch should cost little more time
    # per step (not measured; experiments/BASE_MODELS.md#candidate-bases)
    "gpu-v1-large": Preset(
        dataclasses.replace(_GPU_V1, train_images=24000, unet_batch=1024, unet_lr=4e-4, warmup=100),
        steps_vae=0, steps_unet=40000,
        about="gpu-v1 at batch 1024 (give --init-from a gpu-v1 run to train that on)",
    ),
    # gpu-v1 without a GPU: batch 128 costs 6.3 s per step on 2 cores, batch 32 1.85 s (the same samples per
    # second), so the smaller batch takes 4x the steps in the same time; fewer renders, as fewer are seen
    "cpu-v1": Preset(
        dataclasses.replace(_GPU_V1, train_images=12000, heldout_images=128, unet_batch=32, checkpoint_every=200,
                            log_every=50, samples_per_prompt=1),
        steps_vae=0, steps_unet=40000,
        about="gpu-v1 on the CPU at batch 32 (2 cores: 1.85 s per step; give --time-budget, resumable)",
    ),
    "cpu": Preset(PretrainOptions(architecture=ARCHITECTURES["v2-cpu"], train_images=6000), steps_vae=2400,
                  steps_unet=8000, about="the v2-cpu architecture (attention at every level, v1's width) at batch 12 "
                  "on the CPU: about 2.5 hours on 2 cores; run it in the background, or give --time-budget"),
    "v1": Preset(PretrainOptions(architecture=ARCHITECTURES["v1"], storage="fp32"), steps_vae=2400, steps_unet=5500,
                 about="the earlier shipped base's architecture and recipe (no attention at full latent resolution)"),
    "warm": Preset(
        PretrainOptions(architecture=ARCHITECTURES["v1-attn"], init_from="tiny", train_images=6000, unet_lr=1e-4,
                        warmup=100),
        steps_vae=0, steps_unet=8000,
        about="the shipped base plus attention at the full latent level, trained on from its weights on the wider "
              "world (CPU: hours at 0.6 s per step on 2 free cores; give --time-budget)",
    ),
    "decoder": Preset(
        PretrainOptions(architecture=ARCHITECTURES["v1"], init_from="tiny", train_images=3000, storage="fp32"),
        steps_vae=0, steps_unet=0, steps_decoder=2200,
        about="the VAE decoder of a base (the shipped one, or --init-from DIR) refined on the wider world, its "
              "defect pixels weighted; encoder, latents, UNet and text encoder unchanged (CPU: about 15 minutes)",
    ),
    "decoder-colour": Preset(
        PretrainOptions(architecture=ARCHITECTURES["v1"], init_from="tiny", train_images=3000, storage="fp32",
                        decoder_recolour=0.5),
        steps_vae=0, steps_unet=0, steps_decoder=2200,
        about="the decoder preset with half of its rows recoloured at random (saturated hues the world lacks, such "
              "as the held-out bottle's green)",
    ),
    "tiny": Preset(
        PretrainOptions(
            architecture=ARCHITECTURES["test"], train_images=16, heldout_images=8, vae_batch=4, unet_batch=4,
            warmup=2, checkpoint_every=2, log_every=2, sample_steps=2, samples_per_prompt=1,
        ),
        steps_vae=3, steps_unet=4, about="test size: seconds on a CPU (use --resolution 32)",
    ),
}


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Corpus:
    """Rendered images (N x 3 x H x W uint8), their captions and kinds (see `synthetic.WORLD_KINDS`)."""

    images: torch.Tensor
    captions: list[str]
    kinds: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _render_one(job: tuple) -> tuple[np.ndarray, str, str]:
    item = world_item(*job)
    return item.image, item.caption, item.kind


def render_corpus(
    seed: int, stream: int, count: int, resolution: int, families: tuple[str, ...] = PRETRAIN_FAMILIES,
    workers: int = 1,
) -> Corpus:
    """`count` world images of `stream` (0: training, 1: held out, 2: the held-out category), in parallel
    over `workers` processes; every image is fixed by its coordinates, so the result is the same for any
    number of workers."""
    jobs = [(seed, stream, i, resolution, tuple(families)) for i in range(count)]
    if workers > 1 and count > 64:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            items = pool.map(_render_one, jobs, chunksize=max(1, count // (workers * 8)))
    else:
        items = [_render_one(job) for job in jobs]
    images = as_batch([image for image, _, _ in items])
    return Corpus(images, [caption for _, caption, _ in items], [kind for _, _, kind in items])


def tokenizer_words(arch: Architecture, families: tuple[str, ...]) -> tuple[str, ...]:
    """The words the tokenizer keeps whole: a fixed list (v1), or the pretraining captions' words and the
    paper's identifiers, category names left to be spelled in characters (v2)."""
    if arch.vocabulary == "fixed":
        return VOCAB_WORDS
    return tuple(world_words(families)) + IDENTIFIER_WORDS


# ------------------------------------------------------------------------------------------------ VAE


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, generator: torch.Generator,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """`reconstruction_loss` of a posterior sample's decoding + KL per latent element, on [-1, 1] images."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator)
    kl = posterior.kl().float().mean() / latents[0].numel()
    return reconstruction_loss(vae.decode(latents).sample, images, weight) + kl_weight * kl


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Posterior-mean reconstructions of uint8 images, in [-1, 1]."""
    device = vae.device
    return torch.cat([
        vae.decode(vae.encode(batch_to_model_range(chunk.to(device))).latent_dist.mode()).sample.float()
        for chunk in images.split(batch)
    ])


def latent_scaling_factor(means: torch.Tensor, stds: torch.Tensor) -> float:
    """1 / std of sampled latents (SD's rule), exactly: var(sample) = var(mean) + E[std^2]."""
    return float(1.0 / torch.sqrt(means.var() + stds.pow(2).mean()))


# ------------------------------------------------------------------------------------------------ UNet


def diffusion_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    snr_gamma: float | None,
    per_row: bool = False,
) -> torch.Tensor:
    """SD's epsilon-prediction MSE; with `snr_gamma`, each row weighted by min(SNR, gamma) / SNR (min-SNR).
    With `per_row` the unweighted MSE of each row."""
    alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    prediction = unet(noisy, timesteps, text_encoder(input_ids)[0]).sample.float()
    rows = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    if per_row:
        return rows
    if snr_gamma is None:
        return rows.mean()
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return (rows * snr.clamp(max=snr_gamma) / snr).mean()


def profile_unet_step(options: PretrainOptions, resolution: int, device: str | torch.device, steps: int = 6) -> str:
    """Where a UNet training step's time goes (torch.profiler's op table, slowest first), on random latents
    at the options' batch: GPU steps ran far slower than these model sizes need, and a table says why."""
    device = torch.device(device)
    mixed = device.type == "cuda"
    tokenizer, unet, _, text_encoder = build_base(options.architecture, resolution)
    unet.to(device).train()
    text_encoder.to(device).train()
    trainable = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=mixed or None)
    size, batch = resolution // 4, options.unet_batch
    ids = tokenizer(["a nut with hole"] * batch, padding="max_length", return_tensors="pt").input_ids.to(device)
    alphas_cumprod = sd_scheduler().alphas_cumprod.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mixed else nullcontext()

    def step() -> None:
        latents, noise = torch.randn(2, batch, 4, size, size, device=device)
        timesteps = torch.randint(len(alphas_cumprod), (batch,), device=device)
        with autocast:
            loss = diffusion_loss(unet, text_encoder, latents, ids, noise, timesteps, alphas_cumprod, options.snr_gamma)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if mixed else [])
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        if mixed:
            torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    table = profiler.key_averages().table(sort_by=f"self_{'cuda' if mixed else 'cpu'}_time_total", row_limit=20)
    return f"UNet step at batch {batch}, {resolution} px on {device.type}: {1000 * seconds:.1f} ms (profiled)\n{table}"


@torch.no_grad()
def sample_images(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    prompts: list[str],
    seed: int,
    steps: int,
    guidance: float,
    batch: int = 64,
) -> np.ndarray:
    """DDIM samples with classifier-free guidance (empty negative prompt); N x H x W x 3 uint8. The initial
    noise is drawn on the CPU, so a seed gives the same start on any device."""
    device = unet.device
    scheduler = DDIMScheduler.from_config(sd_scheduler().config)
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), unet.config.in_channels, size, size, generator=generator)
    images = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        ids = tokenizer(chunk + [""] * len(chunk), padding="max_length", truncation=True, return_tensors="pt")
        context = text_encoder(ids.input_ids.to(device))[0]
        latents = noise[start : start + len(chunk)].to(device)
        for t in scheduler.timesteps:
            cond, uncond = unet(torch.cat([latents, latents]), t, context).sample.float().chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        images.append(to_uint8(vae.decode(latents / vae.config.scaling_factor).sample))
    return np.concatenate(images)


def image_grid(rows: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """One labelled row per (label, N x H x W x 3 images): the label on a strip above the images."""
    height, width = rows[0][1].shape[1:3]
    columns = max(len(images) for _, images in rows)
    strip = 12
    canvas = Image.new("RGB", (columns * width, len(rows) * (height + strip)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        top = r * (height + strip)
        draw.text((2, top), label or "(empty prompt)", fill="black")
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image), (c * width, top + strip))
    return np.asarray(canvas)


def sample_prompts(families: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """The sample sheet's rows: per family its normal and first-defect prompt, the held-out category's,
    three part prompts and the empty prompt."""
    rows = []
    for name in list(families) + ([HELD_OUT] if HELD_OUT not in families else []):
        thing, defect = thing_name(name), next(iter(FAMILIES[name].defects)).replace("_", " ")
        label = f"{name}{' (held out)' if name not in families else ''}"
        rows.append((label, [f"a {thing}", f"a {thing} with {defect}"]))
    rows.append(("part images", ["hole", "scratch", "crack"]))
    rows.append(("empty prompt", [""]))
    return rows


# ------------------------------------------------------------------------------------------------ the run


def _cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then a cosine from 1 down to 5 % at `total`."""
    return min(1.0, (step + 1) / max(warmup, 1)) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Models:
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters()) + list(self.text_encoder.parameters())


@dataclass
class Data:
    train: Corpus
    heldout: Corpus  # same families, other images
    unseen: Corpus  # the held-out category


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
    started = _now()
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


class _Stage:
    """One training stage's bookkeeping, so that its loop shows only the step itself: the step count, the
    wall clock (time the first steps, plan how many fit before the deadline, stop there), the loss window
    and its log line, the progress bar and when to checkpoint.

        stage = _Stage(run, "unet", "UNet", deadline, max_steps, bars)
        while stage.running():
            loss = ...one step...
            if stage.record(loss):
                save()
        if stage.finish():  # stopped early: save where it stopped
            save()
    """

    CALIBRATE = (5, 25)  # time steps 5..25 (after warm-up: kernel selection, allocator growth)

    def __init__(self, run: _Run, key: str, label: str, deadline: float | None, max_steps: int, bars: Bars):
        self.run, self.key, self.label, self.deadline, self.max_steps = run, key, label, deadline, max_steps
        self.bar = bars(label, self.total())
        if self.step:  # resumed: the bar starts where the checkpoint left off
            self.bar(min(self.step, max_steps), self.total())
        self.window: list[torch.Tensor] = []
        self.mark: tuple[int, float] | None = None
        self.earlier = run.history["seconds"].setdefault(key, 0.0)  # seconds before a resume
        self.started = time.perf_counter()

    @property
    def step(self) -> int:
        return self.run.steps[self.key]

    def total(self) -> int:
        """The stage's step count for schedules: the plan under a time budget, else the maximum."""
        if self.deadline is None:
            return self.max_steps
        return min(self.run.plans.get(self.key, self.max_steps), self.max_steps)

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def running(self) -> bool:
        """Another step? Not past the step count, nor past the deadline (every stage takes at least one step,
        so that it has something to save)."""
        if self.step >= self.total():
            return False
        if self.run.stop():  # the caller saves where it stopped, then `pretrain_base` raises `Stopped`
            self.run.stopped[self.key] = "signal"
            return False
        if self.deadline is not None and self.step > 0 and _now() >= self.deadline:
            self.run.stopped[self.key] = f"time budget, after {self.step} of {self.total()} planned steps"
            return False
        return True

    def record(self, loss: torch.Tensor) -> bool:
        """Count the step just taken, plan, log; True when a checkpoint is due."""
        step = self.run.steps[self.key] = self.step + 1
        self.window.append(loss.detach())
        self._plan(step)
        self.bar(step, self.total())
        opts = self.run.options
        if step % opts.log_every == 0 or step == self.total():
            mean = _mean_loss(self.window, self.label, step)
            self.run.history[f"{self.key}_loss"].append([step, mean])
            self.run.log(f"{self.label} step {step}/{self.total()} loss {mean:.4f} ({self.seconds() / step:.3f} s/step)")
            self.window = []
        due = bool(opts.checkpoint_every and step % opts.checkpoint_every == 0) or step == self.total()
        if due:
            self.run.history["seconds"][self.key] = self.seconds()
        return due

    def finish(self) -> bool:
        """After the loop: the stage's time; True when it stopped early (then save where it stopped)."""
        self.run.sync()
        self.run.history["seconds"][self.key] = self.seconds()
        return self.key in self.run.stopped

    def _plan(self, step: int) -> None:
        """At the calibration window's ends, time it and plan the steps that fit."""
        if self.deadline is None or self.key in self.run.plans:
            return
        first, last = self.CALIBRATE
        if step in (first, last):
            self.run.sync()
        if step == first:
            self.mark = (step, _now())
        elif step == last and self.mark is not None:
            seconds = (_now() - self.mark[1]) / (step - self.mark[0])
            fit = step + int(max(self.deadline - _now(), 0) / seconds)
            self.run.plans[self.key] = min(self.max_steps, fit)
            self.run.log(f"{self.label}: {seconds * 1000:.1f} ms/step, planning {self.run.plans[self.key]} steps")


def _raise_if_stopped(run: _Run) -> None:
    """`Stopped` once a training stage has saved at the step where a signal stopped it."""
    if run.stop():
        where = f"VAE step {run.steps['vae']}, decoder step {run.steps['decoder']}, UNet step {run.steps['unet']}"
        raise Stopped(run.stop(), f"at {where}; checkpoint saved, continue with the same command and --resume")


def _mean_loss(window: list[torch.Tensor], stage: str, step: int) -> float:
    mean = float(torch.stack(window).float().mean()) if window else float("nan")
    if not math.isfinite(mean):
        raise UserError(f"{stage} loss became {mean} by step {step}; resume from the last checkpoint with a lower "
                        "learning rate, or start over with another seed")
    return mean


def _stage_deadline(run: _Run, share: float) -> float | None:
    if run.deadline is None:
        return None
    now = _now()
    return now + max(run.deadline - now, 0) * share


def _train_vae(run: _Run, models: Models, data: Data, max_steps: int, bars: Bars) -> None:
    """Stage 2: the VAE, on random crops of the training images. Skipped when the checkpoint is past it."""
    opts, vae = run.options, models.vae
    if run.state is not None and run.state.get("unet") is not None:
        if max_steps != run.steps["vae"]:
            run.log(f"the VAE is already frozen after {run.steps['vae']} steps; --steps-vae {max_steps} is ignored")
        return
    resolution = data.train.images.shape[-1]
    crop = min(opts.vae_crop, resolution)
    images = data.train.images.to(run.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=opts.vae_lr, weight_decay=0.0, fused=run.mixed or None)
    if run.state is not None and "vae_optimizer" in run.state:
        optimizer.load_state_dict(run.state["vae_optimizer"])

    def checkpoint() -> None:
        run.checkpoint(vae=vae.state_dict(), vae_optimizer=optimizer.state_dict())

    vae.train()
    stage = _Stage(run, "vae", "VAE", _stage_deadline(run, opts.vae_share), max_steps, bars)
    while stage.running():
        for group in optimizer.param_groups:
            group["lr"] = opts.vae_lr * _cosine(stage.step, stage.total(), opts.warmup // 4)
        index = torch.randint(len(images), (opts.vae_batch,), generator=run.generator, device=run.device)
        y, x = torch.randint(resolution - crop + 1, (2,), generator=run.host_generator).tolist()
        with run.autocast():
            loss = vae_loss(vae, batch_to_model_range(images[index, :, y : y + crop, x : x + crop]), opts.kl_weight, run.generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if stage.record(loss):
            checkpoint()
    if stage.finish():
        checkpoint()


def _refine_decoder(run: _Run, models: Models, data: Data, max_steps: int, bars: Bars, share: float) -> None:
    """Stage 2b: only the VAE's decoder, on crops of the training images, half of them part images whose
    defect pixels weigh more: the small dark or pale defect the anomaly branch draws on grey is what a
    small VAE reconstructs worst, and every generated pixel passes through the decoder. The encoder is
    frozen, so the latents (and a UNet trained on them) do not change. Skipped once the UNet stage began.
    Under a time budget it takes `share` of the time left."""
    opts, vae = run.options, models.vae
    if max_steps < 1 or (run.state is not None and run.state.get("unet") is not None):
        return
    resolution = data.train.images.shape[-1]
    crop = min(opts.vae_crop, resolution)
    images = data.train.images.to(run.device)
    parts = torch.tensor([i for i, kind in enumerate(data.train.kinds) if kind == "part"], device=run.device,
                         dtype=torch.long)
    vae.requires_grad_(False)
    decoder = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for parameter in decoder:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder, lr=opts.decoder_lr, weight_decay=0.0, fused=run.mixed or None)
    if run.state is not None and "decoder_optimizer" in run.state:
        optimizer.load_state_dict(run.state["decoder_optimizer"])

    def checkpoint() -> None:
        run.checkpoint(vae=vae.state_dict(), decoder_optimizer=optimizer.state_dict())

    vae.train()
    half = max(opts.vae_batch // 2, 1) if len(parts) else 0  # rows of part images at the batch's end
    is_part = torch.zeros(opts.vae_batch, 1, 1, 1, device=run.device)
    is_part[opts.vae_batch - half :] = 1.0
    stage = _Stage(run, "decoder", "decoder", _stage_deadline(run, share), max_steps, bars)
    while stage.running():
        index = torch.randint(len(images), (opts.vae_batch - half,), generator=run.generator, device=run.device)
        if half:
            index = torch.cat([index, parts[torch.randint(len(parts), (half,), generator=run.generator, device=run.device)]])
        y, x = torch.randint(resolution - crop + 1, (2,), generator=run.host_generator).tolist()
        batch = images[index, :, y : y + crop, x : x + crop]
        defect = (batch != 128).any(1, keepdim=True).float() * is_part  # a part image's defect: its non-grey pixels
        if opts.decoder_recolour:  # the chosen rows: a uniform hue turn, saturation x U(1, 2)
            chosen = torch.rand(len(batch), generator=run.generator, device=run.device) < opts.decoder_recolour
            angle = torch.rand(len(batch), generator=run.generator, device=run.device) * 2 * math.pi * chosen
            saturation = 1 + torch.rand(len(batch), generator=run.generator, device=run.device) * chosen
            batch = recoloured(batch, angle, saturation)
        with run.autocast():
            loss = vae_loss(vae, batch_to_model_range(batch), opts.kl_weight, run.generator, 1 + opts.defect_weight * defect)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        optimizer.step()
        if stage.record(loss):
            checkpoint()
    if stage.finish():
        checkpoint()
    vae.requires_grad_(False).eval()


def recoloured(images: torch.Tensor, angle: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W images with each row's hue turned by its `angle` (radians) about the grey axis and its
    saturation scaled by its `saturation`: every pixel's channel mean is kept, so grey stays grey."""
    turn = torch.tensor(np.stack([hue_rotation(a) for a in angle.tolist()]), dtype=torch.float32, device=images.device)
    x = images.float()
    mean = x.mean(1, keepdim=True)
    out = mean + torch.einsum("nij,njhw->nihw", saturation[:, None, None] * turn, x - mean)
    return out.round().clamp(0, 255).to(images.dtype)


def _encode_corpus(run: _Run, models: Models, data: Data) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The frozen VAE's posterior over every training image, and the latent scaling factor."""
    models.vae.requires_grad_(False).eval()
    tick = time.perf_counter()
    means, stds = encode_latents(models.vae, data.train.images, batch=256 if run.mixed else 32)  # fp32: exact latents
    # a warm-started UNet learned its base's latent scale; a new one gets unit variance
    scale = models.vae.config.scaling_factor if run.options.init_from else latent_scaling_factor(means, stds)
    models.vae.register_to_config(scaling_factor=scale)
    run.history["seconds"]["encode"] = time.perf_counter() - tick
    return means, stds, scale


def _train_unet(run: _Run, models: Models, data: Data, latents: tuple[torch.Tensor, torch.Tensor, float],
                max_steps: int, bars: Bars) -> EMAModel:
    """Stage 3: UNet + text encoder on the frozen VAE's latents, min-SNR epsilon loss, EMA of the weights."""
    opts, gen, device = run.options, run.generator, run.device
    means, stds, scale = latents
    tokenizer = models.tokenizer
    ids = tokenizer(data.train.captions, padding="max_length", truncation=True, return_tensors="pt").input_ids.to(device)
    empty = tokenizer([""], padding="max_length", return_tensors="pt").input_ids[0].to(device)
    alphas_cumprod = sd_scheduler().alphas_cumprod.to(device)
    trainable = models.trainable()
    optimizer = torch.optim.AdamW(trainable, lr=opts.unet_lr, weight_decay=1e-2, fused=run.mixed or None)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / opts.warmup))
    ema = EMAModel(trainable, decay=opts.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=run.mixed)
    if run.state is not None and run.state.get("unet") is not None:
        models.unet.load_state_dict(run.state["unet"])
        models.text_encoder.load_state_dict(run.state["text_encoder"])
        optimizer.load_state_dict(run.state["optimizer"])
        warmup.load_state_dict(run.state["lr_schedule"])
        ema.load_state_dict(run.state["ema"])
    ema.to(device)

    def checkpoint() -> None:
        run.checkpoint(vae=models.vae.state_dict(), unet=models.unet.state_dict(),
                       text_encoder=models.text_encoder.state_dict(), optimizer=optimizer.state_dict(),
                       lr_schedule=warmup.state_dict(), ema=ema.state_dict())

    models.unet.train()
    models.text_encoder.train()
    stage = _Stage(run, "unet", "UNet", run.deadline, max_steps, bars)
    while stage.running():
        index = torch.randint(len(means), (opts.unet_batch,), generator=gen, device=device)
        sample = (means[index] + stds[index] * torch.randn(means[index].shape, generator=gen, device=device)) * scale
        noise = torch.randn(sample.shape, generator=gen, device=device)
        timesteps = torch.randint(len(alphas_cumprod), (len(index),), generator=gen, device=device)
        drop = torch.rand(len(index), generator=gen, device=device) < opts.empty_caption
        batch_ids = torch.where(drop[:, None], empty[None], ids[index])
        with run.autocast():
            loss = diffusion_loss(models.unet, models.text_encoder, sample, batch_ids, noise, timesteps, alphas_cumprod,
                                  opts.snr_gamma)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        warmup.step()
        ema.step(trainable)
        if stage.record(loss):
            checkpoint()
    if stage.finish():
        checkpoint()
    return ema


# ------------------------------------------------------------------------------------------------ measuring


@torch.no_grad()
def denoising_by_bucket(unet, text_encoder, vae, tokenizer, corpus: Corpus, seed: int) -> dict[str, float]:
    """Plain epsilon MSE on held-out latents, one fixed timestep per image drawn inside each bucket of
    ``TIMESTEP_BUCKETS``, fixed noise (drawn on the CPU from `seed`, so any device and any base see the same)."""
    device = unet.device
    means, _ = encode_latents(vae, corpus.images)
    latents = means * vae.config.scaling_factor
    ids = tokenizer(corpus.captions, padding="max_length", truncation=True, return_tensors="pt").input_ids.to(device)
    alphas_cumprod = sd_scheduler().alphas_cumprod.to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    result = {}
    for low, high in TIMESTEP_BUCKETS:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(low, high, (len(latents),), generator=generator).to(device)
        rows = []
        for chunk in range(0, len(latents), 64):
            part = slice(chunk, chunk + 64)
            rows.append(diffusion_loss(unet, text_encoder, latents[part], ids[part], noise[part], timesteps[part],
                                       alphas_cumprod, None, per_row=True))
        result[f"{low}-{high - 1}"] = round(float(torch.cat(rows).mean()), 5)
    return result


@torch.no_grad()
def vae_figures(vae: AutoencoderKL, data: Data) -> tuple[dict, dict[str, np.ndarray]]:
    """VAE PSNR (dB) on the held-out images: all, per kind, flat mid-grey, the defect and the grey regions of
    part images, and the unseen category; with the reconstructions (uint8) for the sheet."""
    recon = to_uint8(reconstruct(vae, data.heldout.images))
    unseen = to_uint8(reconstruct(vae, data.unseen.images))
    grey_recon = to_uint8(reconstruct(vae, torch.full((1, *data.heldout.images.shape[1:]), 128, dtype=torch.uint8)))
    originals = data.heldout.images.permute(0, 2, 3, 1).numpy()
    values = psnr(originals, recon)
    kinds = np.array(data.heldout.kinds)
    figures = {
        "vae_psnr_db": float(values.mean()),
        "vae_psnr_db_min": float(values.min()),
        "vae_psnr_db_by_kind": {k: float(values[kinds == k].mean()) for k in WORLD_KINDS if (kinds == k).any()},
        "vae_psnr_db_flat_grey": float(psnr(np.full_like(grey_recon, 128), grey_recon)[0]),
        "vae_psnr_db_unseen_category": float(psnr(data.unseen.images.permute(0, 2, 3, 1).numpy(), unseen).mean()),
    }
    parts = kinds == "part"
    if parts.any():
        defect = (originals[parts] != 128).any(-1)
        figures["vae_psnr_db_part_defect_region"] = float(psnr(originals[parts], recon[parts], defect).mean())
        figures["vae_psnr_db_part_grey_region"] = float(psnr(originals[parts], recon[parts], ~defect).mean())
    sheets = {"originals": originals, "reconstructions": recon, "kinds": kinds, "grey": grey_recon,
              "unseen": data.unseen.images.permute(0, 2, 3, 1).numpy(), "unseen_reconstructions": unseen}
    return figures, sheets


def _measure(run: _Run, models: Models, data: Data, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Stage 4: the held-out figures of the (EMA) model, in fp32 on any device (comparable with `measure_base`)."""
    tick = time.perf_counter()
    vae, sheets = vae_figures(models.vae, data)
    figures = {
        **vae,
        "denoising_mse_by_timestep": denoising_by_bucket(models.unet, models.text_encoder, models.vae, models.tokenizer,
                                                         data.heldout, seed),
        "denoising_mse_by_timestep_unseen_category": denoising_by_bucket(
            models.unet, models.text_encoder, models.vae, models.tokenizer, data.unseen, seed),
    }
    run.history["seconds"]["measure"] = time.perf_counter() - tick
    run.log(f"VAE held-out PSNR {figures['vae_psnr_db']:.2f} dB; denoising MSE {figures['denoising_mse_by_timestep']}")
    return figures, sheets


def measure_base(spec: str, resolution: int = 128, seed: int = 0, options: PretrainOptions = PRESETS["cpu"].options,
                 device: str = "auto", workers: int = 1) -> dict:
    """The held-out figures of any base (``load_base_model`` spec) on the same held-out images a pretraining
    run with (resolution, seed, options) measures: the way to put an earlier base beside a new one.

        before = measure_base("tiny", options=PRESETS["gpu"].options)  # the shipped base, the gpu run's images
    """
    base = load_base_model(spec)
    target = resolve_device(device)
    for module in (base.unet, base.vae, base.text_encoder):
        module.to(target)
    data = Data(Corpus(torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8), [], []),
                render_corpus(seed, 1, options.heldout_images, resolution, options.families, workers),
                render_corpus(seed, 2, options.heldout_images, resolution, (HELD_OUT,), workers))
    figures, _ = vae_figures(base.vae, data)
    for key, corpus in (("denoising_mse_by_timestep", data.heldout),
                        ("denoising_mse_by_timestep_unseen_category", data.unseen)):
        figures[key] = denoising_by_bucket(base.unet, base.text_encoder, base.vae, base.tokenizer, corpus, seed)
    return figures


def _write_sheets(run: _Run, models: Models, seed: int, sheets: dict[str, np.ndarray], psnr_db: float) -> None:
    """samples.png (a row per family: its normal and first-defect prompts) and reconstructions.png."""
    tick = time.perf_counter()
    opts = run.options
    rows = sample_prompts(opts.families)
    prompts = [p for _, group in rows for p in group for _ in range(opts.samples_per_prompt)]
    samples = sample_images(models.unet, models.vae, models.text_encoder, models.tokenizer, prompts, seed,
                            opts.sample_steps, opts.guidance)
    grid, start = [], 0
    for label, group in rows:
        count = len(group) * opts.samples_per_prompt
        grid.append((f"{label}: " + " | ".join(p or '""' for p in group), samples[start : start + count]))
        start += count
    save_png(run.out / "samples.png", image_grid(grid))
    rows = []
    for kind in WORLD_KINDS:  # four originals, then their reconstructions
        chosen = np.flatnonzero(sheets["kinds"] == kind)[:4]
        if len(chosen):
            rows.append((f"{kind} images, then their reconstructions",
                         np.concatenate([sheets["originals"][chosen], sheets["reconstructions"][chosen]])))
    rows.append((f"held-out category {HELD_OUT}, then its reconstructions",
                 np.concatenate([sheets["unseen"][:4], sheets["unseen_reconstructions"][:4]])))
    rows.append((f"flat mid-grey, reconstructed (all held-out images: mean PSNR {psnr_db:.1f} dB)", sheets["grey"]))
    save_png(run.out / "reconstructions.png", image_grid(rows))
    run.history["seconds"]["samples"] = time.perf_counter() - tick


# ------------------------------------------------------------------------------------------------ export


def _storage_copy(module: torch.nn.Module, storage: str) -> torch.nn.Module:
    """The module as it is saved: a copy with fp16 parameters, or the module itself for fp32."""
    if storage == "fp32":
        return module
    copied = copy.deepcopy(module)
    for tensor in list(copied.parameters()) + list(copied.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float16)
    return copied


def _export(out: Path, models: Models, record: dict, options: PretrainOptions) -> None:
    """Stage 5: write the diffusers directory into a temporary folder, then move each component into `out`."""
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shard = options.shard_mib * 2**20
    _storage_copy(models.unet, options.storage).save_pretrained(tmp / "unet", safe_serialization=True, max_shard_size=shard)
    _storage_copy(models.vae, options.storage).save_pretrained(tmp / "vae", safe_serialization=True, max_shard_size=shard)
    _storage_copy(models.text_encoder, options.storage).save_pretrained(tmp / "text_encoder", safe_serialization=True,
                                                                        max_shard_size=shard)
    models.tokenizer.save_pretrained(tmp / "tokenizer")
    sd_scheduler().save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": record["versions"]["diffusers"],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    atomic_write_text(tmp / "model_index.json", json.dumps(index, indent=2) + "\n")
    for name in BASE_FILES[:-1]:
        shutil.rmtree(out / name, ignore_errors=True)
        (tmp / name).rename(out / name)
    (tmp / "model_index.json").replace(out / "model_index.json")
    tmp.rmdir()
    atomic_write_text(out / "training.json", json.dumps(record, indent=2) + "\n")


def _base_record(spec: str) -> dict | None:
    """The training.json of the base `spec` ('tiny' or a directory), if it has one."""
    path = base_folder(spec) / "training.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _record(run: _Run, models: Models, data: Data, scale: float, figures: dict, preset: str | None,
            workers: int) -> dict:
    import diffusers
    import transformers

    opts = run.options
    history = run.history
    device = run.device
    return {
        "what": "the project's small Stable-Diffusion-shaped base model, pretrained by `dualanodiff pretrain-base`",
        "preset": preset,
        "settings": run.settings,
        "steps": dict(run.steps),
        "planned_steps": dict(run.plans),
        "stopped_early": dict(run.stopped),
        "parameters": {"unet": _count(models.unet), "vae": _count(models.vae), "text_encoder": _count(models.text_encoder)},
        "storage": opts.storage,
        "compute": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": "bf16 autocast" if run.mixed else "fp32",
            "torch_threads": torch.get_num_threads(),
            "render_workers": workers,
            "time_budget_s": None if run.deadline is None else round(run.deadline - run.started, 1),
        },
        "data": {
            "source": "dualanodiff.synthetic.world_item (stream 0: training, 1: held out, 2: the held-out category)",
            "families": {name: sorted(FAMILIES[name].defects) for name in opts.families},
            "held_out_category": HELD_OUT,
            "mix": WORLD_MIX,
            "part_and_background": "I*M and (1 - M_f)*I taken in [-1, 1]: mid-grey (128) where multiplied away",
            "augmentation": "random flip / quarter turn; colour jitter (saturation, hue, contrast, brightness) on 30%",
            "train_images": opts.train_images,
            "heldout_images": opts.heldout_images,
            "empty_caption_share": opts.empty_caption,
            "caption_examples": data.train.captions[:8],
        },
        "latent_scaling_factor": scale,
        "seconds": history["seconds"],
        "wall_seconds": round(_now() - run.started, 1),
        "seconds_per_step": {
            "vae": history["seconds"].get("vae", 0.0) / max(run.steps["vae"], 1),
            "unet": history["seconds"].get("unet", 0.0) / max(run.steps["unet"], 1),
            "decoder": history["seconds"].get("decoder", 0.0) / max(run.steps["decoder"], 1),
        },
        "losses": {"vae": history["vae_loss"], "unet": history["unet_loss"], "decoder": history["decoder_loss"]},
        # a warm start's provenance: the training.json of the base it started from
        "init_from_record": _base_record(opts.init_from) if opts.init_from else None,
        "heldout": figures,
        "samples": {"scheduler": "DDIM", "steps": opts.sample_steps, "guidance": opts.guidance,
                    "rows": sample_prompts(opts.families)},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }


def pretrain_base(
    out: Path,
    steps_vae: int,
    steps_unet: int,
    resolution: int = 128,
    seed: int = 0,
    options: PretrainOptions = PRESETS["cpu"].options,
    *,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    time_budget: float | None = None,
    workers: int = 1,
    preset: str | None = None,
    log: Callable[[str], None] = lambda message: None,
    bars: Bars = no_bars,
    steps_decoder: int = 0,
) -> dict:
    """Train the VAE, refine its decoder (`steps_decoder`), then train the UNet + text encoder; write the
    diffusers directory `out`; return training.json. With `options.init_from` the base's VAE is the start
    and either later stage may be skipped (0 steps).

    A re-run with `resume` continues from ``out/checkpoint/state.pt`` (written every
    `options.checkpoint_every` steps, at each stage's end, and at the step where SIGINT or SIGTERM stopped a
    stage, which then raises `Stopped`) and gives the same weights as an uninterrupted run; with more steps
    than before it trains on, with as many or fewer it only (re)exports.
    `time_budget` (seconds from this call): no training step starts later; measuring and export follow.
    `workers`: processes rendering the data. `preset`: the name recorded in training.json. `bars`: a
    bar per training stage ("VAE", "UNet") advanced at each step (`dualanodiff.progress`), beside the
    `log` lines every `options.log_every` steps.
    """
    out = Path(out)
    if options.init_from:
        if steps_unet < 0 or steps_decoder < 0 or steps_unet + steps_decoder < 1:
            raise UserError("--steps-unet/--steps-decoder: a warm start needs at least one step of either")
    elif steps_vae < 1 or steps_unet < 1:
        raise UserError("--steps-vae/--steps-unet: need at least one step of each (no VAE steps with init_from)")
    run = _start_run(out, resolution, seed, options, resume, force, device, time_budget, log)
    data = _render_data(run, resolution, seed, workers)
    models = _build_models(run, resolution, seed)
    scale = models.vae.config.scaling_factor
    with deferred_signals() as run.stop:
        if not options.init_from:  # a warm start keeps its base's VAE
            _train_vae(run, models, data, steps_vae, bars)
            _raise_if_stopped(run)
        _refine_decoder(run, models, data, steps_decoder, bars, options.vae_share if steps_unet else 1.0)
        _raise_if_stopped(run)
        if steps_unet:  # a warm start without UNet steps keeps its base's UNet and text encoder
            latents = _encode_corpus(run, models, data)
            scale = latents[2]
            _train_unet(run, models, data, latents, steps_unet, bars).copy_to(models.trainable())  # the EMA weights
            _raise_if_stopped(run)
    models.unet.eval()
    models.text_encoder.eval()
    figures, sheets = _measure(run, models, data, seed)
    _write_sheets(run, models, seed, sheets, figures["vae_psnr_db"])
    record = _record(run, models, data, scale, figures, preset, workers)
    _export(out, models, record, options)
    load_base_model(str(out))  # the directory must load the way users will load it
    return record
