"""Atomic file writes: every output is written to a temporary name in its folder, then renamed.

A killed process therefore leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp's 0600 would hide outputs from other users


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 HxW (grey) or HxWx3 (RGB) array as PNG, atomically and byte-deterministically."""
    if array.dtype != np.uint8:
        raise TypeError(f"save_png expects uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    atomic_write_bytes(path, buffer.getvalue())
