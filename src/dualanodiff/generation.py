"""Generation of aligned anomaly image-mask pairs from a trained run (paper §3.3, DESIGN §3).

`DualAnoDiffPipeline` samples both branches jointly: every denoising step is ONE UNet call over the
rows ``[global | anomaly | background]``, each block holding ``2P`` rows for ``P`` pairs (the
unconditional rows first, then the conditional ones, for classifier-free guidance). The background rows
are BCM's input: the VAE latents of a background ``(1 - M_f) * I`` noised to the step's timestep with
fresh noise. Any diffusers scheduler runs the loop; the official setting is SD-1.5's PNDM, 100 steps,
guidance 2.5::

    pipe = DualAnoDiffPipeline.from_run("runs/nut-hole")
    pairs = pipe(seeds=[0, 1, 2, 3], steps=25, scheduler="dpm")   # GeneratedPair: image, part, seed
    summary = generate(Path("runs/nut-hole"), Path("gen"), GenerateConfig(num=8))

Each pair draws everything random (initial noise, background noise, a stochastic scheduler's noise)
from its own ``torch.Generator`` seeded with its seed, so a pair does not depend on the batch it was
sampled in, and ``seed = generate.seed + attempt`` regenerates it on the same device. The two rows of a
pair start from independent noise (the paper and reference code) or from one draw
(``initial_noise="shared"``), which couples where the two branches put the defect.

`generate` turns pairs into files: a mask from the anomaly-part image (Otsu threshold, cross-attention
of the anomaly prompt's tokens or U²-Net), the quality filter, the pair-consistency and image-mask
alignment scores (`dualanodiff.alignment`), and the resumable MVTec-like layout of `dualanodiff.pairs`.

Inpainting (``normal``/``normal_mask``): after every step the global branch's latents outside the mask
(downsampled to latent cells by max-pooling, so it covers the mask) are replaced by the normal image's
latents noised to the next step. The decoded image is taken from the VAE reconstruction of the normal
image outside those latent cells, so it stays within VAE reconstruction error of the input there. The
pair's mask is the part mask intersected with the user mask; an empty intersection is an "empty" mask
(dropped by the filter): a defect the anomaly branch did not draw inside the region is not labelled.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from dualanodiff.alignment import alignment_score
from dualanodiff.config import Config, GenerateConfig
from dualanodiff.data import foreground_mask, load_image, load_mask, natural_key, open_category
from dualanodiff.devices import resolve_device, resolve_dtype
from dualanodiff.errors import UserError
from dualanodiff.masks import attention_to_mask, filter_verdict, pair_consistency, part_to_mask, u2net_part_mask
from dualanodiff.model.base import load_base_model
from dualanodiff.model.dual import DualAnoDiffModel
from dualanodiff.pairs import PairWriter
from dualanodiff.images import resize_image, resize_mask, to_model_range, to_uint8
from dualanodiff.training import ADAPTERS

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


def make_scheduler(name: str, base_config: dict):
    """A fresh diffusers scheduler by short name (pndm, ddim, dpm, ...) or class name, on the base's schedule."""
    import diffusers

    class_name = SCHEDULER_ALIASES.get(name.lower(), name)
    if class_name not in KarrasDiffusionSchedulers.__members__:
        choices = ", ".join(SCHEDULER_ALIASES)
        raise UserError(f"--scheduler {name}: unknown scheduler; choose one of {choices} or a diffusers class name such as DDIMScheduler")
    try:
        return getattr(diffusers, class_name).from_config({**SD_SCHEDULER_DEFAULTS, **base_config})
    except ImportError:  # e.g. DPMSolverSDEScheduler needs torchsde
        raise UserError(f"--scheduler {name}: a package it needs is not installed; pick another scheduler") from None


@dataclass
class GeneratedPair:
    image: np.ndarray  # HxWx3 uint8, the global branch decoded
    part: np.ndarray  # HxWx3 uint8, the anomaly branch decoded (mid-grey outside the defect)
    seed: int
    attention: np.ndarray | None  # (h, w) map of the anomaly rows' cross-attention to the anomaly prompt


