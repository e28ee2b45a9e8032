"""Whole-dataset runs (`dualanodiff run-all`): train and generate for every (category, defect type),
then one evaluation per category (localization, and classification over its defect types), as Ray tasks
on this machine or on a Ray cluster.

The output folder::

    runs/<category>/<defect>/       training runs (`dualanodiff.training.train`)
    generated/<category>/<defect>/  generated pairs (`dualanodiff.generation.generate`)
    baselines/crop-paste/<category>/<defect>/  crop-paste pairs of the same few-shot defects
    reports/<category>/report.md    the category's evaluation, ours beside crop-paste and beside both together
                                    (+ report.png, results.json, results.csv)
    jobs/<category>__<defect>/      one folder per job (the evaluation's is jobs/<category>/):
                                    running.json while it runs (stage, start time, host, process
                                    id), then done.json or failed.json (error, traceback), and log.txt
    summary.md, summary.csv         one table over all jobs (`summary_rows`)

A generation job records the pairs it kept of those asked (``kept``, ``asked``, and the quality filter's
``reasons``); one that kept fewer than asked finishes as "short" rather than "done". A job whose
done.json records the settings it would run with now is skipped on a re-run (its status gets
" earlier"); any other job runs again, and a training run left unfinished resumes from its last
checkpoint (one stopped before its first checkpoint starts over). A job that raises is tried once more
(`run_job`), a job whose worker dies (killed, out of memory) is retried once by Ray, picking up the same
way; then it is reported failed (`lost_job_error` says what to do) and the other jobs go on. A category's
evaluation waits for its generation jobs, scores every defect type that has pairs and lists the others
with the reason (`evaluation_job`); it fails only when no defect type has pairs. `run_outcome` gives the
exit code: failed jobs, a partial run (some generation short of ``--num``) or all done. SIGINT or SIGTERM
stops the run: the driver forwards it to the running jobs as Ray's cancel (a KeyboardInterrupt there: a
training checkpoints at its step boundary, a generation keeps its written pairs), waits up to
`CANCEL_GRACE_S`, writes the summary and raises `dualanodiff.signals.Stopped`; a re-run continues. On a
cluster, the output and dataset folders must be on a file system every node sees under the same path.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dualanodiff.config import Config
from dualanodiff.data import natural_key, open_category
from dualanodiff.errors import EXIT_FAILED, EXIT_PARTIAL, OtherSettings, UserError
from dualanodiff.evaluation.metrics import METRIC_KEYS
from dualanodiff.evaluation.report import COLUMNS, NOT_COMPUTED, format_value
from dualanodiff.io import atomic_write_text
from dualanodiff.pairs import rejected_rows
from dualanodiff.progress import Bar
from dualanodiff.runs import RunFolder
from dualanodiff.signals import Stopped, deferred_signals

GENERATED = "generated"
GENERATOR = "dualanodiff"  # the row name in the evaluation reports
CROP_PASTE = Path("baselines") / "crop-paste"  # crop-paste pairs of the same few-shot defects, for comparison
COMBINED = f"crop-paste+{GENERATOR}"  # how users will use it: the few-shot real pairs plus generated ones
COMPARED = ("crop-paste", COMBINED)  # the rows each category's evaluation scores beside ours
SCORE_KEYS = (*METRIC_KEYS, "accuracy")  # a category's figures: localization, then classification
RUNNING, DONE, FAILED, LOG = "running.json", "done.json", "failed.json", "log.txt"
FINISHED = ("done", "short")  # ran to its end; "short": a generation that kept fewer pairs than asked
EARLIER = " earlier"  # status suffix of a job skipped on a re-run: its done.json is from an earlier run
STAGE_INTERVAL_S = 2.0  # a job rewrites running.json at most this often
PLAIN_INTERVAL_S = 60.0  # outside a terminal, a line on the running jobs at most this often
LOCAL_OBJECT_STORE = 256 * 2**20  # jobs exchange small records only
CANCEL_GRACE_S = 60  # on Ctrl-C, time given to running jobs to save a checkpoint


@dataclass(frozen=True)
class Job:
    """Train + generate one defect type (``defect`` set), or evaluate a category on ``defects`` (and
    report ``without_pairs``: the planned defect types left out, with the reason)."""

    category: str
    data: Path  # the category folder
    defect: str | None = None
    defects: tuple[str, ...] = ()
    without_pairs: tuple[tuple[str, str], ...] = ()  # (defect type, why it has no pairs)

    @property
    def name(self) -> str:
        return f"{self.category}__{self.defect}" if self.defect else self.category


def finished(record: dict | None) -> bool:
    """Whether a job record says the job ran to its end (done or short, now or earlier)."""
    return bool(record) and record.get("status", "").removesuffix(EARLIER) in FINISHED


# ---------------------------------------------------------------------------------------------- planning


def plan_jobs(
    data: Path | str,
    categories: list[str] | None = None,
    defects: list[str] | None = None,
    max_defects: int | None = None,
) -> list[Job]:
    """The jobs of a dataset root, per category (natural order): its defect types' jobs, then its
    evaluation. ``defects`` keeps the defect types of that name, ``max_defects`` the first K of them."""
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"--data {root}: folder does not exist; pass the dataset root (one folder per category)")
    found = {
        folder.name: folder
        for folder in sorted(root.iterdir(), key=lambda p: natural_key(p.name))
        if folder.is_dir() and not folder.name.startswith(".")
        and ((folder / "test").is_dir() or (folder / "images").is_dir())
    }
    if not found:
        raise UserError(
            f"--data {root}: no category folders (<category>/test/ or <category>/images/) in it; pass the dataset root"
        )
    names = list(dict.fromkeys(categories)) if categories else list(found)
    for name in names:
        if name not in found:
            raise UserError(f"--categories {name}: not a category of {root}; valid: {', '.join(found)}")
    if max_defects is not None and max_defects < 1:
        raise UserError(f"--max-defects {max_defects}: must be at least 1")
    jobs, matched = [], set()
    for name in names:
        category = open_category(found[name])
        chosen = [d for d in category.defects if not defects or d in defects]
        matched.update(chosen)
        chosen = chosen[:max_defects]
        if chosen:
            jobs += [Job(name, category.root, d) for d in chosen] + [Job(name, category.root, None, tuple(chosen))]
    for defect in defects or []:
        if defect not in matched:
            raise UserError(f"--defects {defect}: not a defect type of any chosen category; check the name")
    return jobs


def job_settings(job: Job, cfg: Config) -> dict:
    """What a job's result depends on besides its identity: a re-run with other settings redoes it."""
    if job.defect:
        data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("data", "defect")}
        sections = {"data": data, **{s: dataclasses.asdict(getattr(cfg, s)) for s in ("model", "train", "generate")}}
    else:
        sections = {
            "evaluate": dataclasses.asdict(cfg.evaluate),
            "split_rounding": cfg.data.split_rounding,
            "defects": list(job.defects),
            "without_pairs": dict(job.without_pairs),  # listed in the report: a change rewrites it
            "crop_paste": {"num": cfg.generate.num, "seed": cfg.generate.seed,
                           "allow_empty_masks": cfg.data.allow_empty_masks},
        }
    return json.loads(json.dumps(sections))


