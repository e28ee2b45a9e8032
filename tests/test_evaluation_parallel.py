"""`parallel.run_trainings`: jobs on spawned workers at one thread each, results in order, bars relayed to the
parent's, a worker's error raised as it was. (That the figures do not depend on the workers, and that a SIGINT
stops them all: tests/test_evaluation_compare.py.)"""

from __future__ import annotations

import os

import pytest
import torch

from dualanodiff.errors import UserError
from dualanodiff.evaluation.parallel import run_trainings, torch_threads


def threads_and_bar(job: int, bars) -> dict:
    """A job that reports two steps on a bar and says on how many threads it ran."""
    bar = bars(f"job {job}", 2)
    bar(1)
    bar(2, note="done")
    return {"job": job, "threads": torch.get_num_threads(), "pid": os.getpid()}


def fails_on_two(job: int, bars) -> dict:
    if job == 2:
        raise UserError(f"job {job}: refused")
    return {"job": job}


def test_jobs_run_on_one_thread_in_workers_and_their_bars_reach_the_parent(recorded_bars):
    results = run_trainings(threads_and_bar, [0, 1, 2, 3], workers=2, device="cpu", bars=recorded_bars)
    assert [r["job"] for r in results] == [0, 1, 2, 3] and {r["threads"] for r in results} == {1}
    assert os.getpid() not in {r["pid"] for r in results}
    assert recorded_bars.totals == {f"job {k}": 2 for k in range(4)}
    assert recorded_bars.updates == {f"job {k}": [(1, None), (2, None)] for k in range(4)}


def test_in_this_process_a_job_runs_on_one_thread_and_the_thread_count_comes_back(recorded_bars):
    threads = torch.get_num_threads()
    results = run_trainings(threads_and_bar, [0, 1], workers=1, device="cpu", bars=recorded_bars)
    assert [(r["threads"], r["pid"]) for r in results] == [(1, os.getpid())] * 2
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError), torch_threads():
        raise ValueError
    assert torch.get_num_threads() == threads


def test_a_workers_error_is_raised_in_the_parent_as_it_was():
    with pytest.raises(UserError, match=r"^job 2: refused$"):
        run_trainings(fails_on_two, [0, 1, 2, 3], workers=2, device="cpu", bars=lambda label, total=None: None)
