"""Crop-paste: the real few-shot defects (training split only) are cut out with their masks,
flipped, rotated (any angle for objects, multiples of 90 degrees for textures) and scaled
(0.75-1.25), and pasted onto a random ``train/good`` image; on object categories only where the
object is (the position is chosen among those whose overlap with the foreground is largest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from dualanodiff.baselines.common import (
    MAX_DRAWS,
    BaselinePair,
    Defect,
    Normal,
    NormalPool,
    anomaly_part,
    training_defects,
    write_pairs,
)
from dualanodiff.data import Category
from dualanodiff.errors import UserError

SCALE_RANGE = (0.75, 1.25)
CROP_MARGIN = 4  # pixels kept around a defect's bounding box so interpolation never reads past it


def transform_patch(
    image: np.ndarray, mask: np.ndarray, angle: float, scale: float, flip_x: bool, flip_y: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Flip, then rotate by `angle` degrees (counter-clockwise, as `cv2.getRotationMatrix2D`) and
    scale a patch; returns the patch cropped to the transformed mask's bounding box.

    The image is resampled bilinearly (mirrored at its edges), the mask by nearest neighbour, so the
    returned mask stays binary and may be empty for a tiny defect shrunk away.
    """
    if flip_x:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if flip_y:
        image, mask = image[::-1], mask[::-1]
    h, w = mask.shape
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)
    corners = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [-0.5, h - 0.5, 1], [w - 0.5, h - 0.5, 1]])
    mapped = corners @ matrix.T
    low = mapped.min(axis=0)
    matrix[:, 2] -= low + 0.5  # the transformed patch's top-left corner lands on (-0.5, -0.5)
    size = np.ceil(mapped.max(axis=0) - low).astype(int)
    width, height = int(size[0]), int(size[1])
    warped = cv2.warpAffine(
        np.ascontiguousarray(image), matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    warped_mask = cv2.warpAffine(
        np.ascontiguousarray(mask, dtype=np.uint8), matrix, (width, height), flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    ).astype(bool)
    if not warped_mask.any():
        return warped[:0, :0], warped_mask[:0, :0]
    rows, cols = np.flatnonzero(warped_mask.any(1)), np.flatnonzero(warped_mask.any(0))
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    return warped[box], warped_mask[box]


def _crop(defect: Defect) -> tuple[np.ndarray, np.ndarray]:
    """The defect's bounding box plus `CROP_MARGIN` (clipped to the image)."""
    rows, cols = np.flatnonzero(defect.mask.any(1)), np.flatnonzero(defect.mask.any(0))
    h, w = defect.mask.shape
    box = (
        slice(max(rows[0] - CROP_MARGIN, 0), min(rows[-1] + 1 + CROP_MARGIN, h)),
        slice(max(cols[0] - CROP_MARGIN, 0), min(cols[-1] + 1 + CROP_MARGIN, w)),
    )
    return defect.image[box], defect.mask[box]


def _placements(foreground: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Top-left offsets (flat indices into the offset grid) where `mask` overlaps `foreground` most:
    every offset with full overlap when there is one. Empty when no offset touches the foreground."""
    overlap = cv2.matchTemplate(foreground.astype(np.float32), mask.astype(np.float32), cv2.TM_CCORR)
    best = float(overlap.max())
    if best < 0.5:
        return np.empty(0, int)
    return np.flatnonzero(overlap >= min(best, float(mask.sum())) - 0.5)


def place_defect(
    rng: np.random.Generator, defects: Sequence[Defect], normals: Sequence[Normal], kind: str
) -> tuple[Normal, np.ndarray, np.ndarray, dict]:
    """One randomly transformed training defect pasted onto a random normal image: (the normal image,
    the pasted image, the mask of the pasted pixels, how it was made).

    Objects: any rotation, and the pasted pixels are those of the transformed mask that land on the
    target's foreground, at a position where that share is largest. Textures: rotations by multiples
    of 90 degrees (their structure is axis-aligned), anywhere.
    """
    for _ in range(MAX_DRAWS):
        source = defects[int(rng.integers(len(defects)))]
        target = normals[int(rng.integers(len(normals)))]
        angle = float(rng.uniform(0, 360)) if kind == "object" else 90.0 * int(rng.integers(4))
        scale = float(rng.uniform(*SCALE_RANGE))
        flip_x, flip_y = bool(rng.integers(2)), bool(rng.integers(2))
        crop_image, crop_mask = _crop(source)
        height, width = target.foreground.shape
        patch, patch_mask = transform_patch(crop_image, crop_mask, angle, scale, flip_x, flip_y)
        if patch_mask.shape[0] > height or patch_mask.shape[1] > width:  # shrink a defect too large to fit
            scale *= 0.95 * min(height / patch_mask.shape[0], width / patch_mask.shape[1])
            patch, patch_mask = transform_patch(crop_image, crop_mask, angle, scale, flip_x, flip_y)
        if not patch_mask.any():
            continue
        offsets = _placements(target.foreground, patch_mask)
        if offsets.size == 0:
            continue
        columns = width - patch_mask.shape[1] + 1
        top, left = divmod(int(offsets[rng.integers(offsets.size)]), columns)
        window = slice(top, top + patch_mask.shape[0]), slice(left, left + patch_mask.shape[1])
        mask = np.zeros((height, width), bool)
        mask[window] = patch_mask & target.foreground[window]
        image = target.image.copy()
        image[window][mask[window]] = patch[mask[window]]
        record = {
            "source": source.stem, "target": target.stem, "angle": angle, "scale": scale,
            "flip_x": flip_x, "flip_y": flip_y, "top": top, "left": left,
        }
        return target, image, mask, record
    raise UserError(
        f"crop-paste: no transformed defect could be placed on the object after {MAX_DRAWS} draws; "
        "check the train/good images show the object"
    )


def crop_paste_pair(
    rng: np.random.Generator, defects: Sequence[Defect], normals: Sequence[Normal], kind: str
) -> BaselinePair:
    """A `place_defect` pair: its mask is exactly the pasted pixels."""
    target, image, mask, record = place_defect(rng, defects, normals, kind)
    return BaselinePair(image, mask, anomaly_part(image, mask), record, target.foreground)


def crop_paste(
    category: Category,
    defect: str,
    num: int,
    out: Path,
    seed: int = 0,
    rounding: str = "floor",
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    allow_empty_masks: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Write `num` crop-paste pairs of `defect` under ``out/<category>/<defect>``; returns that folder.
    Few-shot pairs with an empty mask are refused, or skipped with ``allow_empty_masks`` (see `train`)."""
    defects = training_defects(category, defect, rounding, allow_empty_masks, log)
    normals = NormalPool(category)
    settings = {"generator": "crop-paste", "split_rounding": rounding}
    return write_pairs(category, defect, num, Path(out), seed, settings, force, progress,
                lambda rng: crop_paste_pair(rng, defects, normals, category.kind))
