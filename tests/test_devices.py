"""Device and precision names: one check for training, generation and evaluation."""

from __future__ import annotations

import pytest
import torch

from dualanodiff.devices import cast_frozen, resolve_device, resolve_dtype
from dualanodiff.errors import UserError
from dualanodiff.training import make_accelerator


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("gpu0", "mps", "cuda:x"):
        with pytest.raises(UserError, match=f"device {name}: not a device name"):
            resolve_device(name)
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(UserError, match="no CUDA GPU"):
                resolve_device(name)
            with pytest.raises(UserError, match="no CUDA GPU"):
                make_accelerator("no", name)


def test_precision_names_are_checked():
    cpu = torch.device("cpu")
    assert resolve_dtype("bf16", cpu) is torch.bfloat16 and resolve_dtype("fp32", cpu) is torch.float32
    with pytest.raises(UserError, match="dtype fp16: half precision needs a CUDA device"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(UserError, match="dtype half: unknown precision"):
        resolve_dtype("half", cpu)


def test_cast_frozen_leaves_the_trainable_weights_in_fp32():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    cast_frozen(model, torch.bfloat16)
    assert {p.dtype for p in model[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model[1].parameters()} == {torch.float32}
