"""The run's picture sheets: samples.png (a row per family) and reconstructions.png."""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTokenizer

from dualanodiff.images import to_uint8
from dualanodiff.io import save_png
from dualanodiff.model.base import sd_scheduler
from dualanodiff.pretrain.run import Models, _Run
from dualanodiff.synthetic import FAMILIES, HELD_OUT, WORLD_KINDS, thing_name


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
