"""What a pretraining run is reproducible from (`PretrainOptions`) and the named settings of
``dualanodiff pretrain-base --preset`` (`PRESETS`)."""

from __future__ import annotations

from dataclasses import dataclass

from dualanodiff.model.base import ARCHITECTURES, Architecture
from dualanodiff.synthetic import PRETRAIN_FAMILIES


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


@dataclass(frozen=True)
class Preset:
    """Named settings: options and the default step counts (maxima under a time budget)."""

    options: PretrainOptions
    steps_vae: int
    steps_unet: int
    about: str
    steps_decoder: int = 0


PRESETS: dict[str, Preset] = {
    "v1": Preset(PretrainOptions(architecture=ARCHITECTURES["v1"], storage="fp32"), steps_vae=2400, steps_unet=5500,
                 about="the shipped base's first run (stages 1 and 2 of docs/base-model.md): its architecture (no attention at the full latent level) and "
                       "recipe, from scratch (CPU: about 80 minutes on one core)"),
    "decoder": Preset(
        PretrainOptions(architecture=ARCHITECTURES["v1"], init_from="tiny", train_images=3000, storage="fp32"),
        steps_vae=0, steps_unet=0, steps_decoder=2200,
        about="stage 3 of the shipped base: the VAE decoder of a base (the shipped one, or --init-from DIR) refined "
              "on the wider world, its defect pixels weighted; encoder, latents, UNet and text encoder unchanged "
              "(CPU: about 15 minutes)",
    ),
    # batch 32: on a CPU as many samples per second as batch 128, at a quarter of the step time
    "cpu-v1": Preset(
        PretrainOptions(architecture=ARCHITECTURES["v1"], init_from="tiny", train_images=12000, heldout_images=128,
                        vae_batch=32, vae_lr=1e-3, unet_batch=32, unet_lr=2e-4, ema_decay=0.9995,
                        samples_per_prompt=1, storage="fp32"),
        steps_vae=0, steps_unet=40000,
        about="stage 4 of the shipped base: the UNet and text encoder of a base (the shipped one, or --init-from "
              "DIR) trained on the wider world at batch 32 (2 cores: 1.85 s per step; give --time-budget, resumable)",
    ),
    "tiny": Preset(
        PretrainOptions(
            architecture=ARCHITECTURES["test"], train_images=16, heldout_images=8, vae_batch=4, unet_batch=4,
            warmup=2, checkpoint_every=2, log_every=2, sample_steps=2, samples_per_prompt=1,
        ),
        steps_vae=3, steps_unet=4, about="test size: seconds on a CPU (use --resolution 32)",
    ),
}
"""The settings that build the shipped base, stage by stage (docs/base-model.md), and the tests' size. The
candidates measured against it and not shipped are in experiments/BASE_MODELS.md with their commits."""
