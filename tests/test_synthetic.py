"""The synthetic dataset and the pretraining world: exact masks, defects on the object, variety,
determinism, layout; the benchmark files byte-identical to what they were before the world grew."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualanodiff.errors import UserError
from dualanodiff.images import to_model_range, to_uint8
from dualanodiff.synthetic import (
    CATEGORIES,
    FAMILIES,
    GREY,
    HELD_OUT,
    PRETRAIN_FAMILIES,
    WORLD_KINDS,
    background_image,
    part_image,
    render_defect,
    render_normal,
    render_sample,
    thing_name,
    world_item,
    world_words,
    write_dataset,
)
from dualanodiff.training import fill_prompt

ALL_DEFECTS = [(c, d) for c, spec in FAMILIES.items() for d in spec.defects]
NEW_FAMILIES = [name for name in FAMILIES if name not in CATEGORIES]


def test_categories_cover_objects_and_textures_with_several_defect_types():
    kinds = [spec.kind for spec in CATEGORIES.values()]
    assert kinds.count("object") >= 2 and kinds.count("texture") >= 1
    assert all(len(spec.defects) >= 3 for spec in FAMILIES.values())


def test_the_world_has_many_families_and_a_large_defect_vocabulary():
    kinds = [spec.kind for spec in FAMILIES.values()]
    assert kinds.count("object") >= 8 and kinds.count("texture") >= 5
    vocabulary = {d for spec in FAMILIES.values() for d in spec.defects}
    assert vocabulary >= {"hole", "crack", "scratch", "stain", "missing_piece", "contamination", "bent", "cut",
                          "misprint", "fold", "color", "glue", "thread"}
    assert list(FAMILIES)[:3] == list(CATEGORIES) == ["nut", "pill", "weave"]


@pytest.mark.parametrize("category,defect", ALL_DEFECTS)
def test_mask_marks_exactly_the_altered_pixels(category, defect):
    for seed in range(6):
        sample = render_sample(category, defect, np.random.default_rng(seed), 64)
        assert sample.image.dtype == np.uint8 and sample.image.shape == (64, 64, 3)
        np.testing.assert_array_equal(sample.mask, (sample.image != sample.clean).any(-1))
        assert sample.mask.sum() >= 3, "every defect image shows a defect"
        assert sample.mask.mean() < 0.25, "a defect is a local change"
        if FAMILIES[category].kind == "object":
            assert not (sample.mask & ~sample.foreground).any(), "object defects lie on the object"


@pytest.mark.parametrize("category", list(FAMILIES))
def test_clean_twin_is_the_normal_render_of_the_same_scene(category):
    defect = next(iter(FAMILIES[category].defects))
    sample = render_sample(category, defect, np.random.default_rng(3), 64)
    np.testing.assert_array_equal(sample.clean, render_normal(category, np.random.default_rng(3), 64))
    image, mask = render_defect(category, defect, np.random.default_rng(3), 64)
    np.testing.assert_array_equal(image, sample.image)
    np.testing.assert_array_equal(mask, sample.mask)


@pytest.mark.parametrize("category", list(FAMILIES))
def test_normal_images_vary_in_pose_and_colour(category):
    samples = [render_sample(category, None, np.random.default_rng(s), 64) for s in range(8)]
    assert all(not s.mask.any() for s in samples)
    means = np.array([s.image.reshape(-1, 3).mean(0) for s in samples])
    assert means.std(0).max() > 5, "colours differ between images"
    if FAMILIES[category].kind == "object":
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
    for category, spec in FAMILIES.items():
        for size in (128, 256):
            sample = render_sample(category, next(iter(spec.defects)), np.random.default_rng(0), size)
            assert sample.image.shape == (size, size, 3) and sample.mask.shape == (size, size)
            np.testing.assert_array_equal(sample.mask, (sample.image != sample.clean).any(-1))


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# Computed with the renderer as it was before the pretraining world was added (commit 5bd1435): the
# benchmark files that tests, the demo and recorded results were made from must never change.
BENCHMARK_DIGESTS = {
    (0, 64, 6, 6): "7fe6e7d4d2857ae2f108fad573a31c480d8456588514fb06b556eb8a27d94d4f",  # the tests' dataset
    (3, 32, 2, 2): "f664f3db1486a45ec0d567f99fa855aebd621509dcc4b5281245854623ebce37",
}


@pytest.mark.parametrize("seed,size,per_defect,good", list(BENCHMARK_DIGESTS))
def test_benchmark_files_are_byte_identical_to_those_before_the_world_grew(tmp_path, seed, size, per_defect, good):
    written = write_dataset(tmp_path, seed=seed, size=size, per_defect=per_defect, good=good)
    assert [p.name for p in written] == ["nut", "pill", "weave"], "the default is still the benchmark three"
    assert _digest(tmp_path) == BENCHMARK_DIGESTS[seed, size, per_defect, good]


def test_the_held_out_category_is_written_on_request_and_never_pretrained_on(tmp_path):
    assert HELD_OUT in FAMILIES and HELD_OUT not in PRETRAIN_FAMILIES and HELD_OUT not in CATEGORIES
    assert set(PRETRAIN_FAMILIES) == set(FAMILIES) - {HELD_OUT}
    (root,) = write_dataset(tmp_path, seed=0, size=64, per_defect=1, good=1, categories=[HELD_OUT])
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted([*FAMILIES[HELD_OUT].defects, "good"])
    items = [world_item(0, 0, i, 32) for i in range(300)]
    assert {item.category for item in items} == set(PRETRAIN_FAMILIES)
    assert not any(HELD_OUT in item.caption for item in items)


@pytest.mark.parametrize("category", NEW_FAMILIES)
def test_new_families_render_deterministically(category):
    defect = list(FAMILIES[category].defects)[-1]
    first = render_sample(category, defect, np.random.default_rng(11), 64)
    again = render_sample(category, defect, np.random.default_rng(11), 64)
    other = render_sample(category, defect, np.random.default_rng(12), 64)
    for name in ("image", "clean", "mask", "foreground"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.image, other.image)


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


# ---------------------------------------------------------------------------------------------- the world


def test_world_items_are_fixed_by_their_coordinates():
    first, again = world_item(0, 0, 5, 32), world_item(0, 0, 5, 32)
    assert np.array_equal(first.image, again.image) and first.caption == again.caption
    assert not np.array_equal(first.image, world_item(0, 1, 5, 32).image)
    assert first.image.shape == (32, 32, 3) and first.image.dtype == np.uint8


def test_world_mixes_the_four_kinds_the_branches_see():
    items = [world_item(1, 0, i, 32) for i in range(400)]
    shares = {kind: np.mean([item.kind == kind for item in items]) for kind in WORLD_KINDS}
    assert 0.25 < shares["normal"] < 0.5 and 0.25 < shares["defective"] < 0.45
    assert 0.1 < shares["part"] < 0.27 and 0.04 < shares["background"] < 0.15
    assert not any(item.kind == "background" and FAMILIES[item.category].kind == "texture" for item in items)
    defects = {(item.category, item.defect) for item in items if item.kind == "defective"}
    assert len({d for _, d in defects}) >= 10


def test_captions_take_the_exact_forms_of_the_few_shot_prompts():
    for i in range(200):
        item = world_item(2, 0, i, 32)
        spec = FAMILIES[item.category]
        if item.kind == "defective":
            assert item.caption == fill_prompt("a {object} with {defect}", item.category, item.defect, spec.kind)
        elif item.kind == "part":
            assert item.caption == fill_prompt("{defect}", item.category, item.defect, spec.kind)
        elif item.kind == "background":
            assert item.caption == f"a {thing_name(item.category)} background"
        else:
            assert item.caption in (f"a {thing_name(item.category)}", f"a photo of a {thing_name(item.category)}")
    assert thing_name("weave") == "weave texture" and thing_name("nut") == "nut"


def test_part_and_background_images_are_the_training_products_in_minus_one_one_space():
    sample = render_sample("nut", "hole", np.random.default_rng(4), 64)
    pixels = to_model_range(sample.image)
    expected_part = to_uint8(pixels * torch.from_numpy(sample.mask).float())
    expected_background = to_uint8(pixels * (1 - torch.from_numpy(sample.foreground).float()))
    np.testing.assert_array_equal(part_image(sample.image, sample.mask), expected_part)
    np.testing.assert_array_equal(background_image(sample.image, sample.foreground), expected_background)
    assert (part_image(sample.image, sample.mask)[~sample.mask] == GREY).all()
    parts = [item for item in (world_item(3, 0, i, 32) for i in range(120)) if item.kind == "part"]
    assert parts and all((item.image == GREY).all(-1).mean() > 0.5 for item in parts), "grey outside the defect"


def test_world_words_keep_defect_words_whole_and_leave_names_out():
    words = world_words()
    assert {"a", "with", "texture", "missing", "piece", "contamination", "misprint"} <= set(words)
    assert not set(FAMILIES) & set(words)
