"""One typed configuration for every stage, with the paper's official settings as defaults.

A run's `config.yaml` is this object dumped whole, so a run can always be reproduced from it::

    cfg = Config.from_yaml("run/config.yaml")      # unknown keys are an error, missing keys default
    cfg.train.steps = 20
    cfg.to_yaml("run/config.yaml")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from dualanodiff.errors import UserError


@dataclass(frozen=True)
class Range:
    """An option's valid values: ``low <= value`` (``<`` when `open_low`) and ``value <= high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def check(self, value: float, where: str) -> None:
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        if not (low_ok and (self.high is None or value <= self.high)):
            bounds = [f"{'above' if self.open_low else 'at least'} {self.low:g}"] if self.low is not None else []
            bounds += [f"at most {self.high:g}"] if self.high is not None else []
            given = f"{where} {value!r}" if where.startswith("--") else f"{where} = {value!r}"  # a flag or a key
            raise UserError(f"{given}: out of range; it must be {' and '.join(bounds)}")


Count = Annotated[int, Range(1)]
Size = Annotated[int, Range(0)]  # 0 has a meaning where it is allowed (see the option's comment)
Positive = Annotated[float, Range(0, open_low=True)]
NonNegative = Annotated[float, Range(0)]
Share = Annotated[float, Range(0, 1)]
PairSize = Union[int, Literal["model", "source"]]
PAIR_SIZE_NAMES = ("model", "source")


def parse_pair_size(value: Any, where: str = "--size") -> int | str:
    """A pair size as a config or the command line gives it: "model", "source" or a side in pixels (> 0)."""
    if value in PAIR_SIZE_NAMES:
        return value
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise UserError(f"{where}: {value!r} is not a size; give model, source or a side in pixels such as 256")
    return int(text)


@dataclass
class DataConfig:
    data: str = ""  # category directory (MVTec layout) or custom folder (images/ + masks/)
    defect: str = ""  # defect type to learn
    split_rounding: Literal["floor", "ceil"] = "floor"  # floor: disjoint sets (ours); ceil: official rule
    resolution: Size = 0  # training size in pixels; 0: the base model's native size (512 for SD 1.5, official)
    flips: bool = True  # random horizontal + vertical flips (official; off for cable)
    foreground: Literal["auto", "object", "texture"] = "auto"
    u2net_weights: str = ""  # optional TorchScript U^2-Net for the foreground mask
    allow_empty_masks: bool = False  # skip few-shot pairs whose mask is empty (else they are refused)


@dataclass
class ModelConfig:
    base_model: str = "tiny"  # local diffusers dir, single .safetensors, "tiny" (embedded) or "tiny-random"
    rank: Count = 32  # UNet LoRA rank (official)
    alpha: NonNegative = 0.0  # LoRA scale alpha / rank; 0: alpha = rank, as the official scripts keep it
    text_rank: Size = 32  # text-encoder LoRA rank (official); 0 disables text LoRA
    # prompts may name the category and defect: "a {object} with {defect}" / "{defect}" (filled in by training)
    global_prompt: str = "a vfx with sks"
    anomaly_prompt: str = "sks"
    learned_words: str = ""  # words whose input token embeddings train (textual inversion), e.g. "vfx sks"
    lora_targets: Literal["attention", "attention+ff", "attention+ff+conv"] = "attention"  # UNet layers with LoRA
    # the ResNet blocks whose convolutions get LoRA (lora_targets with conv): all, or the up path only, which spares
    # the backward pass through the frozen down path (11 % faster, level within noise; the recipe keeps all)
    # (experiments/ON_NORMALS.md#resnet-lora-on-the-up-path-only-modelconv_blocks-up-2026-11-27)
    conv_blocks: Literal["all", "up"] = "all"
    saim: bool = True
    saim_rank: Size = 0  # 0: full-rank projections (paper); >0: low-rank SAIM projections
    # zero: SAIM's output starts at 0 (ours); official: nn.Linear's default init, as the reference code (measured
    # to turn the global branch's objects into texture within 300 few-shot steps: experiments/ABLATION.md)
    saim_init: Literal["official", "zero"] = "zero"
    # to_anomaly (ours): only the part rows read the image; both: the paper's two-way exchange (measured to pull
    # the image toward the flat part image and to teach the localizer less: experiments/ABLATION.md)
    saim_direction: Literal["both", "to_anomaly"] = "to_anomaly"
    bcm: bool = True
    bcm_variant: Literal["paper", "official"] = "paper"  # paper: h + g*MLP(b); official: (1-g)h + g*MLP(b)
    # false (ours): BCM's background rows run without autograd in a separate UNet call before the pairs (the BCM
    # MLP and gamma still train on their detached states; the LoRA no longer learns through them): -16 % FLOPs per
    # SD-1.5 step, quality within the ablation's noise (experiments/ABLATION.md); true: end to end, as the paper
    bcm_background_grad: bool = False
    gamma_init: float = 0.1
    bcm_hidden: Size = 0  # MLP width; 0 means the layer's own width

    @property
    def lora_alpha(self) -> float:
        """The LoRA scale's numerator: `alpha`, or the rank where alpha is 0 (the official scripts' rule)."""
        return self.alpha or float(self.rank)


