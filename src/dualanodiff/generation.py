"""The generate command: pairs from a trained run into files (paper §3.3, DESIGN §3).

`generate` samples with `dualanodiff.pipeline.DualAnoDiffPipeline` (the same pairs a Python caller gets
for the same seeds), applies the quality filter, scores pair consistency and image-mask alignment
(`dualanodiff.alignment`) and writes the resumable MVTec-like layout of `dualanodiff.pairs`::

    summary = generate(Path("runs/nut-hole"), Path("gen"), GenerateConfig(num=8))

Attempt ``a`` uses seed ``generate.seed + a``, so any pair regenerates alone on the same device.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from dualanodiff.alignment import alignment_score
from dualanodiff.baselines import NormalPool, anomaly_part, load_defects, place_defect
from dualanodiff.config import MAX_TRIES_FACTOR, SAMPLING_SIDE_STEP, Config, GenerateConfig, assignments, validated
from dualanodiff.data import load_image, load_mask, open_category, recorded_split
from dualanodiff.devices import resolve_device, resolve_dtype
from dualanodiff.errors import UserError
from dualanodiff.images import as_grey, is_grey, resize_image, resize_mask
from dualanodiff.masks import (
    area_ratio,
    filter_verdict,
    foreground_mask,
    pair_consistency,
)
from dualanodiff.pairs import PairWriter, kept_rows, pair_size
from dualanodiff.pipeline import (
    DualAnoDiffPipeline,
    make_scheduler,
    prepared_background,
)
from dualanodiff.progress import CostEstimate
from dualanodiff.runs import RunFolder
from dualanodiff.signals import Stopped, deferred_signals


@dataclass
class GenerationSummary:
    folder: Path
    kept: int
    dropped: int
    attempts: int
    seconds: float


def generate_config(run: Path, config_file: Path | None = None, assigned: list[str] = (), **overrides) -> GenerateConfig:
    """The run's saved `generate` section, then the keys `config_file` sets, then `assigned` (``--set
    generate.KEY=VALUE``), then non-None `overrides`."""
    raw = RunFolder(run).load_config().to_dict()["generate"]
    if config_file is not None:
        Config.from_yaml(config_file)  # validates the whole file
        raw.update((yaml.safe_load(Path(config_file).read_text()) or {}).get("generate") or {})
    flags = {("generate", name): value for name, value in overrides.items()}
    cfg = Config.from_dict({"generate": raw}, str(config_file or run))
    return check_config(cfg.with_overrides({**assignments(list(assigned), ("generate",)), **flags}).generate)


BORDER_SHARE = 0.03  # of the image side: the frame where an object's defect is not expected
OBJECT_FLOOR = 0.25  # of the few-shot images' mean object share: a foreground smaller than this is a speck
ON_NORMALS_STREAM = 1  # `placement_rng`'s second seed word
REGION_MARGIN = 1 / 32  # of the image side (a latent cell): how far canvas on-normals lets a defect outgrow its shape


def object_region(image: np.ndarray, kind: str, u2net_weights: str = "", min_share: float = 0.0) -> np.ndarray | None:
    """Where an object's defect may lie: its foreground mask without a thin frame along the image border.

    Decoded part images sometimes carry a faint frame that thresholds into a border-hugging mask, which
    the frame rule rejects. An image in which no object stands out, or only one smaller than `min_share`
    of the image (stray dots on an empty background), gets an empty region: its pairs are dropped as
    "no_object". Textures: None (anywhere).
    """
    if kind == "texture":
        return None
    return _without_frame(foreground_mask(image, kind, u2net_weights or None, whole_if_none=False), min_share)


def _without_frame(foreground: np.ndarray, min_share: float) -> np.ndarray:
    """`object_region` from an image's foreground mask (``whole_if_none=False``)."""
    region = foreground.copy()
    band = max(1, round(BORDER_SHARE * min(region.shape)))
    region[:band], region[-band:], region[:, :band], region[:, -band:] = False, False, False, False
    if region.mean() < min_share:
        region[:] = False
    return region


