"""`localization_metrics`: the six numbers of Table 2 and AUPRO, against scikit-learn, a threshold sweep and by hand."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from dualanodiff.evaluation import metrics
from dualanodiff.evaluation.metrics import (
    METRIC_KEYS,
    aupro,
    f1_max,
    image_scores_from_maps,
    localization_metrics,
)


def _random_case(seed: int, n: int = 6, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(0, n, 2):  # every other image anomalous, with a random rectangle
        y, x = rng.integers(0, size - 6, 2)
        masks[i, y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = True
    maps = rng.random((n, size, size)) + 0.8 * masks * rng.random((n, size, size))
    return maps, masks


def _f1_max_by_thresholds(labels: np.ndarray, scores: np.ndarray) -> float:
    """Brute force: F1 of 'score >= t' for every distinct score t."""
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        precision, recall = tp / predicted.sum(), tp / labels.sum()
        if tp:
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_maps_match_sklearn_and_independent_pooling(seed):
    maps, masks = _random_case(seed)
    result = localization_metrics(maps, masks)
    assert set(result) == set(METRIC_KEYS)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result["pixel_f1max"] == pytest.approx(_f1_max_by_thresholds(masks.ravel(), maps.ravel()), abs=1e-12)
    # image score: 21x21 mean with zeros outside the image (scipy, independent of torch), then the max
    pooled = np.stack([ndimage.uniform_filter(m, size=21, mode="constant", cval=0.0) for m in maps])
    scores = pooled.reshape(len(maps), -1).max(axis=1)
    np.testing.assert_allclose(image_scores_from_maps(maps), scores, rtol=1e-10)
    labels = masks.reshape(len(masks), -1).any(axis=1)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["image_f1max"] == pytest.approx(_f1_max_by_thresholds(labels, scores), abs=1e-12)


def test_perfect_map_scores_one_everywhere():
    _, masks = _random_case(3)
    result = localization_metrics(masks.astype(float), masks)
    assert result == {key: 1.0 for key in METRIC_KEYS}


def test_inverted_map_has_auroc_zero():
    _, masks = _random_case(4)
    assert localization_metrics(1.0 - masks, masks)["pixel_auroc"] == 0.0
    # constant maps that rank every normal image above every anomalous one
    labels = masks.reshape(len(masks), -1).any(axis=1)
    constant = np.broadcast_to((~labels)[:, None, None], masks.shape).astype(float)
    assert localization_metrics(constant, masks)["image_auroc"] == 0.0


def test_f1_max_hand_computed():
    # thresholds 0.9, 0.8, 0.4, 0.1 give F1 2/3, 1/2, 4/5 (P 2/3, R 1), 2/3
    assert f1_max(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.1])) == pytest.approx(0.8)


def test_all_normal_images_give_nan():
    maps = np.random.default_rng(0).random((3, 8, 8))
    result = localization_metrics(maps, np.zeros((3, 8, 8), bool))
    assert all(math.isnan(result[key]) for key in METRIC_KEYS)


def test_all_anomalous_images_have_ap_but_no_image_auroc():
    maps, masks = _random_case(5, n=2)
    masks[1, 0, 0] = True  # both images anomalous now
    result = localization_metrics(maps, masks)
    assert math.isnan(result["image_auroc"])
    assert result["image_ap"] == 1.0 and result["image_f1max"] == 1.0  # every image is a positive
    assert not math.isnan(result["pixel_auroc"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        localization_metrics(np.zeros((2, 8, 8)), np.zeros((2, 8, 9), bool))


def test_docstring_example_holds():
    assert doctest.testmod(metrics, raise_on_error=True).attempted >= 3


# ---------------------------------------------------------------------------------------------- AUPRO


def _aupro_by_threshold_sweep(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Independent AUPRO: for every distinct score t, FPR and mean region overlap of 'map >= t' counted
    directly (regions: scipy's 8-connected labels per image), then each segment's area clipped at
    ``limit`` (the PRO at the limit linearly interpolated), over ``limit``."""
    regions = []
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, count + 1)]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fpr = (predicted & ~masks).sum() / (~masks).sum()
        pro = np.mean([(predicted[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed, levels", [(0, None), (1, None), (2, 10), (3, 4)])
def test_aupro_matches_a_direct_threshold_sweep(seed, levels):
    maps, masks = _random_case(seed)
    masks[2, 3:6, 3:6] = masks[2, 6:8, 6:8] = True  # two blocks touching at a corner: one 8-connected region
    if levels:  # coarse scores: many ties between normal and anomalous pixels
        maps = np.round(maps * levels) / levels
    assert aupro(maps, masks) == pytest.approx(_aupro_by_threshold_sweep(maps, masks), abs=1e-12)
    assert localization_metrics(maps, masks)["pixel_aupro"] == aupro(maps, masks)


def test_aupro_hand_computed_with_a_tie():
    # one 1x14 image: region A = pixels 0-1, region B = 3-4, 10 normal pixels (each adds 0.1 to the FPR)
    scores = np.array([[[0.9, 0.5, 0.7, 0.8, 0.3, 0.4, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]])
    mask = np.zeros((1, 1, 14), bool)
    mask[0, 0, [0, 1, 3, 4]] = True
    # curve (FPR, PRO): (0, .25) (0, .5) (.1, .5) (.1, .75) (.2, .75), then at 0.3 B's second pixel and two
    # normal ones together: (.4, 1). Area to 0.3: .1*.5 + .1*.75 + .1*(.75 + .875)/2 = .20625; / .3
    assert aupro(scores, mask) == pytest.approx(0.6875, abs=1e-12)


def test_aupro_regions_are_8_connected():
    # one region of 3 pixels joined at a corner, its corner pixel found: PRO 1/3 (4-connected: 2 regions, 1/2)
    mask = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], bool)
    found = np.array([[[1.0, 0, 0], [0, 0, 0], [0, 0, 0]]])
    # curve (0, 1/3) -> (1, 1); PRO at FPR .3 is 1/3 + .3 * 2/3, so the normalised area is its mean with 1/3
    assert aupro(found, mask) == pytest.approx((1 / 3 + 1 / 3 + 0.3 * 2 / 3) / 2, abs=1e-12)


def test_aupro_needs_a_region_and_a_normal_pixel():
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert math.isnan(aupro(maps, np.zeros((2, 4, 4), bool)))
    assert math.isnan(aupro(maps, np.ones((2, 4, 4), bool)))


def test_nearest_psnr_takes_the_closest_reference_and_matches_skimage():
    from skimage.metrics import peak_signal_noise_ratio

    from dualanodiff.evaluation.metrics import nearest_psnr

    rng = np.random.default_rng(0)
    references = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    near = np.clip(references[1].astype(int) + rng.integers(-3, 4, (8, 8, 3)), 0, 255).astype(np.uint8)
    images = np.stack([near, references[2]])
    values = nearest_psnr(images, references)
    assert values[0] == pytest.approx(peak_signal_noise_ratio(references[1], near, data_range=255))
    assert values[1] == pytest.approx(10 * np.log10(255**2 / 1e-10))  # identical: the MSE floor of 1e-10 caps it
