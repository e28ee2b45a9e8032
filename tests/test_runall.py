"""run-all: the job list, done records, retry-once, defect types without pairs, the summary table, exit
codes, resuming interrupted runs; end-to-end runs on local Ray, with workers killed and run-all stopped."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dualanodiff
from dualanodiff import runall, training
from dualanodiff.config import MAX_TRIES_FACTOR, Config
from dualanodiff.errors import EXIT_FAILED, EXIT_PARTIAL, OtherSettings, UserError
from dualanodiff.model.base import base_recipe
from dualanodiff.runall import (
    LOCAL_OBJECT_STORE,
    Job,
    JobStatus,
    evaluation_job,
    finished_record,
    job_gpus,
    plan_jobs,
    run_all,
    run_job,
    run_outcome,
    summary_rows,
    train_and_generate,
    write_summary,
)
from dualanodiff.runs import RunFolder

SYNTHETIC_DEFECTS = {  # natural name order, as open_category lists them
    "nut": ["crack", "hole", "scratch", "stain"],
    "pill": ["missing_piece", "scratch", "stain"],
    "weave": ["cut", "hole", "stain", "thread"],
}


def names(jobs: list[Job]) -> list[str]:
    return [job.name for job in jobs]


def same_tensors(first, second) -> bool:
    expected, actual = load_file(str(first)), load_file(str(second))
    return expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


# ---------------------------------------------------------------------------------------------- planning


def test_plan_lists_each_categorys_defect_jobs_then_its_evaluation(synthetic_root):
    jobs = plan_jobs(synthetic_root)
    expected = [n for cat, defects in SYNTHETIC_DEFECTS.items() for n in [f"{cat}__{d}" for d in defects] + [cat]]
    assert names(jobs) == expected
    evaluation = jobs[len(SYNTHETIC_DEFECTS["nut"])]
    assert (evaluation.category, evaluation.defect, evaluation.defects) == ("nut", None, tuple(SYNTHETIC_DEFECTS["nut"]))
    assert evaluation.data == synthetic_root / "nut"


def test_plan_filters_categories_defects_and_max_defects(synthetic_root):
    assert names(plan_jobs(synthetic_root, categories=["weave", "pill"], max_defects=1)) == [
        "weave__cut", "weave", "pill__missing_piece", "pill",
    ]
    jobs = plan_jobs(synthetic_root, defects=["stain", "hole"])
    assert names(jobs) == ["nut__hole", "nut__stain", "nut", "pill__stain", "pill", "weave__hole", "weave__stain", "weave"]
    assert jobs[2].defects == ("hole", "stain")
    assert names(plan_jobs(synthetic_root, defects=["hole"], max_defects=1)) == ["nut__hole", "nut", "weave__hole", "weave"]


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"categories": ["nut", "bottle"]}, "--categories bottle"),
        ({"defects": ["stain", "rust"]}, "--defects rust"),
        ({"categories": ["pill"], "defects": ["hole"]}, "--defects hole"),
        ({"max_defects": 0}, "--max-defects 0"),
    ],
)
def test_plan_rejects_unknown_names(synthetic_root, kwargs, option):
    with pytest.raises(UserError, match=option):
        plan_jobs(synthetic_root, **kwargs)


def test_plan_rejects_a_root_without_categories(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        plan_jobs(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    with pytest.raises(UserError, match="no category folders"):
        plan_jobs(tmp_path)


# ---------------------------------------------------------------------------------------------- done records, retry


def test_done_record_skips_a_job_only_while_its_settings_are_unchanged(tmp_path):
    job, cfg = Job("nut", tmp_path / "nut", "hole"), Config()
    record = run_job(job, tmp_path, cfg.to_dict(), lambda job, out, cfg, status: {"kept": 3, "dropped": 1})
    folder = tmp_path / "jobs" / "nut__hole"
    assert (record["status"], record["attempts"], record["kept"], record["dropped"]) == ("done", 1, 3, 1)
    assert json.loads((folder / "done.json").read_text()) == record
    assert not (folder / "running.json").exists()
    assert finished_record(tmp_path, job, cfg) == record
    cfg.evaluate.resolution = 64  # the evaluation's settings do not concern a generation job
    assert finished_record(tmp_path, job, cfg) == record
    cfg.generate.num = 7
    assert finished_record(tmp_path, job, cfg) is None

    evaluation = Job("nut", tmp_path / "nut", None, ("hole",))
    run_job(evaluation, tmp_path, cfg.to_dict(), lambda job, out, cfg, status: {})
    assert finished_record(tmp_path, evaluation, cfg)["status"] == "done"
    assert finished_record(tmp_path, Job("nut", tmp_path / "nut", None, ("crack", "hole")), cfg) is None
    without_crack = Job("nut", tmp_path / "nut", None, ("hole",), (("crack", "kept 0 of 4 pairs"),))
    assert finished_record(tmp_path, without_crack, cfg) is None  # its report must list crack: evaluated again


def test_a_failing_job_is_tried_twice_then_reported(tmp_path):
    attempts = []

    def work(job, out, cfg, status):
        attempts.append(status.attempt)
        raise RuntimeError(f"boom {status.attempt}")

    record = run_job(Job("nut", tmp_path, "hole"), tmp_path, Config().to_dict(), work)
    folder = tmp_path / "jobs" / "nut__hole"
    assert attempts == [1, 2]
    assert (record["status"], record["attempts"], record["error"]) == ("failed", 2, "RuntimeError: boom 2")
    assert "Traceback" in record["traceback"]
    assert json.loads((folder / "failed.json").read_text()) == record
    assert not (folder / "done.json").exists() and not (folder / "running.json").exists()
    log = (folder / "log.txt").read_text()
    assert "attempt 1 failed" in log and "attempt 2 failed" in log
    assert finished_record(tmp_path, Job("nut", tmp_path, "hole"), Config()) is None


def test_a_job_failing_once_succeeds_on_its_retry(tmp_path):
    def work(job, out, cfg, status):
        if status.attempt == 1:
            raise OSError("disk hiccup")
        return {"kept": 2}

    job = Job("nut", tmp_path, "hole")
    run_job(job, tmp_path, Config().to_dict(), lambda *args: 1 / 0)  # leaves failed.json
    record = run_job(job, tmp_path, Config().to_dict(), work)
    assert (record["status"], record["attempts"], record["kept"]) == ("done", 2, 2)
    assert not (tmp_path / "jobs" / "nut__hole" / "failed.json").exists()


def test_a_generation_short_of_num_finishes_as_short_with_its_kept_of_asked(tmp_path):
    job, cfg = Job("nut", tmp_path / "nut", "crack"), Config()
    result = {"kept": 0, "asked": 4, "dropped": 4, "reasons": {"too_large": 4}}
    record = run_job(job, tmp_path, cfg.to_dict(), lambda *args: result)
    assert (record["status"], record["kept"], record["asked"], record["reasons"]) == ("short", 0, 4, {"too_large": 4})
    assert finished_record(tmp_path, job, cfg) == record  # it ran to its end: a re-run does not redo it
    full = run_job(job, tmp_path, cfg.to_dict(), lambda *args: {**result, "kept": 4})
    assert full["status"] == "done"


def generation_records(**jobs) -> dict[str, dict]:
    return {f"nut__{defect}": {"job": f"nut__{defect}", **record} for defect, record in jobs.items()}


def test_an_evaluation_scores_the_defect_types_with_pairs_and_lists_the_others(tmp_path):
    records = generation_records(
        crack={"status": "short", "kept": 0, "asked": 4, "reasons": {"empty": 1, "too_large": 15}},
        hole={"status": "short earlier", "kept": 3, "asked": 4},
        scratch={"status": "failed", "error": "OSError: disk full"},
        stain={"status": "done", "kept": 4, "asked": 4},
    )
    job = Job("nut", tmp_path, None, ("crack", "hole", "scratch", "stain"))
    evaluation = evaluation_job(job, records)
    assert evaluation.defects == ("hole", "stain")
    assert evaluation.without_pairs == (
        ("crack", "kept 0 of 4 pairs (filter dropped empty 1, too_large 15)"),
        ("scratch", "generation failed: OSError: disk full"),
    )
    assert evaluation.name == job.name and evaluation.data == job.data


def test_the_outcome_says_failed_partial_or_done(tmp_path):
    jobs = [Job("nut", tmp_path, "crack"), Job("nut", tmp_path, "hole"), Job("nut", tmp_path, None, ("crack", "hole"))]
    done = {"status": "done", "kept": 4, "asked": 4}
    evaluation = {"nut": {"job": "nut", "status": "done earlier"}}
    assert run_outcome(jobs, {**generation_records(crack=done, hole=done), **evaluation}) == (0, "")

    short = {"status": "short", "kept": 0, "asked": 4, "reasons": {"too_large": 16}}
    code, message = run_outcome(jobs, {**generation_records(crack=short, hole=done), **evaluation})
    assert code == EXIT_PARTIAL == 3
    assert message.startswith("partial run: 1 defect type(s) short of --num: nut/crack kept 0 of 4 pairs (filter dropped too_large 16)")

    failed = {"job": "nut", "status": "failed", "error": "no defect type of this category has generated pairs"}
    code, message = run_outcome(jobs, {**generation_records(crack=short, hole=short), "nut": failed})
    assert (code, message) == (EXIT_FAILED, "1 job(s) failed: nut; see summary.md, re-run to retry them")
    assert run_outcome(jobs, generation_records(crack=done, hole=done))[0] == EXIT_FAILED  # an evaluation never ran


def test_train_and_generate_resumes_a_started_run_and_skips_a_finished_training(synthetic_root, tmp_path, monkeypatch):
    calls, stages = [], []
    monkeypatch.setattr(runall, "STAGE_INTERVAL_S", 0.0)

    def fake_train(cfg, run, resume=False, force=False, progress=None, log=None, bars=None):
        calls.append(resume)
        bars("VAE decoder", 100)(40, note="loss 0.1000")  # the refinement's bar becomes the job's stage
        stages.append(json.loads((status.folder / runall.RUNNING).read_text())["stage"])
        cfg.to_yaml(run / "config.yaml")
        checkpoint = run / "checkpoints" / f"step-{cfg.train.steps:06d}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        torch.save({"step": cfg.train.steps}, checkpoint / "state.pt")
        RunFolder(run).adapters.write_bytes(b"")
        return run

    def fake_generate(run, out, cfg, **kwargs):
        folder = out / "nut" / "hole"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rejected.jsonl").write_text('{"attempt": 5, "verdict": "empty"}\n')
        return SimpleNamespace(folder=folder, kept=cfg.num, dropped=1)

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(dualanodiff, "generation", SimpleNamespace(generate=fake_generate), raising=False)
    job, cfg = Job("nut", synthetic_root / "nut", "hole"), Config()
    cfg.train.steps, cfg.generate.num = 2, 5
    status = JobStatus(tmp_path / "jobs" / job.name, 1, time.time())
    run = tmp_path / "runs" / "nut" / "hole"

    result = train_and_generate(job, tmp_path, cfg, status)
    assert calls == [False] and stages == ["VAE decoder 40/100"]
    assert result == {"run": str(run), "folder": str(tmp_path / "generated" / "nut" / "hole"), "kept": 5, "asked": 5,
                      "dropped": 1, "reasons": {"empty": 1}}
    assert Config.from_yaml(run / "config.yaml").data.data == str(job.data)
    train_and_generate(job, tmp_path, cfg, status)  # trained to 2 steps already: generation only
    assert calls == [False]
    cfg.train.steps = 4  # more steps: continue the run
    train_and_generate(job, tmp_path, cfg, status)
    assert calls == [False, True]
    RunFolder(run).adapters.unlink()  # interrupted before the end: resume
    train_and_generate(job, tmp_path, cfg, status)
    assert calls == [False, True, True]
    cfg.model.rank = 8  # a trained run is not reused with other settings
    with pytest.raises(UserError, match=r"other model settings \(rank 32 -> 8\)"):
        train_and_generate(job, tmp_path, cfg, status)


def templated_config() -> Config:
    """`tiny_config` with the embedded base's prompt templates (its recipe's), which training fills in."""
    cfg = tiny_config()
    recipe = base_recipe("tiny")["model"]
    cfg.model.global_prompt, cfg.model.anomaly_prompt = recipe["global_prompt"], recipe["anomaly_prompt"]
    cfg.train.steps, cfg.train.checkpoint_every = 3, 1
    assert "{defect}" in cfg.model.anomaly_prompt
    return cfg


def job_run_config(cfg: Config, job: Job) -> Config:
    """What `train_and_generate` trains: the job's config with its category and defect type."""
    run_cfg = Config.from_dict(cfg.to_dict())
    run_cfg.data.data, run_cfg.data.defect = str(job.data), job.defect
    return run_cfg


