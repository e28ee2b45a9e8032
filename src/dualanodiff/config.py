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
MAX_TRIES_FACTOR = 4  # generate samples at most num x this many pairs before giving up
SAMPLING_SIDE_STEP = 64  # generate.resolution: 8 latent cells of an 8x VAE (SD 1.x), and so of the embedded 4x one
CANVAS_STRENGTH = {"noise": 1.0, "few-shot": 1.0, "normal": 1.0, "on-normals": 0.15}  # generate.strength 0 means these


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
    rank: Count = 32  # UNet LoRA rank (official; its scale alpha / rank is 1, as the official scripts keep it)
    text_rank: Size = 32  # text-encoder LoRA rank (official); 0 disables text LoRA
    # prompts may name the category and defect: "a {object} with {defect}" / "{defect}" (filled in by training)
    global_prompt: str = "a vfx with sks"
    anomaly_prompt: str = "sks"
    lora_targets: Literal["attention", "attention+ff", "attention+ff+conv"] = "attention"  # UNet layers with LoRA
    saim: bool = True
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


@dataclass
class TrainConfig:
    steps: Count = 5000
    batch_size: Count = 4
    lr: Positive = 2e-5  # AdamW, weight decay 1e-2, gradients clipped at norm 1 (official)
    # offset noise: a constant per row and latent channel, this many standard deviations, added to the training
    # noise, so the model can learn colours and brightness far from the base's mean (ours; 0: the paper)
    noise_offset: NonNegative = 0.0
    # steps of refining the base VAE's decoder on the category's images before the adapters train (ours,
    # `dualanodiff.decoder`: a small base's VAE greys colours its pretraining lacked); 0: the base's decoder
    decoder_steps: Size = 0
    # steps of adapting the base to the category's train/good images (a LoRA fused into the frozen base for the
    # run, `dualanodiff.category`) before the adapters train (ours: a small base never saw the user's category);
    # 0: off, the paper's frozen base
    category_steps: Size = 0
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: Size = 500  # the last two checkpoints are kept
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
    # where sampling starts: "noise" (whole images from x_T, paper); "few-shot" or "normal" (whole images from a
    # few-shot or a train/good image of the run's dataset noised to `strength`, its part row from grey: the
    # image's colours and layout carry over, which a small base cannot guess from a zero-mean x_T); "on-normals"
    # (ours: each defect drawn into a real train/good image inside a few-shot defect's shape placed on it, as
    # crop-paste places it, from that pasted defect noised to `strength`: the pairs then differ from real images
    # only at their defects). `--normal IMAGE --mask M` draws into one given image instead
    canvas: Literal["noise", "few-shot", "normal", "on-normals"] = "noise"
    # the share of the schedule the canvas is noised to, as img2img's strength (1: the first step); 0: the canvas's
    # own, `CANVAS_STRENGTH` (on-normals 0.15: on the magnetic tile photos far above 0.3, level with it on the held-out
    # bottle, experiments/CATEGORY.md#the-redraws-strength-grey-pairs-and-crack-on-real-photos-2026-12-07; whole images 1)
    strength: Share = 0.0
    mask_method: Literal["threshold", "attention", "u2net"] = "threshold"
    filter: bool = True  # at most 4 x num pairs are sampled before giving up
    max_area: Share = 0.5  # drop masks covering more than this share of the image
    min_on_object: Share = 0.5  # objects: share of the mask that must lie on the foreground
    # whole images: lay the part image's defect onto the image inside the pair's mask (`masks.part_onto`, as
    # on_normals always does; the paper's part image is I * M), so the mask's region shows the part's defect
    # wherever the global branch drew its own. false: the global branch's image as drawn (paper). The
    # embedded base's recipe sets it (its branches rarely agree on where the defect is); experiments/ON_NORMALS.md
    lay_part: bool = False
    device: str = "auto"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    size: PairSize = "model"  # pairs written at the model's size, the dataset's ("source") or N x N pixels
    # the side pairs are drawn at, in pixels (a multiple of SAMPLING_SIDE_STEP); 0: the run's training side, and on
    # normals the dataset's image side where that is larger, up to twice training's (`generation.sampling_side`)
    resolution: Size = 0

    @property
    def start_strength(self) -> float:
        """`strength`, or the canvas's own where it is 0."""
        return self.strength or CANVAS_STRENGTH[self.canvas]


@dataclass
class EvaluateConfig:
    # optimizer steps of the localizer and of the classifier, the same for every set of pairs; 3000 is
    # about the reference code's 50 epochs over 500 images at batch 8 (the localizer's batches hold 4 pairs)
    steps: Count = 3000
    batch_size: Count = 8  # Adam at lr 1e-3
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
    def of_run(cls, path: str | Path) -> Config:
        """A run's saved config.yaml, also one written before options were removed or replaced
        (`upgraded_run_config`)."""
        return cls.from_dict(upgraded_run_config(read_yaml(path)), str(path))

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


