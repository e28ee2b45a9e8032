"""Shared fixtures: a small synthetic MVTec-format dataset made once per pytest run."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dualanodiff.evaluation.parallel import torch_threads

torch.set_num_threads(2)

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hazelnut-photos"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): one thread is as
    fast, and immune to OpenMP stalls, where two spinning threads make each step many times slower on a
    busy shared CPU."""
    with torch_threads():
        yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Root of a small synthetic dataset (64 px, 6 images per defect type, 6 good images)."""
    from dualanodiff.synthetic import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, seed=0, size=64, per_defect=6, good=6)
    return root


@pytest.fixture(scope="session")
def tiny_run(synthetic_root, tmp_path_factory) -> Path:
    """A 2-step training run of nut/hole on the random tiny base at 32 px (rank 4): for sampling tests."""
    from dualanodiff.config import Config
    from dualanodiff.training import train

    cfg = Config()
    cfg.data.data = str(synthetic_root / "nut")
    cfg.data.defect = "hole"
    cfg.model.base_model = "tiny-random"
    cfg.model.rank, cfg.model.text_rank = 4, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.device = 2, 2, 1e-3, "cpu"
    return train(cfg, tmp_path_factory.mktemp("tiny-run") / "run")


@pytest.fixture(scope="session")
def hazelnut_photos() -> Path:
    """The real hazelnut photos beside the repository (skipped, with the reason, where absent)."""
    if not SHARED_PHOTOS.is_dir():
        pytest.skip(f"real photos not found at {SHARED_PHOTOS} (they live in ../shared beside the checkout)")
    return SHARED_PHOTOS


class RecordedBars:
    """A `dualanodiff.progress.Bars` factory that keeps what each bar was told: ``updates["VAE"]`` is the
    list of (done, total) it was called with, ``totals["VAE"]`` the total it was made with, ``notes["VAE"]``
    its notes."""

    def __init__(self):
        self.totals: dict[str, int | None] = {}
        self.updates: dict[str, list[tuple[int, int | None]]] = {}
        self.notes: dict[str, list[str]] = {}

    def __call__(self, label: str, total: int | None = None):
        self.totals[label] = total
        updates, notes = self.updates.setdefault(label, []), self.notes.setdefault(label, [])

        def bar(done: int, total: int | None = None, note: str = "") -> None:
            updates.append((done, total))
            notes.append(note)

        return bar


@pytest.fixture
def recorded_bars() -> RecordedBars:
    return RecordedBars()


@pytest.fixture
def run_cli(capsys):
    """Run the command line in-process: ``code, out, err = run_cli("info", path)``."""
    from dualanodiff.cli import main

    def run(*args) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def sigterm_when():
    """``sigterm_when(command, ready, env=None, jitter=0.1) -> stderr``: start `command`, wait until ``ready()``
    (at most 600 s: a bound for a busy 2-core CPU), send SIGTERM a random moment of up to `jitter` seconds later,
    and check that the process ended by that signal."""

    def run(command: list[str], ready, env: dict | None = None, jitter: float = 0.1) -> str:
        deadline = time.monotonic() + 600
        with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as process:
            try:
                while not ready():
                    assert process.poll() is None and time.monotonic() < deadline, (
                        process.stderr.read() if process.poll() else "timeout")
                    time.sleep(0.02)
                time.sleep(random.uniform(0.0, jitter))
                process.send_signal(signal.SIGTERM)
                assert process.wait(300) == -signal.SIGTERM
            finally:
                process.kill()  # a no-op once it has ended
            return process.stderr.read()

    return run
