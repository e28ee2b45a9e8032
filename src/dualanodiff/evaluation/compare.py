"""One evaluation run: several generators' pairs for one category, scored side by side with the same
protocol, seeds and real test split, into one results dict that `write_report` renders.

A row may train on the union of several roots' pairs (a list of roots): the way users will use a
generator, with the few-shot real pairs (crop-paste) beside the generated ones::

    evaluate_generators(data, {"crop-paste": cp, "dualanodiff": gen, "crop-paste+dualanodiff": [cp, gen]}, cfg)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dualanodiff.config import EvaluateConfig
from dualanodiff.data import (
    Category,
    few_shot_split,
    load_image,
    load_mask,
    open_category,
)
from dualanodiff.errors import UserError
from dualanodiff.evaluation.classification import evaluate_classification
from dualanodiff.evaluation.generation_metrics import (
    LPIPS,
    ic_lpips,
    inception_logits,
    inception_score,
    load_inception,
    load_lpips,
)
from dualanodiff.evaluation.inputs import (
    PairPaths,
    generated_pairs,
    load_images,
    pair_alignments,
)
from dualanodiff.evaluation.localization import check_resolution, evaluate_localization
from dualanodiff.evaluation.metrics import METRIC_KEYS
from dualanodiff.evaluation.parallel import run_trainings
from dualanodiff.evaluation.training import LEARNING_RATE
from dualanodiff.images import batch_to_model_range
from dualanodiff.masks import area_ratio
from dualanodiff.progress import Bars, CostEstimate, no_bars

SELECTION = "fixed steps, no test-set selection"
IS_SPLITS = 10  # torch-fidelity's default; fewer when a defect type has fewer generated images


def evaluate_generators(
    category_dir: Path | str,
    generated: dict[str, Path | list[Path]],
    cfg: EvaluateConfig,
    *,
    defects: list[str] | None = None,
    rounding: str = "floor",
    inception_weights: Path | None = None,
    lpips_weights: list[Path] | None = None,
    resnet_weights: Path | None = None,
    classification: bool = True,
    device: str = "auto",
    workers: int = 1,
    log: Callable[[str], None] = lambda message: None,
    bars: Bars = no_bars,
) -> dict:
    """Score every generator (row label -> output root of `generate` or `baseline`, or a list of
    roots whose pairs together make the row) on one category.

    ``defects`` defaults to the category's defect types that every generator has pairs for. Returns
    ``{"category", "defects", "protocol", "notes", "generators": [{"name", "roots", "pairs",
    "metrics", "per_defect", "per_seed"}]}``; metric values are fractions (``nan`` where not computed), with
    keys `METRIC_KEYS` + ``is``, ``is_std``, ``ic_lpips``, ``accuracy``, ``alignment`` (the mean
    `alignment_score` of the row's pairs, a ratio) and ``pairs`` (their number). With ``cfg.seeds`` > 1 each
    row's localizer and classifier are trained at seeds ``cfg.seed``, ``cfg.seed + 1``, ... and their figures
    are the mean; ``per_seed`` lists each training's `METRIC_KEYS` and ``accuracy``. Each row's trainings
    advance bars of ``bars`` labelled with the row's name (``crop-paste: localization U-Net``; with several
    seeds ``crop-paste, seed 1: localization U-Net``). On the CPU every training runs on one thread, up to
    ``workers`` at once in processes of their own (`parallel.run_trainings`): the figures do not depend on
    ``workers``.
    """
    category = open_category(category_dir)
    check_resolution(cfg.resolution)
    if resnet_weights is not None and not Path(resnet_weights).is_file():
        raise UserError(f"--resnet-weights {resnet_weights}: file not found; pass torchvision's resnet34-*.pth")
    inception = load_inception(inception_weights) if inception_weights is not None else None
    lpips = load_lpips(lpips_weights) if lpips_weights else None
    roots = {
        name: [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
        for name, root in generated.items()
    }
    pairs, defects, notes = _pairs_per_generator(category, roots, defects)
    for defect in defects:
        few_shot_split(category.defects[defect], rounding)  # a too small defect type fails before training
    if inception is None:
        notes.append("IS not computed: needs --inception-weights FILE (torch-fidelity's weights-inception-2015-12-05-*.pth)")
    if lpips is None:
        notes.append("IC-LPIPS not computed: needs --lpips-weights alexnet-*.pth --lpips-weights lpips' alex.pth")
    classify = classification and len(defects) >= 2
    if classification and not classify:
        notes.append("classification not computed: it needs at least 2 defect types")
    for note in notes:
        log(note)

    trainings = len(pairs) * cfg.seeds * (2 if classify else 1)
    bars = estimating_bars(bars, trainings * cfg.steps, log, f"{trainings} trainings of {cfg.steps} steps at {cfg.resolution} px")
    jobs = [
        Training(name, cfg.seed + k, category, by_defect, defects, cfg, rounding, resnet_weights, classify, device)
        for name, by_defect in pairs.items() for k in range(cfg.seeds)
    ]
    scoring = _Scoring(category, defects, cfg, rounding, inception, lpips, classify, log)
    alignments = {name: scoring.alignments(name, found) for name, found in pairs.items()}
    trained = run_trainings(train_and_score, jobs, workers, device, bars)
    each_seed = {name: trained[k * cfg.seeds:(k + 1) * cfg.seeds] for k, name in enumerate(pairs)}
    return {
        "category": category.name,
        "category_dir": str(category.root),
        "defects": defects,
        "protocol": _protocol(category, defects, cfg, rounding, resnet_weights, classify),
        "notes": notes,
        "generators": [scoring.row(name, found, roots[name], alignments[name], each_seed[name])
                       for name, found in pairs.items()],
    }


@dataclasses.dataclass
class Training:
    """One row's localizer (and classifier) at one seed: what a worker process needs to train and score them."""

    name: str
    seed: int
    category: Category
    pairs: dict[str, PairPaths]  # defect type -> the row's pairs
    defects: list[str]
    cfg: EvaluateConfig
    rounding: str
    resnet_weights: Path | None
    classify: bool
    device: str