def stop_at(step: int):
    """A training progress callback that interrupts after `step` (training checkpoints, then re-raises)."""

    def progress(done, total, losses):
        if done == step:
            raise KeyboardInterrupt

    return progress


def test_an_interrupted_run_of_prompt_templates_resumes_under_run_all_as_if_never_stopped(synthetic_root, tmp_path):
    """Issue 43: the run saved "a nut with hole", the job holds "a {object} with {defect}"; once both are
    filled in they agree, so the retried job resumes from the checkpoint instead of failing on every re-run."""
    cfg, job, out = templated_config(), Job("nut", synthetic_root / "nut", "hole"), tmp_path / "out"
    run = out / "runs" / "nut" / "hole"
    with pytest.raises(KeyboardInterrupt):
        training.train(job_run_config(cfg, job), run, progress=stop_at(2))
    saved = RunFolder(run).load_config().model
    assert (saved.global_prompt, saved.anomaly_prompt) == ("a nut with hole", "hole")
    status = JobStatus(out / "jobs" / job.name, 1, time.time())
    result = train_and_generate(job, out, cfg, status)
    assert "resuming" in (status.folder / "log.txt").read_text() and result["kept"] == 2
    assert [int(row.split(",")[0]) for row in (run / "loss.csv").read_text().splitlines()[1:]] == [1, 2, 3]
    whole = training.train(job_run_config(cfg, job), tmp_path / "whole")
    assert same_tensors(whole / "adapters.safetensors", run / "adapters.safetensors")


