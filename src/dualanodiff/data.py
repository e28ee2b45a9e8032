"""The dataset layer: read an MVTec-format category (or a plain images/ + masks/ folder), check it,
and split each defect type few-shot (the object's foreground mask lives in `dualanodiff.masks`).

Two layouts are accepted::

    <category>/train/good/*.png                       <folder>/images/<stem>.png
    <category>/test/good/*.png                        <folder>/masks/<stem>.png   (or <stem>_mask.png)
    <category>/test/<defect>/<stem>.png
    <category>/ground_truth/<defect>/<stem>_mask.png

Extensions are png/jpg/jpeg/bmp/tif/tiff in any case. In the folder layout all pairs form one defect
type named after the folder. `open_category` checks the whole folder at once (every file readable, every
defect image with a mask of the same size, no stray files) so a bad dataset fails before training.

Masks may be stored 0/1 or 0/255; JPEG masks carry compression noise (many grey levels), so any mask
whose maximum exceeds 1 is binarised at 128.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from dualanodiff.errors import UserError
from dualanodiff.masks.foreground import has_plain_border

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_EXTENSION_LIST = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: "img2" < "img10"; ties broken by the plain name."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p) + ((2, 0, name),)


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; check the path") from None
    except _READ_ERRORS as exc:
        raise UserError(f"{path}: cannot read image ({exc}); replace or remove the file") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale images scaled to 8 bits (PIL's convert would clip them)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        return Image.fromarray(np.clip(np.round(array / top * 255), 0, 255).astype(np.uint8), "L")
    return image


def load_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB; greyscale, RGBA, palette and 16-bit images are converted."""
    path = Path(path)
    with _open(path) as image:
        try:
            return np.asarray(_to_8bit(image).convert("RGB"))
        except _READ_ERRORS as exc:
            raise UserError(f"{path}: cannot decode image ({exc}); replace or remove the file") from None


def load_mask(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """HxW bool. 0/1 masks: > 0; 0..255 masks (JPEG noise included): >= 128.

    `shape` (H, W), when given, must match: a mask of another size is a `UserError`.
    """
    path = Path(path)
    with _open(path) as image:
        try:
            image = _to_8bit(image)
            array = np.asarray(image.convert("L") if image.mode != "L" else image)
        except _READ_ERRORS as exc:
            raise UserError(f"{path}: cannot decode mask ({exc}); replace or remove the file") from None
    if shape is not None and array.shape != tuple(shape):
        raise UserError(
            f"{path}: mask is {array.shape[1]}x{array.shape[0]} but its image is {shape[1]}x{shape[0]}; "
            "resize the mask to the image size"
        )
    return array > 0 if array.max() <= 1 else array >= 128


@dataclass(frozen=True)
class Pair:
    stem: str
    image: Path
    mask: Path


@dataclass
class Category:
    root: Path
    name: str
    layout: Literal["mvtec", "folder"]
    kind: Literal["object", "texture"]  # object on a plain background vs texture
    defects: dict[str, list[Pair]]  # defect type -> pairs in natural file-name order
    train_good: list[Path] = field(default_factory=list)  # natural order; empty for the folder layout
    test_good: list[Path] = field(default_factory=list)

    def image_size(self) -> tuple[int, int]:
        """(width, height) of the first defect image (images in a category need not share one)."""
        return _header_size(next(iter(self.defects.values()))[0].image)


# ---------------------------------------------------------------------------------------------- layout


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; checks that the file is an image without decoding it."""
    with _open(path) as image:
        try:
            if image.format == "PNG":
                image.verify()  # checks chunk CRCs without decompressing: catches damaged files cheaply
        except _READ_ERRORS as exc:
            raise UserError(f"{path}: damaged image ({exc}); replace or remove the file") from None
        return image.size


def _list_images(folder: Path, what: str) -> list[Path]:
    """Image files of `folder` in natural order; a stray file, a subfolder or no images is an error.

    Hidden files (".DS_Store", "._x.png") are ignored.
    """
    if not folder.is_dir():
        raise UserError(f"{folder}: {what} folder does not exist; check the dataset layout")
    images = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            raise UserError(f"{entry}: unexpected folder inside the {what} folder; move it out")
        if entry.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(f"{entry}: not an image file (expected {_EXTENSION_LIST}); remove it or move it out")
        images.append(entry)
    if not images:
        raise UserError(f"{folder}: {what} folder holds no images; add images or remove the folder")
    return sorted(images, key=lambda p: natural_key(p.name))


def _pairs(images: list[Path], mask_dir: Path, mask_files: list[Path]) -> list[Pair]:
    """Match every image with `<stem>_mask.<ext>` or `<stem>.<ext>` in `mask_dir`, checking sizes."""
    by_stem: dict[str, Path] = {}
    for mask in mask_files:
        by_stem.setdefault(mask.stem, mask)
    pairs = []
    for image in images:
        mask = by_stem.get(f"{image.stem}_mask") or by_stem.get(image.stem)
        if mask is None:
            raise UserError(
                f"{image}: no mask in {mask_dir} (expected {image.stem}_mask.png or {image.stem}.png); "
                "add the mask or remove the image"
            )
        image_size, mask_size = _header_size(image), _header_size(mask)
        if image_size != mask_size:
            raise UserError(
                f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but {image.name} is {image_size[0]}x{image_size[1]}; "
                "resize the mask to the image size"
            )
        pairs.append(Pair(image.stem, image, mask))
    return pairs


def _mask_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return _list_images(folder, "mask") if any(not e.name.startswith(".") for e in folder.iterdir()) else []


def open_category(path: Path | str) -> Category:
    """Read and check a category folder (MVTec layout or images/ + masks/); `UserError` names the bad file."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(
            f"{root}: directory does not exist; pass a category folder (train/ test/ ground_truth/) "
            "or a folder with images/ and masks/"
        )
    if (root / "test").is_dir():
        return _open_mvtec(root)
    if (root / "images").is_dir():
        return _open_folder(root)
    raise UserError(
        f"{root}: neither an MVTec category (test/<defect>/ + ground_truth/<defect>/) nor a custom folder "
        "(images/ + masks/); point to a folder with one of these layouts"
    )


