"""`DualAnoDiffPipeline`: joint sampling of both branches of a trained model, as a diffusers-style pipeline.

Every denoising step is ONE UNet call over the rows ``[global | anomaly | background]``, each block
holding ``2P`` rows for ``P`` pairs (the unconditional rows first, then the conditional ones, for
classifier-free guidance). The background rows are BCM's input: the VAE latents of a background
``(1 - M_f) * I`` noised to the step's timestep with fresh noise. Any diffusers scheduler runs the loop
(``pipe.scheduler``, swapped as in diffusers); the official setting is SD-1.5's PNDM, 100 steps,
guidance 2.5. Each call returns aligned images, masks (from the anomaly-part images, paper §3.3) and the
part images::

    pipe = DualAnoDiffPipeline.from_run("runs/nut-hole")          # or from_pretrained(BASE) + load_adapters(RUN)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe(num_images=4, num_inference_steps=25, guidance_scale=2.5,
               generator=[torch.Generator().manual_seed(s) for s in range(4)])
    out.images[0].save("0.png"); out.masks[0].save("0_mask.png")

Each pair draws everything random (initial noise, background noise, a stochastic scheduler's noise)
from its own ``torch.Generator``, so a pair does not depend on the batch it was sampled in: the pair of
``seeds=[s]`` (or ``generator=[torch.Generator().manual_seed(s)]``) is the same alone or in a batch, on
the same device. The two rows of a pair start from one draw (``initial_noise="shared"``, ours: it
couples where the two branches put the defect) or from independent ones (the paper and reference code).

Inpainting (``normal_image`` + ``mask``, one for all pairs or a list with one per pair): after every step
the global branch's latents outside the mask (downsampled to latent cells by max-pooling, so it covers
the mask) are replaced by the normal image's latents noised to the next step, and the anomaly branch's by
a flat grey image's (the part image is grey wherever there is no defect), so the part's defect lands inside
the mask. The pair's mask is the part mask intersected with the user mask (a defect the anomaly branch did
not draw inside the region is not labelled), and the image is the normal image itself with the part's defect
laid on inside the pair's mask (`part_onto`: the paper's part image is ``I * M``, the image inside the mask):
no VAE texture anywhere else. The global branch shapes that defect through SAIM, from the normal image it is
held to.
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from PIL import Image

from dualanodiff.category import fuse_category
from dualanodiff.config import Config, DataConfig, GenerateConfig, ModelConfig
from dualanodiff.data import load_image
from dualanodiff.decoder import decoder_state, load_decoder
from dualanodiff.devices import resolve_device, resolve_dtype
from dualanodiff.errors import UserError
from dualanodiff.images import resize_image, resize_mask, to_model_range, to_uint8
from dualanodiff.masks import (
    attention_to_mask,
    foreground_mask,
    part_onto,
    part_to_mask,
    u2net_part_mask,
)
from dualanodiff.model.base import load_base_model
from dualanodiff.model.dual import DualAnoDiffModel
from dualanodiff.runs import RunFolder

SCHEDULER_ALIASES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm-single": "DPMSolverSinglestepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "kdpm2-a": "KDPM2AncestralDiscreteScheduler",
    "deis": "DEISMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# Stable Diffusion 1.5's scheduler settings where the base's own config does not say (a DDPM config)
SD_SCHEDULER_DEFAULTS = {"skip_prk_steps": True, "set_alpha_to_one": False}
OUTPUT_TYPES = ("pil", "np")
SAVED_BASE = "model"  # a saved pipeline's base, a diffusers directory
PerPair = np.ndarray | Image.Image | list  # an image for every pair of a call, or a list of one per pair


def make_scheduler(name: str, base_config: dict):
    """A fresh diffusers scheduler by short name (pndm, ddim, dpm, ...) or class name, on the base's schedule."""

    class_name = SCHEDULER_ALIASES.get(name.lower(), name)
    if class_name not in KarrasDiffusionSchedulers.__members__:
        choices = ", ".join(SCHEDULER_ALIASES)
        raise UserError(f"generate.scheduler {name}: unknown scheduler; choose one of {choices} or a diffusers class name such as DDIMScheduler")
    try:
        return getattr(diffusers, class_name).from_config({**SD_SCHEDULER_DEFAULTS, **dict(base_config)})
    except ImportError:  # e.g. DPMSolverSDEScheduler needs torchsde
        raise UserError(f"generate.scheduler {name}: a package it needs is not installed; pick another scheduler") from None


