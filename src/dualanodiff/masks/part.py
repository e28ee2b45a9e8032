"""Masks for generated pairs: from the anomaly-part image (default), from cross-attention, or from U²-Net.

The anomaly-part image follows the official convention: its training target is ``I * M`` computed in
``[-1, 1]`` space, so outside the defect it is flat mid-grey (127/128), not black. The defect is then
whatever is far from that flat level::

    mask = part_to_mask(part)              # part: HxWx3 uint8 -> HxW bool
    filter_verdict(mask, foreground)       # "kept" | "empty" | "too_large" | "off_object"
    pair_consistency(image, part, mask)    # PSNR (dB) of image vs part inside the mask

Every extractor ends with the same clean-up (`clean_mask`): closing, filling small holes and dropping
components smaller than ``min_component`` pixels. No opening: thin scratches and cracks are defects.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects
from skimage.segmentation import find_boundaries

from dualanodiff.masks.u2net import u2net_saliency

__all__ = ["area_ratio", "attention_to_mask", "clean_mask", "filter_verdict", "mask_overlay", "pair_consistency",
           "part_onto", "part_to_mask", "u2net_part_mask"]  # what `dualanodiff.masks` re-exports

PSNR_CAP = 100.0  # dB returned by `pair_consistency` when image and part agree exactly inside the mask
MAX_TINT = 0.25  # furthest a flat part image's median may lie from mid-grey, per channel
_NOISE_CEILING = 3.0  # x median distance (median of max_c |noise_c| is 1.26 sigma for Gaussian noise)
_TINT = np.array([255, 0, 0], dtype=np.float32)


def part_to_mask(
    part: np.ndarray, floor: float = 0.08, min_component: int = 16, radius: int = 1
) -> np.ndarray:
    """Defect mask of an anomaly-part image: pixels far from the flat grey around the defect.

    The distance of a pixel is ``max_c |part_c / 255 - level_c|``, where the flat level is the image's
    own per-channel median: decoded part images are often flat but tinted by 0.07-0.10 in one channel,
    and against a fixed 0.5 most of such an image would count as defect. Only a median further than
    ``MAX_TINT`` from mid-grey is not a flat level but a defect covering most of the image; mid-grey
    is the level then. The threshold is Otsu's on the distance map, never below ``floor`` and never
    above a noise ceiling of 3x the median distance (3.8 sigma for Gaussian noise on the flat region):
    with defects of very different contrast, Otsu alone would split strong from faint defects rather
    than defect from flat. ``min_component`` is in pixels at the image's own size.

    >>> part = np.full((32, 32, 3), 128, np.uint8); part[8:16, 8:20] = (200, 40, 40)
    >>> int(part_to_mask(part).sum())
    96
    """
    distance = distance_from_flat(part)
    if distance.max() <= floor:
        return np.zeros(distance.shape, dtype=bool)
    noise_ceiling = _NOISE_CEILING * float(np.median(distance))
    threshold = max(min(float(threshold_otsu(distance)), noise_ceiling), floor)
    return clean_mask(distance > threshold, min_component, radius)


def distance_from_flat(part: np.ndarray) -> np.ndarray:
    """HxW ``max_c |part_c / 255 - level_c|``, the flat level being the part's per-channel median (mid-grey
    when that median is further than ``MAX_TINT`` from it): how much of the defect each pixel shows."""
    pixels = np.atleast_3d(np.asarray(part)).astype(np.float32) / 255.0
    if pixels.ndim != 3:
        raise ValueError(f"part image must be HxW or HxWxC, got shape {np.shape(part)}")
    median = np.median(pixels.reshape(-1, pixels.shape[2]), axis=0)
    level = median if np.abs(median - 0.5).max() <= MAX_TINT else np.full_like(median, 0.5)
    return np.abs(pixels - level).max(axis=2)


def part_onto(normal: np.ndarray, part: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The part image's defect laid onto a normal image (HxWx3 uint8 each): the paper's ``I * M`` is the
    image inside the mask, so there the pair's image is the part, with an opacity that grows with the
    pixel's distance from the flat grey (full from the median distance of the mask's pixels on): the
    grey the decoder blurs into a defect's rim stays out. Outside the mask it is `normal` exactly."""
    if not mask.any():
        return normal.copy()
    distance = distance_from_flat(part)
    opacity = np.where(mask, np.clip(distance / max(float(np.median(distance[mask])), 1e-6), 0, 1), 0)[..., None]
    return np.clip(np.round(normal + opacity * (part.astype(np.float32) - normal)), 0, 255).astype(np.uint8)