@dataclass
class FewShotObjects:
    """What a run's few-shot training images say about its objects, for judging generated ones.

    `floor` is `object_region`'s `min_share`: OBJECT_FLOOR times their mean foreground share (0 for textures
    or when the dataset is gone). `footprint` is the union of their object regions, flipped as training saw
    them (None: textures, dataset gone). A generated object the detector finds only in part (a low-contrast
    ring seen as a C-shaped arc) otherwise gets defects on its missed part judged off the object, and those
    were the images closest to the few-shot ones (experiments/ON_NORMALS.md).
    """

    floor: float = 0.0
    footprint: np.ndarray | None = None

    def widen(self, own: np.ndarray | None) -> np.ndarray | None:
        """The filter's region for a generated image whose `object_region` (at `floor`) is `own`: united with
        the footprint when an object stands out in it (an image without one stays empty: "no_object")."""
        if own is None or not own.any() or self.footprint is None:
            return own
        return own | resize_mask(self.footprint, own.shape)


def few_shot_objects(run_cfg: Config, kind: str, u2net_weights: str | None = None) -> FewShotObjects:
    if kind == "texture" or not Path(run_cfg.data.data).is_dir():
        return FewShotObjects()
    train, _ = recorded_split(run_cfg.data.data, run_cfg.data.defect, run_cfg.split.get("train", []))
    if not train:
        return FewShotObjects()
    images = [load_image(p.image) for p in train]
    foregrounds = [foreground_mask(image, kind, u2net_weights or None, whole_if_none=False) for image in images]
    shares = [fg.mean() if fg.any() else 1.0 for fg in foregrounds]  # nothing stands out: the whole image
    size = images[0].shape[:2]
    regions = [resize_mask(_without_frame(fg, 0.0), size) for fg in foregrounds]
    if run_cfg.data.flips:
        regions += [flipped for r in regions for flipped in (r[:, ::-1], r[::-1], r[::-1, ::-1])]
    return FewShotObjects(OBJECT_FLOOR * float(np.mean(shares)), np.any(regions, axis=0))


def check_config(cfg: GenerateConfig) -> GenerateConfig:
    """`UserError` for options out of range and unknown scheduler, device or dtype, before any model is loaded."""
    cfg = validated(cfg, "generate")
    if cfg.canvas == "noise" and 0 < cfg.strength < 1:
        raise UserError(f"generate.strength {cfg.strength:g}: a noise canvas starts from pure noise; set generate.canvas "
                        "(--canvas) to few-shot, normal or on-normals, or leave strength at 0")
    if cfg.resolution % SAMPLING_SIDE_STEP:
        raise UserError(f"generate.resolution {cfg.resolution}: must be a multiple of {SAMPLING_SIDE_STEP}, or 0 for the "
                        "run's own side")
    make_scheduler(cfg.scheduler, {})
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    return cfg


def check_inputs(cfg: GenerateConfig, u2net_weights: str, normal: Path | None, mask: Path | None) -> None:
    """One-line errors for options that do not go together (a given --normal image takes the place of a whole-image
    canvas: few-shot or normal)."""
    if cfg.mask_method == "u2net" and not (u2net_weights and Path(u2net_weights).is_file()):
        raise UserError(f"data.u2net_weights {u2net_weights or '(none)'}: generate.mask_method u2net needs the run's "
                        "TorchScript U²-Net file (train with data.u2net_weights)")
    if (normal is None) != (mask is None):
        raise UserError("--normal/--mask: give both, the normal image and the mask of where to put the defect")
    if cfg.canvas == "on-normals" and normal is not None:
        raise UserError("--canvas on-normals picks each pair's normal image itself; drop --normal/--mask")


def run_dataset(run_cfg: Config, option: str, needed_for: str, instead: str) -> Path:
    """The run's dataset folder, which `option` reads (`needed_for`); a `UserError` naming both when it is gone."""
    data = Path(run_cfg.data.data)
    if not data.is_dir():
        raise UserError(f"{option}: the run's dataset {data} is gone; {needed_for}: put it back there, or {instead}")
    return data


