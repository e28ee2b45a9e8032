"""The report (Markdown + chart, JSON, CSV) and `dualanodiff evaluate` end to end on the synthetic data."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualanodiff.data import few_shot_split, load_image, load_mask, open_category
from dualanodiff.errors import UserError
from dualanodiff.evaluation import LPIPS, combined_rows, parse_generated, write_report
from dualanodiff.evaluation.metrics import METRIC_KEYS
from dualanodiff.evaluation.report import format_value
from dualanodiff.pairs import PairWriter


def _results(**metrics) -> dict:
    row = {key: math.nan for key in (*METRIC_KEYS, "is", "is_std", "ic_lpips", "accuracy", "alignment")}
    row.update({"pairs": 3, **metrics})
    return {
        "category": "nut",
        "category_dir": "/data/nut",
        "defects": ["crack"],
        "protocol": {
            "split_rounding": "floor",
            "test_images": {"crack": 4, "good": 6},
            "localization": "U-Net, fixed steps, no test-set selection",
            "classification": "not run",
            "generation": "IS, IC-LPIPS",
            "alignment": "mean alignment score of each row's pairs",
            "mask_area": "median mask area over the few-shot masks'",
            "selection": "fixed steps, no test-set selection",
        },
        "notes": ["IS not computed: needs --inception-weights FILE"],
        "generators": [
            {"name": "ours", "roots": ["/out"], "pairs": {"crack": 3}, "metrics": row, "per_defect": {"crack": row}}
        ],
    }


def test_values_are_percent_with_one_decimal_and_a_dash_when_missing():
    assert format_value(0.92345, True) == "92.3"
    assert format_value(1.8765, False) == "1.88"
    assert format_value(math.nan, True) == format_value(None, False) == "–"
    assert format_value(12, False) == "12"  # a count


def test_seed_spread_is_the_mean_and_sample_standard_deviation():
    from dualanodiff.evaluation.report import seed_spread

    per_seed = [{"pixel_ap": v} for v in (0.50, 0.54, 0.58)]
    assert seed_spread(per_seed) == "54.0 ± 4.0"  # sample std of 50, 54, 58
    assert seed_spread(per_seed[:1]) == "50.0 ± nan"


@pytest.mark.parametrize(
    ("ours", "other", "expected"),
    [
        ((0.50, 0.60, 0.55), (0.30, 0.35, 0.40), "above"),  # differences 20, 25, 15: mean 20 > std 5
        ((0.30, 0.35, 0.40), (0.50, 0.60, 0.55), "below"),
        ((0.50, 0.20, 0.45), (0.30, 0.35, 0.40), "level"),  # differences 20, -15, 5: mean 3.3 < std 17.6
        ((0.90,), (0.10,), "level"),  # one seed shows no spread
    ],
)
def test_a_verdict_needs_a_mean_gap_beyond_the_spread_of_the_per_seed_differences(ours, other, expected):
    from dualanodiff.evaluation.report import verdict

    assert verdict([{"pixel_ap": v} for v in ours], [{"pixel_ap": v} for v in other]) == expected


def test_report_files_and_no_overwrite_without_force(tmp_path):
    results = _results(pixel_auroc=0.991, pixel_ap=0.5, pixel_aupro=0.876, alignment=2.345)
    out = tmp_path / "report.md"
    written = write_report(results, out, json_path=tmp_path / "r.json", csv_path=tmp_path / "r.csv")
    assert written == [out, tmp_path / "report.png", tmp_path / "r.json", tmp_path / "r.csv"]
    text = out.read_text()
    assert "| generator | pairs | pixel AUROC |" in text and text.count("| alignment |") == 2  # table, per defect
    assert "| ours | 3 | 99.1 | 50.0 | – | 87.6 |" in text and "| – | 2.35 |" in text
    assert "| pixel F1-max | pixel AUPRO | image AUROC |" in text
    assert "no test-set selection" in text and "![" in text and "- Alignment: mean alignment score" in text
    assert "- IS not computed" in text
    assert Image.open(tmp_path / "report.png").format == "PNG"
    data = json.loads((tmp_path / "r.json").read_text())
    metrics = data["generators"][0]["metrics"]
    assert metrics["pixel_auroc"] == 0.991 and metrics["is"] is None
    assert metrics["alignment"] == 2.345 and metrics["pairs"] == 3
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert rows[0]["generator"] == "ours" and rows[0]["pixel_ap"] == "50.0" and rows[0]["accuracy"] == ""
    assert rows[0]["pairs"] == "3" and rows[0]["alignment"] == "2.35" and rows[0]["pixel_aupro"] == "87.6"
    with pytest.raises(UserError, match="report.md: already exists.*--force"):
        write_report(results, out)
    write_report(_results(pixel_auroc=0.5), out, force=True)
    assert "| ours | 3 | 50.0 |" in out.read_text()


def test_generated_option_takes_dir_or_name_dir(tmp_path):
    assert parse_generated(str(tmp_path / "crop-paste")) == ("crop-paste", tmp_path / "crop-paste")
    assert parse_generated(f"ours={tmp_path}") == ("ours", tmp_path)
    with pytest.raises(UserError, match="NAME=DIR"):
        parse_generated("=x")


def test_combine_option_names_rows_to_train_on_together(tmp_path):
    roots = {"crop-paste": tmp_path / "cp", "ours": tmp_path / "gen", "perlin": tmp_path / "p"}
    assert combined_rows(["crop-paste+ours"], roots) == {"crop-paste+ours": [tmp_path / "cp", tmp_path / "gen"]}
    assert list(combined_rows(["crop-paste+ours", "ours+perlin"], roots)) == ["crop-paste+ours", "ours+perlin"]
    for bad in ("ours", "ours+dualanodiff"):
        with pytest.raises(UserError, match=re.escape(f"--combine {bad}: expected two or more --generated row names")):
            combined_rows([bad], roots)
    with pytest.raises(UserError, match="exists already"):
        combined_rows(["ours+perlin", "ours+perlin"], roots)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def generators(tmp_path_factory, synthetic_root) -> dict[str, Path]:
    """Two tiny generator outputs for the nut category: the real few-shot pairs copied twice, and a
    bright disc painted on train/good images."""
    category = open_category(synthetic_root / "nut")
    root = tmp_path_factory.mktemp("generated")
    rng = np.random.default_rng(0)
    for defect, pairs in category.defects.items():
        copy = PairWriter(root / "copy", "nut", defect)
        for attempt, pair in enumerate(few_shot_split(pairs)[0] * 2):
            copy.write(load_image(pair.image), load_mask(pair.mask), None, {"attempt": attempt, "seed": attempt})
        disc = PairWriter(root / "disc", "nut", defect)
        for attempt, path in enumerate(category.train_good[:3]):
            image = load_image(path).copy()
            yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
            cy, cx = rng.integers(20, 44, 2)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
            image[mask] = 240
            disc.write(image, mask, None, {"attempt": attempt, "seed": attempt})
    return {"copy": root / "copy", "disc": root / "disc"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Random-weight stand-ins with the real file formats: a TorchScript classifier and an LPIPS state dict."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(network, torch.zeros(1, 3, 299, 299)).save(str(folder / "inception.pt"))
    torch.save(LPIPS().state_dict(), folder / "lpips.pth")
    return {"inception": folder / "inception.pt", "lpips": folder / "lpips.pth"}


@pytest.mark.slow
def test_evaluate_writes_a_complete_report(tmp_path, synthetic_root, generators, weights, run_cli):
    out = tmp_path / "nut.md"
    code, stdout, err = run_cli("evaluate", "--data", synthetic_root / "nut",
        "--generated", f"copy={generators['copy']}", "--generated", generators["disc"], "--combine", "copy+disc",
        "--steps", "2", "--set", "evaluate.resolution=64", "--set", "evaluate.base_width=8",
        "--inception-weights", weights["inception"], "--lpips-weights", weights["lpips"], "--report", out,
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "nut.json").read_text())
    assert [row["name"] for row in results["generators"]] == ["copy", "disc", "copy+disc"]
    assert results["generators"][2]["roots"] == [str(generators["copy"]), str(generators["disc"])]
    assert "2 optimizer steps at batch 8, the same for every set" in results["protocol"]["localization"]
    assert results["defects"] == ["crack", "hole", "scratch", "stain"]
    assert results["protocol"]["selection"] == "fixed steps, no test-set selection"
    for row in results["generators"]:
        metrics = row["metrics"]
        assert all(0.0 <= metrics[key] <= 1.0 for key in METRIC_KEYS), metrics
        assert metrics["is"] >= 1.0 and metrics["ic_lpips"] >= 0.0 and 0.0 <= metrics["accuracy"] <= 1.0
    assert results["generators"][0]["pairs"] == {"crack": 4, "hole": 4, "scratch": 4, "stain": 4}
    assert [row["metrics"]["pairs"] for row in results["generators"]] == [16, 12, 28]
    assert all(row["metrics"]["alignment"] > 1 for row in results["generators"])  # real defects, painted discs
    assert results["protocol"]["test_images"] == {"crack": 4, "hole": 4, "scratch": 4, "stain": 4, "good": 6}
    text = out.read_text()
    assert "| copy |" in text and "| disc |" in text and "### stain" in text and "no test-set selection" in text
    assert Image.open(tmp_path / "nut.png").size[0] > 100
    table = list(csv.DictReader((tmp_path / "nut.csv").open()))
    assert [(row["generator"], row["pairs"]) for row in table] == [("copy", "16"), ("disc", "12"), ("copy+disc", "28")]
    assert all(float(row["alignment"]) > 1 for row in table)
    assert "copy" in stdout

    again = ("evaluate", "--data", synthetic_root / "nut", "--generated", generators["disc"], "--report", out)
    code, _, err = run_cli(*again)
    assert code == 2 and "nut.md: already exists" in err


@pytest.mark.slow
def test_evaluate_without_weight_files_says_which_file_is_needed(tmp_path, synthetic_root, generators, run_cli):
    code, _, err = run_cli("evaluate", "--data", synthetic_root / "nut", "--generated", generators["disc"],
        "--defect", "hole", "--steps", "2", "--set", "evaluate.resolution=64", "--set", "evaluate.base_width=8",
        "--no-classification", "--report", tmp_path / "r.md",
    )  # fmt: skip
    assert code == 0, err
    assert "--inception-weights FILE" in err and "--lpips-weights alexnet-*.pth --lpips-weights" in err
    row = json.loads((tmp_path / "r.json").read_text())["generators"][0]
    assert row["metrics"]["is"] is None and row["metrics"]["ic_lpips"] is None and row["metrics"]["accuracy"] is None
    assert all(0.0 <= row["metrics"][key] <= 1.0 for key in METRIC_KEYS)


def test_bad_inputs_fail_fast_with_one_line(tmp_path, synthetic_root, generators, run_cli):
    nut = synthetic_root / "nut"
    code, _, err = run_cli("evaluate", "--data", synthetic_root / "pill", "--generated", generators["copy"])
    assert code == 2 and str(generators["copy"]) in err and "no generated pairs for category 'pill'" in err
    code, _, err = run_cli("evaluate", "--data", nut, "--generated", generators["copy"], "--defect", "dent")
    assert code == 2 and "--defect dent" in err
    missing = tmp_path / "r.pth"
    code, _, err = run_cli("evaluate", "--data", nut, "--generated", generators["copy"], "--resnet-weights", missing)
    assert code == 2 and "--resnet-weights" in err and "file not found" in err
    code, _, err = run_cli("evaluate", "--data", nut, "--generated", generators["copy"], "--set", "evaluate.resolution=100")
    assert code == 2 and "evaluate.resolution 100: must be a positive multiple of 32" in err
    code, _, err = run_cli("evaluate", "--data", nut, "--generated", generators["copy"], "--set", "train.steps=3")
    assert code == 2 and "--set train.steps: this command reads only the evaluate/data section(s)" in err
    code, _, err = run_cli("evaluate", "--data", nut, "--generated", generators["copy"], "--combine", "copy+dsic")
    assert code == 2 and "--combine copy+dsic" in err and "rows: copy" in err
    code, _, err = run_cli("evaluate", "--data", nut, "--generated", generators["copy"], "--steps", "0")
    assert code == 2 and "--steps 0" in err
