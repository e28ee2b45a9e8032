"""A training stage's bookkeeping (step count, time budget, loss log, progress bar, checkpoints), so that
each stage's loop shows only its step; `_now` is the clock of time budgets."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from dualanodiff.errors import UserError
from dualanodiff.progress import Bars
from dualanodiff.signals import Stopped

if TYPE_CHECKING:  # run.py reads the clock from here
    from dualanodiff.pretrain.run import _Run


_now = time.monotonic  # the clock of time budgets (tests replace it)


class _Stage:
    """One training stage's bookkeeping, so that its loop shows only the step itself: the step count, the
    wall clock (time the first steps, plan how many fit before the deadline, stop there), the loss window
    and its log line, the progress bar and when to checkpoint.

        stage = _Stage(run, "unet", "UNet", deadline, max_steps, bars)
        while stage.running():
            loss = ...one step...
            if stage.record(loss):
                save()
        if stage.finish():  # stopped early: save where it stopped
            save()
    """

    CALIBRATE = (5, 25)  # time steps 5..25 (after warm-up: kernel selection, allocator growth)

    def __init__(self, run: _Run, key: str, label: str, deadline: float | None, max_steps: int, bars: Bars):
        self.run, self.key, self.label, self.deadline, self.max_steps = run, key, label, deadline, max_steps
        self.bar = bars(label, self.total())
        if self.step:  # resumed: the bar starts where the checkpoint left off
            self.bar(min(self.step, max_steps), self.total())
        self.window: list[torch.Tensor] = []
        self.mark: tuple[int, float] | None = None
        self.earlier = run.history["seconds"].setdefault(key, 0.0)  # seconds before a resume
        self.started = time.perf_counter()

    @property
    def step(self) -> int:
        return self.run.steps[self.key]

    def total(self) -> int:
        """The stage's step count for schedules: the plan under a time budget, else the maximum."""
        if self.deadline is None:
            return self.max_steps
        return min(self.run.plans.get(self.key, self.max_steps), self.max_steps)

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def running(self) -> bool:
        """Another step? Not past the step count, nor past the deadline (every stage takes at least one step,
        so that it has something to save)."""
        if self.step >= self.total():
            return False
        if self.run.stop():  # the caller saves where it stopped, then `pretrain_base` raises `Stopped`
            self.run.stopped[self.key] = "signal"
            return False
        if self.deadline is not None and self.step > 0 and _now() >= self.deadline:
            self.run.stopped[self.key] = f"time budget, after {self.step} of {self.total()} planned steps"
            return False
        return True

    def record(self, loss: torch.Tensor) -> bool:
        """Count the step just taken, plan, log; True when a checkpoint is due."""
        step = self.run.steps[self.key] = self.step + 1
        self.window.append(loss.detach())
        self._plan(step)
        self.bar(step, self.total())
        opts = self.run.options
        if step % opts.log_every == 0 or step == self.total():
            mean = _mean_loss(self.window, self.label, step)
            self.run.history[f"{self.key}_loss"].append([step, mean])
            self.run.log(f"{self.label} step {step}/{self.total()} loss {mean:.4f} ({self.seconds() / step:.3f} s/step)")
            self.window = []
        due = bool(opts.checkpoint_every and step % opts.checkpoint_every == 0) or step == self.total()
        if due:
            self.run.history["seconds"][self.key] = self.seconds()
        return due

    def finish(self) -> bool:
        """After the loop: the stage's time; True when it stopped early (then save where it stopped)."""
        self.run.sync()
        self.run.history["seconds"][self.key] = self.seconds()
        return self.key in self.run.stopped

    def _plan(self, step: int) -> None:
        """At the calibration window's ends, time it and plan the steps that fit."""
        if self.deadline is None or self.key in self.run.plans:
            return
        first, last = self.CALIBRATE
        if step in (first, last):
            self.run.sync()
        if step == first:
            self.mark = (step, _now())
        elif step == last and self.mark is not None:
            seconds = (_now() - self.mark[1]) / (step - self.mark[0])
            fit = step + int(max(self.deadline - _now(), 0) / seconds)
            self.run.plans[self.key] = min(self.max_steps, fit)
            self.run.log(f"{self.label}: {seconds * 1000:.1f} ms/step, planning {self.run.plans[self.key]} steps")


def _raise_if_stopped(run: _Run) -> None:
    """`Stopped` once a training stage has saved at the step where a signal stopped it."""
    if run.stop():
        where = f"VAE step {run.steps['vae']}, decoder step {run.steps['decoder']}, UNet step {run.steps['unet']}"
        raise Stopped(run.stop(), f"at {where}; checkpoint saved, continue with the same command and --resume")


def _mean_loss(window: list[torch.Tensor], stage: str, step: int) -> float:
    mean = float(torch.stack(window).float().mean()) if window else float("nan")
    if not math.isfinite(mean):
        raise UserError(f"{stage} loss became {mean} by step {step}; resume from the last checkpoint with a lower "
                        "learning rate, or start over with another seed")
    return mean


def _stage_deadline(run: _Run, share: float) -> float | None:
    if run.deadline is None:
        return None
    now = _now()
    return now + max(run.deadline - now, 0) * share
