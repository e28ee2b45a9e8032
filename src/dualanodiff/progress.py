"""The one progress interface of the library and the command line.

A long-running function takes a ``bars`` factory (`Bars`) and reports through the bars it makes::

    bar = bars("localization U-Net", steps)
    bar(done, total=None, note="loss 0.0912")

Library functions default to `no_bars` (silent), so scripts and tests pass nothing; the command line
passes the factory of `progress_bars`: Rich bars on a terminal, `PlainProgress` lines elsewhere. This
module imports neither typer nor torch, and Rich only once bars are drawn, so both sides import it cheaply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console

PLAIN_PERCENT = 10  # outside a terminal, one progress line per this share of the work ...
PLAIN_SECONDS = 15.0  # ... or per this many seconds, whichever comes first


ESTIMATE_AFTER = 5  # units of work timed (after the first, which warms up) before a cost estimate
ESTIMATE_LIMIT = 600.0  # seconds above which long work says up front what it will cost


class CostEstimate:
    """Says once, after `after` units of work past the first, what all `total` will cost on this device and which
    option shortens it, where that is over `ESTIMATE_LIMIT` seconds: a bar at 30 of 3000 steps does not say that
    hours are left. ``estimate.advance(units)`` after each piece of work."""

    def __init__(self, total: int, log: Callable[[str], None], what: str, shorten: str, after: int = ESTIMATE_AFTER):
        self.total, self.log, self.what, self.shorten, self.after = total, log, what, shorten, after
        self.started: float | None = None
        self.done = 0
        self.said = False

    def advance(self, units: int = 1) -> None:
        now = time.perf_counter()
        if self.started is None:  # the first piece's end starts the clock
            self.started = now
            return
        self.done += units
        if not self.said and self.done >= self.after:
            self.said = True
            seconds = (now - self.started) / self.done * self.total
            if seconds > ESTIMATE_LIMIT:
                self.log(f"{self.what} will take about {seconds / 60:.0f} min on this device; {self.shorten}")


class Bar(Protocol):
    """One bar: ``bar(done)`` after each unit of work; ``total`` when it changed, ``note`` shown beside it."""

    def __call__(self, done: int, total: int | None = None, note: str = "") -> None: ...


class Bars(Protocol):
    """Makes a `Bar` per piece of work: ``bars("training", 500)``."""

    def __call__(self, label: str, total: int | None = None) -> Bar: ...


def _no_bar(done: int, total: int | None = None, note: str = "") -> None:
    pass


def no_bars(label: str, total: int | None = None) -> Bar:
    """The default factory of library functions: progress goes nowhere."""
    return _no_bar


def loss_bar(bars: Bars, label: str, steps: int) -> Callable[[float], None]:
    """``advance(loss)`` after each optimizer step: counts the step on ``bars(label, steps)`` and shows
    the loss averaged over recent steps (one batch's is noise)."""
    bar, done, average = bars(label, steps), 0, None

    def advance(loss: float) -> None:
        nonlocal done, average
        done += 1
        average = loss if average is None else 0.95 * average + 0.05 * loss
        bar(done, note=f"loss {average:.4f}")

    return advance


class PlainProgress:
    """Progress as plain lines for log files and pipes, where bars would print nothing::

        training 120/500 (24%) loss 0.0912, 3.10/s, 2 min 03 s left

    A line at the first update, then one per `PLAIN_PERCENT` of the total or `PLAIN_SECONDS`
    (whichever comes first), and one when the work is done.
    """

    def __init__(self, label: str, total: int | None, print_line: Callable[[str], None], clock=time.monotonic):
        self.label, self.total, self.print_line, self.clock = label, total, print_line, clock
        self.start: tuple[float, int] | None = None  # (time, done) at the first update
        self.last: tuple[float, int | None, int] = (-math.inf, None, -1)  # (time, share, done) of the last line

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        now, self.total = self.clock(), total if total is not None else self.total
        self.start = self.start or (now, done)
        share = done * 100 // PLAIN_PERCENT // self.total if self.total else None
        finished = bool(self.total) and done >= self.total
        last_time, last_share, last_done = self.last
        if done == last_done or not (finished or share != last_share or now - last_time >= PLAIN_SECONDS):
            return
        self.last = (now, share, done)
        parts = [f"{self.label} {done}/{self.total or '?'}" + (f" ({100 * done // self.total}%)" if self.total else "")]
        parts[0] += f" {note}" if note else ""
        rate = (done - self.start[1]) / (now - self.start[0]) if now > self.start[0] else 0.0
        if rate > 0:
            parts.append(f"{rate:.2f}/s")
            if self.total and not finished:
                parts.append(f"{_duration((self.total - done) / rate)} left")
        self.print_line(", ".join(parts))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


@contextmanager
def progress_bars(
    console: Console, log_line: Callable[[str], None] = lambda line: None, enabled: bool = True, transient: bool = True
) -> Iterator[Bars]:
    """A `Bars` factory drawing on ``console``: Rich bars on a terminal (messages printed on ``console``
    go above them), `PlainProgress` lines printed on it when it is a file or a pipe, nothing when not
    ``enabled``. Under bars, ``log_line`` still gets the plain lines (the command line's ``--log-file``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    if not enabled:
        yield no_bars
        return
    if not console.is_terminal:
        yield lambda label, total=None: PlainProgress(label, total, console.print).update
        return
    columns = (
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[note]}", markup=False), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=transient) as progress:

        def bars(label: str, total: int | None = None) -> Bar:
            task = progress.add_task(label, total=total, note="")
            logged = PlainProgress(label, total, log_line)

            def bar(done: int, total: int | None = None, note: str = "") -> None:
                progress.update(task, completed=done, total=total, note=note)
                logged.update(done, total, note)

            return bar

        yield bars
