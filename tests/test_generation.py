"""Generation: joint guided sampling, seeds, the pairs folder (filter, cap, resume), inpainting and the CLI."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from dualanodiff.cli import main
from dualanodiff.config import CANVAS_STRENGTH, Config, GenerateConfig
from dualanodiff.data import load_image, load_mask, open_category
from dualanodiff.errors import UserError
from dualanodiff.generation import (
    REGION_MARGIN,
    generate,
    generate_config,
    placement_rng,
)
from dualanodiff.images import as_grey, is_grey
from dualanodiff.masks import filter_verdict, foreground_mask, part_to_mask
from dualanodiff.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def fast(**options) -> GenerateConfig:
    """Few DDIM steps on the CPU: the file logic does not depend on the sampler's length."""
    return GenerateConfig(steps=2, scheduler="ddim", device="cpu", batch_size=2, **options)


def manifest(folder) -> list[dict]:
    path = folder / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_without_filter_every_pair_is_written_with_its_verdict(run, synthetic_root, tmp_path):
    cfg = fast(num=3, filter=False)
    messages = []
    summary = generate(run, tmp_path, cfg, log=messages.append)
    folder = tmp_path / "nut" / "hole"
    assert (summary.folder, summary.kept, summary.dropped, summary.attempts) == (folder, 3, 0, 3)
    rows = manifest(folder)
    assert [(r["index"], r["attempt"], r["seed"]) for r in rows] == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    assert not (folder / "rejected.jsonl").exists()
    kind = open_category(synthetic_root / "nut").kind
    for row in rows:
        assert (row["steps"], row["scheduler"], row["guidance"]) == (2, "ddim", 2.5)
        mask_png = Image.open(folder / row["mask"])
        assert mask_png.mode == "L" and mask_png.size == (32, 32)
        assert set(np.unique(np.asarray(mask_png))) <= {0, 255}
        image, part, mask = load_image(folder / row["image"]), load_image(folder / row["part"]), load_mask(folder / row["mask"])
        assert np.array_equal(mask, part_to_mask(part))
        assert row["verdict"] == filter_verdict(mask, foreground_mask(image, kind), cfg.max_area, cfg.min_on_object)
        assert row["mask_area"] == pytest.approx(mask.mean(), abs=1e-6)
    # the log compares the median mask area with the few-shot masks' (at their own size: areas are shares)
    areas = [load_mask(folder / row["mask"]).mean() for row in rows]
    train = RunFolder(run).load_config().split["train"]
    real = [load_mask(p.mask).mean() for p in open_category(synthetic_root / "nut").defects["hole"] if p.stem in train]
    expected = f"mask areas: median {100 * np.median(areas):.2f} % of the image"
    if np.median(areas) > 0:
        expected += f", {np.median(areas) / np.median(real):.2f}x the few-shot masks' ({100 * np.median(real):.2f} %)"
    assert expected in messages
    sheet = load_image(folder / "contact_sheet.png")
    assert sheet.shape == (3 * 132 + 4, 3 * 132 + 4, 3)


def test_the_filter_drops_pairs_and_the_cap_stops_the_loop(run, tmp_path):
    messages = []
    summary = generate(run, tmp_path, fast(num=1, max_area=0.0), log=messages.append)
    folder = tmp_path / "nut" / "hole"
    assert (summary.kept, summary.dropped, summary.attempts) == (0, 4, 4)  # the cap: 4 x num
    rejected = [json.loads(line) for line in (folder / "rejected.jsonl").read_text().splitlines()]
    assert [r["attempt"] for r in rejected] == [0, 1, 2, 3]
    assert all(r["verdict"] in ("empty", "too_large") for r in rejected)
    assert manifest(folder) == []
    assert any("cap of 4 x num = 4 attempts" in m for m in messages)


def test_a_larger_num_resumes_and_keeps_the_first_pairs_byte_identical(run, tmp_path):
    folder = tmp_path / "nut" / "hole"
    generate(run, tmp_path, fast(num=2, filter=False))
    files = sorted(p for p in folder.glob("*/*.png"))
    before = {p: p.read_bytes() for p in files}
    first_rows = manifest(folder)
    (folder / "image" / "0002.png").write_bytes(b"truncated by a killed run")  # an orphan without a row
    summary = generate(run, tmp_path, fast(num=4, filter=False))
    assert summary.kept == 4
    assert {p: p.read_bytes() for p in files} == before
    rows = manifest(folder)
    assert rows[:2] == first_rows and [r["attempt"] for r in rows[2:]] == [2, 3]
    assert load_image(folder / "image" / "0002.png").shape == (32, 32, 3)