def train_and_score(job: Training, bars: Bars) -> dict:
    """The row's localizer (and classifier) trained at the job's seed, scored on the real test split; bars named
    by the row (and the seed, with several)."""
    cfg = dataclasses.replace(job.cfg, seed=job.seed)
    bars = _labelled(bars, job.name if job.cfg.seeds == 1 else f"{job.name}, seed {job.seed}")
    flat = [pair for defect in job.defects for pair in job.pairs[defect]]
    localization = evaluate_localization(job.category, flat, cfg, job.rounding, job.defects, cfg.base_width,
                                         job.device, bars)
    accuracy = (evaluate_classification(job.category, {d: job.pairs[d] for d in job.defects}, cfg, job.rounding,
                                        job.resnet_weights, job.device, bars) if job.classify else None)
    return {"localization": localization, "accuracy": accuracy}


@dataclasses.dataclass
class _Scoring:
    """What every row of one evaluation is scored with besides its trainings."""

    category: Category
    defects: list[str]
    cfg: EvaluateConfig
    rounding: str
    inception: Callable | None
    lpips: LPIPS | None
    classify: bool
    log: Callable[[str], None]

    def alignments(self, name: str, found: dict[str, PairPaths]) -> dict[str, list[float]]:
        """Defect type -> the alignment scores of the row's pairs; says how many pairs the row trains on."""
        alignments = {defect: pair_alignments(found[defect], self.category.kind) for defect in self.defects}
        count, mean = sum(len(found[d]) for d in self.defects), _mean([a for s in alignments.values() for a in s])
        self.log(f"{name}: {count} generated pairs over {len(self.defects)} defect types, mean alignment {mean:.2f}")
        return alignments

    def row(self, name: str, found: dict[str, PairPaths], roots: list[Path], alignments: dict[str, list[float]],
            each_seed: list[dict]) -> dict:
        """One generator's row: its figures per defect type and overall from its trainings at each seed."""
        cfg, defects, category = self.cfg, self.defects, self.category
        by_defect = {defect: found[defect] for defect in defects}
        flat = [pair for defect in defects for pair in by_defect[defect]]
        alignment = _mean([score for defect in defects for score in alignments[defect]])
        localization = _mean_tree([result["localization"] for result in each_seed])
        accuracy = _mean_tree([result["accuracy"] for result in each_seed]) if self.classify else None
        per_defect = {}
        for defect in defects:
            pairs = by_defect[defect]
            per_defect[defect] = {
                **localization["per_defect"][defect],
                **_generation_scores(category, defect, pairs, self.rounding, cfg.resolution, self.inception, self.lpips),
                **mask_areas(category, defect, pairs, self.rounding),
                "accuracy": accuracy["per_defect"][defect] if accuracy else math.nan,
                "alignment": _mean(alignments[defect]),
                "pairs": len(pairs),
            }
        metrics = {key: localization[key] for key in METRIC_KEYS}
        for key in ("is", "is_std", "ic_lpips"):
            metrics[key] = _mean([per_defect[d][key] for d in defects])
        metrics["accuracy"] = accuracy["accuracy"] if accuracy else math.nan
        metrics["alignment"], metrics["pairs"] = alignment, len(flat)
        metrics["area_ratio"] = _mean([per_defect[d]["area_ratio"] for d in defects])
        per_seed = [{"seed": cfg.seed + k, **{key: result["localization"][key] for key in METRIC_KEYS},
                     "accuracy": result["accuracy"]["accuracy"] if self.classify else math.nan}
                    for k, result in enumerate(each_seed)]
        return {"name": name, "roots": [str(root) for root in roots], "pairs": {d: len(by_defect[d]) for d in defects},
                "metrics": metrics, "per_defect": per_defect, "per_seed": per_seed}


