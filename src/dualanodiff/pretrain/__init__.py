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
the settings of the shipped base's runs (``v1``, ``decoder``, ``cpu-v1``) and of the tests (``tiny``).
With a ``time_budget`` each training stage stops by the wall clock: after a few timed steps it plans how
many steps fit (the VAE's learning-rate schedule follows that plan) and it never starts a step past its
deadline.

Everything else follows from (resolution, seed, options): a seeded ``torch.Generator`` on the training
device drives every random draw, its state is checkpointed with the models and optimisers, so a resumed
run continues exactly where it stopped (on the same kind of device). Example::

    record = pretrain_base(Path("base"), steps_vae=2400, steps_unet=5500, options=PRESETS["v1"].options)
    print(record["heldout"]["vae_psnr_db"])

Modules, in the order a run uses them: ``options`` (`PretrainOptions`, `PRESETS`), ``data`` (the rendered
corpora), ``run`` (what the stages share, start and resume, warm start), ``stage`` (a stage's bookkeeping
and the clock), ``vae``, ``unet``, ``measure``, ``sheets``, ``export``, and ``build`` (`pretrain_base`).
"""

from dualanodiff.model.base import Architecture
from dualanodiff.pretrain.build import pretrain_base
from dualanodiff.pretrain.data import render_corpus, tokenizer_words
from dualanodiff.pretrain.measure import TIMESTEP_BUCKETS, measure_base
from dualanodiff.pretrain.options import PRESETS, Preset, PretrainOptions
from dualanodiff.pretrain.run import warm_start
from dualanodiff.pretrain.stage import _Stage
from dualanodiff.pretrain.unet import profile_unet_step
from dualanodiff.pretrain.vae import latent_scaling_factor, vae_loss

__all__ = [
    "Architecture", "PretrainOptions", "Preset", "PRESETS", "TIMESTEP_BUCKETS", "latent_scaling_factor", "measure_base",
    "pretrain_base", "profile_unet_step", "render_corpus", "tokenizer_words", "vae_loss", "warm_start",
    "_Stage",
]
