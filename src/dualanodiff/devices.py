"""Device and precision names as the command line spells them, checked the same way by every stage."""

from __future__ import annotations

import torch
from torch import nn

from dualanodiff.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"device {device}: not a device name; choose auto, cpu or cuda")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device}: not a device name; choose auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device}: no CUDA GPU is visible; use cpu or auto")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype}: unknown precision; choose fp32, fp16 or bf16 (generate.dtype)")
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("dtype fp16: half precision needs a CUDA device; use fp32 or bf16 on the CPU (generate.dtype)")
    return DTYPES[dtype]


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Frozen weights in `dtype`, trainable ones left in fp32, as diffusers' training scripts do."""
    for param in module.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)
    return module


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch` / torchrun, or the only process: the one that reports and writes.
    Accelerate's shared process state answers it, the same state every `Accelerator` reads."""
    from accelerate import PartialState

    return PartialState().is_main_process
