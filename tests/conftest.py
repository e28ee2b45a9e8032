"""Shared fixtures: a small synthetic MVTec-format dataset made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hazelnut-photos"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): one thread is as
    fast, and immune to OpenMP stalls, where two spinning threads make each step many times slower on a
    busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    cfg.model.rank, cfg.model.alpha, cfg.model.text_rank = 4, 4.0, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.device = 2, 2, 1e-3, "cpu"
    return train(cfg, tmp_path_factory.mktemp("tiny-run") / "run")


@pytest.fixture(scope="session")
def hazelnut_photos() -> Path:
    """The real hazelnut photos beside the repository (skipped, with the reason, where absent)."""
    if not SHARED_PHOTOS.is_dir():
        pytest.skip(f"real photos not found at {SHARED_PHOTOS} (they live in ../shared beside the checkout)")
    return SHARED_PHOTOS


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
