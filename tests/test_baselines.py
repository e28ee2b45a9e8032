"""Baseline generators: Perlin noise and masks, DRAEM's blend, crop-paste geometry, and the written layout."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from dualanodiff.alignment import alignment_score
from dualanodiff.baselines import (
    PART_GREY,
    Defect,
    Normal,
    NormalPool,
    blend,
    crop_paste,
    crop_paste_pair,
    gradient_noise,
    perlin,
    perlin_mask,
    perlin_noise,
    perlin_pair,
    procedural_texture,
    training_defects,
    transform_patch,
)
from dualanodiff.cli import main
from dualanodiff.data import few_shot_split, load_image, load_mask, open_category
from dualanodiff.errors import UserError
from dualanodiff.masks import foreground_mask
from dualanodiff.pairs import PairWriter


def _fade(t: float) -> float:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def _changed(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (image != reference).any(-1)


# ---------------------------------------------------------------------------------------------- Perlin


def test_gradient_noise_with_constant_gradients_is_offset_minus_fade():
    """With every gradient (1, 0), the four corner terms are fx and fx - 1, so noise = fx - fade(fx)."""
    u = np.array([0.25, 0.5, 0.75, 1.25, 2.0])
    v = np.array([0.3, 1.9, 0.0, 2.5, 1.1])
    along_x = np.zeros((4, 4, 2))
    along_x[..., 0] = 1.0
    expected = np.array([0.25 - _fade(0.25), 0.0, 0.75 - _fade(0.75), 0.25 - _fade(0.25), 0.0])
    np.testing.assert_allclose(gradient_noise(u, v, along_x), expected, atol=1e-12)
    assert gradient_noise(np.array([0.25]), np.array([0.0]), along_x)[0] == pytest.approx(0.146484375)
    along_y = along_x[..., ::-1].copy()
    np.testing.assert_allclose(gradient_noise(v, u, along_y), expected, atol=1e-12)


def test_perlin_noise_vanishes_on_the_lattice():
    """4 cells down and 8 across on 64 px: lattice nodes every 16 rows and 8 columns, where each
    corner term g . (p - corner) is 0."""
    noise = perlin_noise((64, 64), (4, 8), np.random.default_rng(0))
    assert np.abs(noise[::16, ::8]).max() < 1e-12
    assert np.abs(noise[8::16, 4::8]).min() > 0 and np.abs(noise).max() > 0.1


def test_perlin_noise_is_bounded_continuous_and_seeded():
    size, cells = 128, 8
    for seed in range(5):
        angle = float(np.random.default_rng(100 + seed).uniform(-90, 90))
        noise = perlin_noise((size, size), (cells, cells), np.random.default_rng(seed), angle)
        assert np.abs(noise).max() <= math.sqrt(0.5) + 1e-12
        steps = max(np.abs(np.diff(noise, axis=0)).max(), np.abs(np.diff(noise, axis=1)).max())
        assert steps <= 2.5 * cells / size  # Lipschitz: at most 2.5 per lattice cell
        again = perlin_noise((size, size), (cells, cells), np.random.default_rng(seed), angle)
        np.testing.assert_array_equal(noise, again)
    other = perlin_noise((size, size), (cells, cells), np.random.default_rng(99))
    assert not np.array_equal(noise, other)
    white = np.random.default_rng(0).uniform(-0.7, 0.7, (size, size))
    assert np.abs(np.diff(white, axis=1)).max() > 2.5 * cells / size  # the bound is not vacuous


def test_perlin_mask_uses_draem_scales_and_threshold():
    rng = np.random.default_rng(0)
    scales, areas = set(), []
    for _ in range(150):
        mask, params = perlin_mask((64, 64), rng)
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert -90 <= params["angle"] <= 90
        scales.update(params["scale"])
        areas.append(mask.mean())
    assert scales == {1, 2, 4, 8, 16, 32}
    assert 0 < np.mean(areas) < 0.2  # noise rarely exceeds 0.5 (its maximum is sqrt(2)/2)


def test_blend_hand_computed_and_exactly_inside_mask():
    image = np.full((4, 4, 3), 100, np.uint8)
    source = np.full((4, 4, 3), 200, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 2] = True
    out = blend(image, source, mask, beta=0.25)
    assert (out[mask] == 175).all() and (out[~mask] == 100).all()  # 0.75 * 200 + 0.25 * 100
    np.testing.assert_array_equal(blend(image, source, mask, 0.0)[mask], source[mask])

    rng = np.random.default_rng(1)
    image = rng.integers(0, 200, (32, 32, 3)).astype(np.uint8)
    source = image + 55  # (1 - beta) * 55 >= 11 grey levels for beta <= 0.8: every masked pixel changes
    mask = rng.random((32, 32)) < 0.3
    for beta in (0.0, 0.4, 0.8):
        np.testing.assert_array_equal(_changed(blend(image, source, mask, beta), image), mask)


def test_procedural_texture_is_seeded_colour_image():
    texture = procedural_texture((48, 40), np.random.default_rng(3))
    assert texture.shape == (48, 40, 3) and texture.dtype == np.uint8
    np.testing.assert_array_equal(texture, procedural_texture((48, 40), np.random.default_rng(3)))
    assert len(np.unique(texture.reshape(-1, 3), axis=0)) > 8


def test_perlin_pair_marks_the_blended_pixels_on_the_object(synthetic_root):
    category = open_category(synthetic_root / "nut")
    normals = NormalPool(category)
    by_stem = {normals[i].stem: normals[i] for i in range(len(normals))}
    for seed in range(8):
        pair = perlin_pair(np.random.default_rng(seed), normals)
        target = by_stem[pair.record["target"]]
        changed = _changed(pair.image, target.image)
        assert pair.mask.any()
        assert not (changed & ~pair.mask).any()  # nothing changes outside the mask
        assert changed[pair.mask].mean() > 0.9  # and (rounding aside) everything inside it
        assert not (pair.mask & ~target.foreground).any()
        np.testing.assert_array_equal(pair.part, np.where(pair.mask[..., None], pair.image, PART_GREY))
        again = perlin_pair(np.random.default_rng(seed), normals)
        np.testing.assert_array_equal(pair.image, again.image)
        np.testing.assert_array_equal(pair.mask, again.mask)


# ---------------------------------------------------------------------------------------------- crop-paste


def test_transform_patch_geometry():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 14, 3)).astype(np.uint8)
    full = np.ones((10, 14), bool)
    patch, mask = transform_patch(image, full, 90, 1.0, False, False)
    np.testing.assert_array_equal(patch, np.rot90(image))  # cv2's positive angle: counter-clockwise
    assert mask.all() and mask.shape == (14, 10)
    patch, _ = transform_patch(image, full, 0, 1.0, True, True)
    np.testing.assert_array_equal(patch, image[::-1, ::-1])
    patch, mask = transform_patch(image, full, 0, 1.5, False, False)
    assert mask.shape == (15, 21) and mask.all()
    corner = np.zeros((10, 14), bool)
    corner[2:5, 3:9] = True  # the result is cropped to the transformed mask's bounding box
    patch, mask = transform_patch(image, corner, 180, 1.0, False, False)
    np.testing.assert_array_equal(patch, image[2:5, 3:9][::-1, ::-1])
    assert mask.all()


def _red_blob_defect(rng: np.random.Generator, stem: str, size: int = 48) -> Defect:
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(8, size - 8, 2)
    mask = (yy - cy) ** 2 / 25 + (xx - cx) ** 2 / rng.uniform(4, 30) <= 1
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 2] = 200
    image[mask] = (255, 0, 0)
    return Defect(stem, image, mask)


def test_crop_paste_mask_is_exactly_the_pasted_pixels():
    """Red defects on blue, pasted onto green: every pasted pixel differs from the target, so the mask
    must equal the changed pixels exactly; textures rotate by multiples of 90 degrees."""
    rng = np.random.default_rng(0)
    defects = [_red_blob_defect(rng, f"{i:03d}") for i in range(3)]
    green = np.zeros((48, 48, 3), np.uint8)
    green[..., 1] = 200
    normals = [Normal("000", green, np.ones((48, 48), bool))]
    by_stem = {d.stem: d for d in defects}
    for seed in range(20):
        pair = crop_paste_pair(np.random.default_rng(seed), defects, normals, "texture")
        np.testing.assert_array_equal(_changed(pair.image, green), pair.mask)
        assert pair.record["angle"] in (0.0, 90.0, 180.0, 270.0)
        ratio = pair.mask.sum() / by_stem[pair.record["source"]].mask.sum()
        assert 0.75**2 * 0.7 < ratio < 1.25**2 * 1.3  # area follows the scale
        assert (pair.image[pair.mask][:, 1] == 0).all()  # pasted pixels come from the defect (no green)
        np.testing.assert_array_equal(pair.part, np.where(pair.mask[..., None], pair.image, PART_GREY))


def test_crop_paste_pair_keeps_objects_on_the_foreground(synthetic_root):
    category = open_category(synthetic_root / "nut")
    defects = training_defects(category, "crack")
    normals = NormalPool(category)
    by_stem = {normals[i].stem: normals[i] for i in range(len(normals))}
    angles = []
    for seed in range(10):
        pair = crop_paste_pair(np.random.default_rng(seed), defects, normals, "object")
        target = by_stem[pair.record["target"]]
        assert pair.mask.any()
        assert not (pair.mask & ~target.foreground).any()
        assert not (_changed(pair.image, target.image) & ~pair.mask).any()
        angles.append(pair.record["angle"])
    assert any(a % 90 for a in angles)  # objects rotate freely


def test_training_defects_follow_the_split_rounding(tmp_path):
    root = tmp_path / "toy"
    rng = np.random.default_rng(0)
    for split in ("train/good", "test/good"):
        (root / split).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / split / "000.png")
    (root / "test/dent").mkdir(parents=True)
    (root / "ground_truth/dent").mkdir(parents=True)
    for index in range(7):
        defect = _red_blob_defect(rng, f"{index:03d}", size=32)
        Image.fromarray(defect.image).save(root / "test/dent" / f"{index:03d}.png")
        Image.fromarray(defect.mask.astype(np.uint8) * 255).save(root / "ground_truth/dent" / f"{index:03d}_mask.png")
    category = open_category(root)
    assert [d.stem for d in training_defects(category, "dent")] == ["000", "001"]
    assert [d.stem for d in training_defects(category, "dent", "ceil")] == ["000", "001", "002"]
    with pytest.raises(UserError, match="--defect"):
        training_defects(category, "scratch")


# ---------------------------------------------------------------------------------------------- runs


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for kind in ("image", "mask", "part") for p in (folder / kind).iterdir()}


@pytest.mark.parametrize("method", ["crop-paste", "perlin"])
def test_run_writes_layout_resumes_and_regenerates_from_seed(method, synthetic_root, tmp_path):
    category = open_category(synthetic_root / "nut")
    generate = crop_paste if method == "crop-paste" else perlin
    out = tmp_path / "out"
    folder = generate(category, "hole", 3, out, seed=7)
    assert folder == out / "nut" / "hole"
    first = _files(folder)
    assert sorted(first) == sorted(f"{k}/{i:04d}.png" for k in ("image", "mask", "part") for i in range(3))
    assert (folder / "contact_sheet.png").is_file()

    generate(category, "hole", 5, out, seed=7)
    after = _files(folder)
    assert {name: after[name] for name in first} == first
    rows = _rows(folder)
    assert [(r["index"], r["attempt"], r["seed"]) for r in rows] == [(i, i, 7 + i) for i in range(5)]
    assert all(r["generator"] == method for r in rows)

    normals = NormalPool(category)
    train_stems, test_stems = ({p.stem for p in part} for part in few_shot_split(category.defects["hole"]))
    good_stems = {p.stem for p in category.train_good}
    for row in rows:
        rng = np.random.default_rng(row["seed"])
        pair = (
            crop_paste_pair(rng, training_defects(category, "hole"), normals, category.kind)
            if method == "crop-paste"
            else perlin_pair(rng, normals)
        )
        image = load_image(folder / row["image"])
        mask = load_mask(folder / row["mask"])
        np.testing.assert_array_equal(image, pair.image)
        np.testing.assert_array_equal(mask, pair.mask)
        assert row["alignment"] == round(alignment_score(image, mask, pair.region), 4)
        np.testing.assert_array_equal(pair.region, normals[[n.stem for n in normals].index(row["target"])].foreground)
        assert np.isin(np.asarray(Image.open(folder / row["mask"])), [0, 255]).all()
        assert row["target"] in good_stems
        target = load_image(category.train_good[[p.stem for p in category.train_good].index(row["target"])])
        assert not (mask & ~foreground_mask(target, "object")).any()
        if method == "crop-paste":
            assert row["source"] in train_stems and row["source"] not in test_stems


def test_rerun_with_other_settings_needs_force(synthetic_root, tmp_path):
    category = open_category(synthetic_root / "weave")
    folder = crop_paste(category, "cut", 2, tmp_path, seed=0)
    with pytest.raises(UserError, match="--force"):
        crop_paste(category, "cut", 3, tmp_path, seed=1)
    with pytest.raises(UserError, match="--force"):
        perlin(category, "cut", 3, tmp_path, seed=0)
    perlin(category, "cut", 2, tmp_path, seed=0, force=True)
    assert [r["generator"] for r in _rows(folder)] == ["perlin", "perlin"]
    # a texture's defect may sit anywhere: its alignment is scored over the whole image
    for row in _rows(folder):
        image, mask = load_image(folder / row["image"]), load_mask(folder / row["mask"])
        assert row["alignment"] == round(alignment_score(image, mask), 4)
    assert len(PairWriter(tmp_path, "weave", "cut").kept()) == 2


def test_cli_baseline(synthetic_root, tmp_path, capsys):
    def run(*args) -> int:
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            return exc.code
        return 0

    data = synthetic_root / "pill"
    assert run("baseline", "perlin", "--data", data, "--defect", "stain", "--num", 2, "--out", tmp_path) == 0
    assert len(_rows(tmp_path / "pill" / "stain")) == 2
    assert run("baseline", "crop-paste", "--data", data, "--defect", "stain", "--num", 2, "--out", tmp_path / "cp",
               "--split-rounding", "ceil", "--seed", 4) == 0
    assert [r["seed"] for r in _rows(tmp_path / "cp" / "pill" / "stain")] == [4, 5]
    capsys.readouterr()
    assert run("baseline", "stamp", "--data", data, "--defect", "stain", "--num", 2, "--out", tmp_path) == 2
    assert "crop-paste or perlin" in capsys.readouterr().err
    assert run("baseline", "perlin", "--data", data, "--defect", "dent", "--num", 2, "--out", tmp_path) == 2
    assert "--defect dent" in capsys.readouterr().err