def attention_to_mask(
    attention: np.ndarray, size: tuple[int, int], min_component: int = 16, radius: int = 1
) -> np.ndarray:
    """Mask from an averaged cross-attention map of the defect token; ``size`` is (height, width).

    The map is resized bilinearly, normalised to [0, 1] and split by Otsu's threshold. A constant map
    carries no location and gives an empty mask.
    """
    heat = np.asarray(attention, dtype=np.float32)
    if heat.ndim != 2 or not np.isfinite(heat).all():
        raise ValueError(f"attention must be a finite 2-D map, got shape {heat.shape}")
    height, width = size
    heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
    span = float(heat.max() - heat.min())
    if span <= 1e-12:
        return np.zeros((height, width), dtype=bool)
    heat = (heat - heat.min()) / span
    return clean_mask(heat > threshold_otsu(heat), min_component, radius)


def u2net_part_mask(
    part: np.ndarray, weights_path: str | Path, threshold: float = 0.5, min_component: int = 16,
) -> np.ndarray:
    """Mask of the salient defect in a part image from a local TorchScript U²-Net (`u2net_saliency`)."""
    return clean_mask(u2net_saliency(part, weights_path) > threshold, min_component, radius=1)


def clean_mask(binary: np.ndarray, min_component: int = 16, radius: int = 1) -> np.ndarray:
    """Closing with a disk of ``radius``, then filling holes and dropping components under ``min_component``.

    Closing bridges gaps and notches narrower than the disk and leaves convex shapes unchanged. There
    is deliberately no opening: it would erase thin scratches, cracks and cuts, which are defects;
    noise specks go with the small components.
    """
    mask = np.asarray(binary, dtype=bool)
    if radius > 0:
        mask = closing(mask, disk(radius))
    if min_component > 1:
        mask = remove_small_holes(mask, max_size=min_component - 1, connectivity=1)
        mask = remove_small_objects(mask, max_size=min_component - 1, connectivity=2)
    return mask


def filter_verdict(
    mask: np.ndarray, foreground: np.ndarray | None, max_area: float = 0.5, min_on_object: float = 0.5
) -> str:
    """Quality-filter verdict for a generated mask, checked in this order.

    ``"empty"``: no pixel; ``"too_large"``: more than ``max_area`` of the image; with a foreground mask and
    ``min_on_object`` > 0 (0 asks nothing of where the mask lies), ``"no_object"``: the foreground is empty
    (the generated image lost its object), ``"off_object"``: less than ``min_on_object`` of the mask's pixels
    lie on it; else ``"kept"``.
    """
    mask = np.asarray(mask, dtype=bool)
    area = int(mask.sum())
    if area == 0:
        return "empty"
    if area / mask.size > max_area:
        return "too_large"
    if foreground is not None and min_on_object > 0:
        foreground = np.asarray(foreground, dtype=bool)
        if foreground.shape != mask.shape:
            raise ValueError(f"foreground shape {foreground.shape} differs from mask shape {mask.shape}")
        if not foreground.any():
            return "no_object"
        if (mask & foreground).sum() / area < min_on_object:
            return "off_object"
    return "kept"


def pair_consistency(image: np.ndarray, part: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, peak 255) between the global image and the part image over the mask's pixels.

    This is the measurable form of the paper's alignment claim: inside the defect, both branches
    should have drawn the same thing. Exact agreement gives ``PSNR_CAP``; an empty mask gives nan.

    >>> image = np.full((4, 4, 3), 100, np.uint8); mask = np.zeros((4, 4), bool); mask[:2] = True
    >>> round(pair_consistency(image, image + 10, mask), 2)   # 10 log10(255^2 / 10^2)
    28.13
    """
    image = np.asarray(image)
    part = np.asarray(part)
    mask = np.asarray(mask, dtype=bool)
    if image.shape != part.shape or image.shape[:2] != mask.shape:
        raise ValueError(f"shapes differ: image {image.shape}, part {part.shape}, mask {mask.shape}")
    if not mask.any():
        return float("nan")
    difference = image[mask].astype(np.float64) - part[mask].astype(np.float64)
    mse = float(np.mean(difference**2))
    if mse == 0.0:
        return PSNR_CAP
    return min(float(10.0 * np.log10(255.0**2 / mse)), PSNR_CAP)


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The image with the mask tinted red (``alpha``) and its inner contour drawn in pure red."""
    rgb = np.atleast_3d(np.asarray(image))
    rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb[..., :3]
    mask = np.asarray(mask, dtype=bool)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image shape {rgb.shape[:2]} differs from mask shape {mask.shape}")
    out = rgb.astype(np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * _TINT
    out[find_boundaries(mask, mode="inner")] = _TINT
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def area_ratio(generated: list[float], few_shot: list[float]) -> float:
    """How large generated defects are against the real ones they were learned from: the median of the generated
    masks' areas over the median of the few-shot masks' (areas as shares of the image, so sizes may differ).
    About 1 for defects as large as the real ones; nan when either list is empty or the few-shot masks are.

    >>> area_ratio([0.01, 0.02, 0.03], [0.04, 0.05])
    0.4444444444444444
    """
    if not generated or not few_shot or np.median(few_shot) == 0:
        return float("nan")
    return float(np.median(generated) / np.median(few_shot))
