"""Fault injection: each row of issue 14's table, run against the command line, with what it promises.

| row (what broke before)                           | tests here                                               |
|---------------------------------------------------|----------------------------------------------------------|
| usage mistakes: traceback, exit 1                 | one line, exit 2; the installed entry point; --version   |
| `[/]`, `[v2]`, `:train:` in messages              | printed verbatim                                         |
| `train --resume` replaced the run's length        | kept; a finished run says so; --steps extends it; other  |
|                                                   | model settings refused, naming them                      |
| resume after an interrupt was not exact           | tests/test_training.py (a real SIGINT at a random step)  |
| SIGTERM lost the work since the last checkpoint   | train, generate (SIGINT and SIGTERM at random moments),  |
|                                                   | evaluate, pretrain-base, run-all: saved, one line, resume|
| two writers into one folder                       | a real second process refused naming the holder          |
| read-only or full folder: traceback after the work| one line before any model loads (also as root)           |
| all-zero masks trained silently                   | info flags, train/crop-paste refuse or skip them         |
| generate short of --num exited 0                  | exit 3 with the count                                    |
| generate mixed other settings into a folder       | refused; --force replaces                                |
| a redirected log held no progress                 | plain lines; --log-file; a closed pipe ends quietly      |
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dualanodiff
from dualanodiff import cli, generation, pipeline, progress, synthetic
from dualanodiff import io as atomic_io
from dualanodiff.config import Config
from dualanodiff.data import few_shot_split, open_category
from dualanodiff.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    EXIT_USAGE,
)
from dualanodiff.evaluation import compare
from dualanodiff.evaluation import report as report_files
from dualanodiff.evaluation.parallel import torch_threads
from dualanodiff.pairs import LOCK, PairWriter, kept_rows
from dualanodiff.runs import RunFolder

CLI = str(Path(sys.executable).parent / "dualanodiff")
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}  # bit-exact runs need the same reductions as the reference


def one_error_line(err: str) -> str:
    """The single stderr line of a failed command (no traceback, no usage block)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run folder as `train` leaves it, minus the weights: enough for `generate` to read its settings."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config()
    cfg.data.data, cfg.data.defect = str(tmp_path / "data" / "nut"), "hole"
    cfg.to_yaml(run / "config.yaml")
    return run


def train_args(data: Path, out: Path, steps: int) -> list:
    return ["train", "--data", data, "--defect", "hole", "--base-model", "tiny-random", "--steps", str(steps),
            "--set", "model.rank=4", "--set", "train.batch_size=2", "--set", "train.lr=1e-3", "--set", "train.device=cpu",
            "--out", out]  # --out last: a test swaps it


def generate_args(run: Path, out: Path, num: int) -> list:
    return ["generate", run, "--out", out, "--num", str(num), "--steps", "2", "--no-filter", "--set", "generate.batch_size=2",
            "--set", "generate.scheduler=ddim", "--set", "generate.device=cpu"]


def consistent_pairs(folder: Path) -> list[dict]:
    """The manifest rows, after checking the folder holds exactly their files and no temporary file."""
    rows = kept_rows(folder)
    listed = {row[key] for row in rows for key in ("image", "mask", "part") if row.get(key)}
    on_disk = {str(p.relative_to(folder)) for p in folder.glob("*/*.png")}
    assert on_disk == listed and not list(folder.rglob("*.tmp")), (on_disk ^ listed)
    assert [row["index"] for row in rows] == list(range(len(rows)))
    assert len({row["attempt"] for row in rows}) == len(rows)
    return rows


def same_pairs(first: Path, second: Path) -> bool:
    rows = kept_rows(first)
    return rows == kept_rows(second) and all(
        (first / row[key]).read_bytes() == (second / row[key]).read_bytes() for row in rows for key in ("image", "mask", "part")
    )


def signal_later(delay: float, number: int = signal.SIGINT) -> None:
    threading.Timer(delay, os.kill, (os.getpid(), number)).start()


# ---------------------------------------------------------------------------------------------- usage mistakes