def mask_areas(category: Category, defect: str, pairs: PairPaths, rounding: str) -> dict[str, float]:
    """The generated masks' median area and the few-shot masks' (shares of the image), and `area_ratio` of the
    two: generated defects much smaller or larger than the real ones teach a localizer the wrong size."""
    generated = [float(load_mask(mask).mean()) for _, mask in pairs]
    few_shot = [float(load_mask(pair.mask).mean()) for pair in few_shot_split(category.defects[defect], rounding)[0]]
    return {
        "area_median": float(np.median(generated)) if generated else math.nan,
        "few_shot_area_median": float(np.median(few_shot)) if few_shot else math.nan,
        "area_ratio": area_ratio(generated, few_shot),
    }


def estimating_bars(bars: Bars, total_steps: int, log: Callable[[str], None], what: str) -> Bars:
    """`bars` whose first training's steps time the whole evaluation (`CostEstimate`): the paper's protocol on a
    CPU takes hours."""
    estimate = CostEstimate(total_steps, log, f"the evaluation ({what})", "evaluate.steps (--steps) or "
                            "evaluate.resolution (--set evaluate.resolution=PX) shorten it")

    def factory(label: str, total: int | None = None):
        bar = bars(label, total)

        def update(done: int, total: int | None = None, note: str = "") -> None:
            bar(done, total, note=note)
            estimate.advance()

        return update

    return factory


def _labelled(bars: Bars, row: str) -> Bars:
    """``bars`` whose labels name the row: the rows' trainings are otherwise told apart by nothing."""
    return lambda label, total=None: bars(f"{row}: {label}", total)


def _pairs_per_generator(
    category: Category, generated: dict[str, list[Path]], defects: list[str] | None
) -> tuple[dict[str, dict[str, PairPaths]], list[str], list[str]]:
    """Each generator's pairs (the union over its roots), the defect types to evaluate and notes on
    what was left out."""
    if not generated or not all(generated.values()):
        raise UserError("--generated: give at least one folder of generated pairs for every row")
    if defects is not None:
        unknown = [d for d in defects if d not in category.defects]
        if unknown:
            valid = ", ".join(category.defects)
            raise UserError(f"--defect {unknown[0]}: not a defect type of {category.root}; valid: {valid}")
    pairs = {
        name: _union([generated_pairs(root, category.name, defects) for root in roots]) for name, roots in generated.items()
    }
    notes = []
    if defects is None:
        defects = [d for d in category.defects if all(d in by_defect for by_defect in pairs.values())]
        if not defects:
            raise UserError(
                f"{category.root}: no defect type has generated pairs in every --generated folder "
                f"({', '.join(str(root) for roots in generated.values() for root in roots)}); "
                "generate them or pass --defect"
            )
        left_out = sorted({d for by_defect in pairs.values() for d in by_defect} - set(defects))
        if left_out:
            notes.append(f"defect types left out (not in the dataset or not in every generator): {', '.join(left_out)}")
    return pairs, defects, notes


