"""The generated-pairs output layout (MVTec-like) and its crash-safe, resumable writer::

    OUT/<category>/<defect>/image/0000.png    RGB
                            mask/0000.png     L, 0/255
                            part/0000.png     RGB anomaly-part image (optional)
                            manifest.jsonl    one JSON row per kept pair: index, attempt, seed, ... and
                                              the pair's files ("image", "mask", "part": relative or null)
                            rejected.jsonl    one JSON row per pair the quality filter dropped
                            contact_sheet.png image | mask overlay | part, one row per pair

A pair's PNGs are written first, then its manifest row, every file atomically (temporary name, then
rename). A killed run therefore leaves at most orphan PNGs without a row: they are ignored, and the next
pair written takes their index and overwrites them. Pairs already listed are never touched again, so
re-running with a larger ``--num`` keeps them byte-identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dualanodiff.data import IMAGE_EXTENSIONS, load_image, load_mask, natural_key
from dualanodiff.errors import UserError
from dualanodiff.io import atomic_write_text, save_png
from dualanodiff.masks import mask_overlay

MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"
CONTACT_SHEET = "contact_sheet.png"
_FILE_KEYS = ("image", "mask", "part")
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
    """

    def __init__(self, root: Path, category: str, defect: str):
        self.dir = Path(root) / category / defect

    def kept(self) -> list[dict]:
        """Manifest rows whose files all exist, in index order (the last row wins for an index)."""
        return kept_rows(self.dir)

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
        save_png(self.dir / "image" / name, image)
        save_png(self.dir / "mask" / name, mask.astype(np.uint8) * 255)
        if part is None:
            (self.dir / "part" / name).unlink(missing_ok=True)  # an orphan from a killed run
        else:
            save_png(self.dir / "part" / name, part)
        part_file = None if part is None else f"part/{name}"
        row = {"index": index, **record, "image": f"image/{name}", "mask": f"mask/{name}", "part": part_file}
        rows = [r for r in _read_jsonl(self.dir / MANIFEST) if r.get("index") != index] + [row]
        _write_jsonl(self.dir / MANIFEST, rows)
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
    atomic_write_text(path, "".join(json.dumps(_jsonable(row), allow_nan=False) + "\n" for row in rows))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def _subdirs(folder: Path) -> list[Path]:
    folders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(folders, key=lambda p: natural_key(p.name))
