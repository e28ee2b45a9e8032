"""The one optional U²-Net: a local TorchScript file, loaded once per path, giving a saliency map.

Preprocessing as the official U²-Net code: the image divided by its maximum, ImageNet mean/std, resized
to 320 x 320; the first output (the fused map; a tensor or the first of a tuple) min-max normalised and
resized back. Foreground segmentation and part-image masks threshold it their own way.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import cv2
import numpy as np

from dualanodiff.errors import UserError

INPUT_SIZE = 320
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@functools.lru_cache(maxsize=2)
def load_u2net(path: str):
    """The TorchScript model at `path` (eval mode), or a one-line `UserError` naming the file."""
    import torch

    if not Path(path).is_file():
        raise UserError(f"{path}: U²-Net weights not found; pass a local TorchScript U²-Net file (torch.jit.save of "
                        "the scripted model), or leave the option empty")
    try:
        with warnings.catch_warnings():  # deprecated in torch 2.x, yet the one format that needs no model code
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{path}: not a TorchScript model ({str(exc).splitlines()[0]}); export it with torch.jit.save") from None
    return model.eval()


def u2net_saliency(image: np.ndarray, weights: str | Path) -> np.ndarray:
    """HxW float saliency in [0, 1] of an HxW(x3) uint8 image."""
    import torch

    model = load_u2net(str(Path(weights).resolve()))
    rgb = np.atleast_3d(np.asarray(image))
    rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb[..., :3]
    height, width = rgb.shape[:2]
    x = cv2.resize(rgb, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    x = (x / max(float(x.max()), 1e-6) - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    saliency = out.detach().float().cpu().numpy().squeeze()
    if saliency.ndim != 2:
        raise UserError(f"{weights}: U²-Net output has shape {tuple(out.shape)}; expected one saliency map")
    span = float(saliency.max() - saliency.min())
    saliency = (saliency - saliency.min()) / span if span > 1e-12 else np.zeros_like(saliency)
    return cv2.resize(saliency, (width, height), interpolation=cv2.INTER_LINEAR)
