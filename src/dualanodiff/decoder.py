"""The category decoder: the base VAE's decoder refined on one category's own images (ours, not the paper's).

A small base's VAE loses the colours its pretraining world lacks: the embedded base decodes the held-out
bottle's green as dark grey, though its encoder's latents keep green and grey apart. Training only the
decoder (and ``post_quant_conv``) on the category's normal images, its few-shot images and their part
images (grey outside the defect) brings the colours back. The encoder, and so every latent the adapters
learn from or generation starts from, stays as it is: the refinement is independent of the LoRA training
and changes only how generated latents are decoded. Stable Diffusion's VAE does not need it (its default,
``train.decoder_steps: 0``, keeps the base's decoder); the embedded base's recipe turns it on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save

from dualanodiff.errors import UserError
from dualanodiff.images import batch_to_model_range
from dualanodiff.io import atomic_write_bytes
from dualanodiff.progress import Bars, loss_bar, no_bars

DECODER_PREFIXES = ("decoder.", "post_quant_conv.")
LATENT_CROP = 16  # latent cells per side of a training crop (64 px at the VAE's 4x): a quarter of the cost
BATCH = 8
DECODER_LR = 2e-4  # what `train.decoder_steps` refines with


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L1 (each pixel times `weight`, N x 1 x H x W, where given) + image-gradient L1 (keeps edges and weave
    threads sharp) + L1 of 4x4 means (colour, which a small VAE otherwise learns last), on [-1, 1] images."""
    recon, images = recon.float(), images.float()
    l1 = (recon - images).abs() if weight is None else (recon - images).abs() * weight
    gradient = sum(
        (torch.diff(recon, dim=d) - torch.diff(images, dim=d)).abs().mean() for d in (2, 3)
    )
    colour = (F.avg_pool2d(recon, 4) - F.avg_pool2d(images, 4)).abs().mean()
    return l1.mean() + 0.5 * gradient + colour


def decoder_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The weights the refinement trains, by their names in the VAE."""
    return {name: value for name, value in vae.state_dict().items() if name.startswith(DECODER_PREFIXES)}


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of every image (unscaled, fp32, on the VAE's device)."""
    means, stds = [], []
    for chunk in images.split(batch):
        posterior = vae.encode(batch_to_model_range(chunk.to(vae.device))).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def refine_decoder(
    vae: AutoencoderKL, images: torch.Tensor, steps: int, lr: float, seed: int,
    stop: Callable[[], int] = lambda: 0, bars: Bars = no_bars,
) -> dict[str, torch.Tensor] | None:
    """Train `vae`'s decoder for `steps` steps on uint8 `images` (N x 3 x H x W) and return its weights, or
    None when `stop` (polled before each step) says so. Each step decodes posterior samples of random latent
    crops, flipped at random, against the same crops of the images (`reconstruction_loss`); each step
    advances the bar "VAE decoder" of `bars`. The result is fixed by `seed`, so a stopped refinement run again
    gives the same weights."""
    generator = torch.Generator().manual_seed(seed)
    means, stds = (t.cpu() for t in encode_latents(vae, images, BATCH))  # drawn from on the host, as the crops
    scale = images.shape[-1] // means.shape[-1]
    crop = min(LATENT_CROP, *means.shape[-2:])
    pixels = batch_to_model_range(images)
    trained = [p for name, p in vae.named_parameters() if name.startswith(DECODER_PREFIXES)]
    vae.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    vae.train()
    advance = loss_bar(bars, "VAE decoder", steps)
    try:
        for _ in range(steps):
            if stop():
                return None
            index = torch.randint(len(images), (BATCH,), generator=generator)
            y = int(torch.randint(means.shape[-2] - crop + 1, (1,), generator=generator))
            x = int(torch.randint(means.shape[-1] - crop + 1, (1,), generator=generator))
            rows, columns = slice(y, y + crop), slice(x, x + crop)
            latents = means[index, :, rows, columns] + stds[index, :, rows, columns] * torch.randn(
                (BATCH, means.shape[1], crop, crop), generator=generator)
            target = pixels[index, :, y * scale : (y + crop) * scale, x * scale : (x + crop) * scale]
            flip = (torch.rand(BATCH, generator=generator) < 0.5)[:, None, None, None]
            latents = torch.where(flip, latents.flip(-1), latents)
            target = torch.where(flip, target.flip(-1), target)
            recon = vae.decode(latents.to(vae.device, vae.dtype)).sample
            loss = reconstruction_loss(recon, target.to(recon.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            advance(loss.item())
    finally:
        vae.requires_grad_(False).eval()
    return decoder_state(vae)


def save_decoder(weights: dict[str, torch.Tensor], path: Path) -> None:
    """The refined weights as safetensors, written under a temporary name and renamed."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in weights.items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "dualanodiff-decoder"}))


def load_decoder(vae: AutoencoderKL, path: Path) -> None:
    """Put a run's refined decoder weights into `vae` (its other weights must be those of the run's base)."""
    weights = load_file(str(path))
    missing = set(decoder_state(vae)) - set(weights)
    if missing or not all(name.startswith(DECODER_PREFIXES) for name in weights):
        raise UserError(f"{path}: not a decoder of this base model (its weights do not match); retrain the run "
                        "or delete the file to decode with the base's own decoder")
    vae.load_state_dict(weights, strict=False)