def test_generate_options_layer_run_then_config_file_then_set_then_flags(run, tmp_path):
    saved = Config.from_yaml(run / "config.yaml")
    saved.generate.guidance, saved.generate.steps, saved.generate.batch_size = 4.0, 50, 3
    (tmp_path / "run").mkdir()
    saved.to_yaml(tmp_path / "run" / "config.yaml")
    (tmp_path / "options.yaml").write_text(yaml.safe_dump({"generate": {"steps": 7, "scheduler": "ddim", "seed": 5}}))
    cfg = generate_config(tmp_path / "run", tmp_path / "options.yaml", ["generate.steps=9", "generate.seed=6"],
                          steps=3, num=None)
    assert (cfg.guidance, cfg.batch_size, cfg.scheduler, cfg.seed, cfg.steps) == (4.0, 3, "ddim", 6, 3)
    assert cfg.num == GenerateConfig().num
    with pytest.raises(UserError, match=r"^--set train.steps: this command reads only the generate section"):
        generate_config(tmp_path / "run", None, ["train.steps=3"])


def test_cli_generate_writes_pairs_and_a_bad_scheduler_is_one_line(run, tmp_path, capsys):
    common = ["generate", str(run), "--num", "4", "--out", str(tmp_path), "--set", "generate.device=cpu"]
    main(common + ["--steps", "2", "--set", "generate.scheduler=dpm", "--no-filter", "--set", "generate.batch_size=4"])
    assert len(manifest(tmp_path / "nut" / "hole")) == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--set", "generate.scheduler=nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "scheduler nope" in err


def _nut_hole_config(synthetic_root) -> tuple[Config, list[np.ndarray]]:
    """A run config of nut/hole on the synthetic set with its first three hole images as the few-shot split."""
    cfg = Config()
    cfg.data.data, cfg.data.defect = str(synthetic_root / "nut"), "hole"
    train = sorted(p.stem for p in (synthetic_root / "nut" / "test" / "hole").glob("*.png"))[:3]
    cfg.split = {"train": train, "test": []}
    return cfg, [load_image(synthetic_root / "nut" / "test" / "hole" / f"{stem}.png") for stem in train]


def test_an_object_much_smaller_than_the_few_shot_objects_is_no_object(synthetic_root):
    """Two dark dots on an empty background stand out, but they are not a nut: a generated object must cover
    at least OBJECT_FLOOR of the few-shot images' mean object share."""
    from dualanodiff.generation import OBJECT_FLOOR, few_shot_objects, object_region
    from dualanodiff.masks import filter_verdict, foreground_mask

    cfg, images = _nut_hole_config(synthetic_root)
    shares = [foreground_mask(image, "object").mean() for image in images]
    floor = few_shot_objects(cfg, "object").floor
    assert floor == pytest.approx(OBJECT_FLOOR * np.mean(shares)) and 0.02 < floor < 0.2
    assert few_shot_objects(cfg, "texture").floor == 0.0
    cfg.data.data = str(synthetic_root / "gone")
    assert few_shot_objects(cfg, "object").floor == 0.0
    specks = np.full((64, 64, 3), 150, np.uint8)
    specks[20:23, 20:23], specks[40:43, 30:33] = 20, 20
    mask = np.zeros((64, 64), bool)
    mask[20:23, 20:23] = True
    assert 0 < object_region(specks, "object").mean() < floor  # the dots alone stand out ...
    assert filter_verdict(mask, object_region(specks, "object", min_share=floor)) == "no_object"  # ... not an object
    nut = np.full((64, 64, 3), 150, np.uint8)
    nut[12:52, 12:52] = (120, 80, 40)
    assert filter_verdict(mask, object_region(nut, "object", min_share=floor)) == "kept"


