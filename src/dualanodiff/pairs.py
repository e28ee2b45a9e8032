"""The generated-pairs output layout (MVTec-like) and its crash-safe, resumable writer::

    OUT/<category>/<defect>/image/0000.png    RGB
                            mask/0000.png     L, 0/255
                            part/0000.png     RGB anomaly-part image (optional)
                            manifest.jsonl    one JSON row per kept pair: index, attempt, seed, ... and
                                              the pair's files ("image", "mask", "part": relative or null)
                            rejected.jsonl    one JSON row per pair the quality filter dropped
                            contact_sheet.png image | mask overlay | part, one row per pair

                            .writer.lock      held by the one writer at work here (its pid, host, command)

One writer per folder: a `PairWriter` holds an exclusive lock on ``.writer.lock`` (``flock``) from its
creation until `PairWriter.close` (or its end), and a second writer is refused at once with a `UserError`
naming the holder. A pair's PNGs are written first, then its manifest row, every file atomically
(temporary name, then rename); a write that fails (a full disk) removes the pair's PNGs again. A killed
run can leave PNGs without a row: the next writer removes them when it opens the folder, so the folder
never holds an image without its mask and row. Pairs already listed are never touched again, so
re-running with a larger ``--num`` keeps them byte-identical. A writer given a ``size`` resizes every
pair it writes (Lanczos for the images, nearest for the mask: it stays binary and aligned).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dualanodiff.data import (
    IMAGE_EXTENSIONS,
    load_image,
    load_mask,
    natural_key,
    open_category,
)
from dualanodiff.errors import OtherSettings, UserError, describe_changes
from dualanodiff.images import resize_image, resize_mask
from dualanodiff.io import atomic_write_text, jsonable, save_png
from dualanodiff.masks import mask_overlay

MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"
CONTACT_SHEET = "contact_sheet.png"
LOCK = ".writer.lock"
_FILE_KEYS = ("image", "mask", "part")
_PAIR_FILE = re.compile(r"\d{4,}\.png")
_HOLDER_COMMAND_CHARS = 120  # of the holder's command line kept in the lock file
_SHEET_BACKGROUND = 255
_MISSING_TILE = 128


class PairWriter:
    """Writes the kept and rejected pairs of one (category, defect) under ``root/category/defect``::

        writer = PairWriter(out, "hazelnut", "crack")
        attempt = writer.attempts_done()          # where a resumed run carries on
        while len(writer.kept()) < num:
            ...                                   # sample with the seed of `attempt`, extract the mask
            if verdict == "kept":
                writer.write(image, mask, part, {"attempt": attempt, "seed": seed, ...})
            else:
                writer.reject({"attempt": attempt, "seed": seed, "verdict": verdict, ...})
            attempt += 1

    One writer per folder (see the module docstring): use it as a context manager, or `close` it::

        with PairWriter(out, "hazelnut", "crack") as writer:
            ...
    """

    def __init__(self, root: Path, category: str, defect: str, size: tuple[int, int] | None = None):
        self.dir = Path(root) / category / defect
        self.size = size  # (width, height) every pair is written at; None: as given (see `pair_size`)
        self._lock = _take_lock(self.dir)
        self._remove_orphans()

    def close(self) -> None:
        """Release the folder to the next writer (also done when the writer is garbage-collected)."""
        if not self._lock.closed:
            self._lock.close()

    def __enter__(self) -> PairWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def clear(self) -> None:
        """Delete every pair, manifest and sheet here (``--force``), keeping the lock held."""
        for path in self.dir.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != LOCK:
                path.unlink()
        _write_jsonl(self.dir / MANIFEST, [])

    def kept(self) -> list[dict]:
        """Manifest rows whose files all exist, in index order (the last row wins for an index)."""
        return kept_rows(self.dir)

    def check_settings(self, settings: dict) -> None:
        """`OtherSettings` when pairs here (kept or dropped) were made with other ``settings`` (keys of
        their rows): one folder must not mix two experiments. ``--force`` (`clear`) is the way out."""
        rows = self.kept() + rejected_rows(self.dir)
        if not rows:
            return
        changed = describe_changes(rows[0], settings)
        if changed:
            raise OtherSettings(
                f"{self.dir}: holds pairs made with other settings ({changed}); "
                "use another --out, or pass --force to replace them"
            )

    def attempts_done(self) -> int:
        """1 + the largest "attempt" in the manifest and the rejected rows; 0 before the first pair."""
        rows = _read_jsonl(self.dir / MANIFEST) + rejected_rows(self.dir)
        return 1 + max((int(row.get("attempt", -1)) for row in rows), default=-1)

    def write(self, image: np.ndarray, mask: np.ndarray, part: np.ndarray | None, record: dict) -> int:
        """Write one kept pair under the lowest index no kept pair holds (``len(kept())`` normally).

        ``record`` must hold "attempt" and "seed"; the row written is ``{"index", **record, "image",
        "mask", "part"}`` with the files relative to the defect folder ("part" null when absent).
        """
        _check_pair(image, mask, part)
        missing = {"attempt", "seed"} - set(record)
        if missing:
            raise ValueError(f"record is missing {sorted(missing)}")
        reserved = {"index", *_FILE_KEYS} & set(record)
        if reserved:
            raise ValueError(f"record may not set {sorted(reserved)}: the writer fills them in")
        taken = {row["index"] for row in self.kept()}
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        name = f"{index:04d}.png"
        if self.size is not None:
            image, mask = resize_image(image, self.size, Image.Resampling.LANCZOS), resize_mask(mask, self.size)
            part = None if part is None else resize_image(part, self.size, Image.Resampling.LANCZOS)
        files = {"image": image, "mask": mask.astype(np.uint8) * 255, "part": part}
        try:
            for folder, array in files.items():
                if array is not None:
                    save_png(self.dir / folder / name, array)
            part_file = None if part is None else f"part/{name}"
            row = {"index": index, **record, "image": f"image/{name}", "mask": f"mask/{name}", "part": part_file}
            rows = [r for r in _read_jsonl(self.dir / MANIFEST) if r.get("index") != index] + [row]
            _write_jsonl(self.dir / MANIFEST, rows)
        except BaseException:  # a full disk, a signal: no PNG may stay without its manifest row
            for folder in files:
                (self.dir / folder / name).unlink(missing_ok=True)
            raise
        if part is None:
            (self.dir / "part" / name).unlink(missing_ok=True)  # an orphan from an earlier, killed writer
        return index

    def reject(self, record: dict) -> None:
        """Record a pair the quality filter dropped; ``record`` must hold "attempt" and "verdict"."""
        missing = {"attempt", "verdict"} - set(record)
        if missing:
            raise ValueError(f"rejected record is missing {sorted(missing)}")
        _write_jsonl(self.dir / REJECTED, rejected_rows(self.dir) + [dict(record)])

    def write_contact_sheet(self, max_pairs: int = 16, tile: int = 128, margin: int = 4) -> Path:
        """Write ``contact_sheet.png`` for the first ``max_pairs`` kept pairs (see `contact_sheet`)."""
        rows = []
        for row in self.kept()[:max_pairs]:
            image = load_image(self.dir / row["image"])
            mask = load_mask(self.dir / row["mask"], shape=image.shape[:2])
            part = load_image(self.dir / row["part"]) if row.get("part") else None
            rows.append((image, mask, part))
        path = self.dir / CONTACT_SHEET
        save_png(path, contact_sheet(rows, tile=tile, margin=margin))
        return path

    def _remove_orphans(self) -> None:
        """Delete what a killed writer left: temporary files, and pair PNGs no manifest row lists.

        Only in a folder this writer's kind made (one with a manifest); a new, empty folder gets an empty
        manifest at once, so that a writer killed during its first pair leaves a folder that is cleaned
        too. A folder of pairs from another tool (images, no manifest) is left as it is.
        """
        manifest = self.dir / MANIFEST
        for temporary in self.dir.glob("**/.*.tmp"):
            temporary.unlink(missing_ok=True)
        if not manifest.is_file():
            if not any((self.dir / folder).is_dir() for folder in _FILE_KEYS):
                _write_jsonl(manifest, [])
            return
        listed = {row[key] for row in self.kept() for key in _FILE_KEYS if row.get(key)}
        for folder in _FILE_KEYS:
            if (self.dir / folder).is_dir():
                for path in (self.dir / folder).iterdir():
                    if _PAIR_FILE.fullmatch(path.name) and f"{folder}/{path.name}" not in listed:
                        path.unlink()


def contact_sheet(
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], tile: int = 128, margin: int = 4
) -> np.ndarray:
    """A white-framed grid, one row per (image, mask, part): image | mask overlay | part.

    Every tile is resized to ``tile`` x ``tile``; a missing part is a mid-grey tile, and no pairs at
    all give one row of grey tiles. The result has shape
    ``(rows * (tile + margin) + margin, 3 * (tile + margin) + margin, 3)``.
    """
    grey = np.full((tile, tile, 3), _MISSING_TILE, np.uint8)
    tiles = [
        [_tile(image, tile), _tile(mask_overlay(image, mask), tile), grey if part is None else _tile(part, tile)]
        for image, mask, part in pairs
    ] or [[grey, grey, grey]]
    step = tile + margin
    sheet = np.full((len(tiles) * step + margin, 3 * step + margin, 3), _SHEET_BACKGROUND, np.uint8)
    for r, row in enumerate(tiles):
        for c, picture in enumerate(row):
            top, left = margin + r * step, margin + c * step
            sheet[top : top + tile, left : left + tile] = picture
    return sheet


def pair_size(size: int | str, dataset: str | Path) -> tuple[int, int] | None:
    """The (width, height) pairs are written at for a `GenerateConfig.size`: None for "model" (as
    sampled), the size of the ``dataset`` category's images for "source", N x N for N::

        pair_size(256, "")                    # (256, 256)
        pair_size("source", "mvtec/hazelnut") # (1024, 1024)
    """
    if size == "model":
        return None
    if size != "source":
        return (int(size), int(size))
    if not (dataset and Path(dataset).is_dir()):
        raise UserError(
            f"--size source: the pairs' dataset {str(dataset) or '(none recorded)'} is not a folder, so its image "
            "size is unknown; pass --size N, or the dataset where the command takes one"
        )
    return open_category(dataset).image_size()


def read_pairs(defect_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a folder of generated pairs, in index order.

    With a manifest, its kept pairs; without one (pairs made by another tool), images and masks
    matched by file stem (a mask may also be named ``<stem>_mask``), in natural name order.
    """
    defect_dir = Path(defect_dir)
    if (defect_dir / MANIFEST).is_file():
        return [(defect_dir / row["image"], defect_dir / row["mask"]) for row in kept_rows(defect_dir)]
    images = _images_by_stem(defect_dir / "image")
    masks = {stem.removesuffix("_mask"): path for stem, path in _images_by_stem(defect_dir / "mask").items()}
    stems = sorted(images.keys() & masks.keys(), key=natural_key)
    if images and masks and not stems:
        raise UserError(
            f"{defect_dir}: no file in image/ has a mask of the same name in mask/; "
            "name each mask like its image (or <stem>_mask)"
        )
    return [(images[stem], masks[stem]) for stem in stems]


