"""The frozen base model: a Stable Diffusion 1.x/2.x directory, a single checkpoint, or the project's own.

Nothing here ever reaches a model hub: every `from_pretrained` runs with `local_files_only=True`, and a
missing path is a `UserError` listing what to provide.

- `tiny`: the project's small pretrained latent diffusion model shipped in the package (see docs/base-model.md).
- `tiny-random`: the same architecture family at test size, randomly initialised (seeded).

The project's own base comes in the sizes of ``ARCHITECTURES`` (``dualanodiff pretrain-base --preset``):
``v1`` (4.2 M-parameter UNet without attention at the full latent resolution, trainable on a CPU),
``v2`` (Stable-Diffusion-shaped: cross-attention at every latent level, 32x32 included, about 18 M
parameters in all, stored in fp16 within 40 MiB; made for a GPU), ``v2-cpu`` (the v2 shape at v1's width:
attention at every level, trainable on a CPU in about two hours) and ``test`` (seconds on a CPU). Any of them
loads the same way, as a diffusers directory whose weights may be fp16 and sharded; it is always loaded
in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from dualanodiff.config import read_yaml
from dualanodiff.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
hf_logging.disable_progress_bar()  # our own rich bars report progress; tqdm bars would interleave
diffusers_logging.disable_progress_bar()  # e.g. "Loading checkpoint shards" for a sharded UNet

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
EMBEDDED_BASE = Path(__file__).resolve().parent.parent / "assets" / "tiny-base"
RECIPE = "recipe.yaml"  # beside a base's components: the few-shot settings that suit it (config sections)


@dataclass
class BaseModel:
    """The parts of a latent text-to-image diffusion model that DualAnoDiff tunes on top of."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    resolution: int  # native image size in pixels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def freeze(self) -> BaseModel:
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        return self


def base_folder(spec: str) -> Path:
    """The directory of the base `spec` ('tiny': the embedded one)."""
    return EMBEDDED_BASE if spec == "tiny" else Path(spec).expanduser()


def base_recipe(spec: str) -> dict:
    """The few-shot settings stored with a base (``recipe.yaml`` in its directory: config sections), or {}.

    `train` and `run-all` put them between the defaults and the user's --config and flags, so the embedded
    base gets the learning rate and length it needs while Stable Diffusion keeps the paper's settings."""
    folder = base_folder(spec)
    return read_yaml(folder / RECIPE) if (folder / RECIPE).is_file() else {}


def load_base_model(spec: str) -> BaseModel:
    """Load the base named by `spec`: 'tiny', 'tiny-random', a diffusers directory or a .safetensors file."""
    if spec == "tiny-random":
        return tiny_random_base()
    if spec == "tiny":
        if not (EMBEDDED_BASE / "unet").is_dir():
            raise UserError(
                f"the embedded base model is missing from {EMBEDDED_BASE}; reinstall the package or "
                "create it with `dualanodiff pretrain-base --out DIR` and pass --base-model DIR"
            )
        return _load_diffusers_dir(EMBEDDED_BASE)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"--base-model {spec}: path does not exist; give a local Stable Diffusion diffusers directory "
            f"({', '.join(COMPONENTS)}), a .safetensors checkpoint, 'tiny' or 'tiny-random'"
        )
    if path.is_file():
        return _load_single_file(path)
    return _load_diffusers_dir(path)


def _load_diffusers_dir(path: Path) -> BaseModel:
    missing = [name for name in COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise UserError(
            f"--base-model {path}: incomplete diffusers directory, missing {', '.join(missing)}/; "
            "save a full StableDiffusionPipeline there (pipe.save_pretrained(DIR))"
        )
    kw = {"local_files_only": True}
    try:  # fp32 whatever the storage: the project's own base is stored in fp16, Stable Diffusion may be
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32, **kw)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch.float32, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch.float32, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", **kw)
    except (OSError, ValueError) as exc:
        raise UserError(f"--base-model {path}: cannot load ({str(exc).splitlines()[0]})") from None
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, resolution).freeze()


