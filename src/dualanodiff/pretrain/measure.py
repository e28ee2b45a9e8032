"""The held-out figures of a base (denoising MSE by timestep bucket, VAE PSNR by kind and region), for a
run's training.json and to put any two bases side by side."""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import AutoencoderKL

from dualanodiff.decoder import encode_latents
from dualanodiff.devices import resolve_device
from dualanodiff.evaluation.metrics import psnr
from dualanodiff.images import to_uint8
from dualanodiff.model.base import load_base_model, sd_scheduler
from dualanodiff.pretrain.data import Corpus, Data, render_corpus
from dualanodiff.pretrain.options import PRESETS, PretrainOptions
from dualanodiff.pretrain.run import Models, _Run
from dualanodiff.pretrain.unet import diffusion_loss
from dualanodiff.pretrain.vae import reconstruct
from dualanodiff.synthetic import HELD_OUT, WORLD_KINDS

TIMESTEP_BUCKETS = ((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000))


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


def measure_base(spec: str, resolution: int = 128, seed: int = 0, options: PretrainOptions = PRESETS["v1"].options,
                 device: str = "auto", workers: int = 1) -> dict:
    """The held-out figures of any base (``load_base_model`` spec) on the same held-out images a pretraining
    run with (resolution, seed, options) measures: the way to put two bases side by side.

        before = measure_base("tiny", options=PRESETS["cpu-v1"].options)  # the shipped base, a cpu-v1 run's images
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
