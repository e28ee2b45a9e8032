"""The demo end to end on a test-size configuration: report contents, stage reuse, refusal, ablation; from
the command line, stopped by SIGTERM and run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from dualanodiff.config import CANVAS_STRENGTH, Config
from dualanodiff.demo import (
    DemoHooks,
    demo_config,
    demo_settings,
    held_out_config,
    pair_figures,
    render_report,
    run_demo,
)
from dualanodiff.errors import UserError
from dualanodiff.pairs import LOCK


def tiny_demo_config(defect: str = "hole"):
    cfg = demo_config("nut", defect)
    cfg.model.base_model = "tiny-random"
    cfg.model.rank, cfg.model.text_rank = 4, 4
    cfg.train.steps = 2
    cfg.train.decoder_steps = 2
    cfg.train.batch_size = 2
    cfg.train.device = "cpu"
    cfg.generate.num = 2
    cfg.generate.steps = 2
    cfg.generate.filter = False  # a random base makes no defects worth filtering
    cfg.evaluate.steps = 2
    cfg.evaluate.resolution = 32
    cfg.evaluate.base_width = 4
    return cfg


def test_a_config_file_changes_only_its_own_keys_of_the_demos_settings(tmp_path):
    (tmp_path / "mine.yaml").write_text("model:\n  lora_targets: attention\ngenerate:\n  num: 12\n")
    cfg = demo_settings("bottle", "contamination", tmp_path / "mine.yaml")
    expected = demo_config("bottle", "contamination")
    assert expected.model.lora_targets == "attention+ff+conv"  # the embedded base's recipe
    assert (cfg.model.lora_targets, cfg.generate.num) == ("attention", 12)
    expected.model.lora_targets, expected.generate.num = "attention", 12
    assert cfg.to_dict() == expected.to_dict()  # the recipe's 300 steps at lr 1e-3, the demo's category ...
    assert demo_settings("nut", "hole", None).to_dict() == demo_config("nut", "hole").to_dict()
    (tmp_path / "bad.yaml").write_text("model:\n  lora_targets: everything\n")
    with pytest.raises(UserError, match="bad.yaml"):
        demo_settings("nut", "hole", tmp_path / "bad.yaml")


def test_the_demo_runs_on_a_category_folder_of_ones_own_checked_before_any_work(synthetic_root, tmp_path):
    cfg = demo_settings("nut", "crack", None, synthetic_root / "nut")
    assert cfg.data.data == str((synthetic_root / "nut").resolve()) and cfg.data.defect == "crack"
    assert cfg.evaluate.resolution == 128  # not a synthetic category's: the data's side
    with pytest.raises(UserError, match=r"--defect 'dent': not a defect type of .*nut; choose one of \['crack'"):
        demo_settings("nut", "dent", None, synthetic_root / "nut")
    with pytest.raises(UserError, match="missing"):
        demo_settings("nut", "hole", None, tmp_path / "missing")


def test_the_reports_comparisons_rest_on_the_per_seed_pixel_ap():
    from dualanodiff.demo import _seeds_phrase, compare_rows

    def row(name, *values):
        return {"name": name, "per_seed": [{"seed": k, "pixel_ap": v} for k, v in enumerate(values)]}

    results = {"protocol": {"seeds": 3}, "generators": [row("ours", 0.50, 0.60, 0.55), row("perlin", 0.30, 0.35, 0.40),
                                                         row("close", 0.30, 0.45, 0.35)]}
    assert compare_rows(results, "ours", "perlin") == "ours 55.0 ± 5.0 is **above** perlin 35.0 ± 5.0"
    assert compare_rows(results, "perlin", "ours") == "perlin 35.0 ± 5.0 is **below** ours 55.0 ± 5.0"
    assert compare_rows(results, "close", "perlin").startswith("close 36.7 ± 7.6 is **level with** perlin")
    assert _seeds_phrase(results) == "mean ± standard deviation over 3 localizer seeds"
    assert _seeds_phrase({"protocol": {"seeds": 1}}).startswith("at one localizer seed (no verdict")


def test_the_demo_localizes_nut_at_96_px_and_the_held_out_bottle_at_the_datas_128():
    nut = demo_config("nut", "hole")
    assert nut.evaluate.resolution == 96 and demo_config("bottle", "contamination").evaluate.resolution == 128
    nut.data.data = "/demo_out/data/nut"  # as run_demo resolves it
    assert held_out_config(nut).evaluate.resolution == 128
    nut.evaluate.resolution = 64  # a --config file's side holds for the held-out row too
    assert held_out_config(nut).evaluate.resolution == 64


def test_the_reports_whole_image_notes_say_where_sampling_started_and_how_deep():
    def notes(cfg) -> list[str]:
        return render_report("whole_image_notes.md.j2", cfg=cfg).split("\n\n")

    cfg = demo_config("nut", "hole")
    cfg.generate.lay_part = False
    assert notes(cfg)[0].startswith("Sampling started from a real `train/good` image noised to the first step ")
    cfg.generate.canvas, cfg.generate.strength = "few-shot", 0.8
    assert notes(cfg)[0].startswith("Sampling started from a few-shot image noised to 0.8 of the schedule ")
    assert notes(cfg)[-2].startswith("Decoded with the base's VAE decoder refined for 100 steps ")  # the recipe
    assert notes(cfg)[-1] == "" and len(notes(cfg)) == 3  # each note a paragraph
    cfg.generate.canvas, cfg.train.decoder_steps = "noise", 0
    assert render_report("whole_image_notes.md.j2", cfg=cfg) == ""


@pytest.mark.slow
def test_demo_writes_a_report_from_its_own_numbers_and_reuses_stages(tmp_path):
    out = tmp_path / "demo"
    logged = []
    report = run_demo(out, tiny_demo_config(), ablation=True, hooks=DemoHooks(log=logged.append))
    text = report.read_text()
    results = json.loads((out / "evaluation.json").read_text())
    names = [row["name"] for row in results["generators"]]
    assert names == ["dualanodiff", "no-saim", "no-bcm", "dualanodiff-on-normals", "crop-paste", "perlin",
                     "crop-paste+dualanodiff-on-normals"]
    pairs = {row["name"]: row["metrics"]["pairs"] for row in results["generators"]}
    assert pairs["crop-paste+dualanodiff-on-normals"] == pairs["dualanodiff-on-normals"] + pairs["crop-paste"] == 4
    for row in results["generators"]:
        assert f"| {row['name']} | " in text
        ap = row["metrics"]["pixel_ap"]
        assert f"{100 * ap:.1f}" in text
    ours = pair_figures(out / "generated" / "dualanodiff" / "nut" / "hole")
    assert ours["kept"] == 2 and ours["kept_rate"] == 1.0
    assert f"mean {ours['alignment_mean']:.2f}, median {ours['alignment_median']:.2f}" in text
    assert f"{ours['consistency_mean']:.2f} dB" in text
    assert "2 of 2 generation attempts kept (100 %)" in text
    whole = [json.loads(line) for line in (out / "generated" / "dualanodiff" / "nut" / "hole" / "manifest.jsonl").open()]
    assert [(row["lay_part"], row["canvas"], row["strength"]) for row in whole] == [(True, "normal", None)] * 2  # the recipe
    assert "laid on inside its mask (`generate.lay_part`" in text and "`train/good` image noised to the first step" in text
    assert "decoder refined for 2 steps" in text and (out / "runs" / "dualanodiff" / "decoder.safetensors").is_file()
    on_normals = [json.loads(line) for line in (out / "generated" / "dualanodiff-on-normals" / "nut" / "hole" / "manifest.jsonl").open()]
    strength = CANVAS_STRENGTH["on-normals"]
    assert [(row["run"], row["canvas"], row["strength"]) for row in on_normals] == [
        (str((out / "runs" / "dualanodiff").resolve()), "on-normals", strength)] * 2
    assert "`generate --canvas on-normals`" in text and f"at strength {strength:g}" in text
    from dualanodiff.demo import few_shot_reproduction

    reproduction = few_shot_reproduction(out, Config.from_yaml(out / "runs" / "dualanodiff" / "config.yaml"))
    assert 5 < reproduction["generated"] < 60 and 5 < reproduction["real"] < 60
    assert f"lie {reproduction['generated']:.1f} dB" in text and f"lie {reproduction['real']:.1f} dB from it" in text
    assert "## Ablation" in text and "| no-saim |" in text and "SAIM " in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pixel_ap"] == {row["name"]: row["metrics"]["pixel_ap"] for row in results["generators"]}
    assert summary["kept"] == 2 and summary["few_shot_reproduction"] == reproduction
    assert (summary["on_normals"]["kept"], summary["on_normals"]["attempts"]) == (2, 2)
    held_out = json.loads((out / "held-out" / "summary.json").read_text())
    assert (held_out["category"], held_out["defect"]) == ("bottle", "contamination")
    held_out_cfg = Config.from_yaml(out / "held-out" / "config.yaml")
    assert held_out_cfg.model == Config.from_yaml(out / "config.yaml").model and held_out_cfg.train.steps == 2
    assert "## Held-out category: bottle / contamination" in text
    assert f"perlin {100 * held_out['pixel_ap']['perlin']:.1f}" in text and "(held-out/report.md)" in text
    assert (out / "held-out" / "generated" / "dualanodiff" / "bottle" / "contamination").is_dir()
    held_out_rows = [row["name"] for row in json.loads((out / "held-out" / "evaluation.json").read_text())["generators"]]
    assert held_out_rows == ["dualanodiff", "dualanodiff-on-normals", "crop-paste", "perlin"]  # no --ablation: no combined row
    for figure in ("pairs_dualanodiff", "pairs_dualanodiff-on-normals", "pairs_crop-paste", "pairs_perlin", "loss", "metrics", "alignment"):
        assert (out / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="figures/pairs_dualanodiff.png"' in html
    stages = json.loads((out / "stages.json").read_text())
    assert {"data", "train dualanodiff", "generate no-bcm", "generate dualanodiff-on-normals", "baselines", "evaluate",
            "held-out", "report"} <= set(stages)

    adapters = (out / "runs" / "dualanodiff" / "adapters.safetensors").read_bytes()
    evaluation = (out / "evaluation.json").read_bytes()
    logged.clear()
    run_demo(out, tiny_demo_config(), ablation=True, hooks=DemoHooks(log=logged.append))
    assert logged == []  # every stage reused, nothing retrained or regenerated
    assert (out / "runs" / "dualanodiff" / "adapters.safetensors").read_bytes() == adapters
    assert (out / "evaluation.json").read_bytes() == evaluation

    with pytest.raises(UserError, match="other settings"):
        run_demo(out, tiny_demo_config(defect="crack"), ablation=True)


def test_demo_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no demo"):
        run_demo(tmp_path, tiny_demo_config())
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_the_demo_command_stopped_by_sigterm_then_run_again_reuses_its_finished_stages(tmp_path, sigterm_when):
    """`dualanodiff demo` at test size as a user runs it: SIGTERM while it generates (training done) ends it
    by the signal with one line saying what to do; the same command then finishes (exit 0) without training
    again, and writes a report whose figures are images."""
    out, config = tmp_path / "demo", tmp_path / "tiny.yaml"
    tiny_demo_config().to_yaml(config)
    command = [sys.executable, "-m", "dualanodiff", "demo", "--out", str(out), "--config", str(config)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    lock = out / "generated" / "dualanodiff" / "nut" / "hole" / LOCK  # the first generation has started
    first = sigterm_when(command, lock.exists, env)
    assert "training dualanodiff" in first and first.strip().splitlines()[-1] == (
        "stopped by SIGTERM with its finished work kept; run the same command again to continue")
    stages = json.loads((out / "stages.json").read_text())
    assert "train dualanodiff" in stages and "generate dualanodiff" not in stages
    adapters = (out / "runs" / "dualanodiff" / "adapters.safetensors").read_bytes()

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training dualanodiff" not in done.stderr and "demo finished in " in done.stdout + done.stderr
    assert (out / "runs" / "dualanodiff" / "adapters.safetensors").read_bytes() == adapters
    assert json.loads((out / "stages.json").read_text())["train dualanodiff"] == stages["train dualanodiff"]
    report, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    figures = sorted((out / "figures").glob("*.png"))
    assert {"pairs_dualanodiff.png", "loss.png", "metrics.png"} <= {figure.name for figure in figures}
    for figure in figures:
        with Image.open(figure) as image:
            image.load()
            assert min(image.size) > 16, figure
        assert f"figures/{figure.name}" in report + html
    rows = [row["name"] for row in json.loads((out / "evaluation.json").read_text())["generators"]]
    assert rows == ["dualanodiff", "dualanodiff-on-normals", "crop-paste", "perlin"]
    assert all(f"| {name} | " in report for name in rows)
