"""Mask extraction, the quality filter, pair consistency and overlays, on hand-made arrays."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from skimage.draw import disk as draw_disk
from skimage.draw import line as draw_line
from skimage.measure import label
from skimage.metrics import peak_signal_noise_ratio

from dualanodiff.errors import UserError
from dualanodiff.masks import (
    attention_to_mask,
    filter_verdict,
    mask_overlay,
    pair_consistency,
    part_onto,
    part_to_mask,
    u2net_part_mask,
)
from dualanodiff.masks.part import PSNR_CAP


def grey_part(height: int = 64, width: int = 64, level: int = 128) -> np.ndarray:
    return np.full((height, width, 3), level, np.uint8)


def disc(shape: tuple[int, int], center: tuple[int, int], radius: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[draw_disk(center, radius, shape=shape)] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# --- part_to_mask --------------------------------------------------------------------------------


@pytest.mark.parametrize("colour", [(200, 40, 40), (20, 20, 20), (240, 240, 240), (128, 128, 200)])
def test_part_to_mask_recovers_a_rectangle_exactly(colour):
    part = grey_part()
    expected = np.zeros((64, 64), bool)
    expected[10:25, 30:52] = True
    part[expected] = colour
    assert np.array_equal(part_to_mask(part), expected)


def test_part_to_mask_recovers_a_disc_and_defects_touching_the_border_exactly():
    part = grey_part(80, 96)
    expected = disc((80, 96), (40, 50), 11) | disc((80, 96), (0, 0), 9)
    expected[70:80, 80:96] = True
    part[expected] = (30, 160, 220)
    assert np.array_equal(part_to_mask(part), expected)


def test_part_to_mask_finds_darker_and_brighter_defects_in_one_image():
    part = grey_part()
    dark, bright = disc((64, 64), (16, 16), 7), disc((64, 64), (44, 44), 9)
    part[dark], part[bright] = 35, 230
    mask = part_to_mask(part)
    assert np.array_equal(mask, dark | bright)


def test_part_to_mask_keeps_components_of_very_different_contrast():
    # Otsu alone on this distance map splits the strong defect from the faint one (threshold 0.108).
    part = grey_part()
    strong, faint, third = np.zeros((3, 64, 64), bool)
    strong[5:15, 5:15], faint[30:40, 30:40], third[50:60, 5:25] = True, True, True
    part[strong], part[faint], part[third] = (200, 40, 40), 100, (128, 190, 128)
    assert np.array_equal(part_to_mask(part), strong | faint | third)


def test_part_to_mask_follows_a_shifted_flat_level():
    part = grey_part(level=118)  # a decoded part image is often a few grey levels off 127.5
    expected = disc((64, 64), (30, 34), 10)
    part[expected] = 90  # 28 levels from the flat grey but 38 from 127.5: both above the floor
    assert np.array_equal(part_to_mask(part), expected)
    part[expected] = 140  # 22 levels from the flat grey but only 12 from 127.5: below the floor
    assert np.array_equal(part_to_mask(part), expected)


@pytest.mark.parametrize("tint", [0.07, 0.10])
def test_part_to_mask_follows_a_tint_in_one_channel(tint):
    # flat but tinted in blue, as decoded part images often are; against a fixed 0.5 a 0.10 tint made
    # 2679 of 4096 pixels "defect" here
    rng = np.random.default_rng(0)
    expected = disc((64, 64), (40, 20), 6)
    part = grey_part().astype(np.float64)
    part[..., 2] += tint * 255
    part[expected] -= 35
    part = np.clip(np.rint(part + rng.normal(0, 2.0, part.shape)), 0, 255).astype(np.uint8)
    assert np.array_equal(part_to_mask(part), expected)


def test_part_to_mask_ignores_a_faint_frame():
    part = grey_part(level=120)
    part[:2], part[-2:], part[:, :2], part[:, -2:] = 127, 127, 127, 127  # decoded parts often carry a faint frame
    expected = disc((64, 64), (30, 30), 7)
    part[expected] = 40
    assert np.array_equal(part_to_mask(part), expected)


def test_part_to_mask_handles_a_defect_covering_most_of_the_image():
    part = grey_part()
    expected = np.ones((64, 64), bool)
    expected[:20] = False
    part[expected] = (60, 60, 60)  # the median is now the defect colour, not grey
    assert np.array_equal(part_to_mask(part), expected)


def test_part_to_mask_is_robust_to_gaussian_noise():
    rng = np.random.default_rng(0)
    shape = (96, 96)
    expected = disc(shape, (40, 55), 14)
    expected[70:85, 10:40] = True
    part = grey_part(*shape).astype(np.float64)
    part[expected] = (60, 150, 60)
    noisy = np.clip(np.rint(part + rng.normal(0, 8, part.shape)), 0, 255).astype(np.uint8)
    mask = part_to_mask(noisy)
    assert iou(mask, expected) > 0.95


def test_part_to_mask_removes_specks_and_fills_small_holes_at_min_component():
    part = grey_part()
    defect = np.zeros((64, 64), bool)
    defect[30:50, 30:50] = True
    part[defect] = 220
    part[36:38, 36:38] = 128  # 4-pixel hole: filled
    big_hole = disc((64, 64), (43, 43), 4)
    part[big_hole] = 128  # 45-pixel round hole: kept open (closing would round off a square one's corners)
    part[2:6, 2:6] = 220  # 16 pixels = min_component: kept
    part[2:5, 50:55] = 220  # 15 pixels: removed
    part[60, 10] = 220  # single pixel: removed
    expected = defect.copy()
    expected[big_hole] = False
    expected[2:6, 2:6] = True
    assert np.array_equal(part_to_mask(part, min_component=16), expected)


def test_part_to_mask_keeps_one_pixel_wide_scratches_whole():
    part = grey_part()
    scratch = np.zeros((64, 64), bool)
    rows, cols = draw_line(5, 5, 40, 58)  # 8-connected diagonal staircase
    scratch[rows, cols] = True
    scratch[50, 10:40] = True  # straight, 30 pixels
    part[scratch] = (40, 40, 40)
    assert np.array_equal(part_to_mask(part), scratch)


def test_part_to_mask_of_a_flat_grey_image_is_empty():
    assert not part_to_mask(grey_part()).any()
    rng = np.random.default_rng(1)
    noisy = np.clip(np.rint(127.5 + rng.normal(0, 4, (64, 64, 3))), 0, 255).astype(np.uint8)
    assert not part_to_mask(noisy).any()


def test_part_to_mask_accepts_single_channel_parts():
    part = np.full((40, 40), 128, np.uint8)
    part[5:20, 10:30] = 10
    expected = np.zeros((40, 40), bool)
    expected[5:20, 10:30] = True
    assert np.array_equal(part_to_mask(part), expected)


# --- attention_to_mask ---------------------------------------------------------------------------


def test_attention_to_mask_upsamples_a_blob_to_the_requested_height_and_width():
    rows, cols = np.mgrid[0:16, 0:16]
    attention = np.exp(-((rows - 5.5) ** 2 + (cols - 9.5) ** 2) / (2 * 2.0**2))
    attention += 0.02 * np.random.default_rng(0).random((16, 16))
    mask = attention_to_mask(attention.astype(np.float32), (64, 128))
    assert mask.shape == (64, 128)
    assert label(mask).max() == 1  # one blob
    centre = np.argwhere(mask).mean(axis=0)
    # pixel centres: row (5.5 + 0.5) * 4 - 0.5, column (9.5 + 0.5) * 8 - 0.5
    np.testing.assert_allclose(centre, [23.5, 79.5], atol=1.0)
    assert 0.02 < mask.mean() < 0.3


def test_attention_to_mask_of_a_constant_map_is_empty_and_rejects_nan():
    assert not attention_to_mask(np.ones((8, 8)), (32, 32)).any()
    with pytest.raises(ValueError):
        attention_to_mask(np.full((8, 8), np.nan), (32, 32))


# --- filter_verdict ------------------------------------------------------------------------------


def test_filter_verdict_gives_each_verdict_in_order():
    foreground = np.zeros((10, 10), bool)
    foreground[:, :5] = True
    mask = np.zeros((10, 10), bool)
    assert filter_verdict(mask, foreground) == "empty"
    mask[:, :6] = True  # 60 % of the image, also mostly on the object
    assert filter_verdict(mask, foreground, max_area=0.5) == "too_large"
    assert filter_verdict(mask, foreground, max_area=0.6) == "kept"  # share equal to the limit passes
    mask[:] = False
    mask[0:4, 3:8] = True  # 20 pixels, 8 on the object: 40 %
    assert filter_verdict(mask, foreground, min_on_object=0.5) == "off_object"
    assert filter_verdict(mask, foreground, min_on_object=0.4) == "kept"
    assert filter_verdict(mask, None) == "kept"  # textures: no foreground check
    assert filter_verdict(mask, np.zeros((10, 10), bool)) == "no_object"
    assert filter_verdict(mask, np.zeros((10, 10), bool), min_on_object=0.0) == "kept"  # 0: no object asked for


def test_a_generated_object_image_without_an_object_has_an_empty_region():
    """The foreground heuristic's whole-image fallback suits BCM's training masks, not the filter: a plain
    grey image of an object category has nowhere for a defect to be, so its pairs are dropped."""
    from dualanodiff.generation import object_region
    from dualanodiff.masks import foreground_mask

    grey = np.full((64, 64, 3), 128, np.uint8)
    assert foreground_mask(grey, "object").all()
    region = object_region(grey, "object")
    assert region.shape == (64, 64) and not region.any()
    mask = np.zeros((64, 64), bool)
    mask[30:34, 30:34] = True
    assert filter_verdict(mask, region) == "no_object"
    nut = grey.copy()
    nut[16:48, 16:48] = (120, 80, 40)
    assert object_region(nut, "object")[20:44, 20:44].all() and filter_verdict(mask, object_region(nut, "object")) == "kept"


def test_filter_verdict_rejects_a_foreground_of_another_shape():
    with pytest.raises(ValueError):
        filter_verdict(np.ones((4, 4), bool), np.ones((5, 5), bool), max_area=1.0)


# --- pair_consistency ----------------------------------------------------------------------------


def test_pair_consistency_of_a_constant_difference():
    image = np.full((8, 8, 3), 100, np.uint8)
    part = image + 10
    mask = np.zeros((8, 8), bool)
    mask[2:5, 1:7] = True
    assert pair_consistency(image, part, mask) == pytest.approx(20 * math.log10(255 / 10))
    part[~mask] = 0  # outside the mask nothing counts
    assert pair_consistency(image, part, mask) == pytest.approx(28.1308, abs=1e-4)


def test_pair_consistency_matches_skimage_psnr_on_the_masked_pixels():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    part = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    mask = disc((32, 32), (16, 16), 9)
    reference = peak_signal_noise_ratio(image[mask], part[mask], data_range=255)
    assert pair_consistency(image, part, mask) == pytest.approx(reference)


def test_pair_consistency_caps_identical_pairs_and_is_nan_on_empty_masks():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert pair_consistency(image, image.copy(), np.ones((8, 8), bool)) == PSNR_CAP
    assert math.isnan(pair_consistency(image, image, np.zeros((8, 8), bool)))


# --- u2net_part_mask -----------------------------------------------------------------------------


class RedSaliency(torch.nn.Module):
    """Stands in for U²-Net: 'salient' = red channel; returns a tuple like U²-Net's side outputs."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        saliency = torch.sigmoid(x[:, :1])
        return saliency, saliency