def discover_generated(root: Path) -> dict[tuple[str, str], Path]:
    """Every ``root/<category>/<defect>`` folder holding ``image/`` and ``mask/``, in natural order."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"{root}: not a folder of generated pairs; pass the --out folder of `dualanodiff generate`"
        )
    found = {}
    for category in _subdirs(root):
        for defect in _subdirs(category):
            if (defect / "image").is_dir() and (defect / "mask").is_dir():
                found[(category.name, defect.name)] = defect
    return found


def kept_rows(defect_dir: Path) -> list[dict]:
    """The manifest rows of a defect folder whose files all exist, in index order."""
    rows = [row for row in _read_jsonl(defect_dir / MANIFEST) if isinstance(row.get("index"), int)]
    by_index = {row["index"]: row for row in rows}
    return [row for _, row in sorted(by_index.items()) if _files_exist(defect_dir, row)]


def rejected_rows(defect_dir: Path) -> list[dict]:
    """The rows of the pairs the quality filter dropped."""
    return _read_jsonl(defect_dir / REJECTED)


def _take_lock(folder: Path):
    """The open lock file of ``folder``, exclusively locked, holding who locked it; or a `UserError`
    naming the writer that holds it. The lock goes with the file handle (closed: released)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not said who it is yet"
        handle.close()
        raise UserError(
            f"{folder}: another writer is adding pairs here ({holder}); wait for it to finish or pick another --out"
        ) from None
    except BaseException:
        handle.close()
        raise
    handle.seek(0)
    handle.truncate()
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    if len(command) > _HOLDER_COMMAND_CHARS:  # a Ray worker's command line runs to hundreds of characters
        command = command[: _HOLDER_COMMAND_CHARS - 3] + "..."
    handle.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n")
    handle.flush()
    return handle