def test_a_run_folder_without_a_checkpoint_is_started_over_not_refused(synthetic_root, tmp_path):
    """What a worker killed before the first checkpoint leaves (config.yaml, decoder, backgrounds), even of
    other settings: nothing to resume, so the job trains from the start with its own settings."""
    cfg, job, out = templated_config(), Job("nut", synthetic_root / "nut", "hole"), tmp_path / "out"
    run = RunFolder(out / "runs" / "nut" / "hole")
    left = job_run_config(cfg, job)
    left.model.rank = 8
    left.to_yaml(run.config)
    run.decoder.write_bytes(b"partial")
    run.backgrounds.mkdir()
    (run.backgrounds / "000.png").write_bytes(b"")
    status = JobStatus(out / "jobs" / job.name, 1, time.time())
    train_and_generate(job, out, cfg, status)
    assert "starting training run" in (status.folder / "log.txt").read_text()
    assert run.load_config().model.rank == cfg.model.rank and not run.decoder.exists()
    whole = training.train(job_run_config(cfg, job), tmp_path / "whole")
    assert same_tensors(whole / "adapters.safetensors", run.adapters)


def test_resume_refuses_other_model_settings_naming_them_and_accepts_templates(synthetic_root, tmp_path):
    """The one check `train --resume`, run-all and the demo share: a checkpointed run continues only with
    its own model settings, templates counting as the prompts they fill in to."""
    cfg, job = templated_config(), Job("nut", synthetic_root / "nut", "hole")
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        training.train(job_run_config(cfg, job), run, progress=stop_at(1))
    training.check_trained_with(RunFolder(run), job_run_config(cfg, job))  # templates: the same settings
    other = job_run_config(cfg, job)
    other.model.anomaly_prompt, other.model.saim = "{defect} mark", False
    with pytest.raises(OtherSettings) as refused:
        training.train(other, run, resume=True)
    assert str(refused.value) == (
        f"{run / 'config.yaml'}: this run was trained with other model settings (anomaly_prompt 'hole' -> "
        "'hole mark'; saim True -> False); keep the run's settings, or start over in another --out (or delete the run)"
    )


# ---------------------------------------------------------------------------------------------- summary