def _load_single_file(path: Path) -> BaseModel:
    if path.suffix.lower() not in (".safetensors", ".ckpt"):
        raise UserError(f"--base-model {path}: expected a diffusers directory or a .safetensors checkpoint")
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), local_files_only=True)
    except Exception as exc:  # diffusers raises several types for missing local configs
        raise UserError(
            f"--base-model {path}: cannot read this single-file checkpoint offline ({str(exc).splitlines()[0]}); "
            "convert it once to a diffusers directory where its configs are available and pass that directory"
        ) from None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, resolution).freeze()


# --- the project's own small configurations -------------------------------------------------------

# Words that become single tokens; everything else falls back to characters.
VOCAB_WORDS = (
    "a", "an", "the", "with", "of", "on", "and", "photo", "image", "vfx", "sks", "good", "defect", "object",
    "texture", "scratch", "hole", "stain", "crack", "missing", "piece", "cut", "spot", "colour", "color",
    "bent", "broken", "contamination", "print", "squeeze", "thread", "poke", "glue", "fold", "rough",
    "nut", "disc", "pill", "bottle", "capsule", "grid", "tile", "wood", "leather", "carpet", "cable",
    "screw", "zipper", "hazelnut", "transistor", "toothbrush", "fabric", "weave", "ring", "washer",
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character map (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_tokenizer(max_length: int = 16, words: tuple[str, ...] = VOCAB_WORDS) -> CLIPTokenizer:
    """A small byte-level BPE CLIP tokenizer: every byte is a token, each word in `words` is one token."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


IDENTIFIER_WORDS = ("vfx", "sks")  # the paper's identifier words: whole tokens, never trained in pretraining


@dataclass(frozen=True)
class Architecture:
    """Sizes of the project's own base. ``heads``: attention heads per UNet level (diffusers'
    ``attention_head_dim``), or with ``head_dim`` > 0 each level gets channels // head_dim heads.
    ``vocabulary``: "fixed" keeps ``VOCAB_WORDS`` whole; "world" keeps the pretraining captions' words whole
    and spells category names in characters (so a name the base never saw still reads as something)."""

    unet_channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[int, ...] = (1, 2)
    vae_channels: tuple[int, ...] = (32, 64, 64)  # three levels: down-factor 4
    text_width: int = 96
    text_layers: int = 3
    heads: int = 4
    layers_per_block: tuple[int, ...] = (1,)  # one entry per UNet level, or one for all
    vae_layers: int = 1
    head_dim: int = 0
    norm_groups: int = 8
    text_length: int = 16
    vocabulary: str = "fixed"

    def unet_heads(self) -> int | tuple[int, ...]:
        return tuple(c // self.head_dim for c in self.unet_channels) if self.head_dim else self.heads


ARCHITECTURES: dict[str, Architecture] = {
    # the shipped base up to now: no attention at the full 32x32 latent level (its CPU cost)
    "v1": Architecture(),
    # Stable-Diffusion-shaped: cross-attention at every level, two blocks and the most width at full
    # resolution, where a 1-3-cell defect lives; 13.3 M UNet + 3.8 M VAE + 0.8 M text encoder
    "v2": Architecture(
        unet_channels=(96, 128, 192), attention_levels=(0, 1, 2), layers_per_block=(2, 1, 1),
        vae_channels=(64, 128, 128), text_width=128, text_layers=4, head_dim=32, norm_groups=32, text_length=24,
        vocabulary="world",
    ),
    # the v2 shape at v1's width, for pretraining on a CPU: cross-attention at every level (2 heads of 16 at
    # full resolution), 0.77 s per batch-12 step on 2 cores against v1's 0.40 and v2's 4.6
    "v2-cpu": Architecture(
        unet_channels=(32, 64, 128), attention_levels=(0, 1, 2), head_dim=16, text_length=24, vocabulary="world",
    ),
    # v2-cpu's UNet (CPU-cheap few-shot training) with v2's wider VAE, which has to draw small dark defects and
    # flat grey faithfully; for pretraining on a GPU (preset gpu-small)
    "v2-small": Architecture(
        unet_channels=(32, 64, 128), attention_levels=(0, 1, 2), head_dim=16, vae_channels=(64, 128, 128),
        text_length=24, vocabulary="world",
    ),
    # v1 with cross-attention at the full latent level too, for warm starts from a v1 base (`init_from`): every
    # v1 weight keeps its shape and its heads, the new blocks are added around it
    "v1-attn": Architecture(attention_levels=(0, 1, 2)),
    # the v2 shape at test size: seconds on a CPU
    "test": Architecture(
        unet_channels=(8, 16, 32), attention_levels=(0, 1, 2), vae_channels=(8, 16, 16), text_width=16,
        text_layers=1, heads=4, text_length=24, vocabulary="world",
    ),
}


def build_base(
    arch: Architecture, resolution: int, words: tuple[str, ...] = VOCAB_WORDS
) -> tuple[CLIPTokenizer, UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Tokenizer (keeping `words` whole) and randomly initialised UNet, VAE and text encoder of `arch`."""
    tokenizer = build_tokenizer(arch.text_length, tuple(words))
    layers = arch.layers_per_block[0] if len(arch.layers_per_block) == 1 else arch.layers_per_block
    unet, vae, text_encoder = tiny_architecture(
        tokenizer, resolution, arch.unet_channels, arch.vae_channels, arch.text_width, arch.text_layers,
        arch.unet_heads(), arch.attention_levels, layers_per_block=layers, vae_layers=arch.vae_layers,
        norm_groups=arch.norm_groups,
    )
    return tokenizer, unet, vae, text_encoder


def tiny_architecture(
    tokenizer: CLIPTokenizer,
    resolution: int,
    unet_channels: tuple[int, ...],
    vae_channels: tuple[int, ...],
    text_width: int,
    text_layers: int,
    heads: int | tuple[int, ...],
    attention_levels: tuple[int, ...] | None = None,
    *,
    layers_per_block: int | tuple[int, ...] = 1,
    vae_layers: int = 1,
    norm_groups: int = 8,
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Stable-Diffusion-shaped UNet/VAE/CLIP text encoder at a chosen small size, randomly initialised.

    `attention_levels` are the UNet levels (0 = full latent resolution) that get cross-attention blocks;
    by default all but the deepest, as in Stable Diffusion. Leaving out level 0 saves most of the cost
    on a CPU, where self-attention over every latent pixel dominates.
    """
    groups = min(norm_groups, unet_channels[0])
    n = len(unet_channels)
    levels = range(n - 1) if attention_levels is None else attention_levels
    down = tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(n)))
    unet = UNet2DConditionModel(
        sample_size=resolution // 2 ** (len(vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=text_width,
        attention_head_dim=heads,
        norm_num_groups=groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        latent_channels=4,
        layers_per_block=vae_layers,
        norm_num_groups=min(norm_groups, vae_channels[0]),
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=text_width,
            intermediate_size=text_width * 4,
            num_hidden_layers=text_layers,
            num_attention_heads=max(1, text_width // 16),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return unet, vae, text_encoder


def sd_scheduler() -> DDPMScheduler:
    """Stable Diffusion 1.x's training noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )


def tiny_random_base(seed: int = 0, resolution: int = 32) -> BaseModel:
    """A test-size random base: 32 px images, 16x16x4 latents, 2 cross-attention levels."""
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = tiny_architecture(
            tokenizer, resolution, unet_channels=(32, 64), vae_channels=(16, 32), text_width=32,
            text_layers=2, heads=8,
        )
    return BaseModel(unet, vae, text_encoder, tokenizer, sd_scheduler(), resolution).freeze()
