"""The typed config: YAML round trip, each option's valid range in one place, and the LoRA alpha rule."""

from __future__ import annotations

import dataclasses
from typing import Annotated, get_args, get_origin, get_type_hints

import pytest
import yaml

from dualanodiff.config import Config, GenerateConfig, ModelConfig, Range, validated
from dualanodiff.errors import UserError


def ranged_options() -> list[tuple[str, str, Range, type]]:
    """(section, option, range, type) of every option that declares a range."""
    found = []
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for name, hint in get_type_hints(type(value), include_extras=True).items():
            if get_origin(hint) is Annotated:
                base, rule = get_args(hint)[:2]
                found.append((section.name, name, rule, base))
    return found


def test_defaults_round_trip_through_yaml(tmp_path):
    Config().to_yaml(tmp_path / "config.yaml")
    assert Config.from_yaml(tmp_path / "config.yaml") == Config()


def test_the_range_declarations_cover_the_counts_and_shares():
    names = {(section, name) for section, name, _, _ in ranged_options()}
    assert {("train", "steps"), ("generate", "num"), ("generate", "max_area"), ("evaluate", "steps"),
            ("model", "rank"), ("train", "lr")} <= names
    assert len(names) >= 25


@pytest.mark.parametrize("section,name,rule,kind", ranged_options(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_every_range_accepts_its_bounds_and_refuses_beyond_them(section, name, rule, kind, tmp_path):
    def load(value):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({section: {name: value}}))
        return getattr(getattr(Config.from_yaml(path), section), name)

    step = 1 if kind is int else 1e-6
    if rule.low is not None:
        if rule.open_low:
            assert load(kind(rule.low) + step) == kind(rule.low) + step
        else:
            assert load(kind(rule.low)) == rule.low
        with pytest.raises(UserError, match=rf"c\.yaml:{section}:{name} = .*: out of range; it must be"):
            load(kind(rule.low) if rule.open_low else kind(rule.low) - step)
    if rule.high is not None:
        assert load(kind(rule.high)) == rule.high
        with pytest.raises(UserError, match="out of range"):
            load(kind(rule.high) + step)


def test_a_flag_out_of_range_is_named_as_the_flag():
    with pytest.raises(UserError, match=r"^--steps 0: out of range; it must be at least 1$"):
        Config().with_overrides({("train", "steps"): 0})
    with pytest.raises(UserError, match=r"^--max-area 1\.5: out of range; it must be at least 0 and at most 1$"):
        Config().with_overrides({("generate", "max_area"): 1.5})


def test_objects_built_in_python_are_checked_where_they_are_used():
    with pytest.raises(UserError, match="generate:num = 0: out of range"):
        validated(GenerateConfig(num=0), "generate")
    assert validated(GenerateConfig(num=3), "generate") == GenerateConfig(num=3)


def test_lora_alpha_follows_the_rank_unless_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"rank": 8}}))
    assert Config.from_yaml(path).model.lora_alpha == 8.0  # a YAML rank alone keeps the LoRA scale at 1
    assert ModelConfig().lora_alpha == 32.0 and ModelConfig(rank=4, alpha=16.0).lora_alpha == 16.0


def test_the_model_scales_lora_by_alpha_over_rank():
    from dualanodiff.model.base import tiny_random_base
    from dualanodiff.model.dual import DualAnoDiffModel

    for cfg, scale in ((ModelConfig(rank=8, text_rank=0), 1.0), (ModelConfig(rank=4, alpha=8.0, text_rank=0), 2.0)):
        model = DualAnoDiffModel(tiny_random_base(), cfg)
        scales = {lora.scale for processor in model.processors for lora in processor.lora.values()}
        assert scales == {scale}


def test_layers_apply_in_order_and_only_the_keys_they_set():
    recipe = {"train": {"lr": 1e-3, "steps": 300}, "generate": {"scheduler": "dpm"}}
    user = {"train": {"lr": 5e-4}}
    cfg = Config.from_layers([(recipe, "recipe"), (user, "mine.yaml")])
    assert (cfg.train.lr, cfg.train.steps, cfg.generate.scheduler) == (5e-4, 300, "dpm")
    assert cfg.train.batch_size == Config().train.batch_size and Config.from_layers([]) == Config()
    with pytest.raises(UserError, match=r"^recipe:train:steps = 0: out of range"):
        Config.from_layers([({"train": {"steps": 0}}, "recipe")])


def test_the_embedded_base_carries_its_recipe_and_others_have_none(tmp_path):
    from dualanodiff.model.base import base_recipe

    recipe = base_recipe("tiny")
    assert recipe["train"]["lr"] == 1e-3 and recipe["model"]["anomaly_prompt"] == "{defect}"
    Config.from_layers([(recipe, "tiny recipe")])  # valid keys and values
    assert base_recipe(str(tmp_path)) == {} and base_recipe("tiny-random") == {}
