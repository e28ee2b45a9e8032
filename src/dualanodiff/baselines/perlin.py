"""Perlin (DRAEM): a thresholded, rotated Perlin-noise mask, with a procedural colour texture
blended in as ``img * (1 - m) + (1 - beta) * src * m + beta * img * m``, ``beta ~ U(0, 0.8)``;
on object categories the mask is restricted to the foreground.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from dualanodiff.baselines.common import (
    MAX_DRAWS,
    BaselinePair,
    Normal,
    NormalPool,
    anomaly_part,
    defect_pairs,
    write_pairs,
)
from dualanodiff.data import Category
from dualanodiff.errors import UserError

PERLIN_MAX_OCTAVE = 6  # DRAEM: lattice cells per axis 2**k, k drawn from 0..5 (torch.randint(0, 6))
PERLIN_THRESHOLD = 0.5
BETA_MAX = 0.8


def _fade(t: np.ndarray) -> np.ndarray:
    return ((6 * t - 15) * t + 10) * t**3


def gradient_noise(u: np.ndarray, v: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Perlin gradient noise at lattice coordinates (u along x, v along y, both >= 0).

    `gradients` is an (rows, cols, 2) array of (gx, gy) vectors, one per lattice node, covering
    ``floor(v) + 1`` and ``floor(u) + 1``. Each corner contributes ``g . (p - corner)``; the four are
    interpolated with the fade 6t^5 - 15t^4 + 10t^3, so the noise is 0 at every node and C2-smooth.
    """
    i, j = np.floor(v).astype(int), np.floor(u).astype(int)
    fy, fx = v - i, u - j

    def corner(di: int, dj: int) -> np.ndarray:
        g = gradients[i + di, j + dj]
        return g[..., 0] * (fx - dj) + g[..., 1] * (fy - di)

    sx, sy = _fade(fx), _fade(fy)
    top = corner(0, 0) + sx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + sx * (corner(1, 1) - corner(1, 0))
    return top + sy * (bottom - top)


def perlin_noise(
    shape: tuple[int, int], scale: tuple[int, int], rng: np.random.Generator, angle: float = 0.0
) -> np.ndarray:
    """HxW Perlin noise with ``scale = (cells_y, cells_x)`` lattice cells across the image, rotated by
    `angle` degrees about the image centre (values within +-sqrt(2)/2).

    Pixel ``(y, x)`` sits at lattice point ``(y * cells_y / H, x * cells_x / W)`` before rotation (as
    DRAEM's ``rand_perlin_2d``), so unrotated noise is 0 on every ``H / cells_y``-th row.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x = cx + c * (xx - cx) - s * (yy - cy)  # sample the unrotated noise at the inversely rotated point
    y = cy + s * (xx - cx) + c * (yy - cy)
    u, v = x * scale[1] / w, y * scale[0] / h
    u, v = u - math.floor(u.min()), v - math.floor(v.min())
    rows, cols = int(math.floor(v.max())) + 2, int(math.floor(u.max())) + 2
    theta = rng.uniform(0, 2 * math.pi, (rows, cols))
    return gradient_noise(u, v, np.stack([np.cos(theta), np.sin(theta)], axis=-1))


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """DRAEM's anomaly mask: noise with 2**k cells per axis (k independent per axis), rotated by
    U(-90, 90) degrees, thresholded at 0.5. May be empty; returns the mask and its parameters."""
    scale = (2 ** int(rng.integers(PERLIN_MAX_OCTAVE)), 2 ** int(rng.integers(PERLIN_MAX_OCTAVE)))
    angle = float(rng.uniform(-90, 90))
    noise = perlin_noise(shape, scale, rng, angle)
    return noise > PERLIN_THRESHOLD, {"scale": list(scale), "angle": angle}


def _fractal(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Multi-octave Perlin noise normalised to [0, 1]."""
    base = int(rng.integers(1, 5))
    total = sum(0.5**o * perlin_noise(shape, (base * 2**o, base * 2**o), rng) for o in range(4))
    return (total - total.min()) / max(float(np.ptp(total)), 1e-9)