@dataclass
class TrainConfig:
    steps: Count = 5000
    batch_size: Count = 4
    lr: Positive = 2e-5
    weight_decay: NonNegative = 1e-2
    max_grad_norm: Positive = 1.0
    added_lr_scale: Positive = 1.0  # learning-rate multiplier for the modules the paper adds (SAIM, BCM, gamma)
    noise: Literal["independent", "shared"] = "independent"  # one noise draw for both rows of a pair, or two
    defect_loss_weight: NonNegative = 0.0  # anomaly branch: extra loss weight on the defect's latent cells (ours)
    # offset noise: a constant per row and latent channel, this many standard deviations, added to the training
    # noise, so the model can learn colours and brightness far from the base's mean (ours; 0: the paper)
    noise_offset: NonNegative = 0.0
    # steps of refining the base VAE's decoder on the category's images before the adapters train (ours,
    # `dualanodiff.decoder`: a small base's VAE greys colours its pretraining lacked); 0: the base's decoder
    decoder_steps: Size = 0
    decoder_lr: Positive = 2e-4
    # steps of adapting the base to the category's train/good images (a LoRA fused into the frozen base for the
    # run, `dualanodiff.category`) before the adapters train (ours: a small base never saw the user's category);
    # 0: off, the paper's frozen base
    category_steps: Size = 0
    category_rank: Count = 32
    category_lr: Positive = 1e-3
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: Size = 500
    keep_checkpoints: Count = 2
    device: str = "auto"  # auto (GPU if any), cpu or cuda


@dataclass
class GenerateConfig:
    num: Count = 500
    steps: Count = 100  # official: SD-1.5 PNDM, 100 steps, guidance 2.5
    guidance: NonNegative = 2.5
    scheduler: str = "pndm"
    batch_size: Count = 4
    seed: int = 0
    # x_T of a pair's two rows: shared (one draw, ours: puts the part's defect where the image's is) or
    # independent (paper and reference code)
    initial_noise: Literal["independent", "shared"] = "shared"
    mask_method: Literal["threshold", "attention", "u2net"] = "threshold"
    mask_floor: Share = 0.08  # minimum |part - grey| (in [0, 1]) that may count as defect
    min_component: Size = 16  # pixels; smaller connected components are dropped
    filter: bool = True
    max_area: Share = 0.5  # drop masks covering more than this share of the image
    min_on_object: Share = 0.5  # objects: share of the mask that must lie on the foreground
    # drop pairs whose image shows no more defect under the mask than elsewhere on the object (alignment,
    # `dualanodiff.alignment`: about 1 for a mask on plain surface); 0: off (paper: no such filter)
    min_alignment: NonNegative = 0.0
    max_tries_factor: Count = 4  # sample at most num * factor pairs before giving up
    # x_T of whole images: "noise" (paper), "few-shot" (a few-shot image, the one whose background BCM gets,
    # noised to the first step, the part row grey) or "normal" (a train/good image, with its own background).
    # Training's x_T always keeps about 7 % of its image, so it knows the colours of object and background; a
    # zero-mean draw leaves a weak base to guess them (the held-out bottle comes out grey where it is green or
    # brown). on_normals and --normal ignore it
    start_from: Literal["noise", "few-shot", "normal"] = "noise"
    # with start_from few-shot or normal: the start image is noised to this share of the schedule (as img2img's
    # strength); 1 (the first step) keeps about 7 % of it, below 1 its colours and layout carry over more
    start_strength: Annotated[float, Range(0, 1, open_low=True)] = 1.0
    # whole images: lay the part image's defect onto the image inside the pair's mask (`masks.part_onto`, as
    # on_normals always does; the paper's part image is I * M), so the mask's region shows the part's defect
    # wherever the global branch drew its own. false: the global branch's image as drawn (paper). The
    # embedded base's recipe sets it (its branches rarely agree on where the defect is); experiments/ON_NORMALS.md
    lay_part: bool = False
    device: str = "auto"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    size: PairSize = "model"  # pairs written at the model's size, the dataset's ("source") or N x N pixels
    # draw each defect into a real train/good image, in a few-shot defect's shape placed on it (ours, not the
    # paper's: the pairs then differ from real images only at their defects); false: whole images (paper)
    on_normals: bool = False
    # with on_normals: sampling starts from the placed real defect noised to this share of the schedule (as
    # img2img's strength); 1 starts from pure noise, where the defect rarely lands inside its small region.
    # 0.3: the best mean pixel AP on nut/hole and on the held-out bottle
    # (experiments/ON_NORMALS.md#2026-11-26-generate---on-normals-and-at-which-strength)
    on_normals_strength: Annotated[float, Range(0, 1, open_low=True)] = 0.3