class NormalCanvas:
    """Canvas ``on-normals``: each pair's defect is drawn into a real ``train/good`` image of the run's dataset,
    inside the shape of one of the run's few-shot defects placed on it as crop-paste places it (from the pair's
    seed, in a stream of its own, `placement_rng`), grown by `REGION_MARGIN` of the image side so the model may draw
    it larger; the image's own background feeds BCM. The pairs then differ from real normal images only at their
    defects. `photo_side`: the side of the run's few-shot photos (`sampling_side`)."""

    def __init__(self, run_cfg: Config, kind: str, u2net_weights: str | None):
        category = open_category(run_dataset(run_cfg, "--canvas on-normals", "its train/good images are where the defects go",
                                             "generate whole images"))
        if not category.train_good:
            raise UserError(f"--canvas on-normals: {category.root} has no train/good images to draw defects into")
        train, _ = recorded_split(category.root, run_cfg.data.defect, run_cfg.split.get("train", []))
        self.defects = load_defects([pair for pair in train if load_mask(pair.mask).any()])
        if not self.defects:
            raise UserError(f"--canvas on-normals: the run's few-shot pairs of {run_cfg.data.defect} are no longer in {category.root}")
        self.normals, self.kind, self.u2net_weights = NormalPool(category), kind, u2net_weights
        self.photo_side = min(self.defects[0].image.shape[:2])  # the run's own photos, already read

    def inputs(self, seeds: list[int], strength: float) -> tuple[dict, list[dict]]:
        """The pipeline's per-pair inputs for `seeds` (normal images, regions, backgrounds and, below strength 1,
        the placed real defects as image and part to start from), and what each pair used."""
        inputs, records = {"normal_image": [], "mask": [], "background": [], "init_image": [], "init_part": []}, []
        for seed in seeds:
            target, pasted, placed, placement = place_defect(placement_rng(seed), self.defects, self.normals, self.kind)
            inputs["normal_image"].append(target.image)
            inputs["mask"].append(drawing_region(placed, target.foreground))
            inputs["background"].append(prepared_background(target.image, self.kind, self.u2net_weights))
            inputs["init_image"].append(pasted)
            inputs["init_part"].append(anomaly_part(pasted, placed))
            records.append({"background": target.stem, "onto": target.stem, "shape_of": placement["source"]})
        if strength < 1:
            inputs["strength"] = strength
        else:
            del inputs["init_image"], inputs["init_part"]
        return inputs, records


def placement_rng(seed: int) -> np.random.Generator:
    """Where canvas on-normals draws pair `seed`'s placement from: a stream apart from crop-paste's (which places pair
    `seed` from ``default_rng(seed)``), so that the two sets made at the same seeds, trained on together, hold 2N
    placements and not each one twice (experiments/CATEGORY.md#sampling-on-normals-at-the-photos-side-2026-12-07)."""
    return np.random.default_rng([seed, ON_NORMALS_STREAM])


def drawing_region(placed: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Where canvas ``on-normals`` lets the model draw a defect placed at `placed`: that shape grown by `REGION_MARGIN`
    of the image side, on the object's `foreground`."""
    margin = round(REGION_MARGIN * min(placed.shape))
    grown = cv2.dilate(placed.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)).astype(bool)
    return grown & foreground


class StartImages:
    """Canvas few-shot or normal: each whole image starts from an image of the run's dataset noised to the
    first step (or to ``generate.strength`` of the schedule), and its part row from grey, so the defect's place
    is left to the model. ``few-shot``: the few-shot image whose background BCM gets (the same index, `seed`
    modulo their number, over the same natural order); ``normal``: the ``train/good`` image `seed` modulo their
    number (natural order), whose own background BCM gets, so the starts are as many and as varied as the
    category's normal images."""

    def __init__(self, run_cfg: Config, source: str, kind: str, u2net_weights: str | None):
        option = f"--canvas {source}"
        data = run_dataset(run_cfg, option, f"its {source} images are where sampling starts", "use --canvas noise")
        if source == "few-shot":
            paths, _ = recorded_split(data, run_cfg.data.defect, run_cfg.split.get("train", []))
            paths = [pair.image for pair in paths]
            missing = f"the run's few-shot pairs of {run_cfg.data.defect} are no longer in {data}"
        else:
            paths, missing = list(open_category(data).train_good), f"{data} has no train/good images to start from"
        if not paths:
            raise UserError(f"{option}: {missing}; use --canvas noise")
        self.paths, self.own_background, self.kind, self.u2net_weights = paths, source == "normal", kind, u2net_weights

    def inputs(self, seeds: list[int], strength: float) -> tuple[dict, list[dict]]:
        chosen = [self.paths[seed % len(self.paths)] for seed in seeds]
        images = [load_image(path) for path in chosen]
        inputs = {"init_image": images, "init_part": [np.full_like(image, 128) for image in images], "strength": strength}
        if self.own_background:
            inputs["background"] = [prepared_background(image, self.kind, self.u2net_weights) for image in images]
        return inputs, [{"start": path.stem, **({"background": path.stem} if self.own_background else {})} for path in chosen]


