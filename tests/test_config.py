"""The typed config: YAML round trip, each option's valid range in one place, retired keys, and --set."""

from __future__ import annotations

import dataclasses
from typing import Annotated, get_args, get_origin, get_type_hints

import pytest
import yaml

from dualanodiff.config import RETIRED, Config, GenerateConfig, Range, assignments, upgraded_run_config, validated
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
    assert len(names) >= 20


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


def test_a_retired_yaml_key_fails_in_one_line_naming_what_replaced_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"generate": {"on_normals": True}}))
    with pytest.raises(UserError) as caught:
        Config.from_yaml(path)
    message = str(caught.value)
    assert "\n" not in message and "generate.on_normals was replaced by generate.canvas: on-normals" in message
    path.write_text(yaml.safe_dump({"train": {"defect_loss_weight": 2.0}}))
    with pytest.raises(UserError, match=r"train\.defect_loss_weight was removed, .*; drop it$"):
        Config.from_yaml(path)


def test_every_retired_key_is_refused_and_none_is_a_current_option():
    for key in RETIRED:
        section, name = key.split(".")
        assert name not in {f.name for f in dataclasses.fields(getattr(Config(), section))}
        with pytest.raises(UserError, match=rf"{section}\.{name} was (removed|replaced)"):
            Config.from_dict({section: {name: RETIRED[key][1]}})


def test_a_run_saved_with_the_old_keys_loads_with_its_canvas_and_strength():
    old = Config().to_dict()
    old["model"].update(alpha=old["model"]["rank"], saim_rank=0)
    old["train"].update(weight_decay=1e-2, decoder_lr=2e-4)
    old["generate"].update(on_normals=True, on_normals_strength=0.5, start_from="noise", start_strength=1.0)
    upgraded = Config.from_dict(upgraded_run_config(old))
    assert (upgraded.generate.canvas, upgraded.generate.strength, upgraded.generate.start_strength) == ("on-normals", 0.5, 0.5)
    old["generate"].update(on_normals=False, start_from="normal", start_strength=1.0)
    upgraded = Config.from_dict(upgraded_run_config(old))
    assert (upgraded.generate.canvas, upgraded.generate.strength) == ("normal", 0.0)
    old["train"]["weight_decay"] = 0.5  # a value the code no longer offers: refused, not silently changed
    with pytest.raises(UserError, match="train.weight_decay was removed"):
        Config.from_dict(upgraded_run_config(old))


def test_set_assignments_read_yaml_values_and_name_bad_keys():
    assert assignments(["generate.guidance=3.5", "generate.canvas=on-normals", "train.steps=7", "generate.filter=false"]) == {
        ("generate", "guidance"): 3.5, ("generate", "canvas"): "on-normals", ("train", "steps"): 7,
        ("generate", "filter"): False}
    for text, error in (("guidance=3", "expected SECTION.OPTION=VALUE"), ("sampling.steps=3", "no section 'sampling'"),
                        ("generate.stepz=3", "unknown option"), ("generate.on_normals=true", "replaced by generate.canvas"),
                        ("train.steps=0", "out of range")):
        with pytest.raises(UserError, match=error):
            Config().with_overrides(assignments([text]))
    with pytest.raises(UserError, match="reads only the evaluate/data section"):
        assignments(["train.steps=3"], ("evaluate", "data"))


def test_the_config_stays_within_55_options():
    sections = [getattr(Config(), f.name) for f in dataclasses.fields(Config)]
    assert sum(len(dataclasses.fields(section)) for section in sections if dataclasses.is_dataclass(section)) <= 55


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