def job_folder(out: Path, job: Job) -> Path:
    return Path(out) / "jobs" / job.name


def finished_record(out: Path, job: Job, cfg: Config) -> dict | None:
    """The job's done.json if it was done with the settings it would run with now, else None."""
    record = _read_json(job_folder(out, job) / DONE)
    return record if record and record.get("settings") == job_settings(job, cfg) else None


# ---------------------------------------------------------------------------------------------- jobs


class JobStatus:
    """What a running job shows: its stage in running.json (rewritten at most every `STAGE_INTERVAL_S`,
    polled by the driver's live table) and timestamped lines in log.txt."""

    def __init__(self, folder: Path, attempt: int, started: float):
        self.folder, self.attempt, self.started = Path(folder), attempt, started
        self.written = -math.inf
        self.stage("starting", force=True)

    def stage(self, text: str, force: bool = False) -> None:
        if force or time.monotonic() - self.written >= STAGE_INTERVAL_S:
            record = {"stage": text, "attempt": self.attempt, "started": self.started, "host": os.uname().nodename,
                      "pid": os.getpid()}
            _write_json(self.folder / RUNNING, record)
            self.written = time.monotonic()

    def bars(self, label: str, total: int | None = None) -> Bar:
        """A `dualanodiff.progress.Bars` factory for library calls: each bar's position becomes the stage
        (``dualanodiff: localization U-Net 40/100``), which the driver's table shows."""

        def bar(done: int, total: int | None = total, note: str = "") -> None:
            self.stage(f"{label} {done}/{total or '?'}")

        return bar

    def log(self, message: str) -> None:
        with (self.folder / LOG).open("a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def train_and_generate(job: Job, out: Path, cfg: Config, status: JobStatus) -> dict:
    """Train the defect type's run (resuming a started one) unless trained, then generate its pairs."""
    from dualanodiff import generation, training

    run = out / "runs" / job.category / job.defect
    folder = RunFolder(run)
    cfg = copy.deepcopy(cfg)
    cfg.data.data, cfg.data.defect = str(job.data), job.defect
    if folder.trained_steps() < cfg.train.steps:  # a started run resumes, or starts over without a checkpoint
        status.log(f"{'resuming' if folder.latest_checkpoint() else 'starting'} training run {run}")
        training.train(
            cfg, run, resume=folder.is_run(), log=status.log, bars=status.bars,
            progress=lambda step, total, losses: status.stage(f"training {step}/{total}"),
        )
    else:  # a trained run is reused with its own settings only
        training.check_trained_with(folder, cfg)
    def pairs(force: bool) -> generation.GenerationSummary:
        return generation.generate(
            run, out / GENERATED, cfg.generate, log=status.log,
            progress=lambda done, total: status.stage(f"generating {done}/{total}"), force=force,
        )

    try:
        summary = pairs(force=False)  # resumes pairs made with these settings
    except OtherSettings:  # a re-run with other settings redoes the job
        status.log(f"replacing the pairs of {job.category}/{job.defect} made with other settings")
        summary = pairs(force=True)
    reasons = Counter(str(row.get("verdict")) for row in rejected_rows(Path(summary.folder)))
    return {
        "run": str(run), "folder": str(summary.folder), "kept": summary.kept, "asked": cfg.generate.num,
        "dropped": summary.dropped, "reasons": dict(sorted(reasons.items())),
    }


def evaluate_category(job: Job, out: Path, cfg: Config, status: JobStatus) -> dict:
    """The localization protocol (and classification, with two or more defect types: the paper's Table 3) on
    the category's pairs of ``job.defects``, ours beside crop-paste of the same few-shot defects and beside
    the two together; writes its report."""
    from dualanodiff.baselines import crop_paste
    from dualanodiff.evaluation import evaluate_generators, write_report

    status.stage("crop-paste pairs", force=True)
    category = open_category(job.data)
    for defect in job.defects:
        crop_paste(category, defect, cfg.generate.num, out / CROP_PASTE, cfg.generate.seed, cfg.data.split_rounding,
                   allow_empty_masks=cfg.data.allow_empty_masks, log=status.log)
    status.stage("evaluating", force=True)
    rows = {"crop-paste": out / CROP_PASTE, GENERATOR: out / GENERATED, COMBINED: [out / CROP_PASTE, out / GENERATED]}
    results = evaluate_generators(
        job.data, rows, cfg.evaluate, defects=list(job.defects),
        rounding=cfg.data.split_rounding, log=status.log, bars=status.bars,
    )
    results["without_pairs"] = dict(job.without_pairs)
    results["notes"] = list(results.get("notes", [])) + [
        f"not scored, no generated pairs: {defect} ({why})" for defect, why in job.without_pairs
    ]
    report = out / "reports" / job.category / "report.md"
    write_report(results, report, json_path=report.with_name("results.json"), csv_path=report.with_name("results.csv"), force=True)
    scored = {row["name"]: row for row in results["generators"]}
    ours = scored[GENERATOR]
    return {
        "report": str(report),
        "pairs": ours["pairs"],
        "metrics": _scores(ours["metrics"]),
        "per_defect": {defect: _scores(metrics) for defect, metrics in ours["per_defect"].items()},
        "compared": {name: _scores(scored[name]["metrics"]) for name in COMPARED},
        "without_pairs": dict(job.without_pairs),
    }


def run_job(job: Job, out: Path, config: dict, work: Callable | None = None) -> dict:
    """Run one job, once more if it raises; its record (``status`` "done", "short" when ``work`` returns
    fewer ``kept`` than ``asked``, or "failed") is returned and written to done.json or failed.json.
    ``work(job, out, cfg, status) -> dict`` defaults to `train_and_generate` or `evaluate_category`; its
    dict joins the record."""
    out, cfg = Path(out), Config.from_dict(config)
    work = work or (train_and_generate if job.defect else evaluate_category)
    folder = job_folder(out, job)
    started = time.time()
    for attempt in (1, 2):
        status = JobStatus(folder, attempt, started)
        try:
            result = work(job, out, cfg, status)
        except Exception as exc:
            error, trace = f"{type(exc).__name__}: {exc}", traceback.format_exc()
            status.log(f"attempt {attempt} failed:\n{trace}")
            continue
        except KeyboardInterrupt as exc:  # run-all was stopped (Ray's cancel); a re-run continues from here
            status.log(f"stopped: {exc}")
            raise
        short = "asked" in result and result.get("kept", 0) < result["asked"]
        record = _record(job, cfg, "short" if short else "done", started, attempts=attempt, **result)
        _finish(folder, DONE, record)
        return record
    record = _record(job, cfg, "failed", started, attempts=2, error=error, traceback=trace)
    _finish(folder, FAILED, record)
    return record


def _record(job: Job, cfg: Config, status: str, started: float, **fields) -> dict:
    return {
        "job": job.name, "category": job.category, "defect": job.defect, "status": status,
        "seconds": round(time.time() - started, 3), "settings": job_settings(job, cfg), **fields,
    }


def _finish(folder: Path, name: str, record: dict) -> None:
    _write_json(folder / name, record)
    for stale in {DONE, FAILED, RUNNING} - {name}:
        (folder / stale).unlink(missing_ok=True)


def _scores(metrics: dict) -> dict:
    """The localization metrics and the classification accuracy, None where not computed (strict JSON)."""
    return {key: None if math.isnan(metrics[key]) else float(metrics[key]) for key in SCORE_KEYS}


# ---------------------------------------------------------------------------------------------- Ray


def job_gpus(gpus_per_job: float | None, resources: dict) -> float:
    """GPUs each job claims: 1 by default where the cluster has GPUs, else 0; more than it has would hang."""
    available = resources.get("GPU", 0)
    if gpus_per_job is None:
        return 1.0 if available else 0.0
    if gpus_per_job < 0 or gpus_per_job > available:
        raise UserError(
            f"--gpus-per-job {gpus_per_job:g}: the Ray cluster has {available:g} GPU(s); "
            f"pass a share between 0 (CPU) and {available:g}"
        )
    return float(gpus_per_job)


def run_all(
    data: Path | str,
    out: Path | str,
    cfg: Config,
    *,
    categories: list[str] | None = None,
    defects: list[str] | None = None,
    max_defects: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    gpus_per_job: float | None = None,
    console=None,
) -> tuple[list[Job], dict[str, dict]]:
    """Run every job of `plan_jobs` on Ray (an existing connection, ``address``, or a local Ray with
    ``num_cpus``), showing a live table (a line per finished job where ``console`` is not a terminal);
    write summary.md and summary.csv. Returns the jobs and their records by job name (``status``: done,
    short, either with " earlier", or failed; `run_outcome` turns them into the exit code).

    The live table is the one progress display outside `dualanodiff.progress`, on purpose: it is a table
    of jobs, one row each with its stage (what the jobs' `JobStatus.bars` report), not a bar."""
    import ray
    from rich.console import Console
    from rich.live import Live

    console = console or Console(stderr=True, markup=False, emoji=False, highlight=False)  # names and errors verbatim
    data, out = Path(data).resolve(), Path(out).resolve()
    jobs = plan_jobs(data, categories, defects, max_defects)
    started_ray = _start_ray(address, num_cpus)
    try:
        # Ray retries a job whose worker died; run_job retries one that raised
        remote = ray.remote(run_job).options(num_gpus=job_gpus(gpus_per_job, ray.cluster_resources()), max_retries=1)
        driver = _Driver(out, cfg, jobs, remote, console)
        for job in jobs:
            if job.defect:
                driver.submit(job)
        driver.submit_evaluations()
        # transient, then printed once: a file or pipe gets the final table only, ending with a newline
        live = Live(driver.table(), console=console, transient=True)
        with live, deferred_signals() as stop:
            while driver.pending and not stop():
                driver.collect(ray.wait(list(driver.pending), num_returns=len(driver.pending), timeout=1.0)[0])
                live.update(driver.table())
            if stop():  # forwarded as Ray's cancel (a KeyboardInterrupt in each running job, which saves its work)
                for ref in driver.pending:
                    ray.cancel(ref)
                ray.wait(list(driver.pending), num_returns=len(driver.pending), timeout=CANCEL_GRACE_S)
                write_summary(out, jobs, driver.records)
                raise Stopped(stop(), "after its running jobs saved their work; run the same command again to continue")
        console.print(job_table(jobs, driver.records, [], out))
    finally:
        if started_ray:
            ray.shutdown()
    write_summary(out, jobs, driver.records)
    return jobs, driver.records


class _Driver:
    """`run_all`'s bookkeeping: the jobs submitted to Ray, their records, and the evaluations that wait for them."""

    def __init__(self, out: Path, cfg: Config, jobs: list[Job], remote, console):
        self.out, self.cfg, self.jobs, self.remote, self.console = out, cfg, jobs, remote, console
        self.config = cfg.to_dict()
        self.records: dict[str, dict] = {}
        self.pending: dict = {}  # Ray object ref -> job
        self.waiting = {job.category: job for job in jobs if not job.defect}  # evaluations not yet submitted
        self.plain = not console.is_terminal  # a log file or pipe: a line per finished job instead of the live table
        self.last_line = time.monotonic()

    def table(self):
        return job_table(self.jobs, self.records, self.pending.values(), self.out)

    def record_of(self, job: Job, record: dict) -> None:
        self.records[job.name] = record
        if self.plain:
            line = f"{len(self.records)}/{len(self.jobs)} jobs finished: {job.name} {record['status']} {job_note(record)}"
            self.console.print(line.rstrip())

    def submit(self, job: Job) -> None:
        record = finished_record(self.out, job, self.cfg)
        if record:
            self.record_of(job, {**record, "status": record["status"] + EARLIER})
            return
        (job_folder(self.out, job) / RUNNING).unlink(missing_ok=True)  # stale from an interrupted run
        self.pending[self.remote.remote(job, self.out, self.config)] = job

    def submit_evaluations(self) -> None:
        for category, job in list(self.waiting.items()):
            if any(Job(category, job.data, defect).name not in self.records for defect in job.defects):
                continue
            del self.waiting[category]
            evaluation = evaluation_job(job, self.records)
            if evaluation.defects:
                self.submit(evaluation)
            else:
                reasons = "; ".join(f"{defect}: {why}" for defect, why in evaluation.without_pairs)
                error = f"no defect type of this category has generated pairs ({reasons})"
                self.record_of(job, _failure(self.out, evaluation, self.cfg, error, without_pairs=dict(evaluation.without_pairs)))

    def collect(self, ready: list) -> None:
        """The finished jobs' records, then the evaluations they complete, and a plain line now and then."""
        import ray

        for ref in ready:
            job = self.pending.pop(ref)
            try:
                self.record_of(job, ray.get(ref))
            except ray.exceptions.RayError as exc:  # the worker died twice, or the task could not run
                self.record_of(job, _failure(self.out, job, self.cfg, lost_job_error(job, exc)))
        self.submit_evaluations()
        if self.plain and self.pending and time.monotonic() - self.last_line >= PLAIN_INTERVAL_S:
            self.console.print(f"{len(self.records)}/{len(self.jobs)} jobs finished; {running_line(self.pending.values(), self.out)}")
            self.last_line = time.monotonic()


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to Ray at `address`, or start a local Ray with `num_cpus`, unless one is connected already;
    True when this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=LOCAL_OBJECT_STORE)
    return True


