"""`localization_metrics`: the six numbers of Table 2, against scikit-learn and by hand."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from dualanodiff.evaluation import metrics
from dualanodiff.evaluation.metrics import METRIC_KEYS, f1_max, image_scores_from_maps, localization_metrics


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