def _open_mvtec(root: Path) -> Category:
    test = root / "test"
    defects: dict[str, list[Pair]] = {}
    test_good: list[Path] = []
    for folder in sorted((p for p in test.iterdir() if not p.name.startswith(".")), key=lambda p: natural_key(p.name)):
        if not folder.is_dir():
            raise UserError(f"{folder}: stray file in test/ (expected one folder per defect type); move it out")
        if folder.name == "good":
            test_good = _checked_images(folder, "test/good")
        else:
            mask_dir = root / "ground_truth" / folder.name
            defects[folder.name] = _pairs(_list_images(folder, "defect"), mask_dir, _mask_files(mask_dir))
    if not defects:
        raise UserError(f"{test}: no defect folders besides good/; add test/<defect>/ with ground_truth masks")
    train_dir = root / "train" / "good"
    train_good = _checked_images(train_dir, "train/good") if train_dir.is_dir() else []
    kind = _category_kind((train_good or test_good or [next(iter(defects.values()))[0].image])[0])
    return Category(root, root.name, "mvtec", kind, defects, train_good, test_good)


def _checked_images(folder: Path, what: str) -> list[Path]:
    images = _list_images(folder, what)
    for image in images:
        _header_size(image)
    return images


def _open_folder(root: Path) -> Category:
    images = _list_images(root / "images", "images")
    if not (root / "masks").is_dir():
        raise UserError(f"{root / 'masks'}: masks folder does not exist; add masks/ with one mask per image")
    pairs = _pairs(images, root / "masks", _mask_files(root / "masks"))
    return Category(root, root.name, "folder", _category_kind(pairs[0].image), {root.name: pairs})


def _category_kind(sample: Path) -> Literal["object", "texture"]:
    return "object" if has_plain_border(load_image(sample)) else "texture"


# ---------------------------------------------------------------------------------------------- split


def few_shot_split(pairs: list[Pair], rounding: str = "floor") -> tuple[list[Pair], list[Pair]]:
    """Per defect type: in natural file-name order, the first floor(n/3) pairs (ceil(n/3) with
    ``rounding="ceil"``, the official code's rule) are training, the rest test. With 10 pairs: floor
    gives 3 training and 7 test pairs (disjoint, as evaluation needs), ceil gives 4 and 6.
    """
    if rounding not in ("floor", "ceil"):
        raise UserError(f"--split-rounding {rounding}: must be 'floor' or 'ceil'")
    ordered = sorted(pairs, key=lambda p: natural_key(p.stem))
    n = len(ordered)
    k = n // 3 if rounding == "floor" else math.ceil(n / 3)
    if k == 0:
        where = ordered[0].image.parent if ordered else "defect type"
        need = "3 (floor rounding) or 1 (--split-rounding ceil)"
        raise UserError(f"{where}: {n} image-mask pair(s) leave none for training; need at least {need}")
    return ordered[:k], ordered[k:]


def recorded_split(category_dir: Path | str, defect: str, train_stems: list[str]) -> tuple[list[Pair], list[Pair]]:
    """A run's few-shot split as its config records it (`Config.split["train"]`): the defect type's pairs
    named there, and the others, each in the category's order."""
    train = set(train_stems)
    pairs = open_category(category_dir).defects.get(defect, [])
    return [p for p in pairs if p.stem in train], [p for p in pairs if p.stem not in train]


def empty_masks(pairs: list[Pair]) -> list[Pair]:
    """The pairs whose mask marks no pixel: a few-shot pair without its defect marked teaches the
    anomaly branch a blank part image (and crop-paste has nothing to cut)."""
    return [pair for pair in pairs if not load_mask(pair.mask).any()]


def with_marked_masks(pairs: list[Pair], allow_empty: bool, warn: Callable[[str], None]) -> list[Pair]:
    """``pairs`` without those whose mask is empty: refused (a `UserError` naming the files), or with
    ``allow_empty`` (``--allow-empty-masks``) skipped after a warning; at least one must remain."""
    empty = empty_masks(pairs)
    if not empty:
        return pairs
    files = ", ".join(str(pair.mask) for pair in empty)
    if not allow_empty:
        raise UserError(
            f"{files}: mask is empty (all zero); a few-shot training pair needs its defect marked: fix the mask, "
            "remove the pair, or pass --allow-empty-masks to skip it"
        )
    if len(empty) == len(pairs):
        raise UserError(f"{files}: every few-shot training mask is empty; mark the defects in the masks")
    warn(f"warning: skipping {len(empty)} of {len(pairs)} few-shot training pairs, their mask is empty: {files}")
    return [pair for pair in pairs if pair not in empty]


# ---------------------------------------------------------------------------------------------- foreground