def metrics(pixel_auroc, image_f1max):
    return {"pixel_auroc": pixel_auroc, "pixel_ap": 0.5, "pixel_f1max": 0.4, "pixel_aupro": 0.3,
            "image_auroc": 1.0, "image_ap": 1.0, "image_f1max": image_f1max}


def test_summary_rows_and_averages(tmp_path):
    jobs = [Job("a", tmp_path, "w"), Job("a", tmp_path, "x"), Job("a", tmp_path, "y"), Job("a", tmp_path, None, ("w", "x", "y")),
            Job("b", tmp_path, "z"), Job("b", tmp_path, None, ("z",))]
    without = {"w": "kept 0 of 4 pairs (filter dropped empty 3, too_large 1)", "y": "generation failed: UserError: bad mask"}
    records = {
        "a__w": {"job": "a__w", "status": "short", "kept": 0, "asked": 4, "dropped": 4, "seconds": 4.0,
                 "reasons": {"empty": 3, "too_large": 1}},
        "a__x": {"job": "a__x", "status": "done", "kept": 4, "asked": 4, "dropped": 1, "seconds": 10.0},
        "a__y": {"job": "a__y", "status": "failed", "seconds": 2.0, "error": "UserError: bad mask"},
        "a": {"job": "a", "status": "done", "seconds": 6.0, "pairs": {"x": 4}, "metrics": metrics(0.7, None),
              "per_defect": {"x": metrics(0.9, None)}, "without_pairs": without},
        "b__z": {"job": "b__z", "status": "short earlier", "kept": 2, "asked": 3, "dropped": 0, "seconds": 18.0},
        "b": {"job": "b", "status": "done", "seconds": 8.0, "pairs": {"z": 2}, "metrics": metrics(0.8, 0.5),
              "per_defect": {"z": metrics(0.8, 0.6)},
              "compared": {"crop-paste": {**metrics(0.1, 0.2), "accuracy": 0.25}, "crop-paste+dualanodiff": {}}},
    }
    records["a"]["metrics"]["accuracy"] = 0.5
    rows = summary_rows(jobs, records)
    assert [(r["category"], r["defect"], r["status"]) for r in rows] == [
        ("a", "w", "short"), ("a", "x", "done"), ("a", "y", "failed"), ("a", "(evaluation)", "done"),
        ("b", "z", "short earlier"), ("b", "(evaluation)", "done"),
        ("b", "(evaluation: crop-paste)", "done"), ("b", "(evaluation: crop-paste+dualanodiff)", "done"),
        ("average", "over 2 of 4 defect types", "3/4 finished"),  # the types without pairs have no metrics
        ("average", "over 2 categories (2 defect types)", "2/2 finished"),  # ours only, not the compared rows
    ]
    assert [r["note"] for r in rows[:6]] == [
        "kept 0 of 4 pairs (filter dropped empty 3, too_large 1); not scored", "", "UserError: bad mask; not scored",
        "not scored (no pairs): w, y", "kept 2 of 3 pairs", "",
    ]
    assert (rows[6]["pixel_auroc"], rows[6]["accuracy"], rows[6]["pairs"]) == (0.1, 0.25, None)
    assert rows[-1]["accuracy"] == 0.5  # b's evaluation has one defect type: no accuracy
    accuracy_column = [key for key, _ in runall.SUMMARY_COLUMNS].index("accuracy")
    assert runall.summary_cells([rows[6]])[0][accuracy_column] == "25.0"  # in percent, as the metrics
    assert rows[2]["pixel_auroc"] is None and rows[2]["pairs"] is None
    assert (rows[3]["pixel_auroc"], rows[3]["pairs"], rows[3]["seconds"]) == (0.7, 4, 6.0)
    over_defects, over_categories = rows[-2], rows[-1]
    assert over_defects["pixel_auroc"] == pytest.approx((0.9 + 0.8) / 2)
    assert over_defects["image_f1max"] == pytest.approx(0.6)  # missing values are skipped
    assert (over_defects["pairs"], over_defects["asked"], over_defects["dropped"]) == (2, pytest.approx(11 / 3), 5 / 3)
    assert over_defects["seconds"] == pytest.approx(34 / 4)
    assert over_categories["pixel_auroc"] == pytest.approx(0.75)
    assert (over_categories["pairs"], over_categories["dropped"], over_categories["seconds"]) == (3, None, 7.0)

    md, csv_path = write_summary(tmp_path, jobs, records)
    table = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert table[-2] == {"category": "average", "defect": "over 2 of 4 defect types", "pixel_auroc": "85.0",
                         "pixel_ap": "50.0", "pixel_f1max": "40.0", "pixel_aupro": "30.0", "image_auroc": "100.0",
                         "image_ap": "100.0", "image_f1max": "60.0", "accuracy": "", "pairs": "2.0", "asked": "3.7", "dropped": "1.7", "seconds": "8.5",
                         "status": "3/4 finished", "note": ""}
    assert table[2]["pixel_auroc"] == "" and (table[0]["pairs"], table[0]["asked"]) == ("0", "4")
    assert table[3]["note"] == "not scored (no pairs): w, y"
    text = md.read_text()
    assert "| average | over 2 categories (2 defect types) | 75.0 |" in text
    assert "## Defect types without pairs (not scored)\n\n- a/w: kept 0 of 4 pairs (filter dropped empty 3, too_large 1)\n" \
           "- a/y: generation failed: UserError: bad mask\n" in text
    assert "- a__y: UserError: bad mask (log: jobs/a__y/log.txt)" in text


