"""Pixel conversions and resizing: the one home for how images move between files, arrays and the model.

Images on disk and in arrays are HxWx3 uint8 RGB; masks are HxW bool; the model sees float pixels in
[-1, 1], channels first (3xHxW, or Nx3xHxW for a batch)::

    pixels = to_model_range(load_image("0.png"))      # 3xHxW float in [-1, 1]
    back = to_uint8(pixels)                            # HxWx3 uint8, equal to the input
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

Size = int | tuple[int, int]  # a square side, or (width, height) as PIL counts them


def resize_image(image: np.ndarray, size: Size, resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """HxWx3 uint8 to ``size`` (the identity when it already matches): bicubic for the model's inputs,
    ``Image.Resampling.LANCZOS`` for pairs written at a dataset's resolution (sharper)."""
    return np.asarray(Image.fromarray(image).resize(_width_height(size), resample))


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """HxW bool to ``size`` by nearest neighbour: it stays binary and aligned with its resized image
    (a 2x upscale maps pixels 2y and 2y+1 to source pixel y)."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(_width_height(size), Image.NEAREST)) > 127


GREY_TOLERANCE = 2  # grey levels the channels of a grey photo may differ by (JPEG rounding)


def is_grey(image: np.ndarray) -> bool:
    """Whether an HxWx3 uint8 image is a grey photo stored as RGB: its channels equal at every pixel (within
    `GREY_TOLERANCE`)."""
    spread = image.max(axis=-1).astype(np.int16) - image.min(axis=-1)
    return bool(spread.max(initial=0) <= GREY_TOLERANCE)


def as_grey(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 with every channel the image's luma (ITU-R 601, PIL's "L")."""
    return np.asarray(Image.fromarray(image).convert("L").convert("RGB"))


def _width_height(size: Size) -> tuple[int, int]:
    return (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))


def as_batch(pictures: list[np.ndarray]) -> torch.Tensor:
    """uint8 H x W x 3 pictures of one size as an N x 3 x H x W tensor."""
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()


def to_model_range(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [-1, 1]."""
    return batch_to_model_range(torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1))


def batch_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """(N x) 3 x H x W uint8 tensor -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N x) 3 x H x W float in [-1, 1] -> (N x) H x W x 3 uint8 (rounded, clipped)."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()

