"""The one-command demo: the paper's regime end to end on the embedded base, on a CPU, in minutes.

Stages (each reused when a re-run finds it finished, recorded in ``OUT/stages.json``)::

    data        synthetic MVTec-format category            OUT/data/<category>/
    train       few-shot DualAnoDiff on one defect type    OUT/runs/dualanodiff/
    generate    aligned image-mask pairs                   OUT/generated/dualanodiff/<category>/<defect>/
                and the same run's defects drawn into real normal images (generate --on-normals)
                                                           OUT/generated/dualanodiff-on-normals/...
    baselines   crop-paste and Perlin pairs                OUT/generated/{crop-paste,perlin}/...
    evaluate    U-Net localization protocol, all rows      OUT/evaluation.json
                (ours both ways, the baselines; with --ablation also crop-paste + ours on normals together)
    held-out    with --ablation: the whole demo on synthetic.HELD_OUT  OUT/held-out/
    report      OUT/report.md and OUT/report.html (figures in OUT/figures/), OUT/summary.json

``--ablation`` adds the same run with SAIM off and with BCM off (rows ``no-saim`` / ``no-bcm``), the row of
crop-paste and our on-normals pairs together, and the few-shot regime on a category no embedded base saw in
pretraining (``bottle``), as a section of the report.
The settings are one `Config` (``demo_config``) saved as ``OUT/config.yaml``; a re-run with other
settings is refused rather than mixing results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np

from dualanodiff.config import MAX_TRIES_FACTOR, Config, read_yaml
from dualanodiff.data import open_category
from dualanodiff.errors import UserError
from dualanodiff.io import atomic_write_bytes, atomic_write_text
from dualanodiff.model.base import base_recipe
from dualanodiff.pairs import kept_rows, rejected_rows
from dualanodiff.progress import Bars, no_bars
from dualanodiff.runs import RunFolder
from dualanodiff.synthetic import HELD_OUT, write_dataset

OURS = "dualanodiff"
ON_NORMALS = "dualanodiff-on-normals"  # the same run's defects drawn into real normal images
BASELINES = ("crop-paste", "perlin")
COMBINED = f"crop-paste+{ON_NORMALS}"  # how users will use it: the few-shot real pairs plus generated ones
ABLATIONS = {"no-saim": {"saim": False}, "no-bcm": {"bcm": False}}
REPORT_TEMPLATES = Path(__file__).resolve().parent / "assets" / "report"
HELD_OUT_DEFECT = "contamination"  # of synthetic.HELD_OUT: a small dark blob on the object, as nut/hole is
DATA_SIDE = 128  # the synthetic images' side, which the localizer also sees unless LOCALIZER_SIDE says less
# The localizer's image side where the data's 128 px is more than it needs: nut's rows keep their figures at 96 px
# for about half the cost; the held-out bottle's small defects need 128 px
# (experiments/ON_NORMALS.md#2026-11-28-a-cheaper-demo-measured-on-the-pairs)
LOCALIZER_SIDE = {"nut": 96}


def localizer_side(category: str) -> int:
    """The demo's localizer side for a synthetic category: `LOCALIZER_SIDE`'s, else the data's."""
    return LOCALIZER_SIDE.get(category, DATA_SIDE)


def demo_config(category: str = "nut", defect: str = "hole") -> Config:
    """The demo's settings: the defaults, the embedded base's own few-shot recipe (its ``recipe.yaml``:
    300 training steps at lr 1e-3 instead of 5000 at 2e-5, prompts that name the category and the defect,
    DPM-Solver++ with 25 steps instead of PNDM with 100), and what a 2-core CPU budget demands: 30 pairs,
    a localization U-Net trained 200 steps at 96 px on nut, 128 px elsewhere (`LOCALIZER_SIDE`). The choices
    come from `experiments/ABLATION.md` and `experiments/ON_NORMALS.md`.
    """
    cfg = Config.from_layers([(base_recipe("tiny"), "tiny recipe")])
    cfg.data.data = category  # resolved against OUT/data by `run_demo`
    cfg.data.defect = defect
    cfg.model.base_model = "tiny"
    cfg.generate.num = 30
    cfg.generate.batch_size = 6
    # generated pairs still learn after crop-paste's plateau (experiments/DEMO.md#the-localizers-steps-2026-11-26)
    cfg.evaluate.steps = 200
    cfg.evaluate.resolution = localizer_side(category)
    return cfg


