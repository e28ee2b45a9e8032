"""Atomic file writes: every output is written to a temporary name in its folder, then renamed.

A killed process therefore leaves either the old file or the new one, never a truncated one; a failed
write (a full disk) removes its temporary file. `check_writable` tells up front whether an output
folder can take files at all; `jsonable` makes results strict JSON.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dualanodiff.errors import UserError


def jsonable(value):
    """Strict-JSON-ready: nan/inf -> None, Paths -> str, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value) if isinstance(value, Path) else value

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp's 0600 would hide outputs from other users
DIR_MODE = 0o777 & ~_UMASK  # what mkdir() would give; mkdtemp's 0700 would hide them too
MIN_FREE_BYTES = 16 * 2**20  # below this an output folder is refused before any work starts


def check_writable(folder: Path, min_free: int = MIN_FREE_BYTES) -> None:
    """`UserError` unless files can be created in ``folder`` and its file system has ``min_free`` bytes.

    Commands call it on their output folder before loading any model, so a read-only, full or mistyped
    folder fails in a second rather than after the work. A missing folder is judged by its nearest
    existing parent (the folder itself is not created)::

        check_writable(Path("generated"))       # nothing happens where files can be written
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{folder}: {existing} is a file, not a folder; pick another output folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"{folder}: cannot write in {existing} ({exc.strerror}); pick another output folder or fix its permissions"
        ) from exc
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise UserError(
            f"{folder}: only {free / 2**20:.1f} MiB free on its file system (at least {min_free / 2**20:.0f} MiB "
            "needed); free some space or pick another output folder"
        )


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
