"""The VAE stages: the autoencoder trained on crops, its decoder refined on part images, and the frozen
VAE's latents of the corpus with SD's latent scaling factor."""

from __future__ import annotations

import math
import time

import torch
from diffusers import AutoencoderKL

from dualanodiff.decoder import encode_latents, reconstruction_loss
from dualanodiff.images import batch_to_model_range
from dualanodiff.pretrain.data import Data
from dualanodiff.pretrain.run import Models, _Run
from dualanodiff.pretrain.stage import _Stage, _stage_deadline
from dualanodiff.progress import Bars


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


def _cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then a cosine from 1 down to 5 % at `total`."""
    return min(1.0, (step + 1) / max(warmup, 1)) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))


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