def evaluation_job(job: Job, records: dict[str, dict]) -> Job:
    """A category's evaluation once its generation jobs have records: ``defects`` the defect types that
    have pairs, ``without_pairs`` the others with the reason (`no_pairs_reason`)::

        evaluation_job(Job("nut", root, None, ("crack", "hole")), records)
        # Job("nut", ..., defects=("hole",), without_pairs=(("crack", "kept 0 of 4 pairs (filter dropped empty 12)"),))
    """
    scored, without = [], []
    for defect in job.defects:
        reason = no_pairs_reason(records[Job(job.category, job.data, defect).name])
        if reason:
            without.append((defect, reason))
        else:
            scored.append(defect)
    return dataclasses.replace(job, defects=tuple(scored), without_pairs=tuple(without))


def no_pairs_reason(record: dict) -> str | None:
    """Why a generation job left its defect type without pairs (failed, or kept 0); None if it has pairs."""
    if not finished(record):
        return f"generation failed: {record.get('error', 'not run')}"
    return kept_note(record) if record.get("kept") == 0 else None


def kept_note(record: dict) -> str:
    """``kept 3 of 4 pairs (filter dropped empty 5, too_large 1)`` for a generation record."""
    asked = f" of {record['asked']}" if record.get("asked") is not None else ""
    reasons = ", ".join(f"{verdict} {count}" for verdict, count in (record.get("reasons") or {}).items())
    return f"kept {record.get('kept')}{asked} pairs" + (f" (filter dropped {reasons})" if reasons else "")


