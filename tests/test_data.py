"""The dataset layer: loading, layouts, the few-shot split rule and the foreground mask."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from dualanodiff.data import (
    IMAGE_EXTENSIONS,
    Pair,
    few_shot_split,
    load_image,
    load_mask,
    natural_key,
    open_category,
)
from dualanodiff.errors import UserError
from dualanodiff.masks import foreground_mask
from dualanodiff.synthetic import render_sample


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# ---------------------------------------------------------------------------------------------- names


def test_natural_order():
    names = ["img10.png", "img2.png", "IMG1.png", "img1b.png", "a.png"]
    assert sorted(names, key=natural_key) == ["a.png", "IMG1.png", "img1b.png", "img2.png", "img10.png"]
    assert sorted(["010", "9", "0100"], key=natural_key) == ["9", "010", "0100"]


def test_extensions():
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


# ---------------------------------------------------------------------------------------------- split

# n -> number of training pairs, worked by hand: floor(n/3) and ceil(n/3).
FLOOR = {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 2, 9: 3, 10: 3}
CEIL = {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 3, 8: 3, 9: 3, 10: 4}


def _pairs(n: int) -> list[Pair]:
    stems = [str(i) for i in range(n)]
    shuffled = stems[::2] + stems[1::2]  # the split must not rely on the given order
    return [Pair(s, Path(f"crack/{s}.png"), Path(f"gt/{s}_mask.png")) for s in shuffled]


@pytest.mark.parametrize("n", range(1, 11))
@pytest.mark.parametrize("rounding,table", [("floor", FLOOR), ("ceil", CEIL)])
def test_few_shot_split(n, rounding, table):
    if table[n] == 0:
        with pytest.raises(UserError, match="crack"):
            few_shot_split(_pairs(n), rounding)
        return
    train, test = few_shot_split(_pairs(n), rounding)
    assert [p.stem for p in train] == [str(i) for i in range(table[n])]
    assert [p.stem for p in test] == [str(i) for i in range(table[n], n)]


def test_split_uses_natural_order_and_checks_rounding():
    pairs = [Pair(s, Path(f"{s}.png"), Path(f"{s}_mask.png")) for s in ["img10", "img2", "img1"]]
    train, test = few_shot_split(pairs)
    assert [p.stem for p in train] == ["img1"] and [p.stem for p in test] == ["img2", "img10"]
    with pytest.raises(UserError, match="--split-rounding"):
        few_shot_split(pairs, "round")
    with pytest.raises(UserError):
        few_shot_split([])


# ---------------------------------------------------------------------------------------------- loading


def test_load_image_converts_modes_and_reads_any_extension_case(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.PNG")
    Image.fromarray(np.dstack([rgb, np.full((5, 7), 9, np.uint8)]), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.bmp")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.tiff")
    Image.fromarray(rgb).save(tmp_path / "photo.JPEG", quality=95)
    np.testing.assert_array_equal(load_image(tmp_path / "grey.PNG"), np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(load_image(tmp_path / "alpha.png"), rgb)
    palette = Image.open(tmp_path / "palette.bmp")
    np.testing.assert_array_equal(load_image(tmp_path / "palette.bmp"), np.asarray(palette.convert("RGB")))
    np.testing.assert_array_equal(load_image(tmp_path / "deep.tiff"), np.repeat(grey[..., None], 3, -1))
    photo = load_image(tmp_path / "photo.JPEG")
    assert photo.shape == (5, 7, 3) and photo.dtype == np.uint8


def test_load_mask_binarises_both_conventions(tmp_path):
    pattern = np.zeros((6, 8), np.uint8)
    pattern[1:4, 2:6] = 1
    Image.fromarray(pattern).save(tmp_path / "ones.png")
    Image.fromarray(pattern * 255).save(tmp_path / "bytes.png")
    noisy = (pattern * 200 + 40).astype(np.uint8)  # 40 outside, 240 inside: not 0/1, threshold 128
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    Image.fromarray(np.dstack([pattern * 255] * 3)).save(tmp_path / "rgb.png")
    for name in ("ones.png", "bytes.png", "noisy.png", "rgb.png"):
        mask = load_mask(tmp_path / name)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, pattern.astype(bool))
    with pytest.raises(UserError, match="ones.png.*8x6.*9x6"):
        load_mask(tmp_path / "ones.png", shape=(6, 9))


def test_unreadable_file_is_a_user_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="broken.png"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(UserError, match="missing.png"):
        load_mask(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------------- layouts


def test_open_synthetic_categories(synthetic_root):
    expected_kind = {"nut": "object", "pill": "object", "weave": "texture"}
    for name, kind in expected_kind.items():
        category = open_category(synthetic_root / name)
        assert (category.name, category.layout, category.kind) == (name, "mvtec", kind)
        assert [p.name for p in category.train_good] == [f"{i:03d}.png" for i in range(6)]
        assert len(category.test_good) == 6
        for defect, pairs in category.defects.items():
            assert [p.stem for p in pairs] == [f"{i:03d}" for i in range(6)]
            assert all(p.mask == synthetic_root / name / "ground_truth" / defect / f"{p.stem}_mask.png" for p in pairs)
        assert category.image_size() == (64, 64)


def test_open_folder_layout_with_real_jpeg_pairs(tmp_path, hazelnut_photos):
    folder = tmp_path / "hazelnut_custom"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    shutil.copy(hazelnut_photos / "crack.jpg", folder / "images" / "nut10.JPG")
    shutil.copy(hazelnut_photos / "colour.jpg", folder / "images" / "nut2.jpg")
    shutil.copy(hazelnut_photos / "crack_mask.jpg", folder / "masks" / "nut10_mask.jpg")
    shutil.copy(hazelnut_photos / "colour_mask.jpg", folder / "masks" / "nut2.jpeg")
    (folder / "masks" / ".DS_Store").write_bytes(b"\0")
    category = open_category(folder)
    assert (category.layout, category.kind, category.train_good, category.test_good) == ("folder", "object", [], [])
    assert list(category.defects) == ["hazelnut_custom"]
    pairs = category.defects["hazelnut_custom"]
    assert [(p.stem, p.mask.name) for p in pairs] == [("nut2", "nut2.jpeg"), ("nut10", "nut10_mask.jpg")]


# ---------------------------------------------------------------------------------------------- real masks


def test_real_jpeg_mask_binarises_to_one_clean_blob(hazelnut_photos):
    raw = np.asarray(Image.open(hazelnut_photos / "crack_mask.jpg").convert("L"))
    assert len(np.unique(raw)) > 2, "the JPEG mask holds compression noise"
    mask = load_mask(hazelnut_photos / "crack_mask.jpg", shape=raw.shape)
    assert set(np.unique(mask.astype(np.uint8)).tolist()) == {0, 1}
    np.testing.assert_array_equal(mask, raw >= 128)
    # The noise sits near 0 and 255: the mask is the same for any threshold in the middle of the range.
    assert (mask != (raw > 64)).mean() < 0.002 and (mask != (raw > 192)).mean() < 0.002
    labels, count = ndimage.label(mask)
    assert count >= 1 and np.bincount(labels.ravel())[1:].max() >= 0.9 * mask.sum()


# ---------------------------------------------------------------------------------------------- foreground


@pytest.mark.parametrize("category", ["nut", "pill"])
def test_foreground_of_synthetic_objects(category):
    ious = []
    for seed in range(8):
        sample = render_sample(category, None, np.random.default_rng(seed), 128)
        mask = foreground_mask(sample.image)
        assert mask.dtype == bool and mask.shape == (128, 128)
        ious.append(_iou(mask, sample.foreground))
        assert foreground_mask(sample.image, "object").sum() == mask.sum(), "auto recognises an object"
    assert np.mean(ious) > 0.9 and min(ious) > 0.8, ious


def test_foreground_of_a_texture_is_the_whole_image():
    image = render_sample("weave", None, np.random.default_rng(0), 128).image
    assert foreground_mask(image).all()
    nut = render_sample("nut", None, np.random.default_rng(0), 64).image
    assert foreground_mask(nut, "texture").all()
    with pytest.raises(UserError, match="kind|foreground"):
        foreground_mask(nut, "fabric")


def test_foreground_of_a_plain_image_is_everything():
    """Nothing stands out from the background: no part of the image may be called off the object."""
    assert foreground_mask(np.full((64, 64, 3), 120, np.uint8), "object").all()


def test_foreground_of_real_hazelnut(hazelnut_photos):
    good = load_image(hazelnut_photos / "good.jpg")
    mask = foreground_mask(good)
    labels, count = ndimage.label(mask)
    assert count == 1, "one nut, one blob"
    assert 0.1 < mask.mean() < 0.6
    cy, cx = np.argwhere(mask).mean(0) / np.array(mask.shape)
    assert 0.3 < cy < 0.7 and 0.3 < cx < 0.7
    assert ndimage.binary_fill_holes(mask).sum() == mask.sum(), "no holes"
    crack = load_image(hazelnut_photos / "crack.jpg")
    defect = load_mask(hazelnut_photos / "crack_mask.jpg", crack.shape[:2])
    assert (defect & foreground_mask(crack)).sum() >= 0.98 * defect.sum()


class _BrightnessSaliency(torch.nn.Module):
    """A stand-in U^2-Net: saliency = brightness (undoing the ImageNet normalisation); checks input size."""

    def forward(self, x: torch.Tensor):
        if x.shape[1] != 3 or x.shape[2] != 320 or x.shape[3] != 320:
            raise RuntimeError("expected 1x3x320x320")
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        grey = (x * std + mean).mean(1, keepdim=True)
        return grey * 5.0, grey  # unnormalised, like some exports; the first output is the fused map


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_u2net_hook(tmp_path):
    path = tmp_path / "u2net.pt"
    torch.jit.save(torch.jit.script(_BrightnessSaliency()), str(path))
    image = np.full((96, 128, 3), 40, np.uint8)
    image[20:70, 30:90] = 220
    truth = np.zeros((96, 128), bool)
    truth[20:70, 30:90] = True
    mask = foreground_mask(image, "object", u2net_weights=path)
    assert mask.shape == (96, 128) and _iou(mask, truth) > 0.95
    with pytest.raises(UserError, match="absent.pt"):
        foreground_mask(image, "object", u2net_weights=tmp_path / "absent.pt")
