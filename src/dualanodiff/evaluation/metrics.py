"""Localization metrics of the anomaly-generation papers' downstream protocol (AnomalyDiffusion,
DualAnoDiff Table 2): pixel- and image-level AUROC, AP and F1-max of anomaly maps against masks, and
pixel AUPRO (MVTec AD).

Pixel metrics pool every pixel of every image. The image score is the maximum of the anomaly map
after a 21x21 average pool (stride 1, padding 10, zero padding counted in the mean, as torch's
``avg_pool2d(count_include_pad=True)`` and the reference code do); an image is anomalous when its
mask has any positive pixel. AP is scikit-learn's ``average_precision_score``; F1-max is the largest
F1 over every threshold of ``precision_recall_curve``.

AUPRO is MVTec AD's localization metric (Bergmann et al., IJCV 2021, and their evaluation code): the
per-region overlap (each 8-connected ground-truth region's share of pixels above the threshold,
averaged over all regions of all images) against the false-positive rate over all normal pixels,
integrated up to FPR 0.3 and divided by 0.3. The curve is exact (every distinct score a threshold);
anomalib's ``AUPRO`` resamples the per-region curves onto a grid, so its value can differ slightly.

Few-shot reproduction (`nearest_psnr`): each image's PSNR to the closest of a set of references (the
few-shot training images), to set generated images beside real unseen ones of the same defect type.

A metric that is undefined is ``nan``: AUROC needs both classes, AP, F1-max and AUPRO need a positive (AUPRO also a normal pixel). So an
evaluation on normal images only gives ``nan`` for all pixel and image metrics.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

IMAGE_POOL = 21  # window of the average pool that turns a map into an image score
AUPRO_FPR_LIMIT = 0.3  # MVTec AD's integration limit

METRIC_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "image_auroc", "image_ap", "image_f1max")


def localization_metrics(anomaly_maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The six metrics of Table 2 and pixel AUPRO for anomaly maps (N, H, W, float, higher = more
    anomalous) against ground-truth masks (N, H, W, bool or 0/1).

    Worked example: two 1x2 "images", the first with its right pixel anomalous and found::

        >>> maps = np.array([[[0.1, 0.9]], [[0.2, 0.3]]])
        >>> masks = np.array([[[0, 1]], [[0, 0]]], bool)
        >>> m = localization_metrics(maps, masks)
        >>> m["pixel_auroc"], m["pixel_ap"], m["pixel_f1max"], m["pixel_aupro"]  # 0.9 ranks above all 3 normal pixels
        (1.0, 1.0, 1.0, 1.0)
        >>> round(m["image_auroc"], 3)   # pooled scores: (0.1+0.9)/441 > (0.2+0.3)/441
        1.0

    With ``masks`` all False every value is ``nan`` (no positive to rank).
    """
    maps = np.asarray(anomaly_maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"anomaly maps {maps.shape} and masks {masks.shape} must both be (N, H, W)")
    image_scores = image_scores_from_maps(maps)
    image_labels = masks.reshape(len(masks), -1).any(axis=1)
    pixel = _ranking_metrics(masks.ravel(), maps.ravel())
    image = _ranking_metrics(image_labels, image_scores)
    pixel["aupro"] = aupro(maps, masks)
    return {**{f"pixel_{k}": v for k, v in pixel.items()}, **{f"image_{k}": v for k, v in image.items()}}


def pro_curve(anomaly_maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, PRO) with one point per distinct score as threshold (``score >= t`` is anomalous), from
    (0, 0) to (1, 1), FPR non-decreasing; None without a region or without a normal pixel.

    Sorting the pixels by score once, each normal pixel adds 1 / #normal to the FPR and each pixel of
    region r adds 1 / (|r| * #regions) to the PRO as the threshold passes it (as MVTec AD's code does).
    """
    maps = np.asarray(anomaly_maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    overlap_step = np.zeros(masks.shape)
    regions = 0
    for step, mask in zip(overlap_step, masks):
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        sizes = np.bincount(labels.ravel(), minlength=count)
        step[mask] = 1.0 / sizes[labels[mask]]
        regions += count - 1
    normal = int((~masks).sum())
    if regions == 0 or normal == 0:
        return None
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(~masks.ravel()[order]) / normal
    pro = np.minimum(np.cumsum(overlap_step.ravel()[order]) / regions, 1.0)
    last_of_tie = np.append(scores[1:] != scores[:-1], True)  # a threshold takes all pixels of its score
    return np.append(0.0, fpr[last_of_tie]), np.append(0.0, pro[last_of_tie])


def aupro(anomaly_maps: np.ndarray, masks: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Area under the `pro_curve` from FPR 0 to ``fpr_limit`` (trapezoids, the PRO at the limit
    interpolated linearly), divided by ``fpr_limit``: 1.0 for a perfect map, nan where undefined."""
    curve = pro_curve(anomaly_maps, masks)
    if curve is None:
        return math.nan
    fpr, pro = curve
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[0] = 0, fpr[-1] = 1
    x, y = fpr[:inside], pro[:inside]
    if x[-1] < fpr_limit:
        x = np.append(x, fpr_limit)
        y = np.append(y, np.interp(fpr_limit, fpr[inside - 1 : inside + 1], pro[inside - 1 : inside + 1]))
    return float(np.trapezoid(y, x) / fpr_limit)


def image_scores_from_maps(anomaly_maps: np.ndarray) -> np.ndarray:
    """(N,) image scores: max of each map average-pooled 21x21, stride 1, zero padding 10."""
    maps = torch.as_tensor(np.asarray(anomaly_maps, dtype=np.float64))[:, None]
    pooled = F.avg_pool2d(maps, IMAGE_POOL, stride=1, padding=IMAGE_POOL // 2, count_include_pad=True)
    return pooled.flatten(1).amax(dim=1).numpy()


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Largest F1 over all thresholds of the precision-recall curve (nan without a positive)."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return math.nan
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


def _ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    positives = int(labels.sum())
    has_both = 0 < positives < labels.size
    return {
        "auroc": float(roc_auc_score(labels, scores)) if has_both else math.nan,
        "ap": float(average_precision_score(labels, scores)) if positives else math.nan,
        "f1max": f1_max(labels, scores),
    }


def psnr(reference: np.ndarray, image: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 N x H x W x 3 arrays, optionally over the pixels `where` (N x H x W) only."""
    error = (reference.astype(np.float64) - image.astype(np.float64)) ** 2
    if where is None:
        mse = error.mean(axis=(1, 2, 3))
    else:
        weight = where[..., None].astype(np.float64)
        mse = (error * weight).sum(axis=(1, 2, 3)) / np.maximum(weight.sum(axis=(1, 2, 3)) * 3, 1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def nearest_psnr(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Each image's PSNR (dB) to its closest reference (N x H x W x 3 and M x H x W x 3 uint8, same size)."""
    return np.array([psnr(references, np.broadcast_to(image, references.shape)).max() for image in images])