class DualAnoDiffPipeline:
    """Joint sampling of both branches of a trained DualAnoDiff model (see the module docstring)."""

    def __init__(
        self, model: DualAnoDiffModel, backgrounds: list[np.ndarray], resolution: int, device: str = "auto",
        dtype: str = "fp32", background_names: list[str] | None = None,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(self.device, self.dtype).eval()
        self.resolution = resolution
        self.backgrounds = [resize_image(b, resolution) for b in backgrounds]
        self.background_names = background_names or [str(i) for i in range(len(backgrounds))]
        self.latent_size = resolution // model.base.vae_scale_factor
        self.latent_channels = model.unet.config.in_channels
        self.scaling = model.vae.config.scaling_factor
        with torch.inference_mode():
            self.text = {
                "uncond": model.prompt_embeddings(1, unconditional=True),
                "cond": model.prompt_embeddings(1),
            }
            self.background_latents = self.encode(self.backgrounds) if self.backgrounds else None
        tokens = model.base.tokenizer(model.cfg.anomaly_prompt, truncation=True).input_ids
        self.prompt_tokens = list(range(1, len(tokens) - 1)) or [0]  # the anomaly prompt's words, no BOS/EOS

    @classmethod
    def from_run(cls, run: Path | str, device: str = "auto", dtype: str = "fp32") -> DualAnoDiffPipeline:
        """The run's base model with its trained adapters and few-shot backgrounds, at the training size."""
        run = Path(run)
        cfg = load_run_config(run)
        resolve_dtype(dtype, resolve_device(device))  # fail on bad options before loading the model
        model = DualAnoDiffModel(load_base_model(cfg.model.base_model), cfg.model)
        model.load_trainable(run / ADAPTERS)
        paths = sorted((run / "backgrounds").glob("*.png"), key=lambda p: natural_key(p.name))
        resolution = cfg.data.resolution or model.base.resolution
        return cls(model, [load_image(p) for p in paths], resolution, device, dtype, [p.stem for p in paths])

    @classmethod
    def from_model(
        cls, model: DualAnoDiffModel, backgrounds: list[np.ndarray], device: str = "auto", dtype: str = "fp32",
        resolution: int = 0,
    ) -> DualAnoDiffPipeline:
        """A pipeline around an in-memory model; `resolution` 0 means the backgrounds' size, else the base's."""
        resolution = resolution or (backgrounds[0].shape[0] if backgrounds else model.base.resolution)
        return cls(model, backgrounds, resolution, device, dtype)

    def background_index(self, seed: int) -> int:
        """Which few-shot background a pair uses: chosen by its seed, so regeneration picks the same one."""
        return seed % len(self.backgrounds)

    # --- the pieces of a step ----------------------------------------------------------------------

    def encode(self, images: list[np.ndarray]) -> torch.Tensor:
        """VAE latent means (scaled), float32, of HxWx3 uint8 images at the pipeline's resolution."""
        pixels = torch.stack([to_model_range(resize_image(i, self.resolution)) for i in images])
        latents = self.model.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean
        return latents.float() * self.scaling

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

    # --- sampling ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        seeds: list[int],
        steps: int = 100,
        guidance: float = 2.5,
        scheduler: str = "pndm",
        background: np.ndarray | None = None,
        capture_attention: bool = False,
        normal: np.ndarray | None = None,
        normal_mask: np.ndarray | None = None,
        initial_noise: str = "independent",
    ) -> list[GeneratedPair]:
        """Sample one (image, part) pair per seed; `background` replaces the few-shot ones for BCM."""
        if (normal is None) != (normal_mask is None):
            raise ValueError("normal and normal_mask go together")
        if steps < 1:
            raise UserError(f"--steps {steps}: must be at least 1")
        sampler = make_scheduler(scheduler, dict(self.model.base.scheduler.config))
        sampler.set_timesteps(steps, device=self.device)
        timesteps = sampler.timesteps
        pairs, shape = len(seeds), (self.latent_channels, self.latent_size, self.latent_size)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

        def noise(rows_per_pair: int) -> torch.Tensor:  # each pair's draws come from its own generator
            draws = [torch.randn((rows_per_pair, *shape), generator=g) for g in generators]
            return torch.stack(draws, 1).flatten(0, 1).to(self.device)  # (rows_per_pair * pairs, ...) row-blocked

        latents = (noise(2) if initial_noise == "independent" else noise(1).repeat(2, 1, 1, 1)) * sampler.init_noise_sigma
        step_kwargs = {"generator": generators + generators} if "generator" in inspect.signature(sampler.step).parameters else {}

        clean_background = None
        if self.model.cfg.bcm:
            if background is not None:
                clean_background = self.encode([background]).expand(pairs, -1, -1, -1)
            elif self.background_latents is not None:
                clean_background = self.background_latents[[self.background_index(s) for s in seeds]]
            else:
                raise UserError("background: the model uses BCM but the run has no backgrounds/; pass --background IMAGE")

        inpaint = None
        if normal is not None:
            known = self.encode([normal])
            mask = torch.from_numpy(resize_mask(np.asarray(normal_mask, bool), self.resolution)).float()
            free = F.adaptive_max_pool2d(mask[None, None], shape[1:]).to(self.device)  # latent cells touching the mask
            inpaint = (known, free)

        attention = torch.zeros((pairs, *shape[1:]), device=self.device) if capture_attention else None
        late = len(timesteps) // 2
        for i, t in enumerate(timesteps):
            rows = [latents]
            if clean_background is not None:
                rows.append(sampler.add_noise(clean_background, noise(1), t.expand(pairs)))
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
            if inpaint is not None:
                known, free = inpaint
                target = known.expand(pairs, -1, -1, -1)
                if i + 1 < len(timesteps):
                    target = sampler.add_noise(target, noise(1), timesteps[i + 1].expand(pairs))
                latents = torch.cat([free * latents[:pairs] + (1 - free) * target, latents[pairs:]])

        decode = [latents] if inpaint is None else [latents, inpaint[0]]
        pixels = self.model.vae.decode((torch.cat(decode) / self.scaling).to(self.dtype)).sample.float()
        images, parts = pixels[:pairs], pixels[pairs : 2 * pairs]
        if inpaint is not None:
            free_pixels = F.interpolate(inpaint[1], size=images.shape[-2:], mode="nearest").bool()
            images = torch.where(free_pixels, images, pixels[2 * pairs :])
        if attention is not None:
            attention = (attention / (len(timesteps) - late)).cpu().numpy()
        return [
            GeneratedPair(to_uint8(images[k]), to_uint8(parts[k]), int(seed), None if attention is None else attention[k])
            for k, seed in enumerate(seeds)
        ]