def test_summary_marks_jobs_that_never_ran(tmp_path):
    rows = summary_rows([Job("a", tmp_path, "x"), Job("a", tmp_path, None, ("x",))], {})
    assert [r["status"] for r in rows] == ["not run", "not run", "0/1 finished", "0/1 finished"]
    assert all(r["pixel_auroc"] is None and r["seconds"] is None for r in rows)


def test_summary_md_cells_stay_one_table_row(tmp_path):
    jobs = [Job("a", tmp_path, "x"), Job("a", tmp_path, None, ("x",))]
    records = {"a__x": {"job": "a__x", "status": "failed", "seconds": 1.0, "error": "ValueError: a|b\nsecond line"}}
    text = write_summary(tmp_path, jobs, records)[0].read_text()
    assert "| failed | ValueError: a\\|b second line |" in text


# ---------------------------------------------------------------------------------------------- Ray, CLI


def test_job_gpus_defaults_to_one_per_job_where_there_are_gpus():
    assert job_gpus(None, {"CPU": 16.0, "GPU": 2.0}) == 1.0
    assert job_gpus(None, {"CPU": 2.0}) == 0.0
    assert job_gpus(0.5, {"GPU": 1.0}) == 0.5
    with pytest.raises(UserError, match="--gpus-per-job 1: the Ray cluster has 0 GPU"):
        job_gpus(1, {"CPU": 2.0})  # would wait forever for a GPU


def test_cli_applies_flags_over_the_config_and_exits_1_when_a_job_failed(tmp_path, monkeypatch, run_cli):
    seen = {}

    def fake_run_all(data, out, cfg, **options):
        seen.update(cfg=cfg, **options)
        jobs = [Job("nut", data / "nut", "hole"), Job("nut", data / "nut", None, ("hole",))]
        failed = {"status": "failed", "seconds": 1.0, "error": "UserError: bad"}
        return jobs, {"nut__hole": {"job": "nut__hole", **failed}, "nut": {"job": "nut", **failed}}

    monkeypatch.setattr(runall, "run_all", fake_run_all)
    config = tmp_path / "c.yaml"
    config.write_text("model: {rank: 4}\ntrain: {steps: 7}\ngenerate: {num: 3}\n")
    code, out, err = run_cli("run-all", "--data", tmp_path, "--out", tmp_path / "out", "--config", config, "--set", "train.steps=5",
        "--categories", "nut,pill", "--category", "weave", "--defects", "hole", "--gpus-per-job", "0.5",
    )
    assert code == 1 and "2 job(s) failed" in err and "nut__hole" in err
    cfg = seen["cfg"]
    assert (cfg.train.steps, cfg.generate.num, cfg.model.rank) == (5, 3, 4)
    assert (seen["categories"], seen["defects"], seen["max_defects"]) == (["nut", "pill", "weave"], ["hole"], None)
    assert (seen["gpus_per_job"], seen["address"]) == (0.5, None)
    assert "nut" in out


def test_cli_exits_3_when_the_run_was_partial(tmp_path, monkeypatch, run_cli):
    def fake_run_all(data, out, cfg, **options):
        jobs = [Job("nut", data / "nut", "crack"), Job("nut", data / "nut", "hole"), Job("nut", data / "nut", None, ("hole",))]
        return jobs, {
            "nut__crack": {"job": "nut__crack", "status": "short", "kept": 0, "asked": 4, "seconds": 1.0},
            "nut__hole": {"job": "nut__hole", "status": "done", "kept": 4, "asked": 4, "seconds": 1.0},
            "nut": {"job": "nut", "status": "done", "seconds": 1.0, "pairs": {"hole": 4}, "metrics": {}, "per_defect": {},
                    "without_pairs": {"crack": "kept 0 of 4 pairs"}},
        }

    monkeypatch.setattr(runall, "run_all", fake_run_all)
    code, out, err = run_cli("run-all", "--data", tmp_path, "--out", tmp_path / "out")
    assert code == EXIT_PARTIAL
    assert "partial run: 1 defect type(s) short of --num: nut/crack kept 0 of 4 pairs" in err
    assert "not scored (no pairs): crack" in out


def test_cli_rejects_an_unknown_category_before_starting_ray(synthetic_root, tmp_path, run_cli):
    code, out, err = run_cli("run-all", "--data", synthetic_root, "--out", tmp_path, "--categories", "nut,bottle")
    assert code == 2 and out == ""
    assert "--categories bottle: not a category" in err and err.strip().count("\n") == 0


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (its start-up takes seconds); run_all leaves a running Ray up."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=LOCAL_OBJECT_STORE)
    yield ray
    ray.shutdown()


def tiny_config() -> Config:
    cfg = Config()
    cfg.model.base_model, cfg.model.rank, cfg.model.text_rank = "tiny-random", 4, 4
    cfg.train.steps, cfg.train.device = 2, "cpu"
    cfg.generate.num, cfg.generate.steps, cfg.generate.scheduler, cfg.generate.device = 2, 2, "ddim", "cpu"
    cfg.generate.filter = False  # random weights: keep every pair so that each type has exactly `num`
    cfg.evaluate.resolution, cfg.evaluate.base_width = 32, 4
    for length in ("steps", "epochs"):  # the localization U-Net's training length, whichever the config names
        if hasattr(cfg.evaluate, length):
            setattr(cfg.evaluate, length, 1)
    return cfg


