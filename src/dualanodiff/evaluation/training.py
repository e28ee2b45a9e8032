"""What the two downstream trainings (U-Net localization, ResNet classification) share: seeded
batch orders and batch-norm statistics; their bars over optimizer steps are `progress.loss_bar`.

Both train a fixed number of steps, the same for every set of pairs: epochs over sets of different
sizes would be different amounts of training (4 crop-paste pairs score 4 % pixel AP after 10 epochs and
86 % after 30).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

LEARNING_RATE = 1e-3  # Adam's, for the localizer and the classifier


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
