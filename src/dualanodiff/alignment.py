"""Image–mask alignment of an anomaly pair: does the mask sit on the defect?

The paper's claim is that DualAnoDiff's image and mask agree; nothing in the usual tables measures it.
Here a pair is scored by how much its image differs from its own defect-free version inside the mask,
relative to how much it differs at ordinary places of the same object (or texture)::

    A = mean over mask pixels and channels of |image - inpaint(image, mask)|
    B = the same for the mask translated to `shifts` other places (inside `region`, clear of the mask)
    alignment = A / max(B, MIN_RESIDUAL)

Inpainting (OpenCV, Telea) fills a hole from its surroundings, so it reconstructs ordinary surface
well and a defect badly: a mask on a defect gives A well above B, a mask anywhere else gives A ≈ B.
A mask placed at random scores about 1; crop-paste of real defects 2-7 on the synthetic nuts at
128 px (about 5 for holes), less on the woven texture (1.1-1.8), whose threads inpaint poorly anywhere.
Example (a brighter square on black, under the mask)::

    image = np.zeros((64, 64, 3), np.uint8); image[10:18, 10:18] = 20
    mask = image[..., 0] > 0
    alignment_score(image, mask)   # 40.0: A = 20 (black surroundings fill black), B = 0 -> floor 0.5
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy.signal import fftconvolve

DILATION = 2  # pixels added around a mask before inpainting: a defect's soft rim must not seed the fill
INPAINT_RADIUS = 3  # cv2.inpaint's neighbourhood
# A shifted mask keeps this far from the original so that neither its hole nor its fill's sources
# touch the defect or its rim.
CLEARANCE = 2 * DILATION + INPAINT_RADIUS
MIN_RESIDUAL = 0.5  # grey levels: below half a level B is rounding, and a ratio of roundings means nothing


def alignment_score(
    image: np.ndarray, mask: np.ndarray, region: np.ndarray | None = None, shifts: int = 8, seed: int = 0
) -> float:
    """A / B as in the module docstring; image HxWx3 (or HxW) uint8, mask and region HxW bool.

    `region` is where a defect may sit (an object's foreground; None: the whole image, for textures);
    every shifted mask lies wholly inside it and the image (see `shifted_masks`; `seed` breaks ties).
    nan for an empty mask or when no valid translation exists.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    mask = np.asarray(mask, dtype=bool)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"alignment_score: image {image.shape[:2]} and mask {mask.shape} differ in size")
    if not mask.any():
        return math.nan
    moved = shifted_masks(mask, np.ones_like(mask) if region is None else np.asarray(region, dtype=bool), shifts, seed)
    if not moved:
        return math.nan
    reference = float(np.mean([inpainting_residual(image, m) for m in moved]))
    return inpainting_residual(image, mask) / max(reference, MIN_RESIDUAL)


def inpainting_residual(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean over mask pixels and channels of |image - its Telea inpainting inside the dilated mask|.

    Only a window around the mask is inpainted (the fill reads nothing farther away), so the cost
    follows the mask's size, not the image's.
    """
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    margin = DILATION + INPAINT_RADIUS + 2
    window = (
        slice(max(rows[0] - margin, 0), rows[-1] + 1 + margin),
        slice(max(cols[0] - margin, 0), cols[-1] + 1 + margin),
    )
    patch, inside = np.ascontiguousarray(image[window]), mask[window]
    hole = _dilate(inside, DILATION).astype(np.uint8)
    filled = cv2.inpaint(patch, hole, INPAINT_RADIUS, cv2.INPAINT_TELEA)
    difference = np.abs(patch.astype(np.float64) - filled.astype(np.float64))
    return float(difference[inside].mean())


def shifted_masks(mask: np.ndarray, region: np.ndarray, count: int, seed: int = 0) -> list[np.ndarray]:
    """Up to `count` translated copies of `mask` that lie wholly inside `region` and keep `CLEARANCE`
    pixels from the original (a mask too large for that: merely do not touch it), preferring those
    whose fill reads as many pixels outside `region` as the original's does (ties drawn from `seed`).

    A hole hugging an object's edge is filled partly from the background and leaves a large residual
    whatever lies under it; matching that exposure keeps the reference fair for central and edge masks.
    """
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    shape = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    reach = DILATION + INPAINT_RADIUS  # how far from a mask its fill reads
    fill = _dilate(np.pad(shape, reach), reach)
    outside = ~region
    exposure = int((_dilate(mask, reach) & outside).sum())
    # per top-left offset of `shape`: its pixels outside the region, its fill's pixels outside it
    off_region = _count(outside, shape)
    fill_outside = _count(np.pad(outside, reach), fill)
    for clearance in (CLEARANCE, 1):
        on_guard = _count(_dilate(mask, clearance), shape)
        valid = np.flatnonzero((off_region == 0) & (on_guard == 0))
        if valid.size:
            break
    valid = np.random.default_rng(seed).permutation(valid)
    closest = np.argsort(np.abs(fill_outside.flat[valid] - exposure), kind="stable")
    chosen = valid[closest[:count]]
    moved = []
    for offset in chosen:
        top, left = divmod(int(offset), off_region.shape[1])
        copy = np.zeros_like(mask)
        copy[top : top + shape.shape[0], left : left + shape.shape[1]] = shape
        moved.append(copy)
    return moved


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _count(image: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """For every placement of `shape` inside `image` (top-left offsets), how many of its pixels are
    set in `image` (an exact integer count; FFT correlation for speed on large images)."""
    counts = fftconvolve(image.astype(np.float64), shape[::-1, ::-1].astype(np.float64), mode="valid")
    return np.rint(counts).astype(np.int64)