def test_a_defect_on_the_part_of_an_object_the_detector_missed_is_judged_on_the_few_shot_footprint(synthetic_root):
    """A generated object found only in part (its other half as pale as the background) keeps a defect on the
    missed half when the few-shot objects, flipped as training flips them, covered that place; a defect
    outside both stays off the object, and an image without an object stays "no_object"."""
    from dualanodiff.generation import few_shot_objects, object_region
    from dualanodiff.images import resize_mask
    from dualanodiff.masks import filter_verdict

    cfg, images = _nut_hole_config(synthetic_root)
    union = np.any([object_region(image, "object") for image in images], axis=0)
    objects = few_shot_objects(cfg, "object")
    assert np.array_equal(objects.footprint, union | union[:, ::-1] | union[::-1] | union[::-1, ::-1])
    cfg.data.flips = False
    assert np.array_equal(few_shot_objects(cfg, "object").footprint, union)
    footprint = resize_mask(objects.footprint, (96, 96))  # the generated image need not have the dataset's size
    half = np.full((96, 96, 3), 150, np.uint8)
    half[18:78, 18:48] = (120, 80, 40)  # the found half of the object
    own = object_region(half, "object", min_share=objects.floor)
    on_missed_half = np.zeros((96, 96), bool)
    on_missed_half[45:51, 58:64] = True
    assert footprint[on_missed_half].all() and not own[on_missed_half].any()
    assert filter_verdict(on_missed_half, own) == "off_object"
    assert filter_verdict(on_missed_half, objects.widen(own)) == "kept"
    outside = np.zeros((96, 96), bool)
    outside[3:7, 88:92] = True
    assert not footprint[outside].any() and filter_verdict(outside, objects.widen(own)) == "off_object"
    flat = np.full((96, 96, 3), 150, np.uint8)
    assert filter_verdict(on_missed_half, objects.widen(object_region(flat, "object"))) == "no_object"
    assert few_shot_objects(cfg, "texture").widen(None) is None
    cfg.data.data = str(synthetic_root / "gone")
    assert few_shot_objects(cfg, "object").widen(own) is own


def test_object_region_excludes_a_frame_so_border_masks_are_off_object():
    from dualanodiff.generation import object_region
    from dualanodiff.masks import filter_verdict

    image = np.full((100, 100, 3), 150, np.uint8)
    image[10:80, 10:80] = (90, 60, 30)
    frame = np.zeros((100, 100), bool)
    frame[:2], frame[:, :2] = True, True  # a border-hugging mask, as a faint frame in a decoded part image gives
    region = object_region(image, "object")
    assert not region[:3].any() and not region[:, :3].any() and region[12:78, 12:78].all() and not region[85:].any()
    assert filter_verdict(frame, region) == "off_object"
    spot = np.zeros((100, 100), bool)
    spot[40:45, 40:45] = True
    assert filter_verdict(spot, region) == "kept"
    assert object_region(image, "texture") is None and filter_verdict(frame, None) == "kept"
    flat = np.full((100, 100, 3), 150, np.uint8)  # no object stands out: nowhere for a defect to be
    assert not object_region(flat, "object").any() and filter_verdict(spot, object_region(flat, "object")) == "no_object"


def test_a_folder_with_other_settings_is_refused_unless_forced(run, tmp_path):
    from dualanodiff.errors import UserError

    generate(run, tmp_path, fast(num=2, filter=False))
    with pytest.raises(UserError, match=r"other settings \(steps 2 -> 3\).*--force"):
        generate(run, tmp_path, GenerateConfig(num=3, steps=3, scheduler="ddim", device="cpu", filter=False))
    assert len(manifest(tmp_path / "nut" / "hole")) == 2  # nothing was added or removed
    summary = generate(run, tmp_path, GenerateConfig(num=1, steps=3, scheduler="ddim", device="cpu", filter=False), force=True)
    rows = manifest(tmp_path / "nut" / "hole")
    assert summary.kept == 1 and [(r["index"], r["steps"]) for r in rows] == [(0, 3)]
    resumed = generate(run, tmp_path, GenerateConfig(num=2, steps=3, scheduler="ddim", device="cpu", filter=False))
    assert resumed.kept == 2 and resumed.attempts == 2  # same settings: the first pair is kept, one more made