@pytest.mark.slow
def test_run_all_reports_a_failed_job_and_skips_finished_jobs_on_rerun(tmp_path, local_ray):
    from rich.console import Console

    from dualanodiff.synthetic import write_dataset

    data, out, cfg = tmp_path / "data", tmp_path / "out", tiny_config()
    write_dataset(data, seed=0, size=32, per_defect=6, good=4, categories=["nut", "weave"])
    damaged = out / "runs" / "nut" / "crack" / "config.yaml"  # a damaged run (with a checkpoint) fails nut/crack
    (damaged.parent / "checkpoints" / "step-000001").mkdir(parents=True)
    damaged.write_text("model: {rank: [\n")
    quiet = Console(file=io.StringIO())

    _, records = run_all(data, out, cfg, max_defects=2, console=quiet)
    assert {name: r["status"] for name, r in records.items()} == {
        "nut__crack": "failed", "nut__hole": "done", "nut": "done",
        "weave__cut": "done", "weave__hole": "done", "weave": "done",
    }
    assert records["nut__crack"]["attempts"] == 2 and "not valid YAML" in records["nut__crack"]["error"]
    assert records["nut"]["pairs"] == {"hole": 2}  # evaluated on the type that was generated
    assert records["weave"]["pairs"] == {"cut": 2, "hole": 2}
    assert all(0 <= v <= 1 for v in records["weave"]["metrics"].values() if v is not None)
    assert records["nut"]["metrics"]["accuracy"] is None  # one defect type: nothing to classify
    for compared in ("crop-paste", "crop-paste+dualanodiff"):  # scored beside ours, with classification
        assert 0 <= records["weave"]["compared"][compared]["accuracy"] <= 1
        assert 0 <= records["weave"]["compared"][compared]["pixel_ap"] <= 1
    assert 0 <= records["weave"]["metrics"]["accuracy"] <= 1
    report = json.loads((out / "reports" / "weave" / "results.json").read_text())
    assert [row["name"] for row in report["generators"]] == ["crop-paste", "dualanodiff", "crop-paste+dualanodiff"]
    assert report["generators"][2]["pairs"] == {"cut": 4, "hole": 4}  # the two sets' pairs together
    assert (out / "reports" / "nut" / "report.md").is_file()
    assert len(list((out / "generated" / "weave" / "cut" / "image").glob("*.png"))) == 2
    assert len(list((out / "baselines" / "crop-paste" / "weave" / "cut" / "image").glob("*.png"))) == 2
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [row["status"] for row in summary] == [
        "failed", "done", "done", "done", "done", "done", "done", "done", "done", "done", "3/4 finished", "2/2 finished"]
    assert [row["defect"] for row in summary[3:5]] == ["(evaluation: crop-paste)", "(evaluation: crop-paste+dualanodiff)"]
    assert records["nut"]["without_pairs"] == {"crack": f"generation failed: {records['nut__crack']['error']}"}
    assert "nut__crack: UserError" in (out / "summary.md").read_text()

    shutil.rmtree(damaged.parent)
    finished = {p: p.stat().st_mtime_ns for p in (out / "jobs").glob("*/done.json")}
    _, records = run_all(data, out, cfg, max_defects=2, console=quiet)
    assert {name: r["status"] for name, r in records.items()} == {
        "nut__crack": "done", "nut__hole": "done earlier", "nut": "done",  # new defect type: evaluated again
        "weave__cut": "done earlier", "weave__hole": "done earlier", "weave": "done earlier",
    }
    assert records["nut"]["pairs"] == {"crack": 2, "hole": 2}
    assert not math.isnan(records["nut"]["seconds"])
    unchanged = {p for p, mtime in finished.items() if p.stat().st_mtime_ns == mtime}
    assert unchanged == set(finished) - {out / "jobs" / "nut" / "done.json"}


@pytest.mark.slow
def test_a_defect_type_without_kept_pairs_leaves_its_category_evaluated_on_the_others(tmp_path, local_ray, run_cli):
    """Issue 18: with the filter on, nut/crack keeps 0 of 2 pairs; nut is scored on hole, crack is listed
    with its reason in the report and the summary, and the exit code says the run was partial."""
    from dualanodiff.synthetic import write_dataset

    data, out, cfg, config = tmp_path / "data", tmp_path / "out", tiny_config(), tmp_path / "config.yaml"
    write_dataset(data, seed=0, size=32, per_defect=6, good=4, categories=["nut"])
    cfg.generate.filter, cfg.generate.max_area, cfg.generate.min_on_object = True, 1.0, 0.0  # a lenient filter
    cfg.to_yaml(config)
    code, _, err = run_cli("run-all", "--data", data, "--out", out, "--defects", "hole", "--config", config)
    assert code == 0, err  # first nut/hole alone: it keeps its 2 pairs
    cfg.generate.max_area = 0.0  # then a filter no mask passes, and crack too
    cfg.to_yaml(config)

    code, table, err = run_cli("run-all", "--data", data, "--out", out, "--max-defects", "2", "--config", config)
    assert code == EXIT_PARTIAL, err
    assert "partial run: 1 defect type(s) short of --num: nut/crack kept 0 of 2 pairs (filter dropped " in err
    crack = json.loads((out / "jobs" / "nut__crack" / "done.json").read_text())
    hole = json.loads((out / "jobs" / "nut__hole" / "done.json").read_text())
    assert (crack["status"], crack["kept"], crack["asked"], sum(crack["reasons"].values())) == ("short", 0, 2, 2 * MAX_TRIES_FACTOR)
    assert (hole["status"], hole["kept"], hole["asked"]) == ("done", 2, 2)  # its pairs were kept, not redone
    evaluation = json.loads((out / "jobs" / "nut" / "done.json").read_text())
    reason = evaluation["without_pairs"]["crack"]
    assert evaluation["status"] == "done" and evaluation["pairs"] == {"hole": 2} and reason.startswith("kept 0 of 2 pairs")
    assert list(evaluation["per_defect"]) == ["hole"]
    assert f"not scored, no generated pairs: crack ({reason})" in (out / "reports" / "nut" / "report.md").read_text()
    summary = {row["defect"]: row for row in csv.DictReader(io.StringIO((out / "summary.csv").read_text()))}
    assert (summary["crack"]["status"], summary["crack"]["pairs"], summary["crack"]["asked"]) == ("short", "0", "2")
    assert summary["crack"]["pixel_auroc"] == "" and summary["hole"]["pixel_auroc"] != ""
    assert summary["(evaluation)"]["note"] == "not scored (no pairs): crack"
    assert "over 1 of 2 defect types" in summary and "over 1 categories (1 defect types)" in summary
    assert f"- nut/crack: {reason}" in (out / "summary.md").read_text()
    assert "not scored (no pairs): crack" in table


