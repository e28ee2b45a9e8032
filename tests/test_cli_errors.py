"""The command line's failure contract: one line on stderr and the exit code of `dualanodiff.errors`,
for usage mistakes, bad input, unwritable or full output folders and any OSError; verbatim messages;
plain progress lines outside a terminal."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import dualanodiff
from dualanodiff import cli, generation, synthetic
from dualanodiff import io as atomic_io
from dualanodiff.config import Config
from dualanodiff.errors import EXIT_FAILED, EXIT_PARTIAL, EXIT_USAGE
from dualanodiff.pairs import PairWriter


def one_error_line(err: str) -> str:
    """The single stderr line of a failed command (no traceback, no usage block)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run folder as `train` leaves it, minus the weights: enough for `generate` to read its settings."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config()
    cfg.data.data, cfg.data.defect = str(tmp_path / "data" / "nut"), "hole"
    cfg.to_yaml(run / "config.yaml")
    return run


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
    entry = "import sys; from dualanodiff.cli import main; sys.argv[0] = 'dualanodiff'; main()"
    done = subprocess.run(
        [sys.executable, "-c", entry, "train", "--stpes", "3"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    assert one_error_line(done.stderr).startswith("error: No such option: --stpes")


def test_version_prints_the_version(run_cli):
    assert run_cli("--version") == (0, f"dualanodiff {dualanodiff.__version__}\n", "")


def test_no_command_shows_the_help(run_cli):
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


# ---------------------------------------------------------------------------------------------- output folders


def test_an_output_folder_under_a_file_is_refused_before_any_work(tmp_path, run_cli, run_folder, synthetic_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        ("generate", run_folder, "--out", blocker / "gen"),  # no weights in the run: the check came first
        ("train", "--data", synthetic_root / "nut", "--defect", "hole", "--out", blocker / "run"),
        ("evaluate", "--data", synthetic_root / "nut", "--generated", tmp_path, "--report", blocker / "r" / "report.md"),
        ("run-all", "--data", synthetic_root, "--out", blocker / "all"),
        ("synth", blocker / "data"),
    ]
    for args in cases:
        code, _, err = run_cli(*args)
        assert code == EXIT_USAGE, err
        assert blocker.name in one_error_line(err) and "is a file, not a folder" in err


def test_a_read_only_output_folder_is_refused_naming_it(tmp_path, run_cli, run_folder, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: simulate the refusal of the file system
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(atomic_io.tempfile, "mkstemp", refuse)
    else:
        locked.chmod(0o555)
    try:
        code, _, err = run_cli("generate", run_folder, "--out", locked / "gen")
    finally:
        locked.chmod(0o755)
    assert code == EXIT_USAGE
    assert one_error_line(err) == (
        f"error: {locked / 'gen'}: cannot write in {locked} (Permission denied); "
        "pick another output folder or fix its permissions"
    )


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


# ---------------------------------------------------------------------------------------------- writers, short runs


def test_a_second_writer_into_the_same_folder_is_refused_with_one_line(tmp_path, run_cli, synthetic_root):
    with PairWriter(tmp_path / "gen", "nut", "hole"):
        code, _, err = run_cli("baseline", "perlin", "--data", synthetic_root / "nut", "--defect", "hole",
                               "--num", "1", "--out", tmp_path / "gen")
    assert code == EXIT_USAGE
    assert "another writer is adding pairs here (pid" in one_error_line(err)
    assert run_cli("baseline", "perlin", "--data", synthetic_root / "nut", "--defect", "hole", "--num", "1",
                   "--out", tmp_path / "gen")[0] == 0


def test_generate_short_of_num_exits_3_with_the_count(tmp_path, run_cli, run_folder, monkeypatch):
    def short(run, out, cfg, progress=None, **kwargs):
        progress(1, cfg.num)
        return SimpleNamespace(kept=1, folder=out / "nut" / "hole", seconds=0.5)

    monkeypatch.setattr(generation, "generate", short)
    code, _, err = run_cli("generate", run_folder, "--out", tmp_path / "gen", "--num", "4")
    assert code == EXIT_PARTIAL
    assert err.strip().splitlines()[-1] == "short of --num: 1 of 4 pairs kept (exit code 3)"


# ---------------------------------------------------------------------------------------------- progress


def test_progress_outside_a_terminal_prints_plain_lines(tmp_path, run_cli):
    code, _, err = run_cli("synth", tmp_path / "data", "--category", "nut", "--size", "32", "--per-defect", "2", "--good", "2")
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("rendering ")]
    total = sum(1 for _ in synthetic.dataset_jobs(["nut"], 2, 2))
    assert lines[0].startswith(f"rendering 1/{total} (8%)") and lines[-1].startswith(f"rendering {total}/{total} (100%)")
    assert len(lines) >= 3 and all("/s" in line for line in lines[1:])


def test_plain_progress_prints_every_tenth_or_every_few_seconds():
    now, printed = [0.0], []
    bar = cli.PlainProgress("training", 200, printed.append, clock=lambda: now[0])
    for step in range(1, 201):
        now[0] = step * 0.1  # 10 steps per second: 20 s in all
        bar.update(step, note=f"loss {1 / step:.3f}")
    assert len(printed) == 11  # the first step, then every 10 % (20 steps, 2 s)
    assert printed[0] == "training 1/200 (0%) loss 1.000"
    assert printed[1] == "training 20/200 (10%) loss 0.050, 10.00/s, 18 s left"
    assert printed[-1] == "training 200/200 (100%) loss 0.005, 10.00/s"

    slow, printed = cli.PlainProgress("generating", 1000, printed.append, clock=lambda: now[0]), []
    slow.print_line = printed.append
    for done in range(1, 31):
        now[0] = done * 2.0  # a pair every 2 s: 15 s pass long before 10 %
        slow.update(done)
    assert [line.split(" (")[0] for line in printed] == ["generating 1/1000", "generating 9/1000", "generating 17/1000",
                                                         "generating 25/1000"]
    assert printed[1].endswith("0.50/s, 33 min 02 s left")

    unknown, printed = cli.PlainProgress("steps", None, printed.append, clock=lambda: now[0]), []
    unknown.print_line = printed.append
    unknown.update(3)
    assert printed == ["steps 3/?"]


def test_no_progress_when_disabled(capsys):
    with cli.progress_bars(enabled=False) as bars:
        bars("training", 10)(5, 10, "loss 1")
    assert capsys.readouterr().err == ""
