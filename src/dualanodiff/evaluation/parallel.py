"""The downstream trainings of one evaluation, run side by side on the CPU's cores.

Each training (a row's localizer and classifier at one seed) is independent of the others. On a CPU every
training runs on one thread, in as many processes as ``workers`` says: a training's figures are then the same
for any number of workers and any number of cores (a thread count changes the order of float sums, and a
200-step localizer's pixel AP with it), and the protocol's small networks, which use a second thread poorly,
lose nothing by it (on 2 cores the demo's four localizers side by side train at 1.2-1.35x the throughput of
one after the other on both threads; random-data benchmark 1.04-1.08x: benchmarks/RESULTS.md). On a GPU the
trainings run one after the other in this process.

Worker processes are spawned (fork after PyTorch's thread pool started can hang): a script that
evaluates with ``workers`` > 1 keeps its top-level work under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from dualanodiff.devices import resolve_device
from dualanodiff.progress import Bar, Bars

Job = TypeVar("Job")
FINISHED = "finished"  # a worker's last message for a job
POLL_SECONDS = 0.1  # how often the parent looks for finished trainings between progress messages

_progress: Any = None  # in a worker process: the queue its bars write to


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``count`` inside, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_trainings(
    work: Callable[[Job, Bars], dict], jobs: Sequence[Job], workers: int, device: str, bars: Bars
) -> list[dict]:
    """``work(job, bars)`` for every job, results in the order of ``jobs``. On the CPU each runs on one thread,
    up to ``workers`` at once in spawned processes whose bars reach ``bars``; on a GPU one after the other.
    A worker's exception is raised here; so is an interrupt, after the workers are stopped."""
    if resolve_device(device).type != "cpu":
        return [work(job, bars) for job in jobs]
    if workers <= 1 or len(jobs) <= 1:
        with torch_threads():
            return [work(job, bars) for job in jobs]
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    executor = ProcessPoolExecutor(min(workers, len(jobs)), context, initializer=_start_worker, initargs=(messages,))
    try:
        futures = [executor.submit(_run_job, work, job) for job in jobs]
        relay, finished = _BarRelay(bars), 0
        while finished < len(jobs):
            finished += relay.drain(messages, POLL_SECONDS)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
        return [future.result() for future in futures]
    finally:
        _stop(executor)


def _stop(executor: ProcessPoolExecutor) -> None:
    """Workers still running are terminated, not waited for (``terminate_workers()`` from Python 3.14 on)."""
    processes = list(getattr(executor, "_processes", {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def _start_worker(messages) -> None:
    """A worker: one thread; Ctrl-C is the parent's to answer (it stops the workers)."""
    global _progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _progress = messages


def _run_job(work: Callable[[Job, Bars], dict], job: Job) -> dict:
    try:
        return work(job, _queued_bars)
    finally:
        _progress.put(FINISHED)  # after the job's bar messages: the queue keeps one process's order


def _queued_bars(label: str, total: int | None = None) -> Bar:
    """A worker's bars: every call goes to the parent as a message (label, total when made, done, total, note)."""
    _progress.put((label, total, None, None, ""))

    def bar(done: int, total: int | None = None, note: str = "") -> None:
        _progress.put((label, None, done, total, note))

    return bar


class _BarRelay:
    """The parent's side: the workers' messages replayed on its own bars."""

    def __init__(self, bars: Bars):
        self.bars, self.made = bars, {}

    def drain(self, messages, timeout: float) -> int:
        """Replay every waiting message, waiting up to ``timeout`` seconds for the first; the number of jobs
        that said they finished."""
        finished = 0
        try:
            message = messages.get(timeout=timeout)
            while True:
                if message == FINISHED:
                    finished += 1
                else:
                    self.replay(*message)
                message = messages.get_nowait()
        except queue.Empty:
            return finished

    def replay(self, label: str, made_total: int | None, done: int | None, total: int | None, note: str) -> None:
        if done is None:
            self.made[label] = self.bars(label, made_total)
        else:
            self.made[label](done, total, note)