def demo_settings(category: str, defect: str, config: Path | None, data: Path | None = None) -> Config:
    """`demo_config`, with a --config file's keys on top (the options it leaves out stay the demo's). With `data`
    (a category folder of the user's, MVTec layout), the demo runs on it instead of a synthetic `category`."""
    if data is not None:  # checked now: a bad folder or defect type fails before any work
        found = open_category(data)
        if defect not in found.defects:
            raise UserError(f"--defect {defect!r}: not a defect type of {found.root}; choose one of {sorted(found.defects)}")
        category = str(found.root.resolve())
    cfg = demo_config(category, defect)
    if config is None:
        return cfg
    return Config.from_layers([(cfg.to_dict(), "the demo's settings"), (read_yaml(config), str(config))])


@dataclass
class Stages:
    """Finished stages and their wall times, kept in OUT/stages.json so a re-run skips them."""

    path: Path
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Stages:
        return cls(path, json.loads(path.read_text()) if path.is_file() else {})

    def done(self, name: str) -> bool:
        return name in self.seconds

    @contextmanager
    def run(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        atomic_write_text(self.path, json.dumps(self.seconds, indent=1) + "\n")


@dataclass
class DemoHooks:
    """How the demo reports progress (the CLI passes rich bars; tests pass nothing)."""

    log: Callable[[str], None] = lambda message: None
    bar: Bars = no_bars


def run_demo(
    out: Path, cfg: Config | None = None, ablation: bool = False, force: bool = False, hooks: DemoHooks | None = None
) -> Path:
    """Run (or finish) the demo in `out`; returns the path of report.md."""
    out = Path(out)
    hooks = hooks or DemoHooks()
    cfg = cfg or demo_config()
    category_name = Path(cfg.data.data).name
    if force and out.exists():
        shutil.rmtree(out)
    _check_settings(out, cfg, ablation)
    stages = Stages.load(out / "stages.json")
    clock = time.perf_counter()

    data_root = out / "data"
    if not Path(cfg.data.data).is_absolute():  # a synthetic category's name; a user's folder is used as it is
        if not stages.done("data"):
            with stages.run("data"):
                hooks.log(f"synthesising the {category_name} category")
                write_dataset(data_root, seed=cfg.train.seed, size=DATA_SIDE, categories=[category_name])
        cfg.data.data = str(data_root / category_name)

    variants = {OURS: cfg} | ({name: _ablated(cfg, **change) for name, change in ABLATIONS.items()} if ablation else {})
    runs = {}
    for name, variant in variants.items():
        runs[name] = out / "runs" / name
        if not stages.done(f"train {name}"):
            with stages.run(f"train {name}"):
                _train(variant, runs[name], hooks, name)
        if not stages.done(f"generate {name}"):
            with stages.run(f"generate {name}"):
                _generate(runs[name], out / "generated" / name, variant, hooks, name)
    if not stages.done(f"generate {ON_NORMALS}"):
        with stages.run(f"generate {ON_NORMALS}"):
            on_normals = Config.from_dict(cfg.to_dict())
            on_normals.generate.canvas = "on-normals"
            _generate(runs[OURS], out / "generated" / ON_NORMALS, on_normals, hooks, ON_NORMALS)
    pair_sets = [*variants, ON_NORMALS]
    if not stages.done("baselines"):
        with stages.run("baselines"):
            _baselines(cfg, out / "generated", hooks)
    if not stages.done("evaluate"):
        with stages.run("evaluate"):
            _evaluate(cfg, out, pair_sets, hooks, combined=ablation)
    if ablation and category_name != HELD_OUT and not stages.done("held-out"):
        with stages.run("held-out"):
            hooks.log(f"the held-out category {HELD_OUT}, which no embedded base saw in pretraining")
            run_demo(out / "held-out", held_out_config(cfg), hooks=hooks)
    with stages.run("report"):
        report = write_demo_report(out, cfg, pair_sets, stages, time.perf_counter() - clock)
    return report


def held_out_config(cfg: Config) -> Config:
    """The same settings on `synthetic.HELD_OUT`, the category kept out of the embedded bases' pretraining."""
    variant = Config.from_dict(cfg.to_dict())
    variant.data.data, variant.data.defect = HELD_OUT, HELD_OUT_DEFECT
    if cfg.evaluate.resolution == localizer_side(Path(cfg.data.data).name):  # unless a --config file set a side
        variant.evaluate.resolution = localizer_side(HELD_OUT)
    return variant


def _check_settings(out: Path, cfg: Config, ablation: bool) -> None:
    """Save the settings on the first run; refuse a re-run with different ones."""
    saved = out / "config.yaml"
    wanted = cfg.to_dict() | {"demo": {"ablation": ablation}}
    marker = out / "demo.json"
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous != json.loads(json.dumps(wanted)):
            raise UserError(
                f"{out}: holds a demo made with other settings; use another --out or pass --force to start over"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: folder is not empty and holds no demo; use another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(saved)
    atomic_write_text(marker, json.dumps(wanted, indent=1) + "\n")


def _ablated(cfg: Config, **model_changes) -> Config:
    variant = Config.from_dict(cfg.to_dict())
    for name, value in model_changes.items():
        setattr(variant.model, name, value)
    return variant


def _train(cfg: Config, run: Path, hooks: DemoHooks, label: str) -> None:
    from dualanodiff.training import train

    hooks.log(f"training {label}: {cfg.train.steps} steps on the few-shot split of {cfg.data.defect}")
    advance = hooks.bar(f"train {label}", cfg.train.steps)
    resume = RunFolder(run).is_run()
    train(cfg, run, resume=resume, force=not resume, progress=lambda step, total, losses: advance(step), log=hooks.log,
          bars=hooks.bar)


def _generate(run: Path, root: Path, cfg: Config, hooks: DemoHooks, label: str) -> None:
    from dualanodiff.generation import generate

    advance = hooks.bar(f"generate {label}", cfg.generate.num)
    summary = generate(run, root, cfg.generate, progress=lambda done, total: advance(done), log=hooks.log)
    hooks.log(f"{label}: {summary.kept} pairs kept, {summary.dropped} dropped by the quality filter")


def _baselines(cfg: Config, root: Path, hooks: DemoHooks) -> None:
    from dualanodiff import baselines
    from dualanodiff.data import open_category

    category = open_category(cfg.data.data)
    num, defect = cfg.generate.num, cfg.data.defect
    advance = hooks.bar("crop-paste", num)
    baselines.crop_paste(category, defect, num, root / "crop-paste", cfg.generate.seed, progress=advance)
    advance = hooks.bar("perlin", num)
    baselines.perlin(category, defect, num, root / "perlin", cfg.generate.seed, progress=advance)


def _evaluate(cfg: Config, out: Path, pair_sets: list[str], hooks: DemoHooks, combined: bool) -> None:
    """Every pair set's localization row; ``combined`` adds crop-paste + our on-normals pairs as one more row
    (with --ablation only: a fifth localizer would take the plain demo past 10 minutes)."""
    from dualanodiff.evaluation import evaluate_generators, write_report
    from dualanodiff.evaluation.parallel import usable_cores

    rows: dict[str, Path | list[Path]] = {name: out / "generated" / name for name in pair_sets + list(BASELINES)}
    if combined:
        rows[COMBINED] = [rows["crop-paste"], rows[ON_NORMALS]]
    hooks.log(f"evaluating {', '.join(rows)} with the localization protocol ({cfg.evaluate.steps} steps each)")
    results = evaluate_generators(
        cfg.data.data,
        rows,
        cfg.evaluate,
        defects=[cfg.data.defect],
        classification=False,
        device=cfg.train.device,
        workers=usable_cores(),
        log=hooks.log,
        bars=hooks.bar,
    )
    write_report(results, json_path=out / "evaluation.json", force=True)


# --- the report ---------------------------------------------------------------------------------


def pair_figures(defect_dir: Path) -> dict:
    """Filter counts, alignment and pair-consistency statistics of a generated folder.

    Alignment is `dualanodiff.alignment.alignment_score` (about 1 for a mask anywhere, well above 1 for
    a mask on the defect); consistency is the PSNR (dB) of image·M vs part·M inside the mask.
    """
    rows = kept_rows(defect_dir)

    def finite(key: str) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]

    alignment, consistency, area = finite("alignment"), finite("consistency"), finite("mask_area")
    dropped = len(rejected_rows(defect_dir))
    return {
        "kept": len(rows),
        "dropped": dropped,
        "kept_rate": len(rows) / (len(rows) + dropped) if rows or dropped else math.nan,
        "alignment_mean": statistics.fmean(alignment) if alignment else math.nan,
        "alignment_median": statistics.median(alignment) if alignment else math.nan,
        "consistency_mean": statistics.fmean(consistency) if consistency else math.nan,
        "consistency_median": statistics.median(consistency) if consistency else math.nan,
        "mask_area_mean": statistics.fmean(area) if area else math.nan,
        "values": alignment,
    }


def write_demo_report(out: Path, cfg: Config, pair_sets: list[str], stages: Stages, seconds: float) -> Path:
    """report.md (the template ``assets/report/demo.md.j2``) and report.html from the files the stages wrote
    (nothing here is recomputed); summary.json with the figures other reports quote."""
    from dualanodiff.evaluation.report import COLUMNS, markdown_table, table_rows

    results = json.loads((out / "evaluation.json").read_text())
    for row in results["generators"]:  # JSON null -> nan for the formatters
        row["metrics"] = {k: math.nan if v is None else v for k, v in row["metrics"].items()}
    category, defect = Path(cfg.data.data).name, cfg.data.defect
    figures_of = _write_figures(out, category, defect, pair_sets, results)
    ap = {row["name"]: row["metrics"]["pixel_ap"] for row in results["generators"]}
    area = {row["name"]: row["metrics"].get("area_ratio", math.nan) for row in results["generators"]}
    stats, on_normals = figures_of[OURS], figures_of[ON_NORMALS]
    variants = [name for name in pair_sets if name != ON_NORMALS]
    reproduction = few_shot_reproduction(out, cfg)
    summary = {
        "category": category, "defect": defect, "pixel_ap": ap, "area_ratio": area,
        "pixel_ap_per_seed": {row["name"]: [one["pixel_ap"] for one in row["per_seed"]] for row in results["generators"]},
        "alignment_mean": stats["alignment_mean"],
        "kept": stats["kept"], "attempts": stats["kept"] + stats["dropped"], "few_shot_reproduction": reproduction,
        "on_normals": {"alignment_mean": on_normals["alignment_mean"], "kept": on_normals["kept"],
                       "attempts": on_normals["kept"] + on_normals["dropped"]},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    held_out = out / "held-out" / "summary.json"
    text = render_report(
        "demo.md.j2", category=category, defect=defect, cfg=cfg, out=out, split=_split(out), ours=stats,
        figures=figures_of, reproduction=reproduction, area=area, on_normals=on_normals, OURS=OURS, ON_NORMALS=ON_NORMALS,
        seeds_phrase=_seeds_phrase(results), comparisons=_comparisons(results, ap), cap=cfg.generate.num * MAX_TRIES_FACTOR,
        on_normals_strength=dataclasses.replace(cfg.generate, canvas="on-normals").start_strength,
        protocol=results["protocol"]["localization"],
        metrics_table=markdown_table(["generator"] + [title for _, title, _ in COLUMNS], table_rows(results)),
        ablation_table=_ablation_table(variants, figures_of, ap) if len(variants) > 1 else "",
        held_out=json.loads(held_out.read_text()) if held_out.is_file() else None,
        timing_table=markdown_table(["stage", "seconds"], [[name, f"{value:.0f}"] for name, value in stages.seconds.items()]),
        seconds=seconds,
    )
    return _write_markdown_and_html(out, text)


def render_report(template: str, **context) -> str:
    """A report template of ``assets/report/`` filled with `context` (Markdown; objects' fields read as in Python)."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(REPORT_TEMPLATES), keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined, autoescape=False)
    return environment.get_template(template).render(**context)


def _comparisons(results: dict, ap: dict[str, float]) -> str:
    """The result sentence's comparisons: verdicts over seeds where there are several, else each row's figure."""
    if results["protocol"].get("seeds", 1) > 1:
        pairs = [(ON_NORMALS, "perlin"), (OURS, "perlin")] + ([(COMBINED, "crop-paste")] if COMBINED in ap else [])
        return "; ".join(compare_rows(results, first, second) for first, second in pairs)
    return ", ".join(f"{name} {100 * value:.1f}" for name, value in ap.items())


def compare_rows(results: dict, first: str, second: str) -> str:
    """One comparison of the report, worded from the per-seed pixel AP: "above" or "below" only where the mean
    per-seed difference exceeds the spread of those differences (`evaluation.report.verdict`)."""
    from dualanodiff.evaluation.report import seed_spread, verdict

    rows = {row["name"]: row["per_seed"] for row in results["generators"]}
    relation = {"above": "above", "below": "below", "level": "level with"}[verdict(rows[first], rows[second])]
    return f"{first} {seed_spread(rows[first])} is **{relation}** {second} {seed_spread(rows[second])}"


def _seeds_phrase(results: dict) -> str:
    seeds = results["protocol"].get("seeds", 1)
    if seeds == 1:
        return ("at one localizer seed (no verdict: one seed can move pixel AP by tens of points; "
                "`evaluate: {seeds: 5}` in a --config file gives one)")
    return f"mean ± standard deviation over {seeds} localizer seeds"


def _write_figures(out: Path, category: str, defect: str, pair_sets: list[str], results: dict) -> dict[str, dict]:
    """figures/: contact sheets, loss, metrics and alignment charts; returns each pair set's figures."""
    from dualanodiff.evaluation.report import bar_chart_png

    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    generated = {name: out / "generated" / name / category / defect for name in pair_sets + list(BASELINES)}
    for name, folder in generated.items():
        shutil.copyfile(folder / "contact_sheet.png", figures / f"pairs_{name}.png")
    shutil.copyfile(RunFolder(out / "runs" / OURS).loss_png, figures / "loss.png")
    atomic_write_bytes(figures / "metrics.png", bar_chart_png(results))
    figures_of = {name: pair_figures(generated[name]) for name in pair_sets + list(BASELINES)}
    atomic_write_bytes(figures / "alignment.png", _histogram_png({name: figures_of[name] for name in (*pair_sets, "crop-paste")}))
    return figures_of


def _ablation_table(variants: list[str], figures_of: dict[str, dict], ap: dict[str, float]) -> str:
    """The report's ablation table: alignment, consistency, kept, pixel AP per variant."""
    from dualanodiff.evaluation.report import markdown_table

    rows = [
        [name, f"{figures_of[name]['alignment_mean']:.2f}", f"{figures_of[name]['alignment_median']:.2f}",
         f"{figures_of[name]['consistency_mean']:.2f}", f"{figures_of[name]['kept']}/{figures_of[name]['dropped']}",
         f"{100 * ap[name]:.1f}"]
        for name in variants
    ]
    return markdown_table(["variant", "alignment mean", "alignment median", "consistency mean (dB)", "kept/dropped", "pixel AP"], rows)


def _write_markdown_and_html(out: Path, text: str) -> Path:
    """report.md and the same rendered as report.html (images by relative path, as in the markdown)."""
    from markdown_it import MarkdownIt

    atomic_write_text(out / "report.md", text)
    body = MarkdownIt("commonmark").enable("table").render(text)
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
    html = f"<!doctype html><html><head><meta charset='utf-8'><title>DualAnoDiff demo</title><style>{style}</style></head><body>{body}</body></html>\n"
    atomic_write_text(out / "report.html", html)
    return out / "report.md"


def few_shot_reproduction(out: Path, cfg: Config) -> dict:
    """How close our generated images come to the few-shot training images (mean nearest-training PSNR),
    beside real images of the same defect type that were not in the few-shot set: the base's few-shot
    fidelity, which the embedded base caps (issue: within 0.5 dB of the real images)."""
    from dualanodiff.data import load_image, recorded_split
    from dualanodiff.evaluation.metrics import nearest_psnr
    from dualanodiff.images import resize_image

    train, others = recorded_split(cfg.data.data, cfg.data.defect, _split(out))
    references = np.stack([load_image(p.image) for p in train])
    side = references.shape[1]
    real = np.stack([load_image(p.image) for p in others])
    folder = out / "generated" / OURS / Path(cfg.data.data).name / cfg.data.defect
    generated = np.stack([resize_image(load_image(folder / row["image"]), side) for row in kept_rows(folder)])
    return {"generated": float(nearest_psnr(generated, references).mean()), "real": float(nearest_psnr(real, references).mean()),
            "train_images": len(references), "real_images": len(real)}


def _split(out: Path) -> list[str]:
    return RunFolder(out / "runs" / OURS).load_config().split["train"]


def _histogram_png(figures_of: dict[str, dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3), dpi=100)
    axes = figure.add_subplot()
    finite = [v for stats in figures_of.values() for v in stats["values"]]
    bins = np.linspace(min(finite, default=0), max(finite, default=1), 16)
    for name, stats in figures_of.items():
        axes.hist(stats["values"], bins=bins, alpha=0.5, label=name)
    axes.set_xlabel("image-mask alignment score (1: mask no more on a defect than elsewhere)")
    axes.set_ylabel("pairs")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