def _saved_class(folder: Path) -> str | None:
    """The pipeline class a `save_pretrained` folder names in its ``model_index.json`` (None for anything else)."""
    index = folder / DiffusionPipeline.config_name
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def per_pair(value, pairs: int, name: str) -> list[np.ndarray]:
    """One array per pair from an image given once (used by every pair) or as a list of one per pair."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * pairs
    if len(values) != pairs:
        raise ValueError(f"{name}: {len(values)} given for {pairs} pairs; give one, or one per pair")
    return [np.asarray(v) for v in values]


def prepared_background(image: np.ndarray, kind: str, u2net_weights: str | None = None) -> np.ndarray:
    """A normal image as BCM's background, as in training: (1 - M_f) * I, mid-grey on the object."""
    outside = torch.from_numpy(~foreground_mask(image, kind, u2net_weights)).float()
    return to_uint8(to_model_range(image) * outside)


@dataclass
class DualAnoDiffPipelineOutput(BaseOutput):
    """One entry per pair. ``output_type="pil"``: RGB images, "L" masks (0/255), RGB part images;
    ``"np"``: HxWx3 uint8, HxW bool, HxWx3 uint8. ``seeds``: each pair's seed where it is known
    (``None`` for pairs drawn from caller-made generators). ``attention``: with ``return_attention``,
    (h, w) maps of the anomaly rows' cross-attention to the anomaly prompt's words."""

    images: list
    masks: list
    parts: list
    seeds: list[int | None]
    attention: list[np.ndarray] | None = None


@dataclass
class Inpainting:
    """A call's inpainting inputs at the pipeline's resolution: the normal images and masks, and the latents
    both branches keep outside the masks' latent cells (``free``, 1 inside): the normal images' for the
    image rows, flat grey's for the part rows."""

    normals: list[np.ndarray]
    masks: list[np.ndarray]
    known: torch.Tensor
    free: torch.Tensor


