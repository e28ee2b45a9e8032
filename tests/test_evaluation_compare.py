"""`evaluate_generators`: which defect types are compared, what is said about what is not, rows made of
several roots, the alignment of each row's pairs, and trainings on worker processes (the same figures; a SIGINT
stops them all)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dualanodiff.alignment import alignment_score
from dualanodiff.config import EvaluateConfig
from dualanodiff.data import few_shot_split, load_image, load_mask, open_category
from dualanodiff.errors import UserError
from dualanodiff.evaluation import evaluate_generators
from dualanodiff.evaluation.metrics import METRIC_KEYS
from dualanodiff.evaluation.parallel import usable_cores
from dualanodiff.masks import foreground_mask
from dualanodiff.pairs import PairWriter


@pytest.fixture(scope="module")
def roots(tmp_path_factory, synthetic_root):
    """``full``: the few-shot pairs of every nut defect type copied; ``partial``: crack and hole only."""
    category = open_category(synthetic_root / "nut")
    base = tmp_path_factory.mktemp("compare")
    for name, defects in (("full", list(category.defects)), ("partial", ["crack", "hole"])):
        for defect in defects:
            writer = PairWriter(base / name, "nut", defect)
            for attempt, pair in enumerate(few_shot_split(category.defects[defect])[0]):
                writer.write(load_image(pair.image), load_mask(pair.mask), None, {"attempt": attempt, "seed": 0})
    return {"full": base / "full", "partial": base / "partial"}


def test_only_defect_types_every_generator_has_are_compared(synthetic_root, roots, recorded_bars):
    cfg = EvaluateConfig(steps=2, batch_size=4, resolution=64, base_width=4)
    results = evaluate_generators(synthetic_root / "nut", roots, cfg, classification=False, device="cpu",
                                  bars=recorded_bars)
    assert results["defects"] == ["crack", "hole"]
    assert any("left out" in note and "scratch, stain" in note for note in results["notes"])
    full = results["generators"][0]
    assert full["pairs"] == {"crack": 2, "hole": 2} and set(full["per_defect"]) == {"crack", "hole"}
    assert results["protocol"]["test_images"] == {"crack": 4, "hole": 4, "good": 6}
    assert math.isnan(full["metrics"]["accuracy"]) and math.isnan(full["metrics"]["is"])
    labels = ["full: localization U-Net", "partial: localization U-Net"]  # a bar per row's training, named by it
    assert recorded_bars.totals == dict.fromkeys(labels, 2)
    assert recorded_bars.updates == {label: [(1, None), (2, None)] for label in labels}


def test_one_defect_type_skips_classification_with_a_note(synthetic_root, roots):
    cfg = EvaluateConfig(steps=2, batch_size=4, resolution=64, base_width=4)
    results = evaluate_generators(
        synthetic_root / "nut", {"full": roots["full"]}, cfg, defects=["stain"], device="cpu"
    )
    assert results["defects"] == ["stain"]
    assert "classification not computed: it needs at least 2 defect types" in results["notes"]
    assert results["protocol"]["classification"] == "not run"


def test_a_requested_defect_type_missing_from_a_generator_is_a_user_error(synthetic_root, roots):
    with pytest.raises(UserError, match=r"partial/nut/stain: no generated pairs for defect type 'stain'"):
        evaluate_generators(synthetic_root / "nut", roots, EvaluateConfig(resolution=64), defects=["stain"])


@pytest.fixture
def trained_on(monkeypatch) -> dict[str, list]:
    """Replaces the U-Net protocol by a stub that records, per call, the pairs it was given."""
    import dualanodiff.evaluation.compare as compare

    calls = []

    def stub(category, pairs, cfg, rounding, defects, base_width, device, bars):
        calls.append(list(pairs))
        scores = dict.fromkeys(METRIC_KEYS, 0.5)
        return {**scores, "per_defect": {d: dict(scores) for d in defects}, "num_test": 0}

    monkeypatch.setattr(compare, "evaluate_localization", stub)
    return calls


def test_a_row_of_two_roots_trains_on_the_pairs_of_both(synthetic_root, roots, trained_on):
    generated = {"full": roots["full"], "partial": roots["partial"], "full+partial": [roots["full"], roots["partial"]]}
    results = evaluate_generators(synthetic_root / "nut", generated, EvaluateConfig(resolution=64), classification=False)
    full, partial, both = results["generators"]
    assert both["roots"] == [str(roots["full"]), str(roots["partial"])]
    assert both["pairs"] == {"crack": 4, "hole": 4} and both["metrics"]["pairs"] == 8
    assert sorted(trained_on[2]) == sorted(trained_on[0] + trained_on[1])
    assert set(trained_on[0]).isdisjoint(trained_on[1])


def test_each_row_reports_the_mean_alignment_of_its_pairs(synthetic_root, roots, trained_on, tmp_path):
    # roots["full"] has no alignment in its manifest: computed from the files with the foreground
    results = evaluate_generators(synthetic_root / "nut", {"full": roots["full"]}, EvaluateConfig(resolution=64),
                                  defects=["hole"], classification=False)  # fmt: skip
    expected = []
    for image_path, mask_path in trained_on[0]:
        image = load_image(image_path)
        expected.append(alignment_score(image, load_mask(mask_path), foreground_mask(image, "object")))
    row = results["generators"][0]
    assert row["metrics"]["alignment"] == pytest.approx(np.nanmean(expected))
    assert row["per_defect"]["hole"]["alignment"] == pytest.approx(np.nanmean(expected))
    assert row["metrics"]["pairs"] == row["per_defect"]["hole"]["pairs"] == 2
    assert "alignment" in results["protocol"]
    # the row's pairs are the few-shot pairs themselves: their masks are exactly as large as the few-shot masks
    few_shot = [load_mask(pair.mask).mean() for pair in few_shot_split(open_category(synthetic_root / "nut").defects["hole"])[0]]
    assert row["per_defect"]["hole"]["few_shot_area_median"] == pytest.approx(np.median(few_shot))
    assert row["per_defect"]["hole"]["area_ratio"] == row["metrics"]["area_ratio"] == 1.0

    # recorded in the manifest: taken from there (null = not scorable, left out of the mean)
    writer = PairWriter(tmp_path, "nut", "hole")
    for attempt, ((image_path, mask_path), recorded) in enumerate(zip(trained_on[0] * 2, [2.0, 4.0, None, 3.0])):
        record = {"attempt": attempt, "seed": 0, "alignment": recorded}
        writer.write(load_image(image_path), load_mask(mask_path), None, record)
    results = evaluate_generators(synthetic_root / "nut", {"recorded": tmp_path}, EvaluateConfig(resolution=64),
                                  defects=["hole"], classification=False)  # fmt: skip
    assert results["generators"][0]["metrics"]["alignment"] == pytest.approx(3.0)
    assert results["generators"][0]["metrics"]["pairs"] == 4


def test_mask_areas_compare_the_medians_of_generated_and_few_shot_masks(synthetic_root, tmp_path):
    from dualanodiff.evaluation.compare import mask_areas
    from dualanodiff.evaluation.inputs import generated_pairs

    category = open_category(synthetic_root / "nut")
    pair = few_shot_split(category.defects["hole"])[0][0]
    image, mask = load_image(pair.image), load_mask(pair.mask)
    grown = np.zeros_like(mask)
    grown[:16, :16] = True  # 256 of 4096 pixels
    writer = PairWriter(tmp_path, "nut", "hole")
    for attempt, written in enumerate([grown, grown, np.zeros_like(mask)]):
        writer.write(image, written, None, {"attempt": attempt, "seed": 0})
    generated = generated_pairs(tmp_path, "nut")["hole"]
    areas = mask_areas(category, "hole", generated, "floor")
    few_shot = np.median([load_mask(p.mask).mean() for p in few_shot_split(category.defects["hole"])[0]])
    assert areas["area_median"] == 256 / mask.size
    assert areas["area_ratio"] == pytest.approx(256 / mask.size / few_shot)


def test_several_seeds_give_the_mean_of_one_training_per_seed(synthetic_root, roots, recorded_bars):
    """`seeds: 2` trains each row at seed and seed + 1: its figures equal the mean of two one-seed evaluations,
    each training's own figures are kept, and the protocol and the report say so."""
    import dataclasses

    from dualanodiff.evaluation.report import markdown

    cfg = EvaluateConfig(steps=2, batch_size=4, resolution=64, base_width=4, seed=3)
    rows = {"full": roots["full"]}
    single = {
        seed: evaluate_generators(synthetic_root / "nut", rows, dataclasses.replace(cfg, seed=seed), device="cpu")
        ["generators"][0] for seed in (3, 4)
    }
    results = evaluate_generators(synthetic_root / "nut", rows, dataclasses.replace(cfg, seeds=2), device="cpu",
                                  bars=recorded_bars)
    row = results["generators"][0]
    for key in (*METRIC_KEYS, "accuracy"):
        assert row["metrics"][key] == pytest.approx((single[3]["metrics"][key] + single[4]["metrics"][key]) / 2)
    for defect in results["defects"]:
        expected = (single[3]["per_defect"][defect]["pixel_ap"] + single[4]["per_defect"][defect]["pixel_ap"]) / 2
        assert row["per_defect"][defect]["pixel_ap"] == pytest.approx(expected)
    assert [one["seed"] for one in row["per_seed"]] == [3, 4]
    assert all(row["per_seed"][k]["pixel_ap"] == single[seed]["metrics"]["pixel_ap"] for k, seed in enumerate((3, 4)))
    assert single[3]["metrics"]["pixel_ap"] != single[4]["metrics"]["pixel_ap"]  # the seeds do differ
    assert results["protocol"]["seeds"] == 2
    assert "the mean of 2 trainings at seeds 3 to 4" in results["protocol"]["localization"]
    assert set(recorded_bars.totals) == {f"full, seed {s}: {what}" for s in (3, 4)
                                         for what in ("localization U-Net", "classification ResNet-34")}
    ap = [f"{100 * single[s]['metrics']['pixel_ap']:.1f}" for s in (3, 4)]
    assert f"- full: 3: {ap[0]}, 4: {ap[1]}" in markdown(results)