def job_note(record: dict) -> str:
    """What a job record adds to its status: the error, the kept pairs of a short generation, or the
    defect types an evaluation could not score."""
    if record.get("status") == "failed":
        return record.get("error", "")
    if record.get("status", "").startswith("short"):
        return kept_note(record)
    without = record.get("without_pairs") or {}
    return f"not scored (no pairs): {', '.join(without)}" if without else ""


def running_line(submitted, out: Path) -> str:
    """``running: nut__hole training 120/500, pill__stain generating 2/4`` (queued jobs are left out)."""
    stages = [(job.name, _read_json(job_folder(out, job) / RUNNING)) for job in submitted]
    running = [f"{name} {record['stage']}" for name, record in stages if record]
    return f"running: {', '.join(running)}" if running else "waiting for Ray to start the queued jobs"


def run_outcome(jobs: list[Job], records: dict[str, dict]) -> tuple[int, str]:
    """The exit code of a run and the line that explains it: `EXIT_FAILED` when a job failed (or never
    ran), `EXIT_PARTIAL` when a generation kept fewer pairs than asked, else 0."""
    failed = [job.name for job in jobs if not finished(records.get(job.name))]
    if failed:
        return EXIT_FAILED, f"{len(failed)} job(s) failed: {', '.join(failed)}; see summary.md, re-run to retry them"
    short = [f"{job.category}/{job.defect} {kept_note(records[job.name])}" for job in jobs
             if job.defect and records[job.name]["status"].startswith("short")]
    if short:
        return EXIT_PARTIAL, (
            f"partial run: {len(short)} defect type(s) short of --num: {'; '.join(short)}; see summary.md "
            "(loosen generate.max_area/min_on_object in --config, or turn generate.filter off, then re-run)"
        )
    return 0, ""