@dataclass
class EvaluateConfig:
    # optimizer steps of the localizer and of the classifier, the same for every set of pairs; 3000 is
    # about the reference code's 50 epochs over 500 images at batch 8 (the localizer's batches hold 4 pairs)
    steps: Count = 3000
    batch_size: Count = 8
    lr: Positive = 1e-3
    resolution: Count = 256
    base_width: Count = 16  # localization U-Net width (DRAEM uses 64; 16 keeps CPU runs short)
    seed: int = 0
    # trainings per row, at seed, seed + 1, ...; the figures are their mean. One localizer seed can move pixel
    # AP by 40 points on a hard category (experiments/ON_NORMALS.md), so comparisons want 3 or more
    seeds: Count = 1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    split: dict[str, list[str]] = field(default_factory=dict)  # filled by training: file stems used

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        return _build(cls, raw, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        return cls.from_dict(read_yaml(path), str(path))

    @classmethod
    def from_layers(cls, layers: list[tuple[dict[str, Any], str]]) -> Config:
        """The defaults, then each ``(mapping, source)`` layer's keys on top, each layer checked on its own:
        ``[(base recipe, "tiny recipe"), (read_yaml(file), file)]`` lets a file's keys win over a recipe's."""
        raw = cls().to_dict()
        for layer, source in layers:
            checked = cls.from_dict(layer, source).to_dict()
            for section, values in layer.items():
                if isinstance(values, dict):
                    raw[section].update({name: checked[section][name] for name in values})
                else:
                    raw[section] = checked[section]
        return cls.from_dict(raw, layers[-1][1] if layers else "defaults")

    def with_overrides(self, values: dict[tuple[str, str], Any], source: str = "command line") -> Config:
        """A validated copy with ``(section, option) -> value`` set where the value is not None (CLI flags)."""
        raw = self.to_dict()
        hints = {section: get_type_hints(type(getattr(self, section)), include_extras=True) for section, _ in values}
        for (section, name), value in values.items():
            if value is not None:  # checked under the flag's own name first
                raw[section][name] = _coerce(hints[section][name], value, f"--{name.replace('_', '-')}")
        return Config.from_dict(raw, source)

    def to_yaml(self, path: str | Path) -> None:
        from dualanodiff.io import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of config sections as a mapping, or a one-line `UserError` naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found; pass an existing YAML file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (data, model, train, ...)")
    return raw


def validated(section: Any, where: str) -> Any:
    """A config object (or one section) checked as if read from a file: types, choices and ranges."""
    return _build(type(section), dataclasses.asdict(section), where)


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise UserError(f"{where}: unknown option(s) {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{where}: section '{name}' must be a mapping")
            kwargs[name] = _build(hint, value, f"{where}:{name}")
        else:
            kwargs[name] = _coerce(hint, value, f"{where}:{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if get_origin(hint) is Annotated:
        base, *rules = get_args(hint)
        value = _coerce(base, value, where)
        for rule in rules:
            rule.check(value, where)
        return value
    if hint == PairSize:
        return parse_pair_size(value, where)
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise UserError(f"{where}: {value!r} is not one of {list(get_args(hint))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    return value
