"""Exports for anomalib: the MVTec AD and Folder layouts read back by the project's own loaders, the file
pairing anomalib applies, resizing (masks binary and aligned), orphans, refusals and the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualanodiff.config import Config
from dualanodiff.data import load_image, load_mask, open_category
from dualanodiff.errors import UserError
from dualanodiff.exports import export_pairs
from dualanodiff.images import resize_image, resize_mask
from dualanodiff.io import save_png
from dualanodiff.pairs import PairWriter, pair_size, read_pairs

SIDE = 16


def square_pair(seed: int, side: int = SIDE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy grey image with a white square defect, its exact mask and part image."""
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 90, (side, side, 3), dtype=np.uint8)
    mask = np.zeros((side, side), bool)
    top = 2 + seed % 4
    mask[top : top + 6, 4:10] = True
    image[mask] = 255
    return image, mask, np.where(mask[..., None], image, 127).astype(np.uint8)


def write_generated(root: Path, category: str, defect: str, count: int, record: dict | None = None) -> list:
    """``count`` pairs written as `generate` writes them; the (image, mask) arrays in order."""
    written = []
    with PairWriter(root, category, defect) as writer:
        for seed in range(count):
            image, mask, part = square_pair(seed)
            writer.write(image, mask, part, {"attempt": seed, "seed": seed, **(record or {})})
            written.append((image, mask))
    return written


@pytest.fixture
def generated(tmp_path) -> tuple[Path, dict]:
    """Two categories, three defect types; the arrays each holds."""
    root = tmp_path / "gen"
    pairs = {
        ("nut", "hole"): write_generated(root, "nut", "hole", 3),
        ("nut", "crack"): write_generated(root, "nut", "crack", 2),
        ("weave", "cut"): write_generated(root, "weave", "cut", 1),
    }
    return root, pairs


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def anomalib_pairing(images: list[Path], masks: list[Path]) -> list[tuple[str, str]]:
    """anomalib's rule (make_mvtec_ad_dataset and make_folder_dataset at commit b7233686): abnormal images
    and masks are each sorted by path string and paired by position; it then requires image stem in mask stem."""
    pairs = list(zip(sorted(map(str, images)), sorted(map(str, masks))))
    assert len(images) == len(masks)
    return [(Path(image).stem, Path(mask).stem) for image, mask in pairs]


# ---------------------------------------------------------------------------------------------- round trips


def test_mvtec_export_reads_back_as_a_category_with_the_kept_pairs(generated, tmp_path):
    root, written = generated
    out = tmp_path / "mvtec"
    summary = export_pairs(root, out, "mvtec")
    assert summary.pairs == {("nut", "hole"): 3, ("nut", "crack"): 2, ("weave", "cut"): 1}
    assert files_under(out / "weave") == ["export.jsonl", "ground_truth/cut/000_mask.png", "test/cut/000.png"]
    for name in ("nut", "weave"):
        category = open_category(out / name)
        assert category.layout == "mvtec" and category.train_good == [] and category.test_good == []
        for defect, pairs in category.defects.items():
            assert [p.stem for p in pairs] == [f"{i:03d}" for i in range(len(written[(name, defect)]))]
            for pair, (image, mask) in zip(pairs, written[(name, defect)]):
                assert pair.mask.name == f"{pair.stem}_mask.png"
                assert np.array_equal(load_image(pair.image), image)
                stored = np.asarray(Image.open(pair.mask))
                assert set(np.unique(stored)) == {0, 255} and np.array_equal(stored == 255, mask)
    rows = [json.loads(line) for line in (out / "nut" / "export.jsonl").read_text().splitlines()]
    assert [(r["defect"], r["image"], r["mask"]) for r in rows][1:3] == [
        ("crack", "test/crack/001.png", "ground_truth/crack/001_mask.png"),
        ("hole", "test/hole/000.png", "ground_truth/hole/000_mask.png"),
    ]
    assert rows[2]["source_image"] == str((root / "nut" / "hole" / "image" / "0000.png").resolve())


