"""The categories (benchmark and pretraining families), one sample's render with its exact mask, and
the MVTec-AD-layout writer behind `dualanodiff synth`."""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import yaml

from dualanodiff.errors import UserError
from dualanodiff.io import save_png
from dualanodiff.synthetic.defects import (
    _bent,
    _color,
    _contamination,
    _crack,
    _cut,
    _Defect,
    _fold,
    _glue,
    _hole,
    _loose_thread,
    _misprint,
    _missing_piece,
    _scratch,
    _stain,
    _texture_hole,
)
from dualanodiff.synthetic.draw import _Scene
from dualanodiff.synthetic.scenes import (
    _render_bottle,
    _render_carpet,
    _render_chip,
    _render_gear,
    _render_grid,
    _render_leather,
    _render_nut,
    _render_pill,
    _render_screw,
    _render_tablet,
    _render_tile,
    _render_washer,
    _render_weave,
    _render_wood,
)


@dataclass(frozen=True)
class SyntheticCategory:
    kind: Literal["object", "texture"]
    render: Callable[[np.random.Generator, int], _Scene]
    defects: dict[str, _Defect]


@dataclass
class Sample:
    """One render: ``image`` (uint8 HxWx3), its defect-free twin ``clean``, the exact ``mask``
    (bool HxW, all False for a normal image) and the true object ``foreground`` (bool HxW)."""

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    foreground: np.ndarray

CATEGORIES: dict[str, SyntheticCategory] = {
    "nut": SyntheticCategory(
        "object", _render_nut, {"scratch": _scratch, "hole": _hole, "crack": _crack, "stain": _stain}
    ),
    "pill": SyntheticCategory(
        "object", _render_pill, {"scratch": _scratch, "missing_piece": _missing_piece, "stain": _stain}
    ),
    "weave": SyntheticCategory(
        "texture", _render_weave, {"hole": _texture_hole, "cut": _cut, "stain": _stain, "thread": _loose_thread}
    ),
}
"""The benchmark categories: what ``write_dataset`` (and ``dualanodiff synth``) writes by default."""

DRAWERS: dict[str, dict[str, _Defect]] = {  # a defect type's drawer on a category of each kind
    "object": dict(scratch=_scratch, hole=_hole, crack=_crack, stain=_stain, missing_piece=_missing_piece, bent=_bent,
                   contamination=_contamination, misprint=_misprint, color=_color),
    "texture": dict(hole=_texture_hole, cut=_cut, stain=_stain, thread=_loose_thread, bent=_bent, scratch=_scratch,
                    crack=_crack, color=_color, glue=_glue, fold=_fold, contamination=_contamination),
}
RENDERERS = dict(screw=_render_screw, washer=_render_washer, gear=_render_gear, chip=_render_chip, tablet=_render_tablet,
                 bottle=_render_bottle, grid=_render_grid, wood=_render_wood, tile=_render_tile, leather=_render_leather,
                 carpet=_render_carpet)
FAMILY_TABLE = Path(__file__).resolve().parent.parent / "assets" / "synthetic" / "families.yaml"
FAMILIES: dict[str, SyntheticCategory] = {
    **CATEGORIES,
    **{name: SyntheticCategory(kind, RENDERERS[name], {defect: DRAWERS[kind][defect] for defect in defects})
       for name, (kind, defects) in yaml.safe_load(FAMILY_TABLE.read_text()).items()},
}
"""Every renderable category: the benchmark three and the further families of the pretraining world."""

HELD_OUT = "bottle"
"""Never shown to the embedded base in pretraining (normal or defective): a category it has not seen, for the
demo's held-out row. ``write_dataset(root, categories=[HELD_OUT])`` writes it like any other."""

PRETRAIN_FAMILIES: tuple[str, ...] = tuple(name for name in FAMILIES if name != HELD_OUT)


# ---------------------------------------------------------------------------------------------- rendering