# --- files: the generate command ---------------------------------------------------------------------


@dataclass
class GenerationSummary:
    folder: Path
    kept: int
    dropped: int
    attempts: int
    seconds: float


def load_run_config(run: Path) -> Config:
    """A run folder's saved config, or a `UserError` saying it is not a run."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: not a training run (config.yaml missing); pass the --out folder of `dualanodiff train`")
    return Config.from_yaml(run / "config.yaml")


def generate_config(run: Path, config_file: Path | None = None, **overrides) -> GenerateConfig:
    """The run's saved `generate` section, then the keys `config_file` sets, then non-None `overrides`."""
    raw = load_run_config(run).to_dict()["generate"]
    if config_file is not None:
        Config.from_yaml(config_file)  # validates the whole file
        raw.update((yaml.safe_load(Path(config_file).read_text()) or {}).get("generate") or {})
    raw.update({name: value for name, value in overrides.items() if value is not None})
    return check_config(Config.from_dict({"generate": raw}, "command line").generate)


def prepared_background(image: np.ndarray, kind: str, u2net_weights: str | None = None) -> np.ndarray:
    """A normal image as BCM's background, as in training: (1 - M_f) * I, mid-grey on the object."""
    outside = torch.from_numpy(~foreground_mask(image, kind, u2net_weights)).float()
    return to_uint8(to_model_range(image) * outside)


