"""Pretrain the project's own small Stable-Diffusion-shaped base model (``dualanodiff pretrain-base``).

Stable Diffusion's weights cannot be downloaded here, yet DualAnoDiff tunes LoRA branches on top of a
*frozen pretrained* base. So the project trains its own, with SD's recipe at a small size:

1. an ``AutoencoderKL`` (down-factor 4: 128 px -> 32x32x4 latents) for reconstruction (L1 + image-gradient
   L1 + a small KL), then its latent ``scaling_factor`` = 1 / std of the training latents, as SD does;
2. a ``UNet2DConditionModel`` and a ``CLIPTextModel`` together, from scratch, with SD's epsilon objective
   (min-SNR weighted) on the frozen VAE's latents, 10 % empty captions for classifier-free guidance,
   and an exponential moving average of their weights, which is what gets saved.

The data is drawn on the fly from `dualanodiff.synthetic`: normal and defective images of every category and
defect type, the defect-only "part" images DualAnoDiff's anomaly branch learns (defect on mid-grey), random
flips and quarter turns, and colour jitter (hue, saturation, brightness) so the base knows more than three
looks. Captions read "a photo of a nut", "a pill with missing piece", "a weave texture with hole", "scratch".
A held-out set (other seeds) gives the reconstruction PSNR and a denoising loss.

Everything follows from (resolution, seed, options): a seeded ``torch.Generator`` drives every random draw,
its state is checkpointed with the models and optimisers, so a resumed run continues exactly where it
stopped. The result is a diffusers directory (unet, vae, text_encoder, tokenizer, scheduler,
model_index.json) that `load_base_model(DIR)` and ``StableDiffusionPipeline.from_pretrained(DIR)`` load,
with ``training.json`` (data, steps, times, losses, held-out metrics), ``samples.png`` and
``reconstructions.png`` beside it. Example::

    record = pretrain_base(Path("base"), steps_vae=2400, steps_unet=5500)
    print(record["heldout"]["vae_psnr_db"])
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image, ImageDraw
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import CLIPTextModel, CLIPTokenizer

from dualanodiff.errors import UserError
from dualanodiff.io import atomic_write_bytes, atomic_write_text, save_png
from dualanodiff.model.base import build_tokenizer, load_base_model, sd_scheduler, tiny_architecture
from dualanodiff.synthetic import CATEGORIES, render_sample

CHECKPOINT = "checkpoint/state.pt"
SAMPLE_PROMPTS = (
    "a photo of a nut", "a nut with scratch", "a nut with hole", "a photo of a pill", "a pill with missing piece",
    "a pill with stain", "a photo of a weave texture", "a weave texture with hole", "a weave texture with thread",
    "",
)


@dataclass(frozen=True)
class Architecture:
    """Model sizes. The default fits 25 MB of fp32 weights and a ~0.3 s UNet step (12 latents, 2 CPU threads)."""

    unet_channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[int, ...] = (1, 2)  # no attention at full latent resolution: the CPU cost
    vae_channels: tuple[int, ...] = (32, 64, 64)  # three levels: down-factor 4
    text_width: int = 96
    text_layers: int = 3
    heads: int = 4


@dataclass(frozen=True)
class PretrainOptions:
    """Everything besides resolution, seed and step counts that a run is reproducible from."""

    architecture: Architecture = field(default_factory=Architecture)
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
    checkpoint_every: int = 200
    log_every: int = 50
    sample_steps: int = 50  # DDIM steps for samples.png
    guidance: float = 3.0


# ------------------------------------------------------------------------------------------------ data


def _words(name: str) -> str:
    return name.replace("_", " ")


def _caption(rng: np.random.Generator, category: str, defect: str | None, part: bool) -> str:
    if part:
        return _words(defect)
    thing = f"{category} texture" if CATEGORIES[category].kind == "texture" else category
    if defect is None:
        templates = ["a photo of a {t}", "a {t}", "a good {t}"]
    else:
        templates = ["a photo of a {t} with {d}", "a {t} with {d}"]
    return str(rng.choice(templates)).format(t=thing, d=_words(defect or ""))


def _colour_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saturation, hue rotation about the grey axis, contrast and brightness: new looks, same shapes."""
    x = image.astype(np.float32) / 255.0
    grey = x.mean(-1, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        angle = rng.uniform(-math.pi, math.pi)
        k = np.full(3, 1 / math.sqrt(3))
        cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rotation = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
        x = x @ rotation.T.astype(np.float32)
    x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean() * rng.uniform(0.75, 1.25)
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def corpus_item(seed: int, stream: int, index: int, resolution: int) -> tuple[np.ndarray, str]:
    """One training (stream 0) or held-out (stream 1) image with its caption, fixed by its coordinates.

    45 % normal, 45 % defective, 10 % defect-only part images (the defect on mid-grey, as DualAnoDiff's
    anomaly branch sees it); a random flip/quarter turn; colour jitter on 30 % of whole images.
    """
    rng = np.random.default_rng([seed, stream, index])
    category = str(rng.choice(list(CATEGORIES)))
    draw = rng.random()
    defect = None if draw < 0.45 else str(rng.choice(list(CATEGORIES[category].defects)))
    part = draw >= 0.9
    sample = render_sample(category, defect, rng, resolution)
    image = np.where(sample.mask[..., None], sample.image, np.uint8(128)) if part else sample.image
    turn = int(rng.integers(8))
    image = np.rot90(image, turn % 4)
    if turn >= 4:
        image = image[:, ::-1]
    if not part and rng.random() < 0.3:
        image = _colour_jitter(image, rng)
    return np.ascontiguousarray(image), _caption(rng, category, defect, part)


def render_corpus(seed: int, stream: int, count: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """`count` images as an N x 3 x H x W uint8 tensor, and their captions."""
    items = [corpus_item(seed, stream, i, resolution) for i in range(count)]
    images = torch.from_numpy(np.stack([image for image, _ in items])).permute(0, 3, 1, 2).contiguous()
    return images, [caption for _, caption in items]


def _to_model(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W in [-1, 1] -> N x H x W x 3 uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------ VAE


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """L1 + image-gradient L1 (keeps edges and weave threads sharp) + L1 of 4x4 means (colour, which a small VAE
    otherwise learns last) + KL per latent element, on [-1, 1] images."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator)
    recon = vae.decode(latents).sample
    l1 = (recon - images).abs().mean()
    gradient = sum(
        (torch.diff(recon, dim=d) - torch.diff(images, dim=d)).abs().mean() for d in (2, 3)
    )
    colour = (F.avg_pool2d(recon, 4) - F.avg_pool2d(images, 4)).abs().mean()
    kl = posterior.kl().mean() / latents[0].numel()
    return l1 + 0.5 * gradient + colour + kl_weight * kl


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Posterior-mean reconstructions of uint8 images, in [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(_to_model(chunk)).latent_dist.mode()).sample for chunk in images.split(batch)])


def psnr(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 N x H x W x 3 arrays."""
    mse = ((reference.astype(np.float64) - image.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of every image (unscaled)."""
    means, stds = [], []
    for chunk in images.split(batch):
        posterior = vae.encode(_to_model(chunk)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


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
) -> torch.Tensor:
    """SD's epsilon-prediction MSE; with `snr_gamma`, each row weighted by min(SNR, gamma) / SNR (min-SNR)."""
    alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    prediction = unet(noisy, timesteps, text_encoder(input_ids)[0]).sample
    per_row = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_row.mean()
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return (per_row * snr.clamp(max=snr_gamma) / snr).mean()


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
) -> np.ndarray:
    """DDIM samples with classifier-free guidance (empty negative prompt); N x H x W x 3 uint8."""
    scheduler = DDIMScheduler.from_config(sd_scheduler().config)
    scheduler.set_timesteps(steps)
    ids = tokenizer(list(prompts) + [""] * len(prompts), padding="max_length", truncation=True, return_tensors="pt")
    context = text_encoder(ids.input_ids)[0]
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), unet.config.in_channels, size, size, generator=generator)
    for t in scheduler.timesteps:
        cond, uncond = unet(torch.cat([latents, latents]), t, context).sample.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return _to_uint8(vae.decode(latents / vae.config.scaling_factor).sample)


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


# ------------------------------------------------------------------------------------------------ the run


def _cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then a cosine from 1 down to 5 % at `total`."""
    return min(1.0, (step + 1) / max(warmup, 1)) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _prepare_out(out: Path, resume: bool, force: bool) -> dict | None:
    """Check what may be written to `out`; return the checkpoint to resume from, if any."""
    checkpoint = out / CHECKPOINT
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; pick another folder")
    if resume and checkpoint.is_file():
        return torch.load(checkpoint, weights_only=True)
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


def _export(out: Path, unet, vae, text_encoder, tokenizer, record: dict) -> None:
    """Write the diffusers directory into a temporary folder, then move each component into `out`."""
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
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
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(out / name, ignore_errors=True)
        (tmp / name).rename(out / name)
    (tmp / "model_index.json").replace(out / "model_index.json")
    tmp.rmdir()
    atomic_write_text(out / "training.json", json.dumps(record, indent=2) + "\n")


def pretrain_base(
    out: Path,
    steps_vae: int,
    steps_unet: int,
    resolution: int = 128,
    seed: int = 0,
    options: PretrainOptions = PretrainOptions(),
    *,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = lambda message: None,
    show_progress: bool = True,
) -> dict:
    """Train the VAE, then the UNet + text encoder; write the diffusers directory `out`; return training.json.

    A re-run with `resume` continues from ``out/checkpoint/state.pt`` (written every
    `options.checkpoint_every` steps and at each stage's end) and gives the same weights as an uninterrupted
    run; with more steps than before it trains on, with as many or fewer it only (re)exports.
    """
    out = Path(out)
    if resolution % 4 or resolution < 16:
        raise UserError(f"--resolution {resolution}: must be a multiple of 4, at least 16; use 128")
    if steps_vae < 1 or steps_unet < 1:
        raise UserError("--steps-vae/--steps-unet: need at least one step of each")
    settings = {"resolution": resolution, "seed": seed, "options": dataclasses.asdict(options)}
    state = _prepare_out(out, resume, force)
    if state is not None and json.loads(json.dumps(state["settings"])) != json.loads(json.dumps(settings)):
        raise UserError(f"--out {out}: its checkpoint was made with other settings ({state['settings']}); "
                        "repeat those settings or start another folder")
    out.mkdir(parents=True, exist_ok=True)
    arch = options.architecture
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = tiny_architecture(
            tokenizer, resolution, arch.unet_channels, arch.vae_channels, arch.text_width, arch.text_layers,
            arch.heads, arch.attention_levels,
        )
    generator = torch.Generator().manual_seed(seed)
    history: dict = {"vae_loss": [], "unet_loss": [], "seconds": {"data": 0.0, "vae": 0.0, "unet": 0.0}}
    vae_step = unet_step = 0
    if state is not None:
        vae.load_state_dict(state["vae"])
        generator.set_state(state["generator"])
        history, vae_step, unet_step = state["history"], state["vae_step"], state["unet_step"]
        log(f"resuming at VAE step {vae_step}, UNet step {unet_step}")

    started = time.perf_counter()
    train_images, train_captions = render_corpus(seed, 0, options.train_images, resolution)
    heldout_images, heldout_captions = render_corpus(seed, 1, options.heldout_images, resolution)
    history["seconds"]["data"] = time.perf_counter() - started
    crop = min(options.vae_crop, resolution)

    def checkpoint(extra: dict) -> None:
        _save_checkpoint(out / CHECKPOINT, {
            "settings": settings, "vae": vae.state_dict(), "generator": generator.get_state(), "history": history,
            "vae_step": vae_step, "unet_step": unet_step, **extra,
        })

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        # ---- stage 1: VAE
        vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=options.vae_lr, weight_decay=0.0)
        if state is not None and "vae_optimizer" in state:
            vae_optimizer.load_state_dict(state["vae_optimizer"])
        frozen = state is not None and state.get("unet") is not None
        task = progress.add_task("VAE", total=steps_vae, completed=min(vae_step, steps_vae), loss=float("nan"))
        window: list[float] = []
        while vae_step < steps_vae and not frozen:
            tick = time.perf_counter()
            for group in vae_optimizer.param_groups:
                group["lr"] = options.vae_lr * _cosine(vae_step, steps_vae, options.warmup // 4)
            index = torch.randint(len(train_images), (options.vae_batch,), generator=generator)
            y, x = torch.randint(resolution - crop + 1, (2,), generator=generator).tolist()
            batch = _to_model(train_images[index, :, y : y + crop, x : x + crop])
            loss = vae_loss(vae, batch, options.kl_weight, generator)
            vae_optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            vae_optimizer.step()
            vae_step += 1
            window.append(loss.item())
            history["seconds"]["vae"] += time.perf_counter() - tick
            progress.update(task, completed=vae_step, loss=loss.item())
            if vae_step % options.log_every == 0 or vae_step == steps_vae:
                history["vae_loss"].append([vae_step, float(np.mean(window))])
                log(f"VAE step {vae_step}/{steps_vae} loss {np.mean(window):.4f} "
                    f"({history['seconds']['vae'] / vae_step:.2f} s/step)")
                window = []
            if vae_step % options.checkpoint_every == 0 or vae_step == steps_vae:
                checkpoint({"vae_optimizer": vae_optimizer.state_dict()})
        if frozen and steps_vae != vae_step:
            log(f"the VAE is already frozen after {vae_step} steps; --steps-vae {steps_vae} is ignored")
        vae.requires_grad_(False).eval()
        recon = _to_uint8(reconstruct(vae, heldout_images))
        heldout_np = heldout_images.permute(0, 2, 3, 1).numpy()
        vae_psnr = psnr(heldout_np, recon)
        log(f"VAE held-out PSNR {vae_psnr.mean():.2f} dB")

        # ---- stage 2: UNet + text encoder on frozen-VAE latents
        tick = time.perf_counter()
        means, stds = encode_latents(vae, train_images)
        scale = latent_scaling_factor(means, stds)
        vae.register_to_config(scaling_factor=scale)
        history["seconds"]["encode"] = time.perf_counter() - tick
        ids = tokenizer(train_captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        empty = tokenizer([""], padding="max_length", return_tensors="pt").input_ids[0]
        alphas_cumprod = sd_scheduler().alphas_cumprod
        trainable = list(unet.parameters()) + list(text_encoder.parameters())
        optimizer = torch.optim.AdamW(trainable, lr=options.unet_lr, weight_decay=1e-2)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / options.warmup))
        ema = EMAModel(trainable, decay=options.ema_decay, use_ema_warmup=True, power=3 / 4)
        if state is not None and state.get("unet") is not None:
            unet.load_state_dict(state["unet"])
            text_encoder.load_state_dict(state["text_encoder"])
            optimizer.load_state_dict(state["optimizer"])
            warmup.load_state_dict(state["lr_schedule"])
            ema.load_state_dict(state["ema"])
        unet.train()
        text_encoder.train()
        task = progress.add_task("UNet", total=steps_unet, completed=min(unet_step, steps_unet), loss=float("nan"))
        window = []
        while unet_step < steps_unet:
            tick = time.perf_counter()
            index = torch.randint(len(train_images), (options.unet_batch,), generator=generator)
            latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(len(alphas_cumprod), (len(index),), generator=generator)
            drop = torch.rand(len(index), generator=generator) < options.empty_caption
            batch_ids = torch.where(drop[:, None], empty[None], ids[index])
            loss = diffusion_loss(unet, text_encoder, latents, batch_ids, noise, timesteps, alphas_cumprod,
                                  options.snr_gamma)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            warmup.step()
            ema.step(trainable)
            unet_step += 1
            window.append(loss.item())
            history["seconds"]["unet"] += time.perf_counter() - tick
            progress.update(task, completed=unet_step, loss=loss.item())
            if unet_step % options.log_every == 0 or unet_step == steps_unet:
                history["unet_loss"].append([unet_step, float(np.mean(window))])
                log(f"UNet step {unet_step}/{steps_unet} loss {np.mean(window):.4f} "
                    f"({history['seconds']['unet'] / unet_step:.2f} s/step)")
                window = []
            if unet_step % options.checkpoint_every == 0 or unet_step == steps_unet:
                checkpoint({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                            "optimizer": optimizer.state_dict(), "lr_schedule": warmup.state_dict(),
                            "ema": ema.state_dict()})

    # ---- the EMA weights are the model; measure and export them
    ema.copy_to(trainable)
    unet.eval()
    text_encoder.eval()
    heldout_loss = _heldout_denoising(unet, text_encoder, vae, tokenizer, heldout_images, heldout_captions, seed,
                                      alphas_cumprod)
    log(f"held-out denoising MSE by timestep {heldout_loss}")
    tick = time.perf_counter()
    prompts = list(SAMPLE_PROMPTS)
    per_prompt = 4
    samples = sample_images(unet, vae, text_encoder, tokenizer, [p for p in prompts for _ in range(per_prompt)], seed,
                            options.sample_steps, options.guidance)
    save_png(out / "samples.png", image_grid([(p, samples[i * per_prompt : (i + 1) * per_prompt])
                                              for i, p in enumerate(prompts)]))
    shown = min(8, len(heldout_np))
    save_png(out / "reconstructions.png", image_grid([
        ("held-out originals", heldout_np[:shown]),
        (f"VAE reconstructions (mean PSNR {vae_psnr.mean():.1f} dB)", recon[:shown]),
    ]))
    history["seconds"]["samples"] = time.perf_counter() - tick
    import diffusers
    import transformers

    record = {
        "what": "the project's small Stable-Diffusion-shaped base model, pretrained by `dualanodiff pretrain-base`",
        "settings": settings,
        "steps": {"vae": vae_step, "unet": unet_step},
        "parameters": {"unet": _count(unet), "vae": _count(vae), "text_encoder": _count(text_encoder)},
        "data": {
            "source": "dualanodiff.synthetic, rendered on the fly (stream 0: training, stream 1: held out)",
            "categories": {name: sorted(spec.defects) for name, spec in CATEGORIES.items()},
            "mix": "45% normal, 45% defective, 10% defect-only part images (defect on mid-grey)",
            "augmentation": "random flip / quarter turn; colour jitter (saturation, hue, contrast, brightness) on 30%",
            "train_images": options.train_images,
            "heldout_images": options.heldout_images,
            "empty_caption_share": options.empty_caption,
            "caption_examples": train_captions[:8],
        },
        "latent_scaling_factor": scale,
        "seconds": history["seconds"],
        "seconds_per_step": {
            "vae": history["seconds"]["vae"] / max(vae_step, 1),
            "unet": history["seconds"]["unet"] / max(unet_step, 1),
        },
        "losses": {"vae": history["vae_loss"], "unet": history["unet_loss"]},
        "heldout": {
            "vae_psnr_db": float(vae_psnr.mean()),
            "vae_psnr_db_min": float(vae_psnr.min()),
            "denoising_mse_by_timestep": heldout_loss,
        },
        "samples": {"scheduler": "DDIM", "steps": options.sample_steps, "guidance": options.guidance,
                    "prompts": prompts},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }
    _export(out, unet, vae, text_encoder, tokenizer, record)
    load_base_model(str(out))  # the directory must load the way users will load it
    return record


@torch.no_grad()
def _heldout_denoising(unet, text_encoder, vae, tokenizer, images, captions, seed, alphas_cumprod) -> dict[str, float]:
    """Plain epsilon MSE on held-out latents at fixed timesteps and fixed noise."""
    means, _ = encode_latents(vae, images)
    latents = means * vae.config.scaling_factor
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(seed + 1)
    result = {}
    for t in (50, 250, 500, 750, 950):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(latents),), t)
        result[str(t)] = round(float(diffusion_loss(unet, text_encoder, latents, ids, noise, timesteps, alphas_cumprod,
                                                    None)), 5)
    return result
