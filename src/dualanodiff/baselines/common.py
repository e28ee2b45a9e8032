"""What the baseline generators share: the real few-shot defects and the normal images they start from,
the pair they return, the anomaly-part convention, and the resumable writing of a folder of pairs.

Pair ``i`` is made from ``np.random.default_rng(seed + attempt)`` alone, so any pair regenerates exactly
from the seed in its manifest row and a re-run with a larger ``num`` only adds pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualanodiff.alignment import alignment_score
from dualanodiff.data import (
    Category,
    Pair,
    few_shot_split,
    load_image,
    load_mask,
    with_marked_masks,
)
from dualanodiff.errors import UserError
from dualanodiff.masks import foreground_mask
from dualanodiff.pairs import PairWriter

PART_GREY = 127  # the anomaly-part image outside the mask: 0 in [-1, 1] space, as uint8
MAX_DRAWS = 100  # redraws (empty mask, nowhere to place) before a pair is declared impossible


@dataclass(frozen=True)
class Defect:
    """A real few-shot training defect: its file stem, image (HxWx3 uint8) and mask (HxW bool)."""

    stem: str
    image: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class Normal:
    """A ``train/good`` image (HxWx3 uint8) with its foreground mask (HxW bool, all True for textures)."""

    stem: str
    image: np.ndarray
    foreground: np.ndarray


@dataclass
class BaselinePair:
    """One generated pair; ``record`` says how it was made (source/target stems, transform, ...) and
    ``region`` is where its defect may sit (the target's foreground)."""

    image: np.ndarray
    mask: np.ndarray
    part: np.ndarray
    record: dict
    region: np.ndarray


def training_defects(
    category: Category, defect: str, rounding: str = "floor", allow_empty: bool = False,
    warn: Callable[[str], None] = lambda message: None,
) -> list[Defect]:
    """The few-shot training pairs of `defect` (never its test images), loaded; a pair whose mask is
    empty is refused, or skipped with ``allow_empty``, as `train` does (`with_marked_masks`)."""
    train, _ = few_shot_split(defect_pairs(category, defect), rounding)
    return load_defects(with_marked_masks(train, allow_empty, warn))


def load_defects(pairs: Sequence[Pair]) -> list[Defect]:
    """`Defect`s of few-shot pairs, read from their files."""
    defects = []
    for pair in pairs:
        image = load_image(pair.image)
        defects.append(Defect(pair.stem, image, load_mask(pair.mask, shape=image.shape[:2])))
    return defects


class NormalPool(Sequence):
    """The category's ``train/good`` images as `Normal`s, loaded (with their foreground) on first use.

    A generator draws one image per pair, so only the images drawn are ever read.
    """

    def __init__(self, category: Category, cache_size: int = 64):
        if not category.train_good:
            raise UserError(
                f"{category.root}: no train/good images to generate on; baselines need an MVTec category "
                "with train/good/"
            )
        self._paths = list(category.train_good)
        self._kind = category.kind
        self._load = functools.lru_cache(maxsize=cache_size)(self._read)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> Normal:
        return self._load(index)

    def _read(self, index: int) -> Normal:
        path = self._paths[index]
        image = load_image(path)
        return Normal(path.stem, image, foreground_mask(image, kind=self._kind))


def defect_pairs(category: Category, defect: str):
    if defect not in category.defects:
        raise UserError(f"--defect {defect}: not a defect type of {category.name}; choose from {sorted(category.defects)}")
    return category.defects[defect]


def anomaly_part(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The anomaly-part image: `image` inside `mask`, flat grey `PART_GREY` outside."""
    return np.where(mask[..., None], image, np.uint8(PART_GREY))


def write_pairs(category: Category, defect: str, num: int, out: Path, seed: int, settings: dict, force: bool,
                progress: Callable[[int], None] | None, make: Callable[[np.random.Generator], BaselinePair]) -> Path:
    """Resume or start a folder of pairs: attempt ``a`` always uses seed ``seed + a``."""
    if num < 1:
        raise UserError(f"--num {num}: must be at least 1")
    with PairWriter(out, category.name, defect) as writer:
        if force:
            writer.clear()
        settings = settings | {"base_seed": seed}
        writer.check_settings(settings)
        done = len(writer.kept())
        attempt = writer.attempts_done()
        if progress:
            progress(done)
        while done < num:
            pair = make(np.random.default_rng(seed + attempt))
            alignment = round(alignment_score(pair.image, pair.mask, pair.region), 4)
            record = {"attempt": attempt, "seed": seed + attempt, **settings, **pair.record, "alignment": alignment}
            writer.write(pair.image, pair.mask, pair.part, record)
            attempt += 1
            done += 1
            if progress:
                progress(done)
        writer.write_contact_sheet()
    return writer.dir
