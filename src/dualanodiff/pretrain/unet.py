"""The UNet stage: UNet and text encoder on the frozen VAE's latents with SD's epsilon objective (min-SNR
weighted) and an EMA of the weights; and a profile of its step."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel

from dualanodiff.model.base import build_base, sd_scheduler
from dualanodiff.pretrain.data import Data
from dualanodiff.pretrain.options import PretrainOptions
from dualanodiff.pretrain.run import Models, _Run
from dualanodiff.pretrain.stage import _Stage
from dualanodiff.progress import Bars


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
