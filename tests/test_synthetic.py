"""The synthetic dataset: exact masks, defects on the object, variety, determinism, layout."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from dualanodiff.errors import UserError
from dualanodiff.synthetic import CATEGORIES, render_defect, render_normal, render_sample, write_dataset

ALL_DEFECTS = [(c, d) for c, spec in CATEGORIES.items() for d in spec.defects]


def test_categories_cover_objects_and_textures_with_several_defect_types():
    kinds = [spec.kind for spec in CATEGORIES.values()]
    assert kinds.count("object") >= 2 and kinds.count("texture") >= 1
    assert all(len(spec.defects) >= 3 for spec in CATEGORIES.values())


@pytest.mark.parametrize("category,defect", ALL_DEFECTS)
def test_mask_marks_exactly_the_altered_pixels(category, defect):
    for seed in range(6):
        sample = render_sample(category, defect, np.random.default_rng(seed), 64)
        assert sample.image.dtype == np.uint8 and sample.image.shape == (64, 64, 3)
        np.testing.assert_array_equal(sample.mask, (sample.image != sample.clean).any(-1))
        assert sample.mask.sum() >= 3, "every defect image shows a defect"
        assert sample.mask.mean() < 0.25, "a defect is a local change"
        if CATEGORIES[category].kind == "object":
            assert not (sample.mask & ~sample.foreground).any(), "object defects lie on the object"


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_clean_twin_is_the_normal_render_of_the_same_scene(category):
    defect = next(iter(CATEGORIES[category].defects))
    sample = render_sample(category, defect, np.random.default_rng(3), 64)
    np.testing.assert_array_equal(sample.clean, render_normal(category, np.random.default_rng(3), 64))
    image, mask = render_defect(category, defect, np.random.default_rng(3), 64)
    np.testing.assert_array_equal(image, sample.image)
    np.testing.assert_array_equal(mask, sample.mask)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_normal_images_vary_in_pose_and_colour(category):
    samples = [render_sample(category, None, np.random.default_rng(s), 64) for s in range(8)]
    assert all(not s.mask.any() for s in samples)
    means = np.array([s.image.reshape(-1, 3).mean(0) for s in samples])
    assert means.std(0).max() > 5, "colours differ between images"
    if CATEGORIES[category].kind == "object":
        centroids = np.array([np.argwhere(s.foreground).mean(0) for s in samples])
        assert centroids.std(0).max() > 1.0, "objects are placed differently"
        assert all(0.03 < s.foreground.mean() < 0.5 for s in samples)
    else:
        assert all(s.foreground.all() for s in samples)


@pytest.mark.parametrize("category,defect", ALL_DEFECTS)
def test_defects_vary_in_size_and_strength(category, defect):
    """Not one fixed stamp: areas and contrasts spread, so three examples do not cover the type."""
    areas, contrasts = [], []
    for seed in range(12):
        sample = render_sample(category, defect, np.random.default_rng(seed), 64)
        areas.append(sample.mask.sum())
        change = np.abs(sample.image.astype(int) - sample.clean.astype(int)).max(-1)
        contrasts.append(change[sample.mask].mean())
    assert max(areas) >= 2 * min(areas)
    assert max(contrasts) >= 1.5 * min(contrasts)


def test_larger_sizes_render():
    for category in CATEGORIES:
        for size in (128, 256):
            sample = render_sample(category, next(iter(CATEGORIES[category].defects)), np.random.default_rng(0), size)
            assert sample.image.shape == (size, size, 3) and sample.mask.shape == (size, size)
            np.testing.assert_array_equal(sample.mask, (sample.image != sample.clean).any(-1))


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_dataset_is_byte_identical_for_a_seed(tmp_path):
    first = _files(write_dataset(tmp_path / "a", seed=5, size=64, per_defect=2, good=2)[0].parent)
    second = _files(write_dataset(tmp_path / "b", seed=5, size=64, per_defect=2, good=2)[0].parent)
    other = _files(write_dataset(tmp_path / "c", seed=6, size=64, per_defect=2, good=2)[0].parent)
    assert first == second
    assert first.keys() == other.keys() and first != other


def test_write_dataset_layout_and_masks(synthetic_root):
    for category, spec in CATEGORIES.items():
        root = synthetic_root / category
        assert sorted(p.name for p in (root / "train" / "good").iterdir()) == [f"{i:03d}.png" for i in range(6)]
        assert len(list((root / "test" / "good").iterdir())) == 6
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted([*spec.defects, "good"])
        for defect in spec.defects:
            for index in range(6):
                mask = Image.open(root / "ground_truth" / defect / f"{index:03d}_mask.png")
                image = Image.open(root / "test" / defect / f"{index:03d}.png")
                assert mask.mode == "L" and image.mode == "RGB" and mask.size == image.size == (64, 64)
                values = set(np.unique(np.asarray(mask)).tolist())
                assert values == {0, 255}


def test_more_images_keep_the_existing_ones(tmp_path):
    """Each file has its own seed: asking for more images appends, the first ones stay identical."""
    small = _files(write_dataset(tmp_path / "a", seed=0, size=64, per_defect=1, good=1, categories=["nut"])[0])
    large = _files(write_dataset(tmp_path / "b", seed=0, size=64, per_defect=2, good=2, categories=["nut"])[0])
    assert all(large[name] == data for name, data in small.items())


def test_write_dataset_replaces_a_category_folder(tmp_path):
    write_dataset(tmp_path, size=64, per_defect=3, good=1, categories=["pill"])
    write_dataset(tmp_path, size=64, per_defect=1, good=1, categories=["pill"])
    assert len(list((tmp_path / "pill" / "test" / "stain").iterdir())) == 1


def test_generation_is_fast(tmp_path):
    start = time.perf_counter()
    write_dataset(tmp_path, seed=1, size=64, per_defect=6, good=6)
    assert time.perf_counter() - start < 3.0


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="marble"):
        write_dataset(tmp_path, categories=["marble"])
    with pytest.raises(UserError, match="--size"):
        write_dataset(tmp_path, size=8)
    with pytest.raises(UserError, match="bubble"):
        render_defect("nut", "bubble", np.random.default_rng(0), 64)