BORDER_SHARE = 0.03  # of the image side: the frame where an object's defect is not expected


def object_region(image: np.ndarray, kind: str, u2net_weights: str = "") -> np.ndarray | None:
    """Where an object's defect may lie: its foreground mask without a thin frame along the image border.

    Decoded part images sometimes carry a faint frame that thresholds into a border-hugging mask; when
    the foreground heuristic also falls back to the whole image, only the frame rule catches it.
    Textures: None (anywhere).
    """
    if kind == "texture":
        return None
    region = foreground_mask(image, kind, u2net_weights or None).copy()
    band = max(1, round(BORDER_SHARE * min(region.shape)))
    region[:band], region[-band:], region[:, :band], region[:, -band:] = False, False, False, False
    return region


def extract_mask(pair: GeneratedPair, cfg: GenerateConfig, u2net_weights: str = "") -> np.ndarray:
    if cfg.mask_method == "attention":
        return attention_to_mask(pair.attention, pair.image.shape[:2], cfg.min_component)
    if cfg.mask_method == "u2net":
        return u2net_part_mask(pair.part, u2net_weights, min_component=cfg.min_component)
    return part_to_mask(pair.part, cfg.mask_floor, cfg.min_component)


def check_config(cfg: GenerateConfig) -> GenerateConfig:
    """`UserError` for counts below 1 and unknown scheduler, device or dtype, before any model is loaded."""
    for name in ("num", "steps", "batch_size", "max_tries_factor"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    make_scheduler(cfg.scheduler, {})
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    return cfg


def check_inputs(cfg: GenerateConfig, u2net_weights: str, normal: Path | None, mask: Path | None) -> None:
    if cfg.mask_method == "u2net" and not (u2net_weights and Path(u2net_weights).is_file()):
        raise UserError(f"--u2net-weights {u2net_weights or '(none)'}: --mask-method u2net needs a local TorchScript U²-Net file")
    if (normal is None) != (mask is None):
        raise UserError("--normal/--mask: give both, the normal image and the mask of where to put the defect")


def foreground_kind(run_cfg: Config) -> str:
    """The run's foreground setting; for "auto", its category's kind when the dataset is still there."""
    if run_cfg.data.foreground != "auto" or not Path(run_cfg.data.data).is_dir():
        return run_cfg.data.foreground
    return open_category(run_cfg.data.data).kind


def generate(
    run: Path,
    out: Path,
    cfg: GenerateConfig,
    background: Path | None = None,
    normal: Path | None = None,
    mask: Path | None = None,
    u2net_weights: str = "",
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
    force: bool = False,
) -> GenerationSummary:
    """Write `cfg.num` kept pairs to OUT/<category>/<defect>/, resuming what is there (see `dualanodiff.pairs`).

    Attempt ``a`` uses seed ``cfg.seed + a``; at most ``num * max_tries_factor`` attempts are made in all.
    A folder holding pairs made from another run or with other sampling settings is refused (its pairs
    would mix with the new ones) unless ``force``, which replaces them.
    """
    start = time.monotonic()
    run_cfg = load_run_config(run)
    u2net_weights = str(u2net_weights or "")
    check_config(cfg)
    check_inputs(cfg, u2net_weights, normal, mask)
    settings = {
        "run": str(Path(run).resolve()),
        "prompts": {"global": run_cfg.model.global_prompt, "anomaly": run_cfg.model.anomaly_prompt},
        "steps": cfg.steps, "guidance": cfg.guidance, "scheduler": cfg.scheduler, "dtype": cfg.dtype,
        "initial_noise": cfg.initial_noise, "base_seed": cfg.seed, "mask_method": cfg.mask_method,
        "normal": None if normal is None else str(normal), "filter": cfg.filter,
    }
    with PairWriter(Path(out), Path(run_cfg.data.data).name, run_cfg.data.defect) as writer:
        if force:
            writer.clear()
        writer.check_settings(settings)
        kept, attempt = len(writer.kept()), writer.attempts_done()
        cap = cfg.num * cfg.max_tries_factor
        verdicts: Counter[str] = Counter()
        if progress is not None:
            progress(kept, cfg.num)
        if kept < cfg.num and attempt < cap:
            pipe = DualAnoDiffPipeline.from_run(run, cfg.device, cfg.dtype)
            kind, fg_weights = foreground_kind(run_cfg), run_cfg.data.u2net_weights or None
            inputs, source = _inputs(pipe, kind, fg_weights, background, normal, mask)
            while kept < cfg.num and attempt < cap:
                count = min(cfg.batch_size, cfg.num - kept, cap - attempt)
                seeds = [cfg.seed + a for a in range(attempt, attempt + count)]
                generated = pipe(
                    seeds, cfg.steps, cfg.guidance, cfg.scheduler, capture_attention=cfg.mask_method == "attention",
                    initial_noise=cfg.initial_noise, **inputs,
                )
                for offset, pair in enumerate(generated):
                    pair_mask = extract_mask(pair, cfg, u2net_weights)
                    if "normal_mask" in inputs:
                        pair_mask = pair_mask & inputs["normal_mask"]
                    region = object_region(pair.image, kind, fg_weights)
                    verdict = filter_verdict(pair_mask, region, cfg.max_area, cfg.min_on_object)
                    verdicts[verdict] += 1
                    record = {
                        "attempt": attempt + offset,
                        "seed": pair.seed,
                        **settings,
                        "background": _background_name(pipe, source, pair.seed),
                        "mask_area": round(float(pair_mask.mean()), 6),
                        "consistency": round(pair_consistency(pair.image, pair.part, pair_mask), 4),
                        "alignment": round(alignment_score(pair.image, pair_mask, region, seed=pair.seed), 4),
                        "verdict": verdict,
                    }
                    if verdict == "kept" or not cfg.filter:
                        writer.write(pair.image, pair_mask, pair.part, record)
                        kept += 1
                    else:
                        writer.reject(record)
                attempt += count
                if progress is not None:
                    progress(kept, cfg.num)
        writer.write_contact_sheet()
    summary = GenerationSummary(writer.dir, kept, attempt - kept, attempt, time.monotonic() - start)
    _report(summary, cfg, verdicts, log)
    return summary


def _inputs(
    pipe: DualAnoDiffPipeline, kind: str, fg_weights: str | None, background: Path | None, normal: Path | None,
    mask: Path | None,
) -> tuple[dict, str]:
    """Pipeline keyword arguments for --background and --normal/--mask, and the background's name."""
    inputs, source = {}, ""
    if normal is not None:
        image = load_image(normal)
        user_mask = load_mask(mask, shape=image.shape[:2])
        inputs["normal"] = resize_image(image, pipe.resolution)
        inputs["normal_mask"] = resize_mask(user_mask, pipe.resolution)
        inputs["background"] = prepared_background(image, kind, fg_weights)
        source = str(normal)
    if background is not None:
        inputs["background"] = prepared_background(load_image(background), kind, fg_weights)
        source = str(background)
    return inputs, source


def _background_name(pipe: DualAnoDiffPipeline, source: str, seed: int) -> str | None:
    if not pipe.model.cfg.bcm:
        return None
    return source or pipe.background_names[pipe.background_index(seed)]


def _report(summary: GenerationSummary, cfg: GenerateConfig, verdicts: Counter, log: Callable[[str], None]) -> None:
    dropped = ", ".join(f"{verdict} {n}" for verdict, n in sorted(verdicts.items()) if verdict != "kept")
    log(
        f"{summary.folder}: {summary.kept} of {cfg.num} pairs kept, {summary.dropped} dropped by the quality filter"
        f"{f' (this run: {dropped})' if dropped and cfg.filter else ''}, {summary.attempts} attempts"
    )
    if summary.kept < cfg.num:
        log(
            f"stopped at the cap of num x max_tries_factor = {cfg.num * cfg.max_tries_factor} attempts; raise "
            "generate.max_tries_factor, loosen generate.max_area/min_on_object, or pass --no-filter"
        )