def lost_job_error(job: Job, exc: Exception) -> str:
    """The error of a job Ray gave up on: its worker died on both tries (killed, out of memory, its node lost),
    or Ray could not run it. Ray's own text points at its log files; this says what to do."""
    from ray.exceptions import NodeDiedError, OutOfMemoryError, WorkerCrashedError

    if isinstance(exc, (WorkerCrashedError, OutOfMemoryError, NodeDiedError)):
        why = "its worker died on both tries (killed, out of memory, or its node lost)"
    else:
        why = f"Ray could not run it ({' '.join(str(exc).split())[:200]})"
    return (f"{type(exc).__name__}: {why}; see jobs/{job.name}/{LOG}, then run the same command again to retry it "
            "(a training resumes from its last checkpoint)")


def _failure(out: Path, job: Job, cfg: Config, error: str, **fields) -> dict:
    record = _record(job, cfg, "failed", time.time(), attempts=0, error=error, **fields)
    _finish(job_folder(out, job), FAILED, record)
    return record


def job_table(jobs: list[Job], records: dict[str, dict], submitted, out: Path):
    """The live table: every job as waiting (an evaluation before its generations end), queued,
    running (its stage and elapsed time), done, short (its kept pairs), done/short earlier or failed
    (its error)."""
    from rich.table import Table

    submitted = {job.name for job in submitted}
    table = Table(title="run-all jobs")
    for column in ("job", "status", "stage", "elapsed"):
        table.add_column(column)
    for job in jobs:
        record = records.get(job.name)
        if record:
            table.add_row(job.name, record["status"], job_note(record)[:80], f"{record['seconds']:.0f} s")
        elif job.name in submitted:
            running = _read_json(job_folder(out, job) / RUNNING)
            if running:
                attempt = f" (attempt {running['attempt']})" if running["attempt"] > 1 else ""
                table.add_row(job.name, "running", running["stage"] + attempt, f"{time.time() - running['started']:.0f} s")
            else:
                table.add_row(job.name, "queued", "", "")
        else:
            table.add_row(job.name, "waiting", "for its category's generations", "")
    return table