def _files_exist(defect_dir: Path, row: dict) -> bool:
    files = [row.get("image"), row.get("mask")] + ([row["part"]] if row.get("part") else [])
    return all(isinstance(name, str) and (defect_dir / name).is_file() for name in files)


def _check_pair(image: np.ndarray, mask: np.ndarray, part: np.ndarray | None) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 uint8, got {image.shape} {image.dtype}")
    if mask.dtype != bool or mask.shape != image.shape[:2]:
        raise ValueError(f"mask must be bool of shape {image.shape[:2]}, got {mask.shape} {mask.dtype}")
    if part is not None and (part.dtype != np.uint8 or part.shape != image.shape):
        raise ValueError(f"part must be uint8 of shape {image.shape}, got {part.shape} {part.dtype}")


def _tile(picture: np.ndarray, size: int) -> np.ndarray:
    height, width = picture.shape[:2]
    interpolation = cv2.INTER_AREA if height >= size and width >= size else cv2.INTER_LINEAR
    return cv2.resize(picture, (size, size), interpolation=interpolation)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: not a JSON object; fix or delete that line")
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole file atomically; non-finite floats become null so every row is strict JSON."""
    atomic_write_text(path, "".join(json.dumps(jsonable(row), allow_nan=False) + "\n" for row in rows))


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def _subdirs(folder: Path) -> list[Path]:
    folders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(folders, key=lambda p: natural_key(p.name))
