"""The object's foreground mask M_f: what background compensation keeps out of the background image.

Objects on a plain background are separated by their colour distance from a plane fitted to the image
border (weight-free), or by a local U²-Net's saliency; textures are foreground everywhere::

    fg = foreground_mask(image)                  # HxWx3 uint8 -> HxW bool, kind picked by the border
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold, threshold_otsu

from dualanodiff.errors import UserError
from dualanodiff.masks.u2net import u2net_saliency


def _border_frame(shape: tuple[int, ...]) -> np.ndarray:
    """HxW bool frame about 3 % of the image wide."""
    h, w = shape[:2]
    b = max(2, round(0.03 * min(h, w)))
    frame = np.ones((h, w), bool)
    frame[b:-b, b:-b] = False
    return frame


def _background_model(image: np.ndarray) -> np.ndarray:
    """The plain background as a per-channel plane a + b*y + c*x fitted to the image border (HxWx3).

    A plane absorbs a lighting gradient; the fit is repeated on the 80 % best-fitting border pixels so
    that an object touching the border does not drag it.
    """
    h, w = image.shape[:2]
    frame = _border_frame(image.shape)
    yy, xx = np.nonzero(frame)
    design = np.stack([np.ones(len(yy)), yy / h - 0.5, xx / w - 0.5], axis=1)
    values = image[frame].astype(np.float64)
    keep = np.ones(len(values), bool)
    for _ in range(2):
        coefficients, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        residual = np.linalg.norm(values - design @ coefficients, axis=1)
        keep = residual <= np.percentile(residual, 80)
    gy, gx = np.mgrid[0:h, 0:w]
    full = np.stack([np.ones((h, w)), gy / h - 0.5, gx / w - 0.5], axis=-1)
    return (full @ coefficients).astype(np.float32)


def has_plain_border(image: np.ndarray) -> bool:
    """An object on a plain background: the border deviates from a smooth background far less than
    the brightest-differing pixels of the image do (a texture differs as much at its border)."""
    distance = _background_distance(image.astype(np.float32), _background_model(image))
    border_spread = np.percentile(distance[_border_frame(image.shape)], 90)
    return border_spread < 0.35 * np.percentile(distance, 99)


def foreground_mask(
    image: np.ndarray, kind: str = "auto", u2net_weights: str | Path | None = None, whole_if_none: bool = True
) -> np.ndarray:
    """The object's foreground mask M_f (HxW bool) for background compensation.

    ``kind="texture"`` gives the whole image. ``"object"`` separates the object from a plain background:
    the background colour is the median of the image border, pixels far from it (Otsu threshold on the
    colour distance, with the border's own spread as a floor) are closed, hole-filled, opened, and the
    largest components are kept. ``"auto"`` picks by how uniform the border is. With `u2net_weights`
    (a local TorchScript U^2-Net) objects are segmented by its saliency map instead. If nothing stands
    out from the background the whole image is returned, so that no defect is judged off the object
    (``whole_if_none=False``: an empty mask, for judging generated images that may have lost the object).
    """
    if kind not in ("auto", "object", "texture"):
        raise UserError(f"foreground {kind!r}: must be 'auto', 'object' or 'texture'")
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    h, w = image.shape[:2]
    if kind == "auto":
        kind = "object" if has_plain_border(image) else "texture"
    if kind == "texture":
        return np.ones((h, w), bool)
    if u2net_weights:
        mask = _largest_components(ndimage.binary_fill_holes(u2net_saliency(image, u2net_weights) > 0.5))
    else:
        mask = _plain_background_mask(image)
    return mask if mask.any() or not whole_if_none else np.ones((h, w), bool)


def _disk(radius: int) -> np.ndarray:
    r = max(1, int(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy * yy + xx * xx <= r * r


def _background_distance(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Colour distance from the background (HxWx3 each), darkening counted half: a cast shadow only
    darkens the background, while an object also changes its hue or is brighter."""
    difference = image - background
    direction = background / np.maximum(np.linalg.norm(background, axis=-1, keepdims=True), 1e-6)
    along = (difference * direction).sum(-1)
    across = difference - along[..., None] * direction
    return np.sqrt((across**2).sum(-1) + np.where(along > 0, along, 0.5 * along) ** 2)


def _plain_background_mask(image: np.ndarray) -> np.ndarray:
    side = min(image.shape[:2])
    smooth = ndimage.gaussian_filter(image.astype(np.float32), (max(0.5, side / 256), max(0.5, side / 256), 0))
    distance = _background_distance(smooth, _background_model(smooth))
    floor = float(np.percentile(distance[_border_frame(image.shape)], 99)) * 1.5 + 1.0
    high = max(float(threshold_otsu(distance)), floor)
    mask = apply_hysteresis_threshold(distance, max(floor, 0.5 * high), high)
    mask = ndimage.binary_closing(mask, _disk(side / 64), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    mask = ndimage.binary_opening(mask, _disk(side / 128))
    return _largest_components(mask)


def _largest_components(mask: np.ndarray, share: float = 0.3) -> np.ndarray:
    """Keep the largest connected component and any other at least `share` of its size."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= share * sizes.max()) + 1
    return np.isin(labels, keep)
