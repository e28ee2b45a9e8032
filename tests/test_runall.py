"""run-all: the job list, done records, retry-once, the summary table; one end-to-end run on local Ray."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch

import dualanodiff
from dualanodiff import runall, training
from dualanodiff.config import Config
from dualanodiff.errors import UserError
from dualanodiff.runall import (
    LOCAL_OBJECT_STORE,
    Job,
    JobStatus,
    finished_record,
    job_gpus,
    plan_jobs,
    run_all,
    run_job,
    summary_rows,
    train_and_generate,
    write_summary,
)

SYNTHETIC_DEFECTS = {  # natural name order, as open_category lists them
    "nut": ["crack", "hole", "scratch", "stain"],
    "pill": ["missing_piece", "scratch", "stain"],
    "weave": ["cut", "hole", "stain", "thread"],
}


def names(jobs: list[Job]) -> list[str]:
    return [job.name for job in jobs]


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
    cfg.evaluate.epochs = 3  # the evaluation's settings do not concern a generation job
    assert finished_record(tmp_path, job, cfg) == record
    cfg.generate.num = 7
    assert finished_record(tmp_path, job, cfg) is None

    evaluation = Job("nut", tmp_path / "nut", None, ("hole",))
    run_job(evaluation, tmp_path, cfg.to_dict(), lambda job, out, cfg, status: {})
    assert finished_record(tmp_path, evaluation, cfg)["status"] == "done"
    assert finished_record(tmp_path, Job("nut", tmp_path / "nut", None, ("crack", "hole")), cfg) is None


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


def test_train_and_generate_resumes_a_started_run_and_skips_a_finished_training(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfg, run, resume=False, force=False, progress=None, log=None):
        calls.append(resume)
        cfg.to_yaml(run / "config.yaml")
        checkpoint = run / "checkpoints" / f"step-{cfg.train.steps:06d}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        torch.save({"step": cfg.train.steps}, checkpoint / "state.pt")
        (run / training.ADAPTERS).write_bytes(b"")
        return run

    def fake_generate(run, out, cfg, **kwargs):
        return SimpleNamespace(folder=out / "nut" / "hole", kept=cfg.num, dropped=1)

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(dualanodiff, "generation", SimpleNamespace(generate=fake_generate), raising=False)
    job, cfg = Job("nut", tmp_path / "data" / "nut", "hole"), Config()
    cfg.train.steps, cfg.generate.num = 2, 5
    status = JobStatus(tmp_path / "jobs" / job.name, 1, time.time())
    run = tmp_path / "runs" / "nut" / "hole"

    result = train_and_generate(job, tmp_path, cfg, status)
    assert calls == [False]
    assert result == {"run": str(run), "folder": str(tmp_path / "generated" / "nut" / "hole"), "kept": 5, "dropped": 1}
    assert Config.from_yaml(run / "config.yaml").data.data == str(job.data)
    train_and_generate(job, tmp_path, cfg, status)  # trained to 2 steps already: generation only
    assert calls == [False]
    cfg.train.steps = 4  # more steps: continue the run
    train_and_generate(job, tmp_path, cfg, status)
    assert calls == [False, True]
    (run / training.ADAPTERS).unlink()  # interrupted before the end: resume
    train_and_generate(job, tmp_path, cfg, status)
    assert calls == [False, True, True]
    cfg.model.rank = 8
    with pytest.raises(UserError, match="other model settings"):
        train_and_generate(job, tmp_path, cfg, status)


# ---------------------------------------------------------------------------------------------- summary


def metrics(pixel_auroc, image_f1max):
    return {"pixel_auroc": pixel_auroc, "pixel_ap": 0.5, "pixel_f1max": 0.4,
            "image_auroc": 1.0, "image_ap": 1.0, "image_f1max": image_f1max}


def test_summary_rows_and_averages(tmp_path):
    jobs = [Job("a", tmp_path, "x"), Job("a", tmp_path, "y"), Job("a", tmp_path, None, ("x", "y")),
            Job("b", tmp_path, "z"), Job("b", tmp_path, None, ("z",))]
    records = {
        "a__x": {"job": "a__x", "status": "done", "kept": 4, "dropped": 1, "seconds": 10.0},
        "a__y": {"job": "a__y", "status": "failed", "seconds": 2.0, "error": "UserError: bad mask"},
        "a": {"status": "done", "seconds": 6.0, "pairs": {"x": 4}, "metrics": metrics(0.7, None),
              "per_defect": {"x": metrics(0.9, None)}},
        "b__z": {"job": "b__z", "status": "done earlier", "kept": 2, "dropped": 0, "seconds": 20.0},
        "b": {"status": "done", "seconds": 8.0, "pairs": {"z": 2}, "metrics": metrics(0.8, 0.5),
              "per_defect": {"z": metrics(0.8, 0.6)}},
    }
    rows = summary_rows(jobs, records)
    assert [(r["category"], r["defect"], r["status"]) for r in rows] == [
        ("a", "x", "done"), ("a", "y", "failed"), ("a", "(evaluation)", "done"), ("b", "z", "done earlier"),
        ("b", "(evaluation)", "done"), ("average", "over defect types", "2/3 done"),
        ("average", "over categories", "2/2 done"),
    ]
    assert rows[1]["pixel_auroc"] is None and rows[1]["pairs"] is None
    assert (rows[2]["pixel_auroc"], rows[2]["pairs"], rows[2]["seconds"]) == (0.7, 4, 6.0)
    over_defects, over_categories = rows[-2], rows[-1]
    assert over_defects["pixel_auroc"] == pytest.approx((0.9 + 0.8) / 2)  # the failed type has no metrics
    assert over_defects["image_f1max"] == pytest.approx(0.6)  # missing values are skipped
    assert (over_defects["pairs"], over_defects["dropped"]) == (3, 0.5)
    assert over_defects["seconds"] == pytest.approx(32 / 3)
    assert over_categories["pixel_auroc"] == pytest.approx(0.75)
    assert (over_categories["pairs"], over_categories["dropped"], over_categories["seconds"]) == (3, None, 7.0)

    md, csv_path = write_summary(tmp_path, jobs, records)
    table = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert table[-2] == {"category": "average", "defect": "over defect types", "pixel_auroc": "85.0", "pixel_ap": "50.0",
                         "pixel_f1max": "40.0", "image_auroc": "100.0", "image_ap": "100.0", "image_f1max": "60.0",
                         "pairs": "3.0", "dropped": "0.5", "seconds": "10.7", "status": "2/3 done"}
    assert table[1]["pixel_auroc"] == "" and table[0]["pairs"] == "4"
    text = md.read_text()
    assert "| average | over categories | 75.0 |" in text
    assert "- a__y: UserError: bad mask (log: jobs/a__y/log.txt)" in text


def test_summary_marks_jobs_that_never_ran(tmp_path):
    rows = summary_rows([Job("a", tmp_path, "x"), Job("a", tmp_path, None, ("x",))], {})
    assert [r["status"] for r in rows] == ["not run", "not run", "0/1 done", "0/1 done"]
    assert all(r["pixel_auroc"] is None and r["seconds"] is None for r in rows)


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
    code, out, err = run_cli("run-all", "--data", tmp_path, "--out", tmp_path / "out", "--config", config, "--steps", "5",
        "--categories", "nut,pill", "--category", "weave", "--defects", "hole", "--gpus-per-job", "0.5",
    )
    assert code == 1 and "2 job(s) failed" in err and "nut__hole" in err
    cfg = seen["cfg"]
    assert (cfg.train.steps, cfg.generate.num, cfg.model.rank) == (5, 3, 4)
    assert (seen["categories"], seen["defects"], seen["max_defects"]) == (["nut", "pill", "weave"], ["hole"], None)
    assert (seen["gpus_per_job"], seen["address"]) == (0.5, None)
    assert "nut" in out


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
    cfg.model.base_model, cfg.model.rank, cfg.model.alpha, cfg.model.text_rank = "tiny-random", 4, 4.0, 4
    cfg.train.steps, cfg.train.device = 2, "cpu"
    cfg.generate.num, cfg.generate.steps, cfg.generate.scheduler, cfg.generate.device = 2, 2, "ddim", "cpu"
    cfg.generate.filter = False  # random weights: keep every pair so that each type has exactly `num`
    cfg.evaluate.epochs, cfg.evaluate.resolution, cfg.evaluate.base_width = 1, 32, 4
    return cfg


@pytest.mark.slow
def test_run_all_reports_a_failed_job_and_skips_finished_jobs_on_rerun(tmp_path, local_ray):
    from rich.console import Console

    from dualanodiff.synthetic import write_dataset

    data, out, cfg = tmp_path / "data", tmp_path / "out", tiny_config()
    write_dataset(data, seed=0, size=32, per_defect=6, good=4, categories=["nut", "weave"])
    damaged = out / "runs" / "nut" / "crack" / "config.yaml"  # a damaged run folder fails nut/crack
    damaged.parent.mkdir(parents=True)
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
    assert (out / "reports" / "nut" / "report.md").is_file()
    assert len(list((out / "generated" / "weave" / "cut" / "image").glob("*.png"))) == 2
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [row["status"] for row in summary] == ["failed", "done", "done", "done", "done", "done", "3/4 done", "2/2 done"]
    assert "nut__crack: UserError" in (out / "summary.md").read_text()

    damaged.unlink()
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