def test_a_long_evaluation_says_up_front_what_it_will_cost_and_how_to_shorten_it(synthetic_root, roots, monkeypatch):
    import dualanodiff.progress as progress

    cfg = EvaluateConfig(steps=6, batch_size=4, resolution=64, base_width=4, seeds=2)
    rows = {"full": roots["full"], "partial": roots["partial"]}
    for limit, said in ((0.0, True), (1e9, False)):
        monkeypatch.setattr(progress, "ESTIMATE_LIMIT", limit)
        messages = []
        evaluate_generators(synthetic_root / "nut", rows, cfg, defects=["hole"], classification=False, device="cpu",
                            log=messages.append)
        estimates = [m for m in messages if m.startswith("the evaluation (") and " will take about " in m]
        assert len(estimates) == int(said)  # once, after the first training's first steps
        if said:
            assert "(4 trainings of 6 steps at 64 px) will take about" in estimates[0]
            assert estimates[0].endswith("; evaluate.steps (--steps) or evaluate.resolution (--set evaluate.resolution=PX) shorten it")


def test_figures_from_two_workers_equal_those_of_one_process(synthetic_root, roots, recorded_bars):
    """Two rows at two seeds, localizer and classifier: every training's figures are the same to the bit."""
    cfg = EvaluateConfig(steps=3, batch_size=4, resolution=64, base_width=4, seeds=2)
    one = evaluate_generators(synthetic_root / "nut", roots, cfg, device="cpu", workers=1)
    two = evaluate_generators(synthetic_root / "nut", roots, cfg, device="cpu", workers=2, bars=recorded_bars)
    assert [row["per_seed"] for row in two["generators"]] == [row["per_seed"] for row in one["generators"]]
    assert [row["per_defect"] for row in two["generators"]] == [row["per_defect"] for row in one["generators"]]
    labels = {f"{row}, seed {seed}: {what}" for row in roots for seed in (0, 1)
              for what in ("localization U-Net", "classification ResNet-34")}
    assert recorded_bars.totals == dict.fromkeys(labels, 3)
    assert all([done for done, _ in updates] == [1, 2, 3] for updates in recorded_bars.updates.values())


