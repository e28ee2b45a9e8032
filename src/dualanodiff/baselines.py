"""The baseline generators the paper compares against, writing the same layout as `generate`.

* **Crop-paste**: the real few-shot defects (training split only) are cut out with their masks,
  flipped, rotated (any angle for objects, multiples of 90 degrees for textures) and scaled
  (0.75-1.25), and pasted onto a random ``train/good`` image; on object categories only where the
  object is (the position is chosen among those whose overlap with the foreground is largest).
* **Perlin** (DRAEM): a thresholded, rotated Perlin-noise mask, with a procedural colour texture
  blended in as ``img * (1 - m) + (1 - beta) * src * m + beta * img * m``, ``beta ~ U(0, 0.8)``;
  on object categories the mask is restricted to the foreground.

The mask of a pair is exactly the set of pixels the generator wrote, and the part image follows the
generator's anomaly-part convention (the pair's pixels inside the mask, flat mid-grey 127 outside).
Each manifest row holds the pair's ``alignment`` (`alignment_score` on the target's foreground): the
positive control for the generated pairs' score.
Pair ``i`` is made from ``np.random.default_rng(seed + attempt)`` alone, so any pair regenerates
exactly from the seed in its manifest row and a re-run with a larger ``num`` only adds pairs::

    cat = open_category("mvtec/hazelnut")
    out_dir = crop_paste(cat, "crack", num=100, out=Path("baselines/crop-paste"))
    rows = PairWriter(Path("baselines/crop-paste"), "hazelnut", "crack").kept()
    pair = crop_paste_pair(np.random.default_rng(rows[5]["seed"]), training_defects(cat, "crack"),
                           NormalPool(cat), cat.kind)   # == pair 5 on disk
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dualanodiff.alignment import alignment_score
from dualanodiff.data import (
    Category,
    few_shot_split,
    load_image,
    load_mask,
    with_marked_masks,
)
from dualanodiff.errors import UserError
from dualanodiff.masks import foreground_mask
from dualanodiff.pairs import PairWriter

PART_GREY = 127  # the anomaly-part image outside the mask: 0 in [-1, 1] space, as uint8
SCALE_RANGE = (0.75, 1.25)
CROP_MARGIN = 4  # pixels kept around a defect's bounding box so interpolation never reads past it
PERLIN_MAX_OCTAVE = 6  # DRAEM: lattice cells per axis 2**k, k drawn from 0..5 (torch.randint(0, 6))
PERLIN_THRESHOLD = 0.5
BETA_MAX = 0.8
_MAX_DRAWS = 100  # redraws (empty mask, nowhere to place) before a pair is declared impossible


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


# ---------------------------------------------------------------------------------------------- inputs


def training_defects(
    category: Category, defect: str, rounding: str = "floor", allow_empty: bool = False,
    warn: Callable[[str], None] = lambda message: None,
) -> list[Defect]:
    """The few-shot training pairs of `defect` (never its test images), loaded; a pair whose mask is
    empty is refused, or skipped with ``allow_empty``, as `train` does (`with_marked_masks`)."""
    train, _ = few_shot_split(_defect_pairs(category, defect), rounding)
    defects = []
    for pair in with_marked_masks(train, allow_empty, warn):
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


def _defect_pairs(category: Category, defect: str):
    if defect not in category.defects:
        raise UserError(f"--defect {defect}: not a defect type of {category.name}; choose from {sorted(category.defects)}")
    return category.defects[defect]


def anomaly_part(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The anomaly-part image: `image` inside `mask`, flat grey `PART_GREY` outside."""
    return np.where(mask[..., None], image, np.uint8(PART_GREY))


# ---------------------------------------------------------------------------------------------- crop-paste


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


def crop_paste_pair(
    rng: np.random.Generator, defects: Sequence[Defect], normals: Sequence[Normal], kind: str
) -> BaselinePair:
    """Paste one randomly transformed training defect onto a random normal image.

    Objects: any rotation, and the pasted pixels are those of the transformed mask that land on the
    target's foreground, at a position where that share is largest. Textures: rotations by multiples
    of 90 degrees (their structure is axis-aligned), anywhere. The mask is exactly the pasted pixels.
    """
    for _ in range(_MAX_DRAWS):
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
        return BaselinePair(image, mask, anomaly_part(image, mask), record, target.foreground)
    raise UserError(
        f"crop-paste: no transformed defect could be placed on the object after {_MAX_DRAWS} draws; "
        "check the train/good images show the object"
    )


# ---------------------------------------------------------------------------------------------- Perlin


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
    for _ in range(_MAX_DRAWS):
        mask, params = perlin_mask(target.foreground.shape, rng)
        mask &= target.foreground
        if mask.any():
            break
    else:
        raise UserError(
            f"perlin: {target.stem}: no Perlin mask met the object's foreground after {_MAX_DRAWS} draws; "
            "check the train/good images show the object"
        )
    source = procedural_texture(target.foreground.shape, rng)
    beta = float(rng.uniform(0, BETA_MAX))
    image = blend(target.image, source, mask, beta)
    record = {"target": target.stem, "beta": beta, **params}
    return BaselinePair(image, mask, anomaly_part(image, mask), record, target.foreground)


# ---------------------------------------------------------------------------------------------- runs


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
    return _run(category, defect, num, Path(out), seed, settings, force, progress,
                lambda rng: crop_paste_pair(rng, defects, normals, category.kind))


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
    _defect_pairs(category, defect)
    normals = NormalPool(category)
    return _run(category, defect, num, Path(out), seed, {"generator": "perlin"}, force, progress,
                lambda rng: perlin_pair(rng, normals))


def _run(category, defect, num, out, seed, settings, force, progress, make) -> Path:
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