def test_folder_export_holds_only_images_and_masks_that_pair_by_name(generated, tmp_path):
    root, written = generated
    out = tmp_path / "folder"
    export_pairs(root, out, "folder")
    assert sorted(os.listdir(out / "nut")) == ["crack", "export.jsonl", "hole"]
    for (name, defect), arrays in written.items():
        folder = out / name / defect
        assert sorted(os.listdir(folder)) == ["images", "masks"]
        assert sorted(os.listdir(folder / "images")) == sorted(os.listdir(folder / "masks"))
        category = open_category(folder)  # the project's images/ + masks/ reader
        assert category.layout == "folder" and list(category.defects) == [defect]
        for pair, (image, mask) in zip(category.defects[defect], arrays):
            assert pair.image.name == pair.mask.name
            assert np.array_equal(load_image(pair.image), image)
            assert np.array_equal(load_mask(pair.mask), mask)


def test_both_layouts_pair_the_way_anomalib_sorts_even_past_999_pairs(tmp_path):
    """1000.png sorts before 101.png but 1000_mask.png after 100_mask.png: names must share a width."""
    folder = tmp_path / "gen" / "nut" / "hole"  # pairs from another tool: no manifest, matched by stem
    tiny = np.zeros((2, 2, 3), np.uint8)
    for index in range(1001):
        save_png(folder / "image" / f"{index}.png", tiny)
        save_png(folder / "mask" / f"{index}.png", np.full((2, 2), 255, np.uint8))
    export_pairs(tmp_path / "gen", tmp_path / "mvtec", "mvtec")
    export_pairs(tmp_path / "gen", tmp_path / "folder", "folder")
    images = list((tmp_path / "mvtec" / "nut" / "test" / "hole").iterdir())
    masks = list((tmp_path / "mvtec" / "nut" / "ground_truth" / "hole").iterdir())
    assert len(images) == 1001 and {len(p.stem) for p in images} == {4}
    assert all(f"{image}_mask" == mask for image, mask in anomalib_pairing(images, masks))
    images = list((tmp_path / "folder" / "nut" / "hole" / "images").iterdir())
    masks = list((tmp_path / "folder" / "nut" / "hole" / "masks").iterdir())
    assert all(image == mask for image, mask in anomalib_pairing(images, masks))


def test_normal_images_join_the_export_as_links_from_the_dataset(generated, synthetic_root, tmp_path):
    root, _ = generated
    nut = open_category(synthetic_root / "nut")
    summary = export_pairs(root, tmp_path / "mvtec", "mvtec", normal_from=synthetic_root, force=False)
    exported = open_category(tmp_path / "mvtec" / "nut")
    assert [p.name for p in exported.train_good] == [p.name for p in nut.train_good]
    assert [p.name for p in exported.test_good] == [p.name for p in nut.test_good]
    assert summary.normals["nut"] == len(nut.train_good) + len(nut.test_good)
    assert os.path.samefile(exported.train_good[0], nut.train_good[0])  # a hard link, not a copy
    assert (tmp_path / "mvtec" / "weave" / "train" / "good").is_dir()
    nut_only = tmp_path / "nut-only"
    write_generated(nut_only, "nut", "hole", 1)
    export_pairs(nut_only, tmp_path / "folder", "folder", normal_from=synthetic_root / "nut")  # the category itself
    good = sorted((tmp_path / "folder" / "nut" / "good").iterdir())
    assert [p.name for p in good] == [p.name for p in nut.train_good]
    assert sorted(os.listdir(tmp_path / "folder" / "nut")) == ["export.jsonl", "good", "hole"]


def test_a_normal_dataset_without_the_category_is_one_clear_error(generated, synthetic_root, tmp_path):
    root, _ = generated
    with pytest.raises(UserError, match=r"--normal-from .*pill: has no nut/ folder"):
        export_pairs(root, tmp_path / "out", "mvtec", normal_from=synthetic_root / "pill")
    with pytest.raises(UserError, match=r"--normal-from .*nut: has no weave/ folder"):  # gen holds weave too
        export_pairs(root, tmp_path / "out", "mvtec", normal_from=synthetic_root / "nut")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- resolution


def test_resized_masks_stay_binary_and_a_square_lands_where_expected():
    mask = np.zeros((64, 64), bool)
    mask[16:32, 8:24] = True
    up, down = resize_mask(mask, 128), resize_mask(mask, 32)
    expected_up, expected_down = np.zeros((128, 128), bool), np.zeros((32, 32), bool)
    expected_up[32:64, 16:48], expected_down[8:16, 4:12] = True, True
    assert up.dtype == bool and np.array_equal(up, expected_up) and np.array_equal(down, expected_down)
    wide = resize_mask(mask, (128, 32))  # (width, height)
    assert wide.shape == (32, 128) and np.array_equal(np.argwhere(wide)[[0, -1]], [[8, 16], [15, 47]])