@pytest.mark.parametrize(
    "args, message, command",
    [
        (["train", "--stpes", "3"], "error: No such option: --stpes (Possible options: ", "dualanodiff train"),
        (["generate", "RUN", "--out", "x", "--num", "abc"], "error: Invalid value for '--num'", "dualanodiff generate"),
        (["train", "--data", "x"], "error: Missing option '--out'.", "dualanodiff train"),
        (["trian"], "error: No such command 'trian'. Did you mean 'train'?", "dualanodiff"),
        (["generate"], "error: Missing argument 'run'.", "dualanodiff generate"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(run_cli, args, message, command):
    code, out, err = run_cli(*args)
    assert code == EXIT_USAGE and out == ""
    line = one_error_line(err)
    assert line.startswith(message) and line.endswith(f" (see '{command} --help')")


def test_the_installed_entry_point_gives_the_same_line_without_a_traceback(tmp_path):
    done = subprocess.run([CLI, "train", "--stpes", "3"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    assert one_error_line(done.stderr).startswith("error: No such option: --stpes")


def test_version_prints_the_version_and_no_command_shows_the_help(run_cli):
    assert run_cli("--version") == (0, f"dualanodiff {dualanodiff.__version__}\n", "")
    code, out, err = run_cli()
    assert code == EXIT_USAGE and "Usage: dualanodiff" in out and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- verbatim messages


def test_markup_and_emoji_codes_in_messages_print_verbatim(tmp_path, run_cli, capsys):
    weird = tmp_path / "runs[/]" / "[v2]" / ":train:"
    code, _, err = run_cli("info", weird)
    assert code == EXIT_USAGE
    assert one_error_line(err).startswith(f"error: {weird}: ")
    cli._log("loss [bold]0.1[/] at [v2] :train: [/]")
    assert capsys.readouterr().err == "loss [bold]0.1[/] at [v2] :train: [/]\n"


# ---------------------------------------------------------------------------------------------- resume


def test_resume_keeps_the_runs_length_and_a_finished_run_says_so(synthetic_root, tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli(*train_args(synthetic_root / "nut", run, steps=3))[0] == 0
    code, _, err = run_cli("train", "--out", run, "--resume")
    assert code == EXIT_USAGE and last_line(err) == f"error: {run}: already trained for 3 steps; pass a larger --steps to continue"
    assert Config.from_yaml(run / "config.yaml").train.steps == 3  # not replaced by the default 5000
    code, _, err = run_cli("train", "--out", run, "--resume", "--steps", "4", "--set", "model.rank=8")
    assert code == EXIT_USAGE and "this run was trained with other model settings (rank 4 -> 8)" in one_error_line(err)
    assert run_cli("train", "--out", run, "--resume", "--steps", "4")[0] == 0
    assert (run / "loss.csv").read_text().splitlines()[-1].startswith("4,")
    assert Config.from_yaml(run / "config.yaml").model.rank == 4  # the run's own settings, not the defaults


# ---------------------------------------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigterm_during_train_checkpoints_at_a_step_and_resumes_bit_exactly(synthetic_root, tmp_path):
    """What Ray, SLURM, Kubernetes and docker send: the process saves at a step boundary, says how to go on
    and ends by SIGTERM itself."""
    args = [CLI, *map(str, train_args(synthetic_root / "nut", tmp_path / "run", steps=40)[:-1])]
    process = subprocess.Popen(args + [str(tmp_path / "run")], env=ONE_THREAD, stderr=subprocess.PIPE, text=True)
    seen = ""
    while not seen.startswith("training 1/40"):  # the first plain progress line: step 1 is done
        seen = process.stderr.readline()
        assert seen or process.poll() is None, "train ended before its first step"
    time.sleep(random.uniform(0.0, 0.5))
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == -signal.SIGTERM
    stopped_at = int(RunFolder(tmp_path / "run").latest_checkpoint().name.split("-")[1])
    assert 1 <= stopped_at < 40
    line = last_line(process.stderr.read())
    assert line == f"stopped by SIGTERM at step {stopped_at} of 40; checkpoint saved, continue with --resume"
    subprocess.run(args[:2] + ["--out", str(tmp_path / "run"), "--resume"], env=ONE_THREAD, check=True, capture_output=True)
    subprocess.run(args + [str(tmp_path / "whole")], env=ONE_THREAD, check=True, capture_output=True)
    expected, actual = (load_file(str(tmp_path / run / "adapters.safetensors")) for run in ("whole", "run"))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_sigint_during_generate_drops_the_batch_and_a_rerun_gives_the_same_pairs(tiny_run, tmp_path, run_cli, monkeypatch):
    """The signal lands at a random moment of a random batch: written pairs stay whole, the batch being
    sampled is dropped, and re-running the command gives the pairs of an uninterrupted run, byte for byte."""
    fire_at, delay = random.randint(1, 3), random.uniform(0.0, 0.05)
    calls, sample = [], pipeline.DualAnoDiffPipeline.__call__

    def armed(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == fire_at:
            signal_later(delay)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.DualAnoDiffPipeline, "__call__", armed)
    code, _, err = run_cli(*generate_args(tiny_run, tmp_path / "gen", num=8))
    monkeypatch.undo()
    folder = tmp_path / "gen" / "nut" / "hole"
    kept = len(consistent_pairs(folder))
    assert code == EXIT_INTERRUPTED and kept in (2 * fire_at - 2, 2 * fire_at), (fire_at, delay, err)
    assert last_line(err) == f"stopped by SIGINT with {kept} of 8 pairs in {folder}; run the same command again to continue"
    PairWriter(tmp_path / "gen", "nut", "hole").close()  # the lock was released
    assert run_cli(*generate_args(tiny_run, tmp_path / "gen", num=8))[0] == 0
    assert run_cli(*generate_args(tiny_run, tmp_path / "whole", num=8))[0] == 0
    assert len(consistent_pairs(folder)) == 8 and same_pairs(folder, tmp_path / "whole" / "nut" / "hole")


@pytest.mark.slow
def test_sigterm_during_generate_keeps_every_written_pair_whole(tiny_run, tmp_path, run_cli):
    args = [CLI, *map(str, generate_args(tiny_run, tmp_path / "gen", num=12))]
    process = subprocess.Popen(args, env=ONE_THREAD, stderr=subprocess.PIPE, text=True)
    folder, deadline = tmp_path / "gen" / "nut" / "hole", time.monotonic() + 180
    while len(kept_rows(folder)) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() else "timeout"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == -signal.SIGTERM
    kept = len(consistent_pairs(folder))
    line = last_line(process.stderr.read())
    assert line == f"stopped by SIGTERM with {kept} of 12 pairs in {folder}; run the same command again to continue"
    assert 2 <= kept < 12 and kept % 2 == 0  # whole batches: a batch's pairs are written together
    assert run_cli(*generate_args(tiny_run, tmp_path / "gen", num=12))[0] == 0
    assert len(consistent_pairs(folder)) == 12


@pytest.fixture
def perlin_pairs(synthetic_root, tmp_path, run_cli) -> Path:
    assert run_cli("baseline", "perlin", "--data", synthetic_root / "nut", "--defect", "hole", "--num", "4",
                   "--out", tmp_path / "perlin")[0] == 0
    return tmp_path / "perlin"


def evaluate_args(synthetic_root: Path, pairs: Path, report: Path) -> list:
    return ["evaluate", "--data", synthetic_root / "nut", "--defect", "hole", "--generated", pairs, "--steps", "1",
            "--set", "evaluate.resolution=32", "--set", "evaluate.base_width=4", "--no-classification", "--report", report]


def test_a_signal_during_evaluate_writes_nothing_or_every_file(synthetic_root, perlin_pairs, tmp_path, run_cli, monkeypatch):
    """Stopped while the localizer trains: no file. Stopped while the files are written: all of them."""
    report = tmp_path / "out" / "report.md"
    files = [report, report.with_suffix(".png"), report.with_suffix(".json"), report.with_suffix(".csv")]
    localize = compare.evaluate_localization

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return localize(*args, **kwargs)

    monkeypatch.setattr(compare, "evaluate_localization", interrupted)
    code, out, err = run_cli(*evaluate_args(synthetic_root, perlin_pairs, report))
    assert code == EXIT_INTERRUPTED and out == ""
    assert last_line(err) == "stopped by SIGINT before anything was written; run the same command again to evaluate"
    assert not any(path.exists() for path in files) and not (tmp_path / "out").exists()

    monkeypatch.setattr(compare, "evaluate_localization", localize)
    write_png = report_files.atomic_write_bytes

    def interrupted_write(path, data):  # the first file of the report: the chart
        os.kill(os.getpid(), signal.SIGINT)
        write_png(path, data)

    monkeypatch.setattr(report_files, "atomic_write_bytes", interrupted_write)
    code, _, err = run_cli(*evaluate_args(synthetic_root, perlin_pairs, report))
    assert code == EXIT_INTERRUPTED and last_line(err) == "stopped by SIGINT"
    assert all(path.is_file() for path in files)
    assert json.loads(report.with_suffix(".json").read_text())["generators"][0]["pairs"] == {"hole": 4}


def test_sigint_during_pretrain_base_checkpoints_at_a_step_and_resume_gives_the_same_base(tmp_path, run_cli, monkeypatch):
    """Only tiny runs in a temporary folder (never a real pretraining): a real SIGINT lands at a random step
    after the VAE's first checkpoint, in the VAE, the decoder or the UNet stage (not at the very last step, after
    which nothing is left to stop). A tiny run can finish faster than any timer, so the step, not a delay, is drawn."""
    args = ["pretrain-base", "--preset", "tiny", "--resolution", "32", "--steps-vae", "4", "--steps-decoder", "4",
            "--steps-unet", "10", "--workers", "1", "--device", "cpu"]
    log = cli._log
    target = random.choice(["VAE step 2/", "VAE step 4/", "decoder step 2/", "decoder step 4/", "UNet step 2/",
                            "UNet step 4/", "UNet step 6/", "UNet step 8/"])

    def armed(message: str) -> None:
        log(message)
        if message.startswith(target):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli, "_log", armed)
    with torch_threads():
        code, _, err = run_cli(*args, "--out", tmp_path / "stopped")
        monkeypatch.setattr(cli, "_log", log)
        state = torch.load(tmp_path / "stopped" / "checkpoint" / "state.pt", weights_only=True)
        assert code == EXIT_INTERRUPTED and not (tmp_path / "stopped" / "unet").exists(), err
        steps = state["vae_step"], state["decoder_step"], state["unet_step"]
        assert last_line(err) == (f"stopped by SIGINT at VAE step {steps[0]}, decoder step {steps[1]}, UNet step {steps[2]}; "
                                  "checkpoint saved, continue with the same command and --resume")
        assert steps < (4, 4, 10)
        assert run_cli(*args, "--out", tmp_path / "stopped", "--resume")[0] == 0
        assert run_cli(*args, "--out", tmp_path / "whole")[0] == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        expected, got = load_file(tmp_path / "whole" / part), load_file(tmp_path / "stopped" / part)
        assert all(torch.equal(expected[k], got[k]) for k in expected), part


@pytest.mark.slow
def test_sigint_to_run_all_stops_its_training_job_at_a_step_and_a_rerun_resumes(tmp_path, run_cli):
    """The driver forwards the stop to the running job (Ray's cancel), which checkpoints; the re-run resumes."""
    data, out = tmp_path / "data", tmp_path / "out"
    synthetic.write_dataset(data, seed=0, size=32, per_defect=6, good=4, categories=["nut"])
    cfg = Config()
    cfg.model.base_model, cfg.model.rank, cfg.model.text_rank = "tiny-random", 4, 4
    cfg.train.steps, cfg.train.device = 30, "cpu"
    cfg.generate.num, cfg.generate.steps, cfg.generate.scheduler, cfg.generate.device, cfg.generate.filter = 2, 2, "ddim", "cpu", False
    cfg.evaluate.resolution, cfg.evaluate.base_width, cfg.evaluate.steps = 32, 4, 1
    cfg.to_yaml(tmp_path / "tiny.yaml")
    args = ["run-all", "--data", data, "--out", out, "--config", tmp_path / "tiny.yaml", "--defects", "hole", "--num-cpus", "1"]
    job, done = out / "jobs" / "nut__hole", threading.Event()

    def stop_while_training() -> None:  # once the job has trained two steps
        while not done.wait(0.05):
            try:
                stage = json.loads((job / "running.json").read_text())["stage"]
            except (OSError, ValueError):  # not written yet, or replaced while read
                continue
            if stage.startswith("training ") and int(stage.split()[1].split("/")[0]) >= 2:
                time.sleep(random.uniform(0.0, 0.3))
                os.kill(os.getpid(), signal.SIGINT)
                return

    threading.Thread(target=stop_while_training, daemon=True).start()
    try:
        code, _, err = run_cli(*args)
    finally:
        done.set()
    assert code == EXIT_INTERRUPTED
    assert last_line(err) == "stopped by SIGINT after its running jobs saved their work; run the same command again to continue"
    stopped_at = int(RunFolder(out / "runs" / "nut" / "hole").latest_checkpoint().name.split("-")[1])
    assert 2 <= stopped_at < 30 and (out / "summary.md").is_file()
    assert f"stopped: stopped by SIGINT at step {stopped_at} of 30" in (job / "log.txt").read_text()
    assert run_cli(*args)[0] == 0
    assert f"from step {stopped_at}" in (job / "log.txt").read_text()
    steps = [line.split(",")[0] for line in (out / "runs" / "nut" / "hole" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [str(step) for step in range(1, 31)]


# ---------------------------------------------------------------------------------------------- concurrent writers


def test_a_second_writer_is_refused_naming_the_first_which_then_finishes_whole(synthetic_root, tmp_path, run_cli):
    """Two real processes: the first is paused (SIGSTOP) while it holds the folder, so the second meets it."""
    args = ["baseline", "perlin", "--data", str(synthetic_root / "nut"), "--defect", "hole", "--num", "30",
            "--out", str(tmp_path / "gen")]
    first = subprocess.Popen([CLI, *args], env=ONE_THREAD, stderr=subprocess.PIPE, text=True)
    lock, deadline = tmp_path / "gen" / "nut" / "hole" / LOCK, time.monotonic() + 120
    try:
        while not (lock.is_file() and lock.read_text().startswith(f"pid {first.pid} ")):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else "timeout"
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        code, _, err = run_cli(*args)
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == EXIT_USAGE
    line = one_error_line(err)
    assert f"another writer is adding pairs here (pid {first.pid} on " in line and "dualanodiff baseline perlin" in line
    assert first.wait(120) == 0
    rows = consistent_pairs(tmp_path / "gen" / "nut" / "hole")
    assert [row["attempt"] for row in rows] == list(range(30))


# ---------------------------------------------------------------------------------------------- output folders


def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path, run_cli, run_folder, synthetic_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        ("generate", run_folder, "--out", blocker / "gen"),  # no weights in the run: the check came first
        ("train", "--data", synthetic_root / "nut", "--defect", "hole", "--out", blocker / "run"),
        ("evaluate", "--data", synthetic_root / "nut", "--generated", tmp_path, "--report", blocker / "r" / "report.md"),
        ("run-all", "--data", synthetic_root, "--out", blocker / "all"),
        ("pretrain-base", "--out", blocker / "base", "--preset", "tiny"),
        ("synth", blocker / "data"),
        ("--log-file", blocker / "run.log", "info", synthetic_root / "nut"),
    ]
    for args in cases:
        code, _, err = run_cli(*args)
        assert code == EXIT_USAGE, err
        assert blocker.name in one_error_line(err) and "is a file, not a folder" in err


def test_a_read_only_output_folder_is_refused_naming_it_before_the_model_loads(tmp_path, run_cli, run_folder):
    """Root writes anywhere chmod forbids, but not in /sys, which takes no new files from anyone."""
    if os.geteuid() == 0:
        locked = Path("/sys")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
    try:
        code, _, err = run_cli("generate", run_folder, "--out", locked / "gen")  # the run has no weights to load
    finally:
        if locked != Path("/sys"):
            locked.chmod(0o755)
    assert code == EXIT_USAGE
    line = one_error_line(err)
    assert line.startswith(f"error: {locked / 'gen'}: cannot write in {locked} (")
    assert line.endswith("); pick another output folder or fix its permissions")


def test_a_full_file_system_is_refused_up_front(tmp_path, run_cli, run_folder, monkeypatch):
    monkeypatch.setattr(atomic_io.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    code, _, err = run_cli("generate", run_folder, "--out", tmp_path / "gen")
    assert code == EXIT_USAGE
    assert "only 1.0 MiB free on its file system" in one_error_line(err)


def test_an_os_error_anywhere_is_one_line_naming_the_path(tmp_path, run_cli, monkeypatch):
    def disk_full(out, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "nut" / "train" / "good" / "000.png"))

    monkeypatch.setattr(synthetic, "write_dataset", disk_full)
    code, _, err = run_cli("synth", tmp_path / "data", "--category", "nut")
    assert code == EXIT_FAILED
    assert one_error_line(err) == f"error: {tmp_path / 'data' / 'nut' / 'train' / 'good' / '000.png'}: No space left on device"


# ---------------------------------------------------------------------------------------------- empty masks


@pytest.fixture
def nut_with_an_empty_mask(synthetic_root, tmp_path) -> tuple[Path, Path]:
    """A copy of the synthetic nut whose second few-shot training mask of `hole` is all zero."""
    import shutil

    data = tmp_path / "nut"
    shutil.copytree(synthetic_root / "nut", data)
    train_pairs, _ = few_shot_split(open_category(data).defects["hole"])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(train_pairs[1].mask)
    return data, train_pairs[1].mask


def test_info_flags_empty_training_masks_naming_the_files(nut_with_an_empty_mask, run_cli):
    data, empty = nut_with_an_empty_mask
    code, out, err = run_cli("info", data)
    assert code == 0 and "hole" in out
    assert err.strip() == (f"warning: nut/hole: empty few-shot training mask(s), all zero: {empty}; train and crop-paste "
                           "refuse them (--allow-empty-masks skips them)")
    code, out, _ = run_cli("info", data, "--json")
    defects = json.loads(out)["defects"]
    assert defects["hole"]["empty_masks"] == [empty.name.removesuffix("_mask.png")] and defects["crack"]["empty_masks"] == []


def test_train_and_crop_paste_refuse_an_empty_mask_or_skip_it_when_allowed(nut_with_an_empty_mask, tmp_path, run_cli):
    data, empty = nut_with_an_empty_mask
    stem = empty.name.removesuffix("_mask.png")
    code, _, err = run_cli(*train_args(data, tmp_path / "run", steps=1))
    assert code == EXIT_USAGE and not (tmp_path / "run" / "config.yaml").exists()
    assert one_error_line(err) == (f"error: {empty}: mask is empty (all zero); a few-shot training pair needs its defect "
                                   "marked: fix the mask, remove the pair, or pass --allow-empty-masks to skip it")
    skipping = f"warning: skipping 1 of 2 few-shot training pairs, their mask is empty: {empty}"
    code, _, err = run_cli(*train_args(data, tmp_path / "run", steps=1), "--allow-empty-masks")
    assert code == 0 and skipping in err.splitlines()
    saved = Config.from_yaml(tmp_path / "run" / "config.yaml")
    assert saved.data.allow_empty_masks and stem not in saved.split["train"] and len(saved.split["train"]) == 1

    crop_paste = ["baseline", "crop-paste", "--data", data, "--defect", "hole", "--num", "2", "--out", tmp_path / "gen"]
    code, _, err = run_cli(*crop_paste)
    assert code == EXIT_USAGE and f"error: {empty}: mask is empty" in one_error_line(err)
    code, _, err = run_cli(*crop_paste, "--allow-empty-masks")
    assert code == 0 and skipping in err.splitlines()
    assert {row["source"] for row in kept_rows(tmp_path / "gen" / "nut" / "hole")} == {
        pair.stem for pair in few_shot_split(open_category(data).defects["hole"])[0]} - {stem}
    # Perlin draws its own masks on train/good and reads no defect mask: nothing to refuse
    assert run_cli("baseline", "perlin", "--data", data, "--defect", "hole", "--num", "1", "--out", tmp_path / "perlin")[0] == 0


# ---------------------------------------------------------------------------------------------- generate's folder


def test_generate_short_of_num_exits_3_with_the_count(tmp_path, run_cli, run_folder, monkeypatch):
    def short(run, out, cfg, progress=None, **kwargs):
        progress(1, cfg.num)
        return SimpleNamespace(kept=1, folder=out / "nut" / "hole", seconds=0.5)

    monkeypatch.setattr(generation, "generate", short)
    code, _, err = run_cli("generate", run_folder, "--out", tmp_path / "gen", "--num", "4")
    assert code == EXIT_PARTIAL
    assert last_line(err) == "short of --num: 1 of 4 pairs kept (exit code 3)"


def test_generate_refuses_a_folder_made_with_other_settings_unless_forced(tiny_run, tmp_path, run_cli):
    folder = tmp_path / "gen" / "nut" / "hole"
    assert run_cli(*generate_args(tiny_run, tmp_path / "gen", num=1))[0] == 0
    code, _, err = run_cli(*generate_args(tiny_run, tmp_path / "gen", num=2), "--steps", "3")
    assert code == EXIT_USAGE
    assert one_error_line(err) == (f"error: {folder}: holds pairs made with other settings (steps 2 -> 3); "
                                   "use another --out, or pass --force to replace them")
    assert [row["steps"] for row in consistent_pairs(folder)] == [2]
    assert run_cli(*generate_args(tiny_run, tmp_path / "gen", num=2), "--steps", "3", "--force")[0] == 0
    assert [row["steps"] for row in consistent_pairs(folder)] == [3, 3]


# ---------------------------------------------------------------------------------------------- logs and pipes


def test_progress_outside_a_terminal_prints_plain_lines(tmp_path, run_cli):
    code, _, err = run_cli("synth", tmp_path / "data", "--category", "nut", "--size", "32", "--per-defect", "2", "--good", "2")
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("rendering ")]
    total = sum(1 for _ in synthetic.dataset_jobs(["nut"], 2, 2))
    assert lines[0].startswith(f"rendering 1/{total} (8%)") and lines[-1].startswith(f"rendering {total}/{total} (100%)")
    assert len(lines) >= 3 and all("/s" in line for line in lines[1:])


def test_evaluate_outside_a_terminal_prints_plain_progress_lines_of_each_training(synthetic_root, perlin_pairs, tmp_path,
                                                                                  run_cli, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_SECONDS", math.inf)  # lines by tenths of the work only: an exact count
    args = evaluate_args(synthetic_root, perlin_pairs, tmp_path / "report.md")
    args[args.index("--steps") + 1] = "20"
    with torch_threads():  # tiny models train many times faster on one thread than on two spinning ones
        code, _, err = run_cli(*args)
    assert code == 0, err
    steps = re.findall(r"^perlin: localization U-Net (\d+)/20 \(\d+%\) loss \d+\.\d{4}", err, re.MULTILINE)
    assert steps == ["1", "2", "4", "6", "8", "10", "12", "14", "16", "18", "20"]  # the first step, then every 10 %


def test_pretrain_base_outside_a_terminal_prints_plain_progress_lines_beside_its_log_lines(tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_SECONDS", math.inf)
    with torch_threads():
        code, _, err = run_cli("pretrain-base", "--preset", "tiny", "--resolution", "32", "--steps-vae", "4",
                               "--steps-unet", "10", "--workers", "1", "--device", "cpu", "--out", tmp_path / "base")
    assert code == 0, err
    bars = re.findall(r"^(VAE|UNet) (\d+)/(\d+) \(", err, re.MULTILINE)
    assert bars == [("VAE", str(step), "4") for step in range(1, 5)] + [("UNet", str(step), "10") for step in range(1, 11)]
    assert re.search(r"^UNet step 10/10 loss \d+\.\d{4} ", err, re.MULTILINE)  # the stage's own log lines stay


def test_log_file_gets_every_message_and_plain_progress_even_under_bars(tmp_path, run_cli, monkeypatch):
    log = tmp_path / "logs" / "run.log"
    log.parent.mkdir()
    args = ["--log-file", log, "synth", tmp_path / "data", "--category", "nut", "--size", "32", "--per-defect", "2", "--good", "2"]
    code, _, err = run_cli(*args)
    assert code == 0
    first = log.read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    assert [line[20:] for line in first] == err.strip().splitlines()  # what stderr showed, each line timestamped
    assert all(re.match(stamp, line) for line in first)
    monkeypatch.setattr(cli.console, "_force_terminal", True)  # a terminal: bars on stderr, plain lines in the log
    code, _, err = run_cli(*args, "--force")
    assert code == 0
    second = log.read_text().splitlines()[len(first):]  # appended
    total = sum(1 for _ in synthetic.dataset_jobs(["nut"], 2, 2))
    assert second[0][20:].startswith(f"rendering 1/{total} (8%)") and second[-2][20:].startswith(f"rendering {total}/{total}")
    assert second[-1][20:] == first[-1][20:] and not any("\x1b" in line for line in second)


def test_a_reader_that_goes_away_ends_the_command_quietly(synthetic_root):
    """``dualanodiff info DIR | head -0``: a real pipe whose reading end is closed before anything is written."""
    for args in (["info", str(synthetic_root / "nut")], ["info", str(synthetic_root / "nut"), "--json"], ["--help"]):
        process = subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.close()
        err = process.stderr.read().decode()
        assert process.wait(120) == EXIT_BROKEN_PIPE and err == "", (args, err)