def foreground_kind(run_cfg: Config) -> str:
    """The run's foreground setting; for "auto", its category's kind when the dataset is still there."""
    if run_cfg.data.foreground != "auto" or not Path(run_cfg.data.data).is_dir():
        return run_cfg.data.foreground
    return open_category(run_cfg.data.data).kind


def grey_category(run_cfg: Config) -> bool:
    """Whether the run's few-shot images are grey photos (stored as RGB, like the magnetic tile's): then its pairs
    are written grey, since the camera makes no colour and a tint the model adds would mark the defects (False
    when the dataset is gone)."""
    if not Path(run_cfg.data.data).is_dir():
        return False
    train, _ = recorded_split(run_cfg.data.data, run_cfg.data.defect, run_cfg.split.get("train", []))
    return bool(train) and all(is_grey(load_image(pair.image)) for pair in train)


def sampling_side(cfg: GenerateConfig, run_cfg: Config, normals: NormalCanvas | None) -> int:
    """The side pairs are drawn at: ``generate.resolution``, else the run's training side; on normals the photos'
    side where that is larger (down to a multiple of `SAMPLING_SIDE_STEP`), up to twice training's. There the defect
    is drawn into a real photo, and a finer latent grid keeps a thin crack thin and a blowhole as small as the real
    ones (experiments/CATEGORY.md#sampling-on-normals-at-the-photos-side-2026-12-07)."""
    trained = run_cfg.data.resolution
    if cfg.resolution or normals is None:
        return cfg.resolution or trained
    photo = normals.photo_side // SAMPLING_SIDE_STEP * SAMPLING_SIDE_STEP
    return max(trained, min(photo, 2 * trained))


def pair_settings(run: Path, run_cfg: Config, cfg: GenerateConfig, normal: Path | None, canvas: str | None,
                  whole_images: bool, grey: bool, side: int) -> dict:
    """What every pair record of one `generate` call carries: a folder takes pairs only made with the same."""
    return {
        "run": str(Path(run).resolve()),
        "prompts": {"global": run_cfg.model.global_prompt, "anomaly": run_cfg.model.anomaly_prompt},
        "steps": cfg.steps, "guidance": cfg.guidance, "scheduler": cfg.scheduler, "dtype": cfg.dtype,
        "initial_noise": cfg.initial_noise, "base_seed": cfg.seed, "mask_method": cfg.mask_method,
        "normal": None if normal is None else str(normal), "filter": cfg.filter,
        "canvas": canvas, "strength": cfg.start_strength if canvas and cfg.start_strength < 1 else None,
        "size": None if cfg.size == "model" else cfg.size,  # None: folders from before --size compare equal
        "lay_part": True if whole_images and cfg.lay_part else None,  # None: folders from before it compare equal
        "grey": True if grey else None,  # None: colour, as folders from before it
        "resolution": side if side != run_cfg.data.resolution else None,  # None: the run's side, as folders from before it
    }


def sampling_pipeline(run: Path, run_cfg: Config, cfg: GenerateConfig, side: int) -> DualAnoDiffPipeline:
    """The run's pipeline with these sampling settings at `side` pixels, its own progress bar off (the caller's counts
    pairs)."""
    pipe = DualAnoDiffPipeline.from_run(run, cfg.device, cfg.dtype, side)
    pipe.use_config(cfg)
    pipe.set_progress_bar_config(disable=True)
    pipe.u2net_weights = run_cfg.data.u2net_weights
    return pipe


