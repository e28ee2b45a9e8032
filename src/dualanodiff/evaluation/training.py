"""What the two downstream trainings (U-Net localization, ResNet classification) share: seeded
batch orders, batch-norm statistics and a progress bar over optimizer steps.

Both train a fixed number of steps, the same for every set of pairs: epochs over sets of different
sizes would be different amounts of training (4 crop-paste pairs score 4 % pixel AP after 10 epochs and
86 % after 30).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import nn


def cycling_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches of exactly ``batch_size`` from consecutive seeded permutations of
    ``range(n)``: each index comes once per pass, and a batch may span two passes (or hold an index
    twice when ``n < batch_size``)."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches of a seeded permutation of ``range(n)``; a trailing batch of one joins the one
    before it, since batch norm cannot train on a single sample."""
    batches = list(torch.randperm(n, generator=generator).split(max(1, batch_size)))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Replace every batch-norm layer's running mean and variance by their average over ``batches``
    (the training inputs, preprocessed), then switch to eval mode.

    Running statistics are an exponential average that lags behind the weights; after a short
    training it can be far from the statistics the final weights produce, and the eval-mode network
    then predicts something else than it learnt. Averaging once over the training data with the final
    weights ("precise BN") removes that lag; it reads no test data.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    model.train()
    for batch in batches:
        model(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


@contextmanager
def step_progress(label: str, steps: int) -> Iterator[Callable[[float], None]]:
    """A rich progress bar over optimizer steps (on stderr, cleared when done); yields
    ``advance(loss)``, and shows the loss averaged over recent steps (one batch's is noise)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    console = Console(stderr=True)
    average = None

    def advance(loss: float) -> None:
        nonlocal average
        average = loss if average is None else 0.95 * average + 0.05 * loss
        progress.update(task, advance=1, loss=f"{average:.4f}")

    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(label, total=steps, loss="-")
        yield advance