# Removed and replaced options (listed in CHANGELOG.md): an old key fails with what to use instead; a removed
# option's study keeps its table and the commit to check out. Values: (what became of it, the value that was its
# default and is now built in: a run's config.yaml holding that value still loads)
RETIRED: dict[str, tuple[str, Any]] = {
    "model.alpha": ("removed: the LoRA scale is alpha = rank, as the official scripts keep it", 0.0),
    "model.learned_words": ("removed, no gain measured (experiments/RECIPE.md)", ""),
    "model.conv_blocks": ("removed, level within the seed noise (experiments/RECIPE.md)", "all"),
    "model.saim_rank": ("removed, fewer pairs kept (experiments/RECIPE.md); SAIM is full rank", 0),
    "model.gamma_init": ("removed: BCM's gamma starts at 0.1, as the paper", 0.1),
    "model.bcm_hidden": ("removed: BCM's MLP is as wide as its layer", 0),
    "train.added_lr_scale": ("removed, no gain measured (experiments/RECIPE.md)", 1.0),
    "train.defect_loss_weight": ("removed, no gain measured (experiments/RECIPE.md)", 0.0),
    "train.noise": ("removed: each row draws its own noise (experiments/RECIPE.md)", "independent"),
    "train.weight_decay": ("removed: AdamW's weight decay is 1e-2 (official)", 1e-2),
    "train.max_grad_norm": ("removed: gradients are clipped at norm 1 (official)", 1.0),
    "train.keep_checkpoints": ("removed: the last two checkpoints are kept", 2),
    "train.decoder_lr": ("removed: the decoder refinement's learning rate is 2e-4", 2e-4),
    "train.category_rank": ("removed: category adaptation's LoRA has rank 32", 32),
    "train.category_lr": ("removed: category adaptation's learning rate is 1e-3", 1e-3),
    "generate.start_from": ("replaced by generate.canvas (noise, few-shot or normal)", "noise"),
    "generate.start_strength": ("replaced by generate.strength", 1.0),
    "generate.on_normals": ("replaced by generate.canvas: on-normals", False),
    "generate.on_normals_strength": ("replaced by generate.strength (with generate.canvas: on-normals)", 0.3),
    "generate.min_alignment": ("removed, filtered runs taught a localizer less (experiments/RECIPE.md)", 0.0),
    "generate.max_tries_factor": ("removed: at most 4 x num pairs are sampled", 4),
    "generate.mask_floor": ("removed: a part image's pixels count as defect from 0.08 off its flat level; 0.16 measured "
                            "level (experiments/CATEGORY.md, mask areas)", 0.08),
    "generate.min_component": ("removed: mask components under 16 pixels are dropped", 16),
    "evaluate.lr": ("removed: the localizer and the classifier train with Adam at 1e-3", 1e-3),
}


def _refuse_retired(key: str, where: str) -> None:
    """A one-line `UserError` for a removed or replaced option's key, saying what became of it."""
    if key in RETIRED:
        fate = RETIRED[key][0]
        raise UserError(f"{where}: {key} was {fate}; {'set that instead' if fate.startswith('replaced') else 'drop it'}")


def upgraded_run_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config in today's options: the canvas from its replaced keys, and retired options that hold
    their built-in value dropped (any other value stays and fails in `from_dict`, naming what to do)."""
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    generate = raw.get("generate", {})
    if "on_normals" in generate or "start_from" in generate:
        on_normals, start = generate.pop("on_normals", False), generate.pop("start_from", "noise")
        on_normals_strength, start_strength = generate.pop("on_normals_strength", 0.3), generate.pop("start_strength", 1.0)
        strength = on_normals_strength if on_normals else start_strength
        generate["canvas"] = "on-normals" if on_normals else start
        generate["strength"] = 0.0 if strength == CANVAS_STRENGTH[generate["canvas"]] else strength
    rank = raw.get("model", {}).get("rank")
    for key, (_, built_in) in RETIRED.items():
        section, name = key.split(".")
        values = raw.get(section, {})
        if name in values and (values[name] == built_in or (key == "model.alpha" and values[name] == rank)):
            del values[name]
    return raw


def assignments(texts: list[str], sections: tuple[str, ...] | None = None) -> dict[tuple[str, str], Any]:
    """``--set`` values, ``["generate.guidance=3.5", "train.lr=1e-4"]``, as `Config.with_overrides` takes them: each
    value read as YAML (true, 3.5, on-normals) and checked against its option; `sections`, where given, are the
    only ones the command reads."""
    found = {}
    for text in texts:
        key, equals, value = text.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (equals and dot):
            raise UserError(f"--set {text!r}: expected SECTION.OPTION=VALUE, e.g. generate.guidance=3.5")
        where = f"--set {section}.{name}"
        if sections is not None and section not in sections:
            raise UserError(f"{where}: this command reads only the {'/'.join(sections)} section(s); use --config for others")
        known = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "split"}
        if section not in known:
            raise UserError(f"{where}: no section {section!r}; valid: {', '.join(known)}")
        _refuse_retired(f"{section}.{name}", where)
        hints = get_type_hints(getattr(Config(), section).__class__, include_extras=True)
        if name not in hints:
            raise UserError(f"{where}: unknown option; valid: {', '.join(sorted(hints))}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        found[(section, name)] = _coerce(hints[name], parsed, where)
    return found


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
    section = where.rsplit(":", 1)[-1]
    for name in sorted(unknown):
        _refuse_retired(f"{section}.{name}", where)
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