class DualAnoDiffPipeline(DiffusionPipeline):
    """Joint sampling of both branches of a trained DualAnoDiff model (see the module docstring), a diffusers
    pipeline with two registered modules: ``model`` (the base wrapped by the adapters) and ``scheduler`` (the one
    the loop runs, swapped as in diffusers).

    ``generate_config``: the sampling and mask-extraction defaults (a run's saved ``generate`` section), used for
    every argument left ``None`` in a call. `save_pretrained` writes one folder holding the base, the adapters,
    the settings and BCM's backgrounds; `from_pretrained` reads it back, and the same seeds give the same pairs.
    """

    def __init__(self, model: DualAnoDiffModel, scheduler: SchedulerMixin, resolution: int = 0,
                 generate_config: GenerateConfig | None = None):
        super().__init__()
        self.register_modules(model=model.eval(), scheduler=scheduler)
        self.resolution = resolution or model.base.resolution
        self.generate_config = generate_config or GenerateConfig()
        self._base_decoder: dict | None = None  # the base's decoder weights, once a run's refined one replaced them
        self.category: Path | None = None  # the run's category LoRA fused into the base, if any
        self.u2net_weights = ""  # a TorchScript U²-Net file, for generate_config.mask_method "u2net"
        self.latent_size = self.resolution // model.base.vae_scale_factor
        self.latent_channels = model.unet.config.in_channels
        self.scaling = model.vae.config.scaling_factor
        self.encode_prompts()
        self.set_backgrounds([])

    def to(self, *args, **kwargs) -> DualAnoDiffPipeline:
        """diffusers' `to` (device, dtype), then the prompt embeddings and background latents made again there."""
        super().to(*args, **kwargs)
        self.encode_prompts()
        self.set_backgrounds(self.backgrounds, self.background_names)
        return self

    def use_config(self, config: GenerateConfig) -> None:
        """Sampling and mask defaults from `config`, and a fresh scheduler of its ``scheduler`` (swap
        ``pipe.scheduler`` afterwards for another)."""
        self.generate_config = config
        self.scheduler = make_scheduler(config.scheduler, self.model.base.scheduler.config)

    def encode_prompts(self) -> None:
        """Both branches' prompt embeddings (conditional and empty) and the anomaly prompt's token positions."""
        with torch.inference_mode():
            self.text = {"uncond": self.model.prompt_embeddings(1, unconditional=True), "cond": self.model.prompt_embeddings(1)}
        tokens = self.model.base.tokenizer(self.model.cfg.anomaly_prompt, truncation=True).input_ids
        self.prompt_tokens = list(range(1, len(tokens) - 1)) or [0]  # the anomaly prompt's words, no BOS/EOS

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, model_config: ModelConfig | None = None, device: str = "auto",
        dtype: str = "fp32", resolution: int = 0, category: Path | None = None,
    ) -> DualAnoDiffPipeline:
        """A folder written by `save_pretrained` (its base, adapters, settings and backgrounds; the other arguments
        but `device` and `dtype` are not used), or a local base model ('tiny', a diffusers directory, a
        .safetensors file) with untrained adapters of `model_config`'s shape, which `load_adapters` then fills
        with a run's. `category`: a run's category LoRA (`dualanodiff.category`), fused into the base before the
        adapters wrap it."""
        folder = Path(str(pretrained_model_name_or_path)).expanduser()
        if _saved_class(folder) == cls.__name__:
            return cls._from_saved(folder, device, dtype)
        resolve_dtype(dtype, resolve_device(device))  # fail on bad options before loading the model
        cfg = replace(model_config or ModelConfig(), base_model=str(pretrained_model_name_or_path))
        base = load_base_model(cfg.base_model)
        if category is not None:
            fuse_category(base.unet, category)
        pipe = cls._around(DualAnoDiffModel(base, cfg), device, dtype, resolution)
        pipe.category = category
        return pipe

    @classmethod
    def _from_saved(cls, folder: Path, device: str, dtype: str) -> DualAnoDiffPipeline:
        cfg = RunFolder(folder).load_config()
        pipe = cls.from_pretrained(folder / SAVED_BASE, cfg.model, device, dtype, cfg.data.resolution).load_adapters(folder)
        scheduler_class = json.loads((folder / cls.config_name).read_text())["scheduler"][1]
        pipe.scheduler = getattr(diffusers, scheduler_class).from_pretrained(folder / "scheduler")
        return pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """One folder for `from_pretrained`: diffusers' ``model_index.json`` and ``scheduler/``, the base under
        the adapters in ``model/`` (a diffusers directory: category LoRA fused, refined decoder in the VAE), and
        a run's files: ``config.yaml`` (model, resolution and generate settings), ``adapters.safetensors`` and
        ``backgrounds/``. Written beside the target and renamed over it, so a stop leaves no half folder."""
        folder = Path(save_directory)
        staging = folder.with_name(f".{folder.name}.saving")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.save_config(staging)
        self.scheduler.save_pretrained(staging / "scheduler")
        self.model.save_base(staging / SAVED_BASE)
        run = RunFolder(staging)
        Config(data=DataConfig(resolution=self.resolution), model=self.model.cfg, generate=self.generate_config).to_yaml(run.config)
        self.model.save_trainable(run.adapters)
        run.backgrounds.mkdir()
        for name, image in zip(self.background_names, self.backgrounds):
            Image.fromarray(image).save(run.backgrounds / f"{name}.png")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)

    @classmethod
    def from_run(cls, run: Path | str, device: str = "auto", dtype: str = "fp32", resolution: int = 0) -> DualAnoDiffPipeline:
        """The run's base model (with its category LoRA where it has one), trained adapters, few-shot backgrounds
        and generate settings, drawing at `resolution` pixels (0: the run's training side)."""
        folder = RunFolder(run)
        cfg = folder.load_config()
        category = folder.category if folder.category.is_file() else None
        pipe = cls.from_pretrained(cfg.model.base_model, cfg.model, device, dtype, resolution or cfg.data.resolution, category)
        return pipe.load_adapters(run)

    @classmethod
    def from_model(
        cls, model: DualAnoDiffModel, backgrounds: list[np.ndarray], device: str = "auto", dtype: str = "fp32",
        resolution: int = 0,
    ) -> DualAnoDiffPipeline:
        """A pipeline around an in-memory model; `resolution` 0 means the backgrounds' size, else the base's."""
        pipe = cls._around(model, device, dtype, resolution or (backgrounds[0].shape[0] if backgrounds else 0))
        pipe.set_backgrounds(backgrounds)
        return pipe

    @classmethod
    def _around(cls, model: DualAnoDiffModel, device: str, dtype: str, resolution: int) -> DualAnoDiffPipeline:
        """A pipeline around `model`, moved to `device` in `dtype`, with the default sampling settings."""
        target = resolve_device(device)
        model = model.to(target, resolve_dtype(dtype, target))
        return cls(model, make_scheduler(GenerateConfig().scheduler, model.base.scheduler.config), resolution)

    def load_adapters(self, run: Path | str) -> DualAnoDiffPipeline:
        """Load a training run's adapters, prompts, few-shot backgrounds (BCM) and saved generate settings.
        The run's model must have this pipeline's shape (rank, SAIM, BCM, ...); its prompts are taken over."""
        run = RunFolder(run)
        cfg = run.load_config()
        if run.category.is_file() and self.category != run.category:
            raise UserError(f"{run.root}: its base was adapted to its category ({run.category.name}); load it with "
                            f"from_run({str(run.root)!r})")
        taken = {name: getattr(cfg.model, name) for name in ("base_model", "global_prompt", "anomaly_prompt")}
        if cfg.model != replace(self.model.cfg, **taken):
            raise UserError(f"{run.root}: its model settings differ from this pipeline's; load it with "
                            f"from_run({str(run.root)!r})")
        self.model.cfg = replace(self.model.cfg, **taken)
        self.model.load_trainable(run.adapters)
        self._load_decoder(run.decoder)
        self.model.to(self.device, self.dtype)
        self.use_config(cfg.generate)
        self.encode_prompts()
        paths = run.background_paths()
        self.set_backgrounds([load_image(p) for p in paths], [p.stem for p in paths])
        return self

    def _load_decoder(self, path: Path) -> None:
        """The run's refined VAE decoder where it has one (`dualanodiff.decoder`), else the base's own."""
        vae = self.model.vae
        if path.is_file():
            if self._base_decoder is None:
                self._base_decoder = {name: value.clone() for name, value in decoder_state(vae).items()}
            load_decoder(vae, path)
        elif self._base_decoder is not None:
            vae.load_state_dict(self._base_decoder, strict=False)

    def set_backgrounds(self, backgrounds: list[np.ndarray], names: list[str] | None = None) -> None:
        """The few-shot backgrounds BCM reads when a call gives none (pair k uses `background_index(seed)`)."""
        self.backgrounds = [resize_image(b, self.resolution) for b in backgrounds]
        self.background_names = names or [str(i) for i in range(len(backgrounds))]
        with torch.inference_mode():
            self.background_latents = self.encode(self.backgrounds) if self.backgrounds else None

    def _start(self, sampler, draw: torch.Tensor, init: list[np.ndarray] | None, strength: float):
        """(x_T, timesteps to run): the noise draw at the first step, or the init images (all image rows, then
        all part rows) noised with it to the step that share of the schedule from its end. At strength 1 that
        is the first step, as diffusers' img2img: x_T then keeps the images' colours, as it does in training,
        where the first step keeps about 7 % of its image (SD's schedule: sqrt(alpha_bar) 0.07)."""
        if init is None:
            return draw * sampler.init_noise_sigma, sampler.timesteps
        start = int(len(sampler.timesteps) * (1 - strength))
        if hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(start)
        timesteps = sampler.timesteps[start:]
        return sampler.add_noise(self.encode(init), draw, timesteps[:1].expand(len(init))), timesteps

    def _inpainting(self, normal_image: PerPair, mask: PerPair, pairs: int) -> Inpainting:
        normals = [resize_image(n, self.resolution) for n in per_pair(normal_image, pairs, "normal_image")]
        masks = [resize_mask(m > 0, self.resolution) for m in per_pair(mask, pairs, "mask")]
        free = F.adaptive_max_pool2d(torch.from_numpy(np.stack(masks)).float()[:, None], (self.latent_size,) * 2)
        grey = self.encode([np.full((self.resolution, self.resolution, 3), 128, np.uint8)]).expand(pairs, -1, -1, -1)
        return Inpainting(normals, masks, torch.cat([self.encode(normals), grey]), free.repeat(2, 1, 1, 1).to(self.device))

    def background_index(self, seed: int) -> int:
        """Which few-shot background a pair uses: chosen by its seed, so regeneration picks the same one."""
        return seed % len(self.backgrounds)

    # --- the pieces of a step ----------------------------------------------------------------------

    def encode(self, images: list[np.ndarray]) -> torch.Tensor:
        """VAE latent means (scaled), float32, of HxWx3 uint8 images at the pipeline's resolution, one image at a
        time: convolution kernels take another path for a batch of one than for more, and a pair's inputs must
        not depend on how many pairs share its batch (resumed generation is byte-identical to one run)."""
        pixels = [to_model_range(resize_image(i, self.resolution))[None].to(self.device, self.dtype) for i in images]
        return torch.cat([self.model.vae.encode(p).latent_dist.mean for p in pixels]).float() * self.scaling

    def guided_noise(
        self, x_global: torch.Tensor, x_anomaly: torch.Tensor, t: torch.Tensor, x_background: torch.Tensor | None,
        guidance: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free-guided noise of both branches from ONE UNet call over [uncond; cond] rows of each block."""
        pairs = x_global.shape[0]
        text = {
            branch: torch.cat([self.text["uncond"][branch], self.text["cond"][branch]]).repeat_interleave(pairs, 0)
            for branch in ("global", "anomaly")
        }
        x_global, x_anomaly, x_background = (
            None if x is None else torch.cat([x, x]).to(self.dtype) for x in (x_global, x_anomaly, x_background)
        )
        eps_global, eps_anomaly = self.model.predict_noise(x_global, x_anomaly, t.expand(2 * pairs), text, x_background)
        guided = [u + guidance * (c - u) for u, c in (e.float().chunk(2) for e in (eps_global, eps_anomaly))]
        return guided[0], guided[1]

    def _attention(self, processors, pairs: int) -> torch.Tensor:
        """(pairs, h, w): the conditional anomaly rows' attention to the prompt's tokens, averaged over layers."""
        maps = []
        for processor in processors:
            for probabilities in processor.attention_maps:  # (2 * pairs, queries, tokens), uncond rows first
                heat = probabilities[pairs:, :, self.prompt_tokens].sum(-1)
                side = int(round(heat.shape[1] ** 0.5))
                maps.append(F.interpolate(heat.view(pairs, 1, side, side), size=(self.latent_size,) * 2, mode="bilinear"))
        return torch.cat(maps, 1).mean(1)

    def part_mask(self, part: np.ndarray, attention: np.ndarray | None) -> np.ndarray:
        """A pair's defect mask by ``generate_config.mask_method``: threshold of the part image, attention or U²-Net."""
        cfg = self.generate_config
        if cfg.mask_method == "attention":
            return attention_to_mask(attention, part.shape[:2])
        if cfg.mask_method == "u2net":
            return u2net_part_mask(part, self.u2net_weights)
        return part_to_mask(part)

    def _generators(self, num_images: int | None, generator, seeds: list[int] | None):
        """(generators, seeds) of a call: per-pair generators from `seeds`, the caller's list, one shared
        generator (draws interleave: reproducible, but pairs then depend on the batch), or seeds drawn from
        torch's global random state (``torch.manual_seed`` makes them repeatable)."""
        if seeds is not None:
            if generator is not None:
                raise ValueError("give seeds or generator, not both")
            seeds = [int(s) for s in seeds]
            return [torch.Generator().manual_seed(s) for s in seeds], seeds
        if isinstance(generator, (list, tuple)):
            if num_images is not None and num_images != len(generator):
                raise ValueError(f"num_images {num_images} but {len(generator)} generators")
            return list(generator), [None] * len(generator)
        count = 1 if num_images is None else num_images
        if generator is not None:
            return [generator] * count, [None] * count
        drawn = torch.randint(0, 2**31 - 1, (count,)).tolist()
        return [torch.Generator().manual_seed(s) for s in drawn], drawn

    # --- sampling ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        num_images: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        background: PerPair | None = None,
        normal_image: PerPair | None = None,
        mask: PerPair | None = None,
        output_type: str = "pil",
        *,
        seeds: list[int] | None = None,
        initial_noise: str | None = None,
        return_attention: bool = False,
        init_image: PerPair | None = None,
        init_part: PerPair | None = None,
        strength: float = 1.0,
        lay_part: bool | None = None,
    ) -> DualAnoDiffPipelineOutput:
        """Sample `num_images` aligned (image, mask, part) pairs; `background` replaces the few-shot ones for
        BCM; `normal_image` + `mask` put the defect into a given normal image inside `mask` (inpainting);
        `init_image` + `init_part` start both branches from those images noised to the `strength` share of the
        schedule (as diffusers' img2img), e.g. a real defect pasted where it should go; `lay_part` lays each
        part's defect onto its whole image inside the mask (inpainting always does). Each image argument is one
        image for all pairs or a list of one per pair. Arguments left None come from ``self.generate_config`` (steps,
        guidance, initial noise, lay_part)."""
        cfg = self.generate_config
        steps = cfg.steps if num_inference_steps is None else num_inference_steps
        guidance = cfg.guidance if guidance_scale is None else guidance_scale
        initial_noise = initial_noise or cfg.initial_noise
        lay_part = cfg.lay_part if lay_part is None else lay_part
        check_call(output_type, normal_image, mask, init_image, init_part, strength, steps)
        generators, pair_seeds = self._generators(num_images, generator, seeds)
        sampler = copy.deepcopy(self.scheduler)  # set_timesteps and multistep solvers keep state per call
        sampler.set_timesteps(steps, device=self.device)
        pairs = len(generators)
        independent = initial_noise == "independent"
        draw = self._noise(generators, 2) if independent else self._noise(generators, 1).repeat(2, 1, 1, 1)
        init = None if init_image is None else per_pair(init_image, pairs, "init_image") + per_pair(init_part, pairs, "init_part")
        latents, timesteps = self._start(sampler, draw, init, strength)
        clean_background = self._clean_background(background, pairs, pair_seeds)
        inpaint = None if normal_image is None else self._inpainting(normal_image, mask, pairs)
        capture = return_attention or cfg.mask_method == "attention"
        latents, maps = self._denoise(sampler, timesteps, latents, generators, clean_background, inpaint, guidance,
                                      capture)
        images, masks, parts = self._pairs(latents, maps, inpaint, lay_part, pairs)
        if output_type == "pil":
            images, parts = [Image.fromarray(i) for i in images], [Image.fromarray(p) for p in parts]
            masks = [Image.fromarray(m.astype(np.uint8) * 255) for m in masks]
        return DualAnoDiffPipelineOutput(images, masks, parts, pair_seeds, maps if return_attention else None)

    def _noise(self, generators: list[torch.Generator], rows_per_pair: int) -> torch.Tensor:
        """Latent noise, each pair's draws from its own generator: (rows_per_pair * pairs, ...), row-blocked."""
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        draws = [torch.randn((rows_per_pair, *shape), generator=g) for g in generators]
        return torch.stack(draws, 1).flatten(0, 1).to(self.device)

    def _clean_background(self, background: PerPair | None, pairs: int,
                          pair_seeds: list[int | None]) -> torch.Tensor | None:
        """BCM's background latents: the given images, else the run's backgrounds by seed (else by position in
        the call); None without BCM."""
        if not self.model.cfg.bcm:
            return None
        if background is not None:
            return self.encode(per_pair(background, pairs, "background"))
        if self.background_latents is not None:
            chosen = [self.background_index(k if s is None else s) for k, s in enumerate(pair_seeds)]
            return self.background_latents[chosen]
        raise UserError("background: the model uses BCM but the run has no backgrounds/; pass background= an image")

    def _denoise(self, sampler, timesteps, latents, generators, clean_background, inpaint, guidance, capture):
        """The sampling loop with both LoRA branches merged; with `capture` the attention maps averaged over the
        later half of the steps (else None)."""
        pairs = len(generators)
        step_kwargs = {"generator": generators + generators} if "generator" in inspect.signature(sampler.step).parameters else {}
        attention = torch.zeros((pairs, self.latent_size, self.latent_size), device=self.device) if capture else None
        late = len(timesteps) // 2
        with self.model.merged_adapters():  # no training here: each branch's LoRA folded into the weights
            for i, t in enumerate(self.progress_bar(timesteps)):
                rows = [latents]
                if clean_background is not None:
                    rows.append(sampler.add_noise(clean_background, self._noise(generators, 1), t.expand(pairs)))
                model_input = sampler.scale_model_input(torch.cat(rows), t)
                x_global, x_anomaly = model_input[:pairs], model_input[pairs : 2 * pairs]
                x_background = model_input[2 * pairs :] if clean_background is not None else None
                if attention is not None and i >= late:
                    with self.model.capturing_attention() as processors:
                        eps = self.guided_noise(x_global, x_anomaly, t, x_background, guidance)
                    attention += self._attention(processors, pairs)
                else:
                    eps = self.guided_noise(x_global, x_anomaly, t, x_background, guidance)
                latents = sampler.step(torch.cat(eps), t, latents, **step_kwargs).prev_sample
                if inpaint is not None:  # both branches: the image is the normal one, the part grey, outside `free`
                    target = inpaint.known
                    if i + 1 < len(timesteps):
                        noise = self._noise(generators, 2)
                        target = sampler.add_noise(target, noise, timesteps[i + 1].expand(2 * pairs))
                    latents = inpaint.free * latents + (1 - inpaint.free) * target
        maps = None if attention is None else list((attention / (len(timesteps) - late)).cpu().numpy())
        return latents, maps

    def _pairs(self, latents: torch.Tensor, maps, inpaint: Inpainting | None, lay_part: bool, pairs: int):
        """Decoded images, their masks from the part images, and the parts (uint8 arrays)."""
        pixels = self.model.vae.decode((latents / self.scaling).to(self.dtype)).sample.float()
        images, parts = list(to_uint8(pixels[:pairs])), list(to_uint8(pixels[pairs:]))
        masks = [self.part_mask(part, None if maps is None else maps[k]) for k, part in enumerate(parts)]
        if inpaint is not None:
            masks = [m & user for m, user in zip(masks, inpaint.masks)]
            images = [part_onto(normal, part, m) for normal, part, m in zip(inpaint.normals, parts, masks)]
        elif lay_part:
            images = [part_onto(image, part, m) for image, part, m in zip(images, parts, masks)]
        return images, masks, parts


def check_call(output_type, normal_image, mask, init_image, init_part, strength: float, steps: int) -> None:
    """A pipeline call's arguments that go together or have a range, checked before any work."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
    if (normal_image is None) != (mask is None) or (init_image is None) != (init_part is None):
        raise ValueError("normal_image and mask go together, as do init_image and init_part")
    if not 0 < strength <= 1:
        raise ValueError(f"strength {strength}: must lie in (0, 1]")
    if steps < 1:
        raise UserError(f"--steps {steps}: must be at least 1")
