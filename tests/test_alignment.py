"""Image–mask alignment: a mask on the defect scores well above 1, a mask anywhere else about 1."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy import ndimage

from dualanodiff.alignment import (
    CLEARANCE,
    DILATION,
    INPAINT_RADIUS,
    alignment_score,
    inpainting_residual,
    shifted_masks,
)

SIZE = 96


def _surface(seed: int) -> np.ndarray:
    """A defect-free textured surface: gentle smooth shading plus sensor noise, HxWx3 float."""
    rng = np.random.default_rng(seed)
    shading = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), 3)
    return 120 + 8 * shading[..., None] / shading.std() + rng.normal(0, 6, (SIZE, SIZE, 3))


def _disk(cy: int, cx: int, radius: int = 6) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _with_dark_blob(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The surface with a dark blob (the defect) and the blob's mask."""
    image, blob = _surface(seed), _disk(40, 50)
    image[blob] -= 70
    return np.clip(image, 0, 255).astype(np.uint8), blob


def test_a_mask_on_a_dark_blob_scores_well_above_one():
    image, blob = _with_dark_blob(0)
    assert alignment_score(image, blob) > 2


def test_the_same_mask_moved_off_the_blob_scores_about_one():
    # Band: over 20 surfaces the score ranged 0.71-1.48 around a mean of 1.02.
    scores = []
    for seed in range(10):
        image, blob = _with_dark_blob(seed)
        elsewhere = np.roll(blob, (30, -30), axis=(0, 1))
        region = ~ndimage.binary_dilation(blob, iterations=8)  # the reference places avoid the real defect
        scores.append(alignment_score(image, elsewhere, region))
    assert all(0.6 < s < 1.6 for s in scores), scores
    assert 0.85 < np.mean(scores) < 1.2


def test_a_bright_square_on_black_has_the_hand_computed_residuals():
    # Inpainting from black surroundings gives exactly black, so inside a square of 20 the residual
    # A is 20 and at every other place B is 0, floored at half a grey level: 20 / 0.5.
    image = np.zeros((64, 64, 3), np.uint8)
    image[10:18, 10:18] = 20
    mask = image[..., 0] > 0
    assert inpainting_residual(image, mask) == 20.0
    assert [inpainting_residual(image, m) for m in shifted_masks(mask, np.ones_like(mask), 8)] == [0.0] * 8
    assert alignment_score(image, mask) == 40.0


def test_empty_mask_scores_nan():
    image, _ = _with_dark_blob(0)
    assert math.isnan(alignment_score(image, np.zeros((SIZE, SIZE), bool)))


def test_no_room_for_a_shifted_mask_scores_nan():
    image, blob = _with_dark_blob(0)
    assert math.isnan(alignment_score(image, blob, region=blob))


def test_same_seed_same_score_and_the_seed_picks_the_places():
    image, blob = _with_dark_blob(1)
    assert alignment_score(image, blob, seed=3) == alignment_score(image, blob, seed=3)
    assert alignment_score(image, blob, seed=3) != alignment_score(image, blob, seed=4)


def test_shifted_masks_stay_inside_the_region_and_clear_of_the_original():
    mask, region = _disk(40, 40, 5), _disk(48, 48, 40)
    guard = ndimage.binary_dilation(mask, iterations=CLEARANCE - 1)
    moved = shifted_masks(mask, region, 8, seed=0)
    assert len(moved) == 8
    for copy in moved:
        assert copy.sum() == mask.sum()
        assert not (copy & ~region).any()
        assert not (copy & guard).any()


def test_residual_of_a_window_equals_that_of_the_whole_image():
    image, blob = _with_dark_blob(2)
    size = 2 * DILATION + 1
    hole = cv2.dilate(blob.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    filled = cv2.inpaint(image, hole, INPAINT_RADIUS, cv2.INPAINT_TELEA)
    whole = np.abs(image.astype(float) - filled)[blob].mean()
    assert inpainting_residual(image, blob) == pytest.approx(whole, abs=0.05)


@pytest.fixture(scope="module")
def nuts(tmp_path_factory):
    """Crop-paste pairs of real (synthetic) nut defects at 128 px, each with the normal image it was
    pasted on."""
    from dualanodiff.baselines import NormalPool, crop_paste_pair, training_defects
    from dualanodiff.data import open_category
    from dualanodiff.synthetic import write_dataset

    root = tmp_path_factory.mktemp("align")
    write_dataset(root, seed=0, size=128, per_defect=4, good=6, categories=["nut"])
    category = open_category(root / "nut")
    normals = NormalPool(category)
    by_stem = {normal.stem: normal for normal in normals}
    pairs = []
    for defect in ("hole", "scratch"):
        sources = training_defects(category, defect)
        for seed in range(12):
            pair = crop_paste_pair(np.random.default_rng(seed), sources, normals, category.kind)
            pairs.append((pair, by_stem[pair.record["target"]]))
    return pairs


def test_crop_paste_pairs_of_real_defects_score_above_two(nuts):
    # measured: mean 6.4
    scores = [alignment_score(pair.image, pair.mask, normal.foreground) for pair, normal in nuts]
    assert np.nanmean(scores) > 2


def test_the_same_masks_on_the_defect_free_images_score_about_one(nuts):
    # The negative control: each pair's mask on the normal image it was pasted on (nothing under it).
    # measured: median 1.04, mean 1.13 (a ratio has a long right tail)
    scores = [alignment_score(normal.image, pair.mask, normal.foreground) for pair, normal in nuts]
    assert 0.75 < np.nanmedian(scores) < 1.3
    assert np.nanmean(scores) < 1.5
