"""What a pretraining run is reproducible from (`PretrainOptions`) and the named settings of
``dualanodiff pretrain-base --preset`` (`PRESETS`)."""

from __future__ import annotations

import dataclasses
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
