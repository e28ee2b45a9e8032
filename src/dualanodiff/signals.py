"""Stopping long work cleanly on SIGINT (Ctrl-C) and SIGTERM (what Ray, SLURM, Kubernetes and docker send).

Inside `deferred_signals` the two signals only record themselves; the work asks at its safe points (a
training step boundary, between generated batches), saves what it has and raises `Stopped` with a line
saying how to go on. Work that is cheaper to redo than to finish (a batch being sampled, an evaluation
that has written nothing yet) runs inside ``stop.at_once()``, where a signal raises `Stopped` at once::

    with deferred_signals() as stop:
        while step < steps and not stop():
            ...one step...
        save_checkpoint()
        if stop():
            raise Stopped(stop(), f"at step {step}; checkpoint saved, continue with --resume")

A signal still unanswered when the block ends raises `Stopped` there, so none is lost. The command
line prints the message and exits 130 (SIGINT) or ends by SIGTERM itself (143 in a shell).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Work stopped by signal ``number`` after saving what it had; ``message`` says what to do next.

    A `KeyboardInterrupt`, so that code which cleans up on Ctrl-C does so here too."""

    def __init__(self, number: int, detail: str = ""):
        super().__init__(number, detail)  # the arguments, so that it pickles (Ray sends errors between processes)
        self.number = number
        self.message = f"stopped by {signal.Signals(number).name}" + (f" {detail}" if detail else "")

    def __str__(self) -> str:
        return self.message


class StopRequest:
    """What `deferred_signals` yields: ``stop()`` is the first signal received (0: none yet)."""

    def __init__(self) -> None:
        self.number = 0
        self._at_once: str | None = None  # inside `at_once`: the detail of the `Stopped` it raises

    def __call__(self) -> int:
        return self.number

    def handle(self, number: int, frame) -> None:
        self.number = self.number or number
        if self._at_once is not None:
            raise Stopped(self.number, self._at_once)

    @contextmanager
    def at_once(self, detail: str = "") -> Iterator[None]:
        """Inside, a signal (or one received before) raises `Stopped` where it lands: for work that is
        dropped and redone rather than finished."""
        if self.number:
            raise Stopped(self.number, detail)
        outer, self._at_once = self._at_once, detail
        try:
            yield
        finally:
            self._at_once = outer


@contextmanager
def deferred_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """SIGINT and SIGTERM recorded instead of acted on while the block runs (see the module docstring).

    Outside the main thread signals cannot be caught: ``stop()`` stays 0 there."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {number: signal.signal(number, stop.handle) for number in signals}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if stop():  # reached only when the block ended without an exception
        raise Stopped(stop())
