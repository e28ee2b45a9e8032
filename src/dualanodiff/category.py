"""Category adaptation (ours, not the paper's): the base learns a user's category from its normal images before
the dual LoRA trains, so that the few-shot adapters have only the defect left to learn.

Stable Diffusion has seen photos of nearly everything; a small base has not, and asked to render a new category
from 3-10 defect images inside a LoRA that must also learn the defect, it draws blurred, off-colour objects. A
user always has hundreds of normal images (``train/good``). A LoRA on the UNet's attention, feed-forward and
ResNet convolutions learns them under the caption ``a {object}`` (``{name} texture`` for textures) and is fused
into the frozen base for the run; SAIM, BCM and both branches' LoRA then train on top exactly as the paper says.
The LoRA is stored in the run as ``category.safetensors`` (peft's keys, its rank in the metadata), so training,
``generate`` and `DualAnoDiffPipeline.from_run` fuse the same weights::

    weights = adapt_to_category(base, images, "a bottle", CategoryOptions(steps=300, rank=32, lr=1e-3))
    save_category(weights, rank=32, path=run.category)
    fuse_category(base.unet, run.category)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save

from dualanodiff.decoder import encode_latents
from dualanodiff.errors import UserError
from dualanodiff.io import atomic_write_bytes
from dualanodiff.progress import Bars, loss_bar, no_bars

ADAPTER = "category"
# every projection and convolution of the UNet's blocks: a new category's shapes and colours live in all of them
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
CATEGORY_RANK, CATEGORY_LR = 32, 1e-3  # what `train.category_steps` trains with

@dataclass(frozen=True)
class CategoryOptions:
    steps: int
    rank: int
    lr: float
    batch_size: int = 4
    noise_offset: float = 0.0  # as the few-shot training's (`train.noise_offset`)
    seed: int = 0


def lora_config(rank: int) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True)


def adapt_to_category(
    base, images: torch.Tensor, caption: str, options: CategoryOptions,
    stop: Callable[[], int] = lambda: 0, bars: Bars = no_bars,
) -> dict[str, torch.Tensor] | None:
    """Train a LoRA of `options.rank` on `base.unet` for `options.steps` steps on uint8 `images` (N x 3 x H x W,
    flipped at random) under `caption`, with the base's own noise schedule and prediction type; return its
    weights and leave the UNet as it was. None when `stop` (polled before each step) says so. Fixed by the seed,
    so a stopped adaptation run again gives the same weights."""
    unet, scheduler = base.unet, base.scheduler
    generator = torch.Generator().manual_seed(options.seed)
    means, stds = (t.cpu() for t in encode_latents(base.vae, images))
    scaling = base.vae.config.scaling_factor
    with torch.no_grad():
        ids = base.tokenizer([caption], padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        text = base.text_encoder(ids.to(base.text_encoder.device))[0].expand(options.batch_size, -1, -1)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator
        torch.manual_seed(options.seed)
        unet.add_adapter(lora_config(options.rank), adapter_name=ADAPTER)
    trained = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=options.lr, weight_decay=1e-2)
    advance = loss_bar(bars, "category", options.steps)
    unet.train()
    try:
        for _ in range(options.steps):
            if stop():
                return None
            index = torch.randint(len(means), (options.batch_size,), generator=generator)
            latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling
            flips = torch.rand(2, options.batch_size, generator=generator) < 0.5
            latents = torch.where(flips[0, :, None, None, None], latents.flip(-1), latents)
            latents = torch.where(flips[1, :, None, None, None], latents.flip(-2), latents)
            noise = torch.randn(latents.shape, generator=generator)
            noise = noise + options.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
            timesteps = torch.randint(scheduler.config.num_train_timesteps, (options.batch_size,), generator=generator)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
            device = unet.device
            prediction = unet(noisy.to(device, unet.dtype), timesteps.to(device), text).sample
            loss = F.mse_loss(prediction.float(), target.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            advance(loss.item())
        return {name: value.detach().cpu().contiguous()
                for name, value in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    finally:
        unet.unload_lora()  # not fused: the base's own weights, untouched
        unet.requires_grad_(False).eval()


def save_category(weights: dict[str, torch.Tensor], rank: int, path: Path) -> None:
    """The category LoRA as safetensors (rank in the metadata), written under a temporary name and renamed."""
    atomic_write_bytes(path, save(weights, metadata={"format": "dualanodiff-category", "rank": str(rank)}))


def fuse_category(unet, path: Path) -> None:
    """Fuse a run's category LoRA into `unet` (the run's base, before the dual model wraps it)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != "dualanodiff-category":
        raise UserError(f"{path}: not a category adaptation of dualanodiff; retrain the run")
    weights = load_file(str(path))
    unet.add_adapter(lora_config(int(metadata["rank"])), adapter_name=ADAPTER)
    result = set_peft_model_state_dict(unet, weights, adapter_name=ADAPTER)
    if result.unexpected_keys or [key for key in result.missing_keys if ADAPTER in key]:
        unet.unload_lora()
        raise UserError(f"{path}: does not fit this base model's UNet; retrain the run")
    unet.fuse_lora(adapter_names=[ADAPTER])
    unet.unload_lora()
    unet.requires_grad_(False)
