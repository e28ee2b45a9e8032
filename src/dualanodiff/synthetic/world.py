"""The pretraining world of the embedded base: normal, defective, part and background images captioned
as the few-shot prompts read, each fixed by its (seed, stream, index)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dualanodiff.synthetic.dataset import (
    PRETRAIN_FAMILIES,
    _category,
    _to_uint8,
    render_sample,
)
from dualanodiff.synthetic.defects import _recolour

WORLD_KINDS = ("normal", "defective", "part", "background")
"""The four kinds of image the embedded base is pretrained on, as DualAnoDiff's branches and BCM see them:
a normal image, a defective image I, the defect-only part image I*M and the background (1 - M_f) * I, both
products taken in [-1, 1] pixel space, so what is multiplied away is mid-grey (128), not black."""

WORLD_MIX = {"normal": 0.35, "defective": 0.35, "part": 0.18, "background": 0.12}
CAPTION_WORDS = ("a", "photo", "of", "with", "texture", "background")
GREY = np.uint8(128)  # 0 in [-1, 1], rounded as the training code rounds it


@dataclass
class WorldItem:
    """One pretraining image (uint8 HxWx3), its caption and what it shows."""

    image: np.ndarray
    caption: str
    kind: str  # one of WORLD_KINDS
    category: str
    defect: str | None


def thing_name(category: str) -> str:
    """How captions name a category: "nut", "metal nut", "weave texture" (as ``training.fill_prompt`` does)."""
    return category.replace("_", " ") + (" texture" if _category(category).kind == "texture" else "")


def world_caption(category: str, defect: str | None, kind: str, rng: np.random.Generator) -> str:
    """A caption in the exact forms the few-shot prompts take: "a {object} with {defect}" for a defective
    image, "{defect}" for a part image; "a {object}" or "a photo of a {object}" for a normal one and
    "a {object} background" for a background."""
    thing = thing_name(category)
    if kind == "defective":
        return f"a {thing} with {defect.replace('_', ' ')}"
    if kind == "part":
        return defect.replace("_", " ")
    if kind == "background":
        return f"a {thing} background"
    return f"a photo of a {thing}" if rng.random() < 0.3 else f"a {thing}"


def world_words(families: tuple[str, ...] | list[str] = PRETRAIN_FAMILIES) -> list[str]:
    """The words of every caption over `families` except the category names: a tokenizer that keeps
    these whole and spells the names in characters can name a category it never saw."""
    words = set(CAPTION_WORDS)
    for name in families:
        for defect in _category(name).defects:
            words.update(defect.split("_"))
    return sorted(words)


def part_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """I*M in [-1, 1] space: the image inside the defect mask, mid-grey elsewhere."""
    return np.where(mask[..., None], image, GREY)


def background_image(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """(1 - M_f) * I in [-1, 1] space: the image with the object's region mid-grey."""
    return np.where(foreground[..., None], GREY, image)


def colour_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saturation, hue rotation about the grey axis, contrast and brightness: new looks, same shapes."""
    x = image.astype(np.float32) / 255.0
    grey = x.mean(-1, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        x = _recolour(x, rng.uniform(-np.pi, np.pi))
    x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean() * rng.uniform(0.75, 1.25)
    return _to_uint8(x)


def world_item(
    seed: int, stream: int, index: int, size: int, families: tuple[str, ...] | list[str] = PRETRAIN_FAMILIES,
    jitter: float = 0.3,
) -> WorldItem:
    """Pretraining image number `index` of `stream` (fixed by these coordinates alone).

    A family drawn uniformly from `families`, a kind drawn by ``WORLD_MIX`` (a texture has no background
    image: it draws a normal one instead), a defect type uniformly from the family's; colour jitter on a
    share `jitter` of the images (before the grey is laid in, so the grey stays exact), then a random
    flip / quarter turn.
    """
    rng = np.random.default_rng([seed, stream, index])
    category = str(families[rng.integers(len(families))])
    spec = _category(category)
    kind = str(rng.choice(list(WORLD_MIX), p=list(WORLD_MIX.values())))
    if kind == "background" and spec.kind == "texture":
        kind = "normal"
    defect = str(rng.choice(list(spec.defects))) if kind in ("defective", "part") else None
    sample = render_sample(category, defect, rng, size)
    image = colour_jitter(sample.image, rng) if rng.random() < jitter else sample.image
    if kind == "part":
        image = part_image(image, sample.mask)
    elif kind == "background":
        image = background_image(image, sample.foreground)
    turn = int(rng.integers(8))
    image = np.rot90(image, turn % 4)
    if turn >= 4:
        image = image[:, ::-1]
    caption = world_caption(category, defect, kind, rng)
    return WorldItem(np.ascontiguousarray(image), caption, kind, category, defect)
