"""The dataset layer: read an MVTec-format category (or a plain images/ + masks/ folder), check it,
split each defect type few-shot, and find the object's foreground mask.

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

import functools
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold, threshold_otsu

from dualanodiff.errors import UserError

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
    return "object" if _has_plain_border(load_image(sample)) else "texture"


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


def _has_plain_border(image: np.ndarray) -> bool:
    """An object on a plain background: the border deviates from a smooth background far less than
    the brightest-differing pixels of the image do (a texture differs as much at its border)."""
    distance = _background_distance(image.astype(np.float32), _background_model(image))
    border_spread = np.percentile(distance[_border_frame(image.shape)], 90)
    return border_spread < 0.35 * np.percentile(distance, 99)


def foreground_mask(
    image: np.ndarray, kind: str = "auto", u2net_weights: str | Path | None = None
) -> np.ndarray:
    """The object's foreground mask M_f (HxW bool) for background compensation.

    ``kind="texture"`` gives the whole image. ``"object"`` separates the object from a plain background:
    the background colour is the median of the image border, pixels far from it (Otsu threshold on the
    colour distance, with the border's own spread as a floor) are closed, hole-filled, opened, and the
    largest components are kept. ``"auto"`` picks by how uniform the border is. With `u2net_weights`
    (a local TorchScript U^2-Net) objects are segmented by its saliency map instead. If nothing stands
    out from the background the whole image is returned, so that no defect is judged off the object.
    """
    if kind not in ("auto", "object", "texture"):
        raise UserError(f"foreground {kind!r}: must be 'auto', 'object' or 'texture'")
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    h, w = image.shape[:2]
    if kind == "auto":
        kind = "object" if _has_plain_border(image) else "texture"
    if kind == "texture":
        return np.ones((h, w), bool)
    if u2net_weights:
        mask = _u2net_mask(image, Path(u2net_weights))
    else:
        mask = _plain_background_mask(image)
    return mask if mask.any() else np.ones((h, w), bool)


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


@functools.lru_cache(maxsize=2)
def _load_u2net(path: str):
    import torch

    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is how U^2-Net ships
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{path}: not a TorchScript U^2-Net ({str(exc).splitlines()[0]}); export it with torch.jit.save") from None
    return model.eval()


def _u2net_mask(image: np.ndarray, weights: Path) -> np.ndarray:
    """Saliency from a TorchScript U^2-Net: input 1x3x320x320 in [0, 1], ImageNet-normalised; the first
    output (the fused map) is min-max normalised as in the official code and thresholded at 0.5."""
    import torch
    import torch.nn.functional as F

    if not weights.is_file():
        raise UserError(
            f"{weights}: U^2-Net weights not found; give a local TorchScript file (torch.jit.save of U^2-Net) "
            "or leave u2net_weights empty to use the weight-free default"
        )
    model = _load_u2net(str(weights))
    h, w = image.shape[:2]
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(320, 320), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model((x - mean) / std)
    if isinstance(out, (tuple, list)):
        out = out[0]
    saliency = out.reshape(1, 1, *out.shape[-2:]).float()
    saliency = (saliency - saliency.min()) / (saliency.max() - saliency.min()).clamp_min(1e-8)
    saliency = F.interpolate(saliency, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    return _largest_components(ndimage.binary_fill_holes(saliency > 0.5))
