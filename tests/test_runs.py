"""RunFolder: the run layout's names, checkpoint order, finished-step count and the not-a-run error."""

from __future__ import annotations

import pytest
import torch

from dualanodiff.config import Config
from dualanodiff.errors import UserError
from dualanodiff.runs import RunFolder


def test_layout_and_checkpoints(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert not run.is_run() and run.latest_checkpoint() is None and run.trained_steps() == 0
    with pytest.raises(UserError, match="not a training run .config.yaml missing."):
        run.load_config()
    Config().to_yaml(run.config)
    assert run.is_run() and run.load_config() == Config()
    for step in (10, 2, 300):
        run.checkpoint(step).mkdir(parents=True)
        torch.save({"step": step}, run.checkpoint(step) / run.STATE)
    (run.checkpoints / ".step-000400.tmp").mkdir()  # one being written is not a checkpoint
    assert [p.name for p in run.all_checkpoints()] == ["step-000002", "step-000010", "step-000300"]
    assert run.trained_steps() == 0  # training has not finished: no adapters.safetensors yet
    run.adapters.write_bytes(b"")
    assert run.trained_steps() == 300
    for name in ("b10", "b2", "a"):
        run.backgrounds.mkdir(exist_ok=True)
        (run.backgrounds / f"{name}.png").write_bytes(b"")
    assert [p.stem for p in run.background_paths()] == ["a", "b2", "b10"]