def children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(child) for child in open(path).read().split()] if os.path.exists(path) else []


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] in ("Z", "X")  # exited, not yet reaped
    except FileNotFoundError:
        return True


@pytest.mark.skipif(usable_cores() < 2 or not os.path.exists("/proc/self/task"), reason="needs 2 cores and /proc")
def test_sigint_while_workers_train_stops_them_all_and_writes_nothing(synthetic_root, roots, tmp_path):
    """A real SIGINT at a random step of the workers' trainings: exit 130 with the one line, no report, no worker
    left running."""
    report = tmp_path / "out" / "report.md"
    args = [str(Path(sys.executable).parent / "dualanodiff"), "evaluate", "--data", str(synthetic_root / "nut"),
            "--defect", "hole", "--generated", f"a={roots['full']}", "--generated", f"b={roots['partial']}",
            "--steps", "5000", "--set", "evaluate.resolution=32", "--set", "evaluate.base_width=4",
            "--no-classification", "--workers", "2", "--report", str(report)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started, training = time.monotonic(), set()
    for line in process.stderr:  # both rows' bars have started: both workers train
        training |= {row for row in "ab" if line.startswith(f"{row}: localization U-Net ")}
        if training == set("ab"):
            break
    time.sleep(torch.rand(1).item())
    workers = children(process.pid)
    assert len(workers) >= 2 and time.monotonic() - started < 120
    process.send_signal(signal.SIGINT)
    err = process.stderr.read()
    assert process.wait(60) == 130
    assert err.strip().splitlines()[-1].endswith(
        "stopped by SIGINT before anything was written; run the same command again to evaluate")
    assert not (tmp_path / "out").exists()
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(pid) for pid in workers)