def _category(name: str) -> SyntheticCategory:
    if name not in FAMILIES:
        raise UserError(f"{name}: unknown synthetic category; choose from {sorted(FAMILIES)}")
    return FAMILIES[name]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def render_sample(category: str, defect: str | None, rng: np.random.Generator, size: int) -> Sample:
    """Render one scene of `category`, with `defect` painted on it (or none), at `size` x `size`."""
    spec = _category(category)
    if defect is not None and defect not in spec.defects:
        raise UserError(f"{defect}: unknown defect for '{category}'; choose from {sorted(spec.defects)}")
    scene = spec.render(rng, size)
    clean = _to_uint8(scene.base + scene.noise)
    foreground = scene.foreground >= 0.5
    if defect is None:
        return Sample(clean, clean.copy(), np.zeros((size, size), bool), foreground)
    alpha, target = spec.defects[defect](scene, rng)
    mask = (alpha > 0.02) & foreground  # object defects stay on the object
    painted = scene.base * (1 - alpha[..., None]) + target * alpha[..., None]
    image = np.where(mask[..., None], _to_uint8(painted + scene.noise), clean)
    _nudge_unchanged(image, clean, target, scene.base, mask)
    return Sample(image, clean, mask, foreground)


def _nudge_unchanged(image, clean, target, base, mask) -> None:
    """Inside the mask, move pixels that rounded back to their clean value one level towards the
    defect's colour, so that the mask is exactly the set of altered pixels (an invisible change)."""
    same = mask & (image == clean).all(-1)
    if not same.any():
        return
    delta = (target - base)[same]
    channel = np.abs(delta).argmax(-1)
    rows = np.flatnonzero(same.ravel())
    values = image.reshape(-1, 3)[rows, channel].astype(np.int16)
    step = np.where(delta[np.arange(len(rows)), channel] >= 0, 1, -1)
    step = np.where((values + step < 0) | (values + step > 255), -step, step)
    image.reshape(-1, 3)[rows, channel] = (values + step).astype(np.uint8)


def render_normal(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free image of `category` (HxWx3 uint8)."""
    return render_sample(category, None, rng, size).image


def render_defect(category: str, defect: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of `category` with `defect` (HxWx3 uint8) and its exact mask (HxW bool)."""
    sample = render_sample(category, defect, rng, size)
    return sample.image, sample.mask


def _seed(seed: int, *parts: str | int) -> np.random.Generator:
    """A generator for one file, independent of how many other files are written."""
    words = [int(p) if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return np.random.default_rng([seed, *words])


def dataset_jobs(categories: list[str], per_defect: int, good: int) -> Iterator[tuple[str, str, str | None, int]]:
    """Every file `write_dataset` writes, as (category, split, defect or None, index)."""
    for name in categories:
        for split in ("train", "test"):
            for index in range(good):
                yield name, split, None, index
        for defect in _category(name).defects:
            for index in range(per_defect):
                yield name, "test", defect, index


def write_dataset(
    root: Path,
    seed: int = 0,
    size: int = 128,
    per_defect: int = 9,
    good: int = 12,
    categories: list[str] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[Path]:
    """Write the synthetic dataset in the MVTec AD layout under `root`; returns the category dirs.

    `good` normal images go to train/good and as many to test/good; `per_defect` images per defect type.
    Existing folders of the categories written are replaced. `progress` is called once per image.
    """
    root = Path(root)
    names = list(CATEGORIES) if categories is None else list(categories)
    for name in names:
        _category(name)
    if size < 32:
        raise UserError(f"--size {size}: images must be at least 32 pixels; pick 64, 128 or 256")
    if per_defect < 1 or good < 1:
        raise UserError("--per-defect/--good: need at least one image of each; pass a positive number")
    for name in names:
        if (root / name).exists():
            shutil.rmtree(root / name)
    for name, split, defect, index in dataset_jobs(names, per_defect, good):
        rng = _seed(seed, name, split, defect or "good", index)
        sample = render_sample(name, defect, rng, size)
        stem = f"{index:03d}"
        save_png(root / name / split / (defect or "good") / f"{stem}.png", sample.image)
        if defect is not None:
            save_png(root / name / "ground_truth" / defect / f"{stem}_mask.png", sample.mask.astype(np.uint8) * 255)
        if progress is not None:
            progress()
    return [root / name for name in names]