def test_a_lanczos_image_stays_aligned_with_its_nearest_neighbour_mask():
    image, mask, _ = square_pair(0, side=32)
    big = resize_image(image, 64, Image.Resampling.LANCZOS)
    assert big.shape == (64, 64, 3)
    assert np.array_equal(big.min(-1) > 160, resize_mask(mask, 64))  # the white square, thresholded


def test_export_resizes_to_n_and_to_the_source_size_of_the_run(generated, synthetic_root, tmp_path):
    root, written = generated
    export_pairs(root, tmp_path / "n", "folder", size=40)
    pair = open_category(tmp_path / "n" / "nut" / "hole").defects["hole"][1]
    image, mask = load_image(pair.image), np.asarray(Image.open(pair.mask))
    assert image.shape == (40, 40, 3) and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 255, resize_mask(written[("nut", "hole")][1][1], 40))
    with pytest.raises(UserError, match="--size source: .* names no training run"):
        export_pairs(root, tmp_path / "source", "mvtec", size="source")
    run = tmp_path / "run"
    cfg = Config()
    cfg.data.data, cfg.data.defect = str(synthetic_root / "nut"), "hole"
    run.mkdir()
    cfg.to_yaml(run / "config.yaml")
    write_generated(tmp_path / "ours", "nut", "hole", 2, {"run": str(run)})
    export_pairs(tmp_path / "ours", tmp_path / "source", "mvtec", size="source")
    exported = open_category(tmp_path / "source" / "nut")
    assert exported.image_size() == open_category(synthetic_root / "nut").image_size() == (64, 64)


def test_normals_are_resized_with_the_pairs(generated, synthetic_root, tmp_path):
    export_pairs(generated[0], tmp_path / "out", "mvtec", size=24, normal_from=synthetic_root)
    good = open_category(tmp_path / "out" / "nut").train_good
    assert {Image.open(p).size for p in good} == {(24, 24)}
    assert not os.path.samefile(good[0], synthetic_root / "nut" / "train" / "good" / good[0].name)


def test_a_writer_with_a_size_writes_resized_pairs(tmp_path):
    image, mask, part = square_pair(1)
    with PairWriter(tmp_path, "nut", "hole", size=(48, 32)) as writer:
        writer.write(image, mask, part, {"attempt": 0, "seed": 0})
        row = writer.kept()[0]
    stored = np.asarray(Image.open(writer.dir / row["mask"]))
    assert load_image(writer.dir / row["image"]).shape == load_image(writer.dir / row["part"]).shape == (32, 48, 3)
    assert set(np.unique(stored)) == {0, 255} and np.array_equal(stored == 255, resize_mask(mask, (48, 32)))


def test_pair_size_reads_the_dataset_for_source(synthetic_root):
    assert pair_size("model", "") is None and pair_size(96, "") == (96, 96)
    assert pair_size("source", synthetic_root / "weave") == (64, 64)
    with pytest.raises(UserError, match="--size source: the pairs' dataset nowhere is not a folder"):
        pair_size("source", "nowhere")