def test_generate_writes_pairs_at_the_asked_size_and_exports_them_for_anomalib(run, synthetic_root, tmp_path, run_cli):
    from dualanodiff.errors import OtherSettings

    summary = generate(run, tmp_path / "sized", fast(num=2, filter=False, size=48))
    rows = manifest(summary.folder)
    assert [r["size"] for r in rows] == [48, 48]
    for row in rows:
        assert load_image(summary.folder / row["image"]).shape == load_image(summary.folder / row["part"]).shape == (48, 48, 3)
        assert set(np.unique(np.asarray(Image.open(summary.folder / row["mask"])))) <= {0, 255}
    with pytest.raises(OtherSettings, match="size 48 -> None"):  # pairs of two sizes never share a folder
        generate(run, tmp_path / "sized", fast(num=3, filter=False))
    out, native_root = tmp_path / "mvtec", tmp_path / "native"
    code, _, err = run_cli(
        "generate", run, "--out", native_root, "--num", "2", "--steps", "2", "--no-filter",
        "--set", "generate.device=cpu", "--set", "generate.scheduler=ddim", "--set", "generate.size=source",
    )
    assert code == 0, err
    code, _, err = run_cli("export", native_root, "--out", out, "--layout", "mvtec")
    assert code == 0, err
    native = native_root / "nut" / "hole"
    category = open_category(out / "nut")
    assert category.image_size() == open_category(synthetic_root / "nut").image_size() == (64, 64)
    exported = category.defects["hole"]
    assert [p.stem for p in exported] == ["000", "001"]
    assert all(np.array_equal(load_image(p.image), load_image(native / r["image"])) for p, r in zip(exported, manifest(native)))


