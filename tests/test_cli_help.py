"""The command line as a user reads it: every default in ``--help`` (the config's where an option is
left to the config), required options marked, and result tables whole when stdout is not a terminal."""

from __future__ import annotations

import math

import pytest
import typer.main
from typer.testing import CliRunner

import dualanodiff.evaluation
from dualanodiff.cli import app
from dualanodiff.config import Config

# Options whose absence means "not used" (no default value to show), per command.
NOT_USED_WHEN_ABSENT = {
    "train": {"data", "defect", "config", "assigned"},  # data, defect: from --config or the resumed run
    "generate": {"config", "normal", "mask", "assigned"},
    "evaluate": {"combine", "defect", "config", "inception_weights", "lpips_weights", "resnet_weights", "report",
                 "assigned"},
}
OPTION_NAME_OF_KEY = {"use_filter": "filter"}  # parameter name -> config key name, where they differ
MACHINE_DEFAULTS = {"workers": "one per usable core"}  # defaults the machine decides, shown in words


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # one line: no wrapping can split what is looked for


@pytest.mark.parametrize("command", ["train", "generate", "evaluate"])
def test_help_shows_every_default_and_marks_required_options(command):
    text = _help(command)
    params = typer.main.get_command(app).commands[command].params
    for param in params:
        flag = param.opts[0]
        if param.required:
            assert param.show_default is not False
            assert f"{flag} " in text and "[required]" in text
        elif param.name in MACHINE_DEFAULTS:
            assert param.show_default == MACHINE_DEFAULTS[param.name]
            assert f"[default: ({param.show_default})]" in text, flag
        elif isinstance(param.show_default, str):  # left to the config: shows the config's key and value
            key, _, shown = param.show_default.removeprefix("the run's ").partition(": ")
            if command == "generate":
                key, _, shown = param.show_default.removeprefix("the run's ").partition(", normally ")
            section, name = key.split(".")
            assert name == OPTION_NAME_OF_KEY.get(param.name, param.name), (flag, key)
            value = getattr(getattr(Config(), section), name)
            assert shown == (("on" if value else "off") if isinstance(value, bool) else str(value)), flag
            assert f"[default: ({param.show_default})]" in text, flag
        elif param.default is not None and not getattr(param, "is_flag", False):
            assert f"[default: {param.default}]" in text, flag
        else:  # a switch that is off unless given, or an input that is not used unless given
            switch_off = getattr(param, "is_flag", False) and param.default is False
            assert switch_off or param.name in NOT_USED_WHEN_ABSENT[command], f"{command} {flag}: no default shown"


def test_help_of_train_names_the_config_defaults():
    text = _help("train")
    defaults = Config()
    assert f"[default: (train.steps: {defaults.train.steps})]" in text
    assert "[default: (data.allow_empty_masks: off)]" in text and "* --out" in text
    assert "--set SECTION.OPTION=VALUE" in text
    assert "required for a new run (or data.data in --config)" in text


def _results(names: list[str]) -> dict:
    metrics = {"pairs": 123456, "pixel_auroc": 0.98765, "pixel_ap": 0.5, "pixel_f1max": 0.25, "pixel_aupro": 0.875,
               "image_auroc": 1.0, "image_ap": math.nan, "image_f1max": 0.0625, "is": 1.2345, "ic_lpips": 0.3333,
               "accuracy": 0.75, "alignment": 4.7171, "area_ratio": 0.4567}
    return {
        "category": "a-category-with-a-long-name",
        "protocol": {"selection": "fixed steps, no test-set selection"},
        "generators": [{"name": name, "metrics": metrics} for name in names],
    }


def test_a_wide_results_table_is_printed_whole_outside_a_terminal(monkeypatch, tmp_path):
    names = ["crop-paste+dualanodiff+perlin-" + "x" * 60, "dualanodiff"]
    monkeypatch.setattr(dualanodiff.evaluation, "evaluate_generators", lambda *a, **k: _results(names))
    args = ["evaluate", "--data", str(tmp_path), "--generated", str(tmp_path / "a"), "--generated", str(tmp_path / "b")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "a-category-with-a-long-name (fixed steps, no test-set selection)"
    assert lines[1].split() == ["generator", "pairs", "pixel", "AUROC", "pixel", "AP", "pixel", "F1-max", "pixel",
                                "AUPRO", "image", "AUROC", "image", "AP", "image", "F1-max", "IS", "IC-LPIPS",
                                "accuracy", "alignment", "mask", "area", "×few-shot"]
    assert set(lines[2]) == {"-", " "}
    cells = ["123456", "98.8", "50.0", "25.0", "87.5", "100.0", "–", "6.2", "1.23", "0.33", "75.0", "4.72", "0.46"]
    assert lines[3].split() == [names[0], *cells] and lines[4].split() == [names[1], *cells]
    assert max(map(len, lines)) > 200 and "…" not in result.output
    assert len({line.index("98.8") for line in lines[3:5]}) == 1  # columns aligned