def judged(image: np.ndarray, mask: np.ndarray, part: np.ndarray, seed: int, kind: str, fg_weights: str | None,
           objects: FewShotObjects, cfg: GenerateConfig) -> dict:
    """A sampled pair's figures and the quality filter's verdict on it (``kept`` or why not)."""
    region = object_region(image, kind, fg_weights, objects.floor)
    return {
        "mask_area": round(float(mask.mean()), 6),
        "consistency": round(pair_consistency(image, part, mask), 4),
        "alignment": round(alignment_score(image, mask, region, seed=seed), 4),
        "verdict": filter_verdict(mask, objects.widen(region), cfg.max_area, cfg.min_on_object),
    }


def generate(
    run: Path,
    out: Path,
    cfg: GenerateConfig,
    normal: Path | None = None,
    mask: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
    force: bool = False,
) -> GenerationSummary:
    """Write `cfg.num` kept pairs to OUT/<category>/<defect>/, resuming what is there (see `dualanodiff.pairs`).

    With `normal` and `mask`, each defect is drawn into that one image inside that mask. Attempt ``a`` uses seed
    ``cfg.seed + a``; at most ``num * MAX_TRIES_FACTOR`` attempts are made in all. The run's U²-Net
    (``data.u2net_weights``) serves the foreground masks and ``generate.mask_method: u2net``.
    A folder holding pairs made from another run or with other sampling settings is refused (its pairs
    would mix with the new ones) unless ``force``, which replaces them. SIGINT or SIGTERM drops the batch
    being sampled (its attempts are made again by a re-run), keeps every pair written and raises `Stopped`.
    """
    start = time.monotonic()
    run_cfg = RunFolder(run).load_config()
    check_config(cfg)
    on_normals = cfg.canvas == "on-normals"
    whole_images = not on_normals and normal is None
    started = whole_images and cfg.canvas != "noise"
    check_inputs(cfg, run_cfg.data.u2net_weights, normal, mask)
    canvas = cfg.canvas if started or on_normals else None  # None: from noise, or into the given --normal image
    grey = grey_category(run_cfg)
    kind, fg_weights = foreground_kind(run_cfg), run_cfg.data.u2net_weights or None
    normals = NormalCanvas(run_cfg, kind, fg_weights) if on_normals else None
    side = sampling_side(cfg, run_cfg, normals)
    settings = pair_settings(run, run_cfg, cfg, normal, canvas, whole_images, grey, side)
    size = pair_size(cfg.size, run_cfg.data.data)
    starting_images = StartImages(run_cfg, cfg.canvas, kind, fg_weights) if started else None
    with PairWriter(Path(out), Path(run_cfg.data.data).name, run_cfg.data.defect, size) as writer, deferred_signals() as stop:
        if force:
            writer.clear()
        writer.check_settings(settings)
        kept, attempt, cap = len(writer.kept()), writer.attempts_done(), cfg.num * MAX_TRIES_FACTOR
        verdicts: Counter[str] = Counter()
        if progress is not None:
            progress(kept, cfg.num)
        if kept < cfg.num and attempt < cap:
            pipe = sampling_pipeline(run, run_cfg, cfg, side)
            objects = few_shot_objects(run_cfg, kind, fg_weights)
            inputs, source = _inputs(pipe, kind, fg_weights, normal, mask)
            estimate = CostEstimate(cfg.num - kept, log, f"generation ({cfg.num - kept} pairs)",
                                    "--num or generate.steps (--steps) shortens it")
            while kept < cfg.num and attempt < cap:
                count = min(cfg.batch_size, cfg.num - kept, cap - attempt)
                seeds = [cfg.seed + a for a in range(attempt, attempt + count)]
                batch_inputs, used = _batch_inputs(inputs, seeds, normals if normals is not None else starting_images,
                                                   cfg.start_strength)
                with stop.at_once(_resume_note(kept, cfg.num, writer.dir)):  # a stop drops this batch
                    out = pipe(seeds=seeds, output_type="np", **batch_inputs)
                for offset, (image, pair_mask, part, seed) in enumerate(zip(out.images, out.masks, out.parts, out.seeds)):
                    if grey:
                        image, part = as_grey(image), as_grey(part)
                    record = {"attempt": attempt + offset, "seed": seed, **settings,
                              "background": _background_name(pipe, source, seed), **used[offset],
                              **judged(image, pair_mask, part, seed, kind, fg_weights, objects, cfg)}
                    verdicts[record["verdict"]] += 1
                    if record["verdict"] == "kept" or not cfg.filter:
                        writer.write(image, pair_mask, part, record)
                        kept += 1
                    else:
                        writer.reject(record)
                attempt += count
                estimate.advance(count)
                if progress is not None:
                    progress(kept, cfg.num)
        writer.write_contact_sheet()
        if stop():
            raise Stopped(stop(), _resume_note(kept, cfg.num, writer.dir))
    summary = GenerationSummary(writer.dir, kept, attempt - kept, attempt, time.monotonic() - start)
    _report(summary, cfg, verdicts, log)
    if side != run_cfg.data.resolution:
        log(f"pairs drawn at {side} px, the run trained at {run_cfg.data.resolution} px")
    if grey:
        log("pairs written grey: the run's few-shot photos are grey")
    log(mask_area_note(summary.folder, run_cfg))
    return summary