def _stripes(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Wavy stripes in [0, 1] at a random angle and period."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(4, max(8, min(h, w) / 4))
    warp = rng.uniform(0, 3) * perlin_noise(shape, (2, 2), rng)
    return 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + warp)


def _colour_augment(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three of DRAEM's colour augmentations, drawn at random: gamma, brightness, hue/saturation,
    solarize, posterize, invert."""

    def gamma(t):
        return np.round(255 * (t / 255.0) ** rng.uniform(0.5, 2.0))

    def brightness(t):
        return t * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)

    def hue(t):
        hsv = cv2.cvtColor(np.clip(t, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.int32)
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float64)

    def solarize(t):
        return np.where(t >= 128, 255 - t, t)

    def posterize(t):
        bits = int(rng.integers(4, 9))
        return (np.clip(t, 0, 255).astype(np.uint8) >> (8 - bits) << (8 - bits)).astype(np.float64)

    def invert(t):
        return 255 - t

    augmentations = [gamma, brightness, hue, solarize, posterize, invert]
    result = texture.astype(np.float64)
    for index in rng.choice(len(augmentations), 3, replace=False):
        result = np.clip(augmentations[index](result), 0, 255)
    return result.astype(np.uint8)


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 uint8 anomaly source (DRAEM uses DTD photos; nothing is downloaded here): fractal
    noise or wavy stripes mapped through a ramp of 2-3 random colours, then colour-augmented."""
    field = _fractal(shape, rng) if rng.integers(2) == 0 else _stripes(shape, rng)
    colours = rng.uniform(0, 255, (int(rng.integers(2, 4)), 3))
    stops = np.linspace(0, 1, len(colours))
    texture = np.stack([np.interp(field, stops, colours[:, c]) for c in range(3)], axis=-1)
    return _colour_augment(np.round(texture).astype(np.uint8), rng)


def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """DRAEM's blend ``img * (1 - m) + (1 - beta) * src * m + beta * img * m`` for a binary mask,
    rounded to uint8."""
    mixed = np.round((1 - beta) * source.astype(np.float64) + beta * image.astype(np.float64))
    return np.where(mask[..., None], mixed.astype(np.uint8), image)


def perlin_pair(rng: np.random.Generator, normals: Sequence[Normal]) -> BaselinePair:
    """One DRAEM-style pair on a random normal image; the mask (restricted to the foreground) is
    redrawn until it is non-empty, and is exactly where the blend was applied."""
    target = normals[int(rng.integers(len(normals)))]
    for _ in range(MAX_DRAWS):
        mask, params = perlin_mask(target.foreground.shape, rng)
        mask &= target.foreground
        if mask.any():
            break
    else:
        raise UserError(
            f"perlin: {target.stem}: no Perlin mask met the object's foreground after {MAX_DRAWS} draws; "
            "check the train/good images show the object"
        )
    source = procedural_texture(target.foreground.shape, rng)
    beta = float(rng.uniform(0, BETA_MAX))
    image = blend(target.image, source, mask, beta)
    record = {"target": target.stem, "beta": beta, **params}
    return BaselinePair(image, mask, anomaly_part(image, mask), record, target.foreground)


def perlin(
    category: Category,
    defect: str,
    num: int,
    out: Path,
    seed: int = 0,
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write `num` DRAEM-style Perlin pairs under ``out/<category>/<defect>`` (the defect type only
    names the folder, so that evaluation matches it with the real test images); returns that folder."""
    defect_pairs(category, defect)
    normals = NormalPool(category)
    return write_pairs(category, defect, num, Path(out), seed, {"generator": "perlin"}, force, progress,
                lambda rng: perlin_pair(rng, normals))