# ---------------------------------------------------------------------------------------------- summary

SUMMARY_COLUMNS = (
    ("category", "category"),
    ("defect", "defect"),
    *[(key, title) for key, title, _ in COLUMNS if key in SCORE_KEYS],
    ("pairs", "pairs"),
    ("asked", "asked"),
    ("dropped", "dropped"),
    ("seconds", "seconds"),
    ("status", "status"),
    ("note", "note"),
)
EVALUATION_ROW = "(evaluation)"
_AVERAGED = (*SCORE_KEYS, "pairs", "asked", "dropped", "seconds")


def summary_rows(jobs: list[Job], records: dict[str, dict]) -> list[dict]:
    """Rows of the summary table, values raw (metrics as fractions, None where missing).

    Per category: one row per defect type (its localization metrics on its own test images plus
    test/good, its kept pairs of those asked, dropped pairs, train + generate seconds, status, and a
    note: the error, or why it was not scored), then the evaluation row (metrics over the category's
    test split of the defect types it scored, pairs evaluated, evaluation seconds; the note names the
    defect types without pairs; with two or more, also the classification accuracy), then a row for each
    pair set scored beside ours (`COMPARED`: crop-paste, and crop-paste with ours). Then two averages of ours,
    whose ``defect`` cell says what they were taken over: the defect types with metrics, and the evaluated
    categories (with their defect types, as the paper's per-category mean). Averages skip missing values;
    their status counts the finished rows.
    """
    defect_rows, evaluation_rows, scored, rows = [], [], [], []  # scored: defect types per evaluated category
    for job in jobs:
        record = records.get(job.name, {})
        if job.defect:
            evaluation = records.get(Job(job.category, job.data).name, {})
            metrics = (evaluation.get("per_defect") or {}).get(job.defect, {}) if finished(evaluation) else {}
            not_scored = finished(evaluation) and job.defect in (evaluation.get("without_pairs") or {})
            note = job_note(record) + ("; not scored" if not_scored else "")
            row = {"category": job.category, "defect": job.defect, **{k: metrics.get(k) for k in SCORE_KEYS},
                   "pairs": record.get("kept"), "asked": record.get("asked"), "dropped": record.get("dropped"),
                   "note": note.strip("; ")}
            defect_rows.append(row)
        else:
            done = finished(record)
            metrics = record.get("metrics", {}) if done else {}
            pairs = sum(record["pairs"].values()) if done else None
            row = {"category": job.category, "defect": EVALUATION_ROW, **{k: metrics.get(k) for k in SCORE_KEYS},
                   "pairs": pairs, "asked": None, "dropped": None, "note": job_note(record)}
            evaluation_rows.append(row)
            scored += [len(record["pairs"])] if done else []
        row.update(seconds=record.get("seconds"), status=record.get("status", "not run"))
        rows.append(row)
        if not job.defect and finished(record):
            rows += [
                {"category": job.category, "defect": f"(evaluation: {name})", **{k: scores.get(k) for k in SCORE_KEYS},
                 "pairs": None, "asked": None, "dropped": None, "seconds": None, "status": row["status"], "note": ""}
                for name, scores in (record.get("compared") or {}).items()
            ]
    with_metrics = sum(any(row[k] is not None for k in METRIC_KEYS) for row in defect_rows)
    rows.append(_average(defect_rows, f"over {with_metrics} of {len(defect_rows)} defect types"))
    rows.append(_average(evaluation_rows, f"over {len(scored)} categories ({sum(scored)} defect types)"))
    return rows