def _batch_inputs(inputs: dict, seeds: list[int], canvas: NormalCanvas | StartImages | None,
                  strength: float) -> tuple[dict, list[dict]]:
    """The pipeline's inputs for one batch of `seeds` and what each pair used: the call's own (none with a
    canvas: `check_inputs` refuses --normal beside on-normals), with the canvas's per-pair images on top."""
    if canvas is None:
        return inputs, [{}] * len(seeds)
    own, used = canvas.inputs(seeds, strength)
    return {**inputs, **own}, used


def _resume_note(kept: int, num: int, folder: Path) -> str:
    return f"with {kept} of {num} pairs in {folder}; run the same command again to continue"


def _inputs(
    pipe: DualAnoDiffPipeline, kind: str, fg_weights: str | None, normal: Path | None, mask: Path | None
) -> tuple[dict, str]:
    """Pipeline keyword arguments for --normal/--mask, and the background's name."""
    inputs, source = {}, ""
    if normal is not None:
        image = load_image(normal)
        user_mask = load_mask(mask, shape=image.shape[:2])
        inputs["normal_image"] = resize_image(image, pipe.resolution)
        inputs["mask"] = resize_mask(user_mask, pipe.resolution)
        inputs["background"] = prepared_background(image, kind, fg_weights)
        source = str(normal)
    return inputs, source


def _background_name(pipe: DualAnoDiffPipeline, source: str, seed: int) -> str | None:
    if not pipe.model.cfg.bcm:
        return None
    return source or pipe.background_names[pipe.background_index(seed)]


def mask_area_note(folder: Path, run_cfg: Config) -> str:
    """One line on how large the kept pairs' masks are against the few-shot masks the run learned from (median
    areas): defects drawn much smaller or larger than the real ones teach a localizer the wrong size."""
    generated = [row["mask_area"] for row in kept_rows(folder) if row.get("mask_area") is not None]
    note = f"mask areas: median {100 * float(np.median(generated)):.2f} % of the image" if generated else "no masks"
    if generated and Path(run_cfg.data.data).is_dir():
        train, _ = recorded_split(run_cfg.data.data, run_cfg.data.defect, run_cfg.split.get("train", []))
        few_shot = [float(load_mask(pair.mask).mean()) for pair in train]
        note += (f", {area_ratio(generated, few_shot):.2f}x the few-shot masks' "
                 f"({100 * float(np.median(few_shot)):.2f} %)" if few_shot else "")
    return note


def _report(summary: GenerationSummary, cfg: GenerateConfig, verdicts: Counter, log: Callable[[str], None]) -> None:
    dropped = ", ".join(f"{verdict} {n}" for verdict, n in sorted(verdicts.items()) if verdict != "kept")
    log(
        f"{summary.folder}: {summary.kept} of {cfg.num} pairs kept, {summary.dropped} dropped by the quality filter"
        f"{f' (this run: {dropped})' if dropped and cfg.filter else ''}, {summary.attempts} attempts"
    )
    if summary.kept < cfg.num:
        log(
            f"stopped at the cap of {MAX_TRIES_FACTOR} x num = {cfg.num * MAX_TRIES_FACTOR} attempts; loosen "
            "generate.max_area/min_on_object, or pass --no-filter"
        )