def _union(found: list[dict[str, PairPaths]]) -> dict[str, PairPaths]:
    """Defect type -> the pairs of every root that has that type, root by root."""
    union: dict[str, PairPaths] = {}
    for by_defect in found:
        for defect, pairs in by_defect.items():
            union.setdefault(defect, []).extend(pairs)
    return union


def _generation_scores(
    category: Category,
    defect: str,
    pairs: PairPaths,
    rounding: str,
    resolution: int,
    inception: Callable | None,
    lpips: LPIPS | None,
) -> dict[str, float]:
    """IS (mean, std over min(10, N) splits) and IC-LPIPS against the real few-shot training images."""
    images = [image for image, _ in pairs]
    scores = {"is": math.nan, "is_std": math.nan, "ic_lpips": math.nan}
    if inception is not None:
        originals = [torch.tensor(load_image(path)).permute(2, 0, 1) for path in images]  # resized as IS does
        logits = inception_logits(inception, originals)
        scores["is"], scores["is_std"] = inception_score(logits, splits=min(IS_SPLITS, len(images)))
    if lpips is not None:
        train = [pair.image for pair in few_shot_split(category.defects[defect], rounding)[0]]
        scores["ic_lpips"] = ic_lpips(_lpips_input(images, resolution), _lpips_input(train, resolution), lpips.pairwise)
    return scores


def _lpips_input(paths: list[Path], size: int) -> torch.Tensor:
    """Images as LPIPS takes them: (N, 3, size, size) float in [-1, 1]."""
    return batch_to_model_range(load_images(paths, size))


def _mean_tree(results: list):
    """Several seeds' results (equal nested dicts of numbers) as one: each number's nan-skipping mean; numbers
    every seed agrees on (test-image counts) stay as they are."""
    first = results[0]
    if isinstance(first, dict):
        return {key: _mean_tree([result[key] for result in results]) for key in first}
    return first if all(value == first for value in results) else _mean(results)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def _seeds_text(cfg: EvaluateConfig) -> str:
    return "" if cfg.seeds == 1 else f"; the mean of {cfg.seeds} trainings at seeds {cfg.seed} to {cfg.seed + cfg.seeds - 1}"


def _protocol(
    category: Category,
    defects: list[str],
    cfg: EvaluateConfig,
    rounding: str,
    resnet_weights: Path | None,
    classify: bool,
) -> dict:
    test = {d: len(few_shot_split(category.defects[d], rounding)[1]) for d in defects}
    return {
        "split_rounding": rounding,
        "test_images": {**test, "good": len(category.test_good)},
        "localization": (
            f"DRAEM-shaped U-Net (base width {cfg.base_width}), focal loss (gamma 2), batches of 50 % generated pairs "
            f"and 50 % train/good with empty masks, {cfg.steps} optimizer steps at batch {cfg.batch_size}, the same "
            f"for every set, at {cfg.resolution} px, {SELECTION}{_seeds_text(cfg)}"
        ),
        "classification": (
            f"ResNet-34 ({'weights from ' + str(resnet_weights) if resnet_weights else 'random init'}), "
            f"{cfg.steps} optimizer steps at batch {cfg.batch_size} on the generated images, the same for every set, "
            f"labels = defect types, {SELECTION}{_seeds_text(cfg)}"
            if classify
            else "not run"
        ),
        "generation": (
            f"IS over min({IS_SPLITS}, N) splits per defect type; IC-LPIPS against the few-shot training images; "
            "both averaged over the defect types"
        ),
        "mask_area": (
            "median area of each row's masks over the median area of the few-shot training masks (1: defects as "
            "large as the real ones), averaged over the defect types"
        ),
        "alignment": (
            "mean image-mask alignment score of each row's pairs (inpainting residual inside the mask over the same "
            "mask shifted elsewhere on the object; about 1 for a random mask); from the pairs' manifests, else "
            "computed; pairs that cannot be scored are left out"
        ),
        "selection": SELECTION,
        "steps": cfg.steps,
        "resolution": cfg.resolution,
        "batch_size": cfg.batch_size,
        "lr": LEARNING_RATE,
        "seed": cfg.seed,
        "seeds": cfg.seeds,
        "base_width": cfg.base_width,
        "torch": torch.__version__,
    }