def _average(rows: list[dict], over: str) -> dict:
    average = {"category": "average", "defect": over, "note": ""}
    for key in _AVERAGED:
        values = [row[key] for row in rows if row[key] is not None]
        average[key] = sum(values) / len(values) if values else None
    average["status"] = f"{sum(row['status'].removesuffix(EARLIER) in FINISHED for row in rows)}/{len(rows)} finished"
    return average


def summary_cells(rows: list[dict]) -> list[list[str]]:
    """Rows as text: metrics in percent with one decimal (as the paper), seconds with one decimal,
    `NOT_COMPUTED` where missing."""
    cells = []
    for row in rows:
        line = []
        for key, _ in SUMMARY_COLUMNS:
            value = row[key]
            if key in SCORE_KEYS:  # localization metrics and accuracy: fractions shown in percent
                line.append(format_value(value, percent=True))
            elif value is None:
                line.append(NOT_COMPUTED)
            elif isinstance(value, float):
                line.append(f"{value:.1f}")
            else:
                line.append(str(value))
        cells.append(line)
    return cells


def write_summary(out: Path, jobs: list[Job], records: dict[str, dict]) -> tuple[Path, Path]:
    """summary.md (the table, then the defect types without pairs and the failures with their logs) and
    summary.csv (the same cells, empty where missing), both atomically."""
    out = Path(out)
    cells = summary_cells(summary_rows(jobs, records))
    titles = [title for _, title in SUMMARY_COLUMNS]
    lines = [
        "# run-all summary",
        "",
        "| " + " | ".join(titles) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(titles) - 4) + ["---", "---"]) + "|",
        *["| " + " | ".join(_md_cell(cell) for cell in line) + " |" for line in cells],
        "",
        "Localization metrics and classification accuracy in percent (per defect type: its test images plus "
        "test/good; evaluation rows: the category's test split of the defect types it scored; crop-paste: the "
        "few-shot defects pasted on normal images, scored the same way); pairs = generated pairs kept; asked = --num; "
        f"seconds = wall time of the job; {NOT_COMPUTED} = not computed.",
    ]
    without = [
        f"- {job.category}/{defect}: {why}"
        for job in jobs if not job.defect
        for defect, why in (records.get(job.name, {}).get("without_pairs") or {}).items()
    ]
    if without:
        lines += ["", "## Defect types without pairs (not scored)", "", *without]
    failures = [records[job.name] for job in jobs if records.get(job.name, {}).get("status") == "failed"]
    if failures:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- {r['job']}: {r['error']} (log: jobs/{r['job']}/{LOG})" for r in failures]
    md, csv_path = out / "summary.md", out / "summary.csv"
    atomic_write_text(md, "\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([key for key, _ in SUMMARY_COLUMNS])
    writer.writerows([["" if cell == NOT_COMPUTED else cell for cell in line] for line in cells])
    atomic_write_text(csv_path, buffer.getvalue())
    return md, csv_path


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