def test_an_evaluation_job_shows_its_trainings_steps_as_its_stage(synthetic_root, tmp_path, monkeypatch):
    from dualanodiff import evaluation

    monkeypatch.setattr(runall, "STAGE_INTERVAL_S", 0.0)
    job = Job("nut", synthetic_root / "nut", None, ("hole",))
    status = JobStatus(tmp_path / "jobs" / job.name, 1, time.time())
    stages = []

    def fake_evaluate(data, generated, cfg, **kwargs):
        bar = kwargs["bars"]("dualanodiff: localization U-Net", 100)
        for done in (1, 40):
            bar(done, note="loss 0.1000")
            stages.append(json.loads((status.folder / runall.RUNNING).read_text())["stage"])
        raise KeyboardInterrupt  # enough: what the table showed meanwhile is checked

    monkeypatch.setattr(evaluation, "evaluate_generators", fake_evaluate)
    cfg = Config()
    cfg.generate.num = 2
    with pytest.raises(KeyboardInterrupt):
        runall.evaluate_category(job, tmp_path, cfg, status)
    assert stages == ["dualanodiff: localization U-Net 1/100", "dualanodiff: localization U-Net 40/100"]
    assert len(list((tmp_path / "baselines" / "crop-paste" / "nut" / "hole" / "image").glob("*.png"))) == 2


def test_train_and_generate_replaces_pairs_made_with_other_settings(synthetic_root, tmp_path, monkeypatch):
    """run-all's rule, a re-run with other settings redoes the job, holds for generate's refusal to mix pairs."""
    from dualanodiff.errors import OtherSettings

    forced = []

    def fake_generate(run, out, cfg, force=False, **kwargs):
        forced.append(force)
        if not force:
            raise OtherSettings(f"{out}: holds pairs made with other settings (steps 25 -> 50)")
        return SimpleNamespace(folder=out / "nut" / "hole", kept=cfg.num, dropped=0)

    monkeypatch.setattr(dualanodiff, "generation", SimpleNamespace(generate=fake_generate), raising=False)
    monkeypatch.setattr("dualanodiff.runs.RunFolder.trained_steps", lambda self: 10)
    job, cfg = Job("nut", synthetic_root / "nut", "hole"), Config()
    cfg.train.steps, cfg.generate.num = 2, 3
    job_run_config(cfg, job).to_yaml(tmp_path / "runs" / "nut" / "hole" / "config.yaml")
    logged = []
    status = JobStatus(tmp_path / "jobs" / job.name, 1, time.time())
    monkeypatch.setattr(status, "log", logged.append)
    result = train_and_generate(job, tmp_path, cfg, status)
    assert forced == [False, True] and result["kept"] == 3
    assert any("other settings" in line for line in logged)


# ---------------------------------------------------------------------------------------------- lost workers, stops


# the --config that shrinks the embedded base's recipe (prompt templates, decoder refinement, dpm, start from
# normals) to a test: nut/hole at 32 px, 16 steps (checkpoints at 4, 8, 12), 2 pairs kept unfiltered
SHRUNK_RECIPE = {
    "data": {"resolution": 32},
    "train": {"steps": 16, "checkpoint_every": 4, "decoder_steps": 2, "batch_size": 2, "device": "cpu"},
    "generate": {"num": 2, "batch_size": 2, "steps": 2, "filter": False, "device": "cpu"},
    "evaluate": {"resolution": 32, "base_width": 4, "steps": 1},
}


def recipe_run_all_args(root: Path) -> list:
    """run-all over `root`'s data with the embedded base's recipe, shrunk by `SHRUNK_RECIPE` in root/shrink.yaml."""
    return ["run-all", "--data", root / "data", "--base-model", "tiny", "--config", root / "shrink.yaml", "--defects", "hole"]


def recipe_config(root: Path) -> Config:
    """The config the command line builds from `recipe_run_all_args`."""
    from dualanodiff.cli import config_with_recipe

    return config_with_recipe(root / "shrink.yaml", "tiny")[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, local_ray) -> Path:
    """A folder with a data set (``data``), shrink.yaml and an uninterrupted run-all of them (``out``)."""
    from dualanodiff.synthetic import write_dataset

    root = tmp_path_factory.mktemp("recipe")
    write_dataset(root / "data", seed=0, size=32, per_defect=6, good=4, categories=["nut"])
    (root / "shrink.yaml").write_text(yaml.safe_dump(SHRUNK_RECIPE))
    assert statuses(recipe_run_all(root, root / "out")[2]) == {"nut__hole": "done", "nut": "done"}
    return root