def test_on_normals_draws_each_defect_into_a_real_normal_image_where_a_few_shot_shape_is_placed(run, synthetic_root, tmp_path, capsys):
    from dualanodiff.baselines import NormalPool, place_defect, training_defects
    from dualanodiff.errors import OtherSettings

    main(["generate", str(run), "--out", str(tmp_path), "--num", "3", "--steps", "2", "--no-filter", "--canvas", "on-normals",
          "--set", "generate.scheduler=ddim", "--set", "generate.batch_size=2", "--set", "generate.device=cpu"])
    assert "pairs drawn at 64 px, the run trained at 32 px" in capsys.readouterr().err
    folder = tmp_path / "nut" / "hole"
    category = open_category(synthetic_root / "nut")
    normals = NormalPool(category)
    defects = [d for d in training_defects(category, "hole") if d.stem in Config.from_yaml(run / "config.yaml").split["train"]]
    rows = manifest(folder)
    assert len(rows) == 3
    for row in rows:
        target, _, placed, placement = place_defect(placement_rng(row["seed"]), defects, normals, category.kind)
        crop_paste = place_defect(np.random.default_rng(row["seed"]), defects, normals, category.kind)[3]
        assert placement != crop_paste  # crop-paste's pair of the same seed is placed apart: no set of both holds one twice
        assert (row["canvas"], row["strength"], row["onto"], row["background"], row["shape_of"]) == (
            "on-normals", 0.15, target.stem, target.stem, placement["source"])  # strength 0: the canvas's own, 0.15
        # drawn at the photos' 64 px, twice the run's 32: outside its mask the pair is the real photo itself
        image, mask = load_image(folder / row["image"]), load_mask(folder / row["mask"])
        assert row["resolution"] == 64 and image.shape == target.image.shape == (64, 64, 3)
        assert np.array_equal(image[~mask], target.image[~mask])
        margin = max(1, round(REGION_MARGIN * placed.shape[0]))
        grown = cv2.dilate(placed.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)).astype(bool)
        assert not (mask & ~grown).any()
    with pytest.raises(OtherSettings, match="canvas 'on-normals' -> None"):
        generate(run, tmp_path, fast(num=4, filter=False))
    started = ["generate", str(run), "--out", str(tmp_path / "started"), "--num", "2", "--steps", "2", "--no-filter",
               "--set", "generate.device=cpu", "--canvas", "on-normals", "--strength"]
    main(started + ["0.5"])
    assert [row["strength"] for row in manifest(tmp_path / "started" / "nut" / "hole")] == [0.5, 0.5]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(started + ["1.5"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "--strength 1.5: out of range" in err
    with pytest.raises(UserError, match="--canvas on-normals picks each pair's normal image itself"):
        generate(run, tmp_path / "other", fast(num=1, canvas="on-normals"), normal=category.train_good[0],
                 mask=category.defects["hole"][0].mask)
    moved = tmp_path / "moved-run"
    shutil.copytree(run, moved)
    saved = Config.from_yaml(moved / "config.yaml")
    saved.data.data = str(tmp_path / "gone")
    saved.to_yaml(moved / "config.yaml")
    with pytest.raises(UserError, match="--canvas on-normals: the run's dataset .*gone"):
        generate(moved, tmp_path / "other", fast(num=1, canvas="on-normals"))
    assert not (tmp_path / "other").exists()


def test_on_normals_pairs_resume_byte_identical_to_one_uninterrupted_run(run, tmp_path):
    # strength 0.5 of 2 steps: one step from the init images, whose encoding must not depend on the batch
    cfg = fast(num=3, filter=False, canvas="on-normals", strength=0.5)
    generate(run, tmp_path / "whole", cfg)
    generate(run, tmp_path / "resumed", fast(num=1, filter=False, canvas="on-normals", strength=0.5))
    generate(run, tmp_path / "resumed", cfg)
    whole, resumed = tmp_path / "whole" / "nut" / "hole", tmp_path / "resumed" / "nut" / "hole"
    assert [(r["onto"], r["shape_of"]) for r in manifest(whole)] == [(r["onto"], r["shape_of"]) for r in manifest(resumed)]
    for row in manifest(whole):
        for key in ("image", "mask", "part"):
            assert (whole / row[key]).read_bytes() == (resumed / row[key]).read_bytes()


def test_a_noise_canvas_refuses_a_strength_below_one():
    from dualanodiff.generation import check_config

    with pytest.raises(UserError, match=r"^generate.strength 0.5: a noise canvas starts from pure noise; set generate.canvas"):
        check_config(GenerateConfig(strength=0.5))
    assert check_config(GenerateConfig(strength=1.0)).start_strength == 1.0
    assert GenerateConfig(canvas="on-normals").start_strength == CANVAS_STRENGTH["on-normals"] == 0.15
    assert GenerateConfig(canvas="normal").start_strength == 1.0


def test_on_normals_draws_at_the_photos_side_up_to_twice_the_runs_and_an_asked_side_wins(run, tmp_path, capsys):
    from types import SimpleNamespace

    from dualanodiff.generation import sampling_side

    def trained_at(side: int) -> Config:
        cfg = Config()
        cfg.data.resolution = side
        return cfg

    photos = lambda side: SimpleNamespace(photo_side=side)  # noqa: E731  # what sampling_side reads of a NormalCanvas
    sides = {(32, 64): 64, (32, 300): 64, (32, 48): 32, (128, 256): 256, (128, 200): 192, (128, 1024): 256, (128, 100): 128}
    for (trained, photo), side in sides.items():
        assert sampling_side(GenerateConfig(), trained_at(trained), photos(photo)) == side
    assert sampling_side(GenerateConfig(), trained_at(128), None) == 128  # whole images: the run's side
    assert sampling_side(GenerateConfig(resolution=64), trained_at(128), photos(1024)) == 64
    generate(run, tmp_path, fast(num=1, filter=False, resolution=64))
    row, = manifest(tmp_path / "nut" / "hole")
    assert row["resolution"] == 64 and load_image(tmp_path / "nut" / "hole" / row["image"]).shape == (64, 64, 3)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(run), "--out", str(tmp_path / "bad"), "--set", "generate.resolution=100"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and "\n" not in err and "generate.resolution 100: must be a multiple of 64" in err
    assert not (tmp_path / "bad").exists()


def test_few_shot_canvas_starts_each_image_from_the_few_shot_image_whose_background_bcm_gets(run, tmp_path, monkeypatch, capsys):
    from dualanodiff.pipeline import DualAnoDiffPipeline

    calls = []
    sample = DualAnoDiffPipeline.__call__
    monkeypatch.setattr(DualAnoDiffPipeline, "__call__", lambda pipe, **kw: calls.append(kw) or sample(pipe, **kw))
    main(["generate", str(run), "--out", str(tmp_path / "started"), "--num", "4", "--steps", "2", "--no-filter",
          "--set", "generate.scheduler=ddim", "--set", "generate.batch_size=4", "--set", "generate.device=cpu",
          "--canvas", "few-shot"])
    saved = Config.from_yaml(run / "config.yaml")
    train = {p.stem: p for p in open_category(saved.data.data).defects["hole"] if p.stem in saved.split["train"]}
    rows = manifest(tmp_path / "started" / "nut" / "hole")
    assert len(train) == 2 and [row["seed"] for row in rows] == [0, 1, 2, 3]
    assert [row["start"] for row in rows] == [row["background"] for row in rows] == [sorted(train)[s % 2] for s in range(4)]
    assert {(row["canvas"], row["strength"]) for row in rows} == {("few-shot", None)}  # strength 1 is not recorded
    (call,) = calls
    assert call["seeds"] == [0, 1, 2, 3] and call.get("strength", 1.0) == 1.0
    for row, image, part in zip(rows, call["init_image"], call["init_part"]):
        assert np.array_equal(image, load_image(train[row["start"]].image)) and (part == 128).all()
    # the default starts from noise and records no canvas
    calls.clear()
    generate(run, tmp_path / "noise", fast(num=1, filter=False))
    assert "init_image" not in calls[0] and manifest(tmp_path / "noise" / "nut" / "hole")[0]["canvas"] is None
    started = load_image(tmp_path / "started" / "nut" / "hole" / rows[0]["image"])
    assert not np.array_equal(started, load_image(tmp_path / "noise" / "nut" / "hole" / rows[0]["image"]))
    moved = tmp_path / "moved-run"
    shutil.copytree(run, moved)
    saved.data.data = str(tmp_path / "gone")
    saved.to_yaml(moved / "config.yaml")
    with pytest.raises(UserError, match="--canvas few-shot: the run's dataset .*gone"):
        generate(moved, tmp_path / "other", fast(num=1, canvas="few-shot"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(run), "--out", str(tmp_path / "other"), "--canvas", "paper"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "canvas: 'paper' is not one of" in err
    assert not (tmp_path / "other").exists()


def test_lay_part_writes_each_image_with_its_parts_defect_laid_on_and_records_it(run, tmp_path):
    from dualanodiff.masks import part_onto

    generate(run, tmp_path / "drawn", fast(num=3, filter=False))
    main(["generate", str(run), "--out", str(tmp_path / "laid"), "--num", "3", "--steps", "2", "--no-filter",
          "--set", "generate.scheduler=ddim", "--set", "generate.batch_size=2", "--set", "generate.device=cpu",
          "--set", "generate.lay_part=true"])
    drawn, laid = (tmp_path / name / "nut" / "hole" for name in ("drawn", "laid"))
    rows = manifest(laid)
    assert [r["lay_part"] for r in rows] == [True] * 3 and [r["lay_part"] for r in manifest(drawn)] == [None] * 3
    for row in rows:
        image, part, mask = load_image(drawn / row["image"]), load_image(drawn / row["part"]), load_mask(drawn / row["mask"])
        assert np.array_equal(load_image(laid / row["part"]), part) and np.array_equal(load_mask(laid / row["mask"]), mask)
        assert np.array_equal(load_image(laid / row["image"]), part_onto(image, part, mask))
    # a folder of drawn pairs takes no laid ones (nor the other way round), and on normals ignore the option
    with pytest.raises(UserError, match=r"other settings \(lay_part None -> True\)"):
        generate(run, tmp_path / "drawn", fast(num=4, filter=False, lay_part=True))
    generate(run, tmp_path / "normals", fast(num=1, filter=False, canvas="on-normals", lay_part=True))
    assert manifest(tmp_path / "normals" / "nut" / "hole")[0]["lay_part"] is None


def test_normal_canvas_starts_each_image_from_a_train_good_image_with_its_own_background(run, synthetic_root, tmp_path, monkeypatch):
    from dualanodiff.pipeline import DualAnoDiffPipeline, prepared_background

    calls = []
    sample = DualAnoDiffPipeline.__call__
    monkeypatch.setattr(DualAnoDiffPipeline, "__call__", lambda pipe, **kw: calls.append(kw) or sample(pipe, **kw))
    generate(run, tmp_path / "started", GenerateConfig(steps=2, scheduler="ddim", device="cpu", num=3, batch_size=3, filter=False, canvas="normal"))
    category = open_category(synthetic_root / "nut")
    good = {path.stem: path for path in category.train_good}
    rows = manifest(tmp_path / "started" / "nut" / "hole")
    assert [row["start"] for row in rows] == [row["background"] for row in rows] == [category.train_good[s].stem for s in range(3)]
    assert {row["canvas"] for row in rows} == {"normal"}
    (call,) = calls
    for row, image, part, background in zip(rows, call["init_image"], call["init_part"], call["background"]):
        normal = load_image(good[row["start"]])
        assert np.array_equal(image, normal) and (part == 128).all()
        assert np.array_equal(background, prepared_background(normal, category.kind))
    no_normals, moved = tmp_path / "nut", tmp_path / "moved-run"  # a dataset without train/good
    shutil.copytree(synthetic_root / "nut", no_normals, ignore=shutil.ignore_patterns("train"))
    shutil.copytree(run, moved)
    saved = Config.from_yaml(run / "config.yaml")
    saved.data.data = str(no_normals)
    saved.to_yaml(moved / "config.yaml")
    with pytest.raises(UserError, match=r"^--canvas normal: .*nut has no train/good images to start from; use --canvas noise$"):
        generate(moved, tmp_path / "other", fast(num=1, canvas="normal"))
    assert not (tmp_path / "other").exists()
    assert {row["strength"] for row in rows} == {None} and calls[0]["strength"] == 1.0  # the first step


def test_strength_noises_the_start_images_to_that_share_of_the_schedule_and_records_it(run, tmp_path, monkeypatch):
    from dualanodiff.pipeline import DualAnoDiffPipeline

    calls = []
    sample = DualAnoDiffPipeline.__call__
    monkeypatch.setattr(DualAnoDiffPipeline, "__call__", lambda pipe, **kw: calls.append(kw) or sample(pipe, **kw))
    main(["generate", str(run), "--out", str(tmp_path / "half"), "--num", "2", "--steps", "4", "--no-filter",
          "--set", "generate.scheduler=ddim", "--set", "generate.batch_size=2", "--set", "generate.device=cpu",
          "--canvas", "normal", "--strength", "0.5"])
    assert [call["strength"] for call in calls] == [0.5]
    assert [row["strength"] for row in manifest(tmp_path / "half" / "nut" / "hole")] == [0.5, 0.5]
    with pytest.raises(UserError, match=r"other settings \(strength 0.5 -> None\)"):
        generate(run, tmp_path / "half", GenerateConfig(steps=4, scheduler="ddim", device="cpu", num=3, filter=False, canvas="normal"))


def test_a_grey_categorys_pairs_are_the_luma_of_what_the_model_drew_and_say_so(run, synthetic_root, tmp_path, capsys):
    grey_data = tmp_path / "grey" / "nut"  # the same category photographed by a grey camera, stored as RGB
    shutil.copytree(synthetic_root / "nut", grey_data)
    for path in grey_data.rglob("*.png"):
        if "ground_truth" not in path.parts:
            Image.fromarray(as_grey(load_image(path))).save(path)
    grey_run = tmp_path / "grey-run"
    shutil.copytree(run, grey_run)
    saved = Config.from_yaml(grey_run / "config.yaml")
    saved.data.data = str(grey_data)
    saved.to_yaml(grey_run / "config.yaml")
    generate(run, tmp_path / "colour", fast(num=3, filter=False))
    generate(grey_run, tmp_path / "grey-pairs", fast(num=3, filter=False), log=print)
    assert "pairs written grey: the run's few-shot photos are grey" in capsys.readouterr().out
    colour_rows, grey_rows = manifest(tmp_path / "colour" / "nut" / "hole"), manifest(tmp_path / "grey-pairs" / "nut" / "hole")
    assert [row.get("grey") for row in colour_rows] == [None] * 3 and [row["grey"] for row in grey_rows] == [True] * 3
    for colour, grey in zip(colour_rows, grey_rows):  # from noise, the model draws the same; the grey pairs keep its luma
        for kind in ("image", "part"):
            drawn = load_image(tmp_path / "colour" / "nut" / "hole" / colour[kind])
            assert not is_grey(drawn) or kind == "part"
            assert np.array_equal(load_image(tmp_path / "grey-pairs" / "nut" / "hole" / grey[kind]), as_grey(drawn))
        assert np.array_equal(load_mask(tmp_path / "colour" / "nut" / "hole" / colour["mask"]),
                              load_mask(tmp_path / "grey-pairs" / "nut" / "hole" / grey["mask"]))


def test_is_grey_allows_jpeg_rounding_and_as_grey_is_the_601_luma():
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = (200, 100, 50)
    assert not is_grey(image)
    assert as_grey(image)[0, 0].tolist() == [round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)] * 3  # 124
    assert is_grey(as_grey(image)) and is_grey(np.array([[[90, 92, 91]]], np.uint8))
    assert not is_grey(np.array([[[90, 93, 91]]], np.uint8))