def test_u2net_part_mask_runs_a_local_torchscript_model(tmp_path):
    weights = tmp_path / "u2net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(RedSaliency()), str(weights))
    part = grey_part(100, 100)
    expected = disc((100, 100), (45, 60), 18)
    part[expected] = (250, 128, 128)
    mask = u2net_part_mask(part, weights)
    assert mask.shape == (100, 100)
    assert iou(mask, expected) > 0.95


def test_u2net_part_mask_names_a_missing_or_bad_weights_file(tmp_path):
    with pytest.raises(UserError, match="u2net-missing.pt"):
        u2net_part_mask(grey_part(), tmp_path / "u2net-missing.pt")
    bad = tmp_path / "not-a-model.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(UserError, match="not-a-model.pt"):
        u2net_part_mask(grey_part(), bad)


# --- mask_overlay --------------------------------------------------------------------------------


def test_mask_overlay_tints_the_mask_and_draws_its_contour():
    image = np.full((20, 20, 3), (50, 100, 200), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    overlay = mask_overlay(image, mask, alpha=0.4)
    assert overlay.dtype == np.uint8 and overlay.shape == (20, 20, 3)
    assert np.array_equal(overlay[~mask], image[~mask])
    assert tuple(overlay[10, 10]) == (round(0.6 * 50 + 0.4 * 255), round(0.6 * 100), round(0.6 * 200))
    contour = mask.copy()
    contour[6:14, 6:14] = False
    assert (overlay[contour] == (255, 0, 0)).all()
    assert (overlay[6:14, 6:14] == overlay[10, 10]).all()



def test_part_onto_lays_the_defect_on_with_its_opacity_and_leaves_the_rest_exact():
    rng = np.random.default_rng(0)
    normal = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    part = grey_part(32, 32)
    part[10:14, 10:14] = (20, 30, 40)  # the defect's core: as far from grey as the mask's median pixel
    part[9, 10:14] = (74, 79, 84)  # a rim half as far: half opaque
    mask = np.zeros((32, 32), bool)
    mask[9:14, 10:14] = True
    out = part_onto(normal, part, mask)
    assert np.array_equal(out[~mask], normal[~mask])
    assert np.array_equal(out[10:14, 10:14], part[10:14, 10:14])
    np.testing.assert_allclose(out[9, 10:14], (normal[9, 10:14].astype(float) + part[9, 10:14]) / 2, atol=1)
    assert np.array_equal(part_onto(normal, part, np.zeros_like(mask)), normal)