def generated_pairs(out: Path) -> tuple[list[dict], dict[str, bytes]]:
    """nut/hole's kept rows (less the run folder they name) and the bytes of every pair file."""
    from dualanodiff.pairs import kept_rows

    folder = out / "generated" / "nut" / "hole"
    rows = [{key: value for key, value in row.items() if key != "run"} for row in kept_rows(folder)]
    return rows, {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.glob("*/*.png"))}


def kill_training_worker(times: int, from_step: int, job_folder: Path, killed: list, done: threading.Event) -> None:
    """SIGKILL the process running the job (its pid in running.json), as a preempted or out-of-memory node
    does: `times` times, each once a new worker shows training step `from_step` or later (0: at once)."""
    while len(killed) < times and not done.wait(0.02):
        running = training_stage(job_folder)
        if running and running["pid"] not in {pid for pid, _ in killed} and running["step"] >= from_step:
            time.sleep(random.uniform(0.0, 0.3))
            os.kill(running["pid"], signal.SIGKILL)
            killed.append((running["pid"], running["stage"]))


def training_stage(job_folder: Path) -> dict | None:
    """The job's running.json, with ``step`` the training step its stage shows (0 before training)."""
    try:
        running = json.loads((job_folder / runall.RUNNING).read_text())
    except (OSError, ValueError):  # not written yet, or replaced while read
        return None
    stage = running["stage"]
    return {**running, "step": int(stage.split()[1].split("/")[0]) if stage.startswith("training ") else 0}


def recipe_run_all(root: Path, out: Path, killer=None) -> tuple[list, list[Job], dict]:
    """run-all of `recipe_config` into `out` in this process, while ``killer(job_folder, killed, done)``
    runs beside it; the processes it killed, the jobs and their records."""
    from rich.console import Console

    killed, done = [], threading.Event()
    thread = threading.Thread(target=killer or (lambda *args: None), args=(out / "jobs" / "nut__hole", killed, done))
    thread.start()
    try:
        jobs, records = run_all(root / "data", out, recipe_config(root), defects=["hole"], console=Console(file=io.StringIO()))
    finally:
        done.set()
        thread.join()
    return killed, jobs, records


def statuses(records: dict) -> dict[str, str]:
    return {name: record["status"] for name, record in records.items()}


@pytest.mark.slow
def test_a_killed_training_worker_costs_one_retry_and_gives_the_pairs_of_an_uninterrupted_run(uninterrupted, tmp_path):
    """Issue 43's fault run: Ray retries the job, which resumes from its last checkpoint; run-all finishes
    with the same pairs, byte for byte, and a re-run skips every job."""
    out = tmp_path / "out"
    killed, _, records = recipe_run_all(uninterrupted, out, functools.partial(kill_training_worker, 1, 4))
    assert len(killed) == 1, "the job finished before its worker could be killed"
    assert statuses(records) == {"nut__hole": "done", "nut": "done"}, records
    log = (out / "jobs" / "nut__hole" / "log.txt").read_text()
    assert log.count("starting training run") == 1 and "resuming training run" in log, (killed, log)
    assert generated_pairs(out) == generated_pairs(uninterrupted / "out")
    assert (out / "reports" / "nut" / "report.md").is_file()
    assert statuses(recipe_run_all(uninterrupted, out)[2]) == {"nut__hole": "done earlier", "nut": "done earlier"}


@pytest.mark.slow
def test_a_job_whose_worker_dies_twice_fails_saying_what_to_do_and_a_rerun_retries_it(uninterrupted, tmp_path):
    out = tmp_path / "out"
    killed, jobs, records = recipe_run_all(uninterrupted, out, functools.partial(kill_training_worker, 2, 0))
    assert len(killed) == 2 and records["nut__hole"]["status"] == "failed", (killed, records)
    assert records["nut__hole"]["error"] == (
        "WorkerCrashedError: its worker died on both tries (killed, out of memory, or its node lost); see "
        "jobs/nut__hole/log.txt, then run the same command again to retry it (a training resumes from its last checkpoint)"
    )
    assert run_outcome(jobs, records) == (EXIT_FAILED, "2 job(s) failed: nut__hole, nut; see summary.md, re-run to retry them")
    assert f"- nut__hole: {records['nut__hole']['error']}" in (out / "summary.md").read_text()
    assert statuses(recipe_run_all(uninterrupted, out)[2]) == {"nut__hole": "done", "nut": "done"}
    assert generated_pairs(out) == generated_pairs(uninterrupted / "out")


@pytest.mark.slow
def test_sigterm_to_run_all_during_training_then_the_same_command_finishes_with_the_same_pairs(uninterrupted, local_ray, tmp_path, sigterm_when):
    """What a scheduler sends: run-all forwards it to the training job, which checkpoints; run-all ends by
    SIGTERM saying to run the same command again, which resumes and finishes (the embedded base's recipe)."""
    out, job = tmp_path / "out", tmp_path / "out" / "jobs" / "nut__hole"
    command = [sys.executable, "-m", "dualanodiff", *map(str, recipe_run_all_args(uninterrupted)), "--out", str(out),
               "--address", local_ray.get_runtime_context().gcs_address]
    stderr = sigterm_when(command, lambda: (running := training_stage(job)) and running["step"] >= 4, jitter=0.3)
    line = stderr.strip().splitlines()[-1]
    assert line == "stopped by SIGTERM after its running jobs saved their work; run the same command again to continue"
    stopped_at = int(RunFolder(out / "runs" / "nut" / "hole").latest_checkpoint().name.split("-")[1])
    assert 4 <= stopped_at < 16
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from step {stopped_at}" in (job / "log.txt").read_text()
    assert generated_pairs(out) == generated_pairs(uninterrupted / "out")
