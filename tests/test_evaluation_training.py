"""Shared training helpers: seeded batches, batch-norm statistics averaged over the training data."""

from __future__ import annotations

import pytest
import torch

from dualanodiff.evaluation.training import (
    cycling_batches,
    recalibrate_batch_norm,
    shuffled_batches,
)


def test_batches_cover_every_index_once_and_never_leave_a_single_sample():
    batches = shuffled_batches(9, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 5]  # 4, 4, 1 -> the 1 joins the batch before
    assert sorted(torch.cat(batches).tolist()) == list(range(9))
    again = shuffled_batches(9, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_cycling_batches_have_one_size_and_take_each_index_once_per_pass():
    batches = cycling_batches(5, 3, torch.Generator().manual_seed(0))
    drawn = [next(batches) for _ in range(5)]  # 15 indices: three passes over range(5)
    assert all(len(b) == 3 for b in drawn)
    flat = torch.cat(drawn).tolist()
    assert all(sorted(flat[i : i + 5]) == list(range(5)) for i in (0, 5, 10))
    again = cycling_batches(5, 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, next(again)) for a in drawn)


def test_cycling_batches_repeat_indices_when_the_set_is_smaller_than_a_batch():
    batch = next(cycling_batches(2, 5, torch.Generator().manual_seed(0)))
    assert len(batch) == 5 and set(batch.tolist()) == {0, 1}


def test_batch_norm_statistics_are_averaged_over_the_given_batches():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1))
    torch.nn.init.ones_(model[0].weight)
    first = torch.full((2, 1, 2, 2), 1.0)
    second = torch.full((2, 1, 2, 2), 3.0)
    second[0] += 2.0  # four values 5 and four values 3: mean 4, unbiased variance 8 / 7
    recalibrate_batch_norm(model, [first, second])
    norm = model[1]
    assert norm.running_mean.item() == pytest.approx((1 + 4) / 2)
    assert norm.running_var.item() == pytest.approx((0 + 8 / 7) / 2)
    assert norm.momentum == 0.1 and not model.training