@pytest.mark.parametrize("size", ["model", "source", 256])
def test_generate_size_round_trips_yaml(size, tmp_path):
    cfg = Config()
    cfg.generate.size = size
    cfg.to_yaml(tmp_path / "config.yaml")
    assert Config.from_yaml(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("value", ["big", 0, -4, 2.5, True])
def test_a_bad_generate_size_names_the_key(value):
    with pytest.raises(UserError, match=rf"run.yaml:generate:size: {value!r} is not a size; give model, source or"):
        Config.from_dict({"generate": {"size": value}}, "run.yaml")
    assert Config.from_dict({"generate": {"size": "64"}}).generate.size == 64  # a command line's text


# ---------------------------------------------------------------------------------------------- refusals


def test_an_orphan_png_is_never_exported(generated, tmp_path):
    root, _ = generated
    orphan_image, orphan_mask, _ = square_pair(9)
    save_png(root / "nut" / "hole" / "image" / "0003.png", orphan_image)  # a killed writer's leftovers
    save_png(root / "nut" / "hole" / "mask" / "0003.png", orphan_mask.astype(np.uint8) * 255)
    summary = export_pairs(root, tmp_path / "out", "mvtec")
    assert summary.pairs[("nut", "hole")] == 3
    assert files_under(tmp_path / "out" / "nut" / "test" / "hole") == ["000.png", "001.png", "002.png"]


def test_a_non_empty_out_is_refused_unless_forced_which_replaces_only_its_categories(generated, tmp_path):
    root, _ = generated
    out = tmp_path / "out"
    (out / "nut" / "test" / "stale").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out .*out: folder is not empty; .* --force"):
        export_pairs(root, out, "mvtec")
    assert (out / "nut" / "test" / "stale").is_dir()
    export_pairs(root, out, "mvtec", force=True)
    assert sorted(os.listdir(out / "nut" / "test")) == ["crack", "hole"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "out"]  # no temporary left beside OUT


def test_an_out_that_would_replace_the_pairs_it_reads_is_refused(generated, tmp_path):
    root, _ = generated
    nested = tmp_path / "x" / "nut" / "pairs"  # exporting category nut into x would replace x/nut
    write_generated(nested, "nut", "hole", 1)
    for source, out in ((root, root), (root, root / "nut" / "hole"), (nested, tmp_path / "x")):
        with pytest.raises(UserError, match="would overwrite the pairs it reads"):
            export_pairs(source, out, "mvtec", force=True)
    write_generated(tmp_path / "y" / "native", "nut", "hole", 1)  # pairs in a folder beside the export
    export_pairs(tmp_path / "y" / "native", tmp_path / "y", "mvtec", force=True)
    assert sorted(os.listdir(tmp_path / "y")) == ["native", "nut"]
    write_generated(tmp_path / "z", "nut", "crack", 1)  # native pairs of an earlier `generate --out z`
    with pytest.raises(UserError, match=r"z/nut holds generated pairs \(the native layout\)"):
        export_pairs(root, tmp_path / "z", "mvtec", force=True)
    assert len(read_pairs(tmp_path / "z" / "nut" / "crack")) == 1


def test_a_folder_without_kept_pairs_and_an_unknown_layout_are_refused(tmp_path):
    with PairWriter(tmp_path / "gen", "nut", "hole"):
        pass
    with pytest.raises(UserError, match="no kept pairs"):
        export_pairs(tmp_path / "gen", tmp_path / "out", "mvtec")
    with pytest.raises(UserError, match="--layout coco: unknown; choose mvtec or folder"):
        export_pairs(tmp_path / "gen", tmp_path / "out", "coco")


def test_an_export_that_fails_midway_leaves_each_category_whole_or_absent(generated, tmp_path, monkeypatch):
    from dualanodiff import exports

    def failing(staging, layout, defect, *args):
        if defect == "cut":  # weave's pair: nut (5 pairs) is finished by then
            raise OSError(28, "No space left on device")
        return original(staging, layout, defect, *args)

    original = exports._export_pair
    monkeypatch.setattr(exports, "_export_pair", failing)
    with pytest.raises(OSError):
        export_pairs(generated[0], tmp_path / "out", "mvtec")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "out"]  # no temporary folder left beside OUT
    assert os.listdir(tmp_path / "out") == ["nut"]
    assert len(files_under(tmp_path / "out" / "nut")) == 2 * 5 + 1


# ---------------------------------------------------------------------------------------------- command line


def test_cli_export_writes_the_layout_and_reports_bad_input_in_one_line(generated, run_cli, tmp_path):
    root, _ = generated
    code, _, err = run_cli("export", root, "--out", tmp_path / "out", "--layout", "folder", "--size", "20")
    assert code == 0 and "6 pairs" in err
    assert load_image(tmp_path / "out" / "nut" / "hole" / "images" / "000.png").shape == (20, 20, 3)
    for args, message in [
        (["--layout", "folder"], "folder is not empty"),
        (["--layout", "folder", "--force", "--size", "big"], "--size: 'big' is not a size"),
        (["--layout", "coco", "--force"], "--layout coco: unknown"),
    ]:
        code, _, err = run_cli("export", root, "--out", tmp_path / "out", *args)
        assert code == 2 and err.strip().count("\n") == 0 and message in err, err
    code, _, err = run_cli("export", tmp_path / "nowhere", "--out", tmp_path / "x", "--layout", "mvtec")
    assert code == 2 and "not a folder of generated pairs" in err
