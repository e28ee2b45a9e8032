"""The `dualanodiff` command line: one subcommand per stage, thin wrappers over the library.

Every failure a user can cause ends in one line on stderr and an exit code (`dualanodiff.errors`): a
usage mistake (unknown command or option, bad value, missing option) or a `UserError` exits 2, an
`OSError` (a read-only or full folder) exits 1, a run short of what was asked exits 3 (`--debug` shows
the traceback instead). Messages are printed verbatim: no rich markup or emoji codes are interpreted,
so paths such as ``runs/[v2]`` and keys such as ``:train:`` appear as they are. Progress shows as
bars on a terminal and as plain lines elsewhere (`progress_bars`); ``--log-file`` appends the plain lines
and every message to a file as well. A command stopped by SIGINT or SIGTERM after saving its work
(`dualanodiff.signals.Stopped`) prints one line saying how to go on, then exits 130 (SIGINT) or ends by
SIGTERM; a reader that goes away (``| head -1``) ends the command quietly with exit code 141.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import signal
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.control import Control
from rich.text import Text

from dualanodiff import __version__, progress
from dualanodiff.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    EXIT_USAGE,
    UserError,
)
from dualanodiff.io import check_writable
from dualanodiff.progress import Bars
from dualanodiff.signals import Stopped, deferred_signals

if TYPE_CHECKING:
    from dualanodiff.config import Config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Few-shot anomaly image-mask pair generation (DualAnoDiff).",
)


class _Console(Console):
    """A console of the command line: verbatim (markup and emoji codes in paths, keys and messages are not
    interpreted). With ``--log-file`` every message printed is also appended to that file,
    plain and timestamped, flushed line by line (bars are not messages: `progress_bars` logs plain lines)."""

    log_file: Console | None = None  # a plain console on the open log file

    def __init__(self, **options):
        super().__init__(markup=False, emoji=False, highlight=False, **options)

    def print(self, *objects, **kwargs) -> None:
        super().print(*objects, **kwargs)
        if objects and not isinstance(objects[0], Control):  # Control: rich moving its bars
            self.log_line(*objects, **kwargs)

    def log_line(self, *objects, **kwargs) -> None:
        if self.log_file is not None:
            self.log_file.print(time.strftime("%Y-%m-%d %H:%M:%S"), *objects, **kwargs)

    def open_log(self, path: Path) -> None:
        check_writable(path.parent)
        try:
            handle = path.open("a", buffering=1)  # line-buffered: each line reaches the file at once
        except OSError as exc:
            raise UserError(f"--log-file {path}: {exc.strerror}; pass a file path in a writable folder") from None
        self.log_file = Console(
            file=handle, markup=False, emoji=False, highlight=False, color_system=None, soft_wrap=True,
            width=TABLE_WIDTH_OUTSIDE_TERMINAL,
        )

    def close_log(self) -> None:
        if self.log_file is not None:
            self.log_file.file.close()
            self.log_file = None


console = _Console(stderr=True, soft_wrap=True)
stdout = _Console()
_state = {"debug": False}
TABLE_WIDTH_OUTSIDE_TERMINAL = 240
SET_OPTION = typer.Option(
    None, "--set", metavar="SECTION.OPTION=VALUE", help="Any config option, e.g. --set generate.guidance=3.5 "
    "(repeatable; over --config, under the flags). The options: docs/usage.md#configuration.",
)


def _show_version(value: bool) -> None:
    if value:
        stdout.print(f"dualanodiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    log_file: Optional[Path] = typer.Option(
        None, "--log-file", help="Also append progress lines and messages to this file (before the command: "
        "dualanodiff --log-file run.log train ...).",
    ),
) -> None:
    _state["debug"] = debug
    if log_file is not None:
        console.open_log(log_file)


# --- progress: bars on a terminal, plain lines elsewhere -------------------------------------------


def progress_bars(enabled: bool = True, transient: bool = True) -> AbstractContextManager[Bars]:
    """The one progress display of every command (`dualanodiff.progress.progress_bars` on `console`):
    ``bar = bars("training", total)``, then ``bar(done, total=None, note="")``; ``--log-file`` gets plain lines."""
    return progress.progress_bars(console, console.log_line, enabled=enabled, transient=transient)


def _log(message: str) -> None:
    console.print(message)


def print_table(table) -> None:
    """A rich `Table` on stdout: drawn by rich on a terminal; elsewhere (a log, a pipe, a file) as
    `plain_table` text, every cell whole however wide (rich would cut it to the width it guesses)."""
    if stdout.is_terminal:
        stdout.print(table)
    else:
        stdout.print(plain_table(table), soft_wrap=True)


def plain_table(table) -> str:
    """A rich `Table` as aligned plain text: title, header, a rule, the rows, caption; columns two
    spaces apart, right-justified where the column is."""
    header = [_plain(column.header) for column in table.columns]
    columns = [[_plain(cell) for cell in column.cells] for column in table.columns]
    widths = [max(map(len, [title, *cells])) for title, cells in zip(header, columns)]

    def line(cells) -> str:
        justified = [
            cell.rjust(width) if column.justify == "right" else cell.ljust(width)
            for cell, width, column in zip(cells, widths, table.columns)
        ]
        return "  ".join(justified).rstrip()

    rows = [line(header), line(["-" * width for width in widths]), *(line(row) for row in zip(*columns))]
    return "\n".join([_plain(table.title)] * bool(table.title) + rows + [_plain(table.caption)] * bool(table.caption))


def _plain(cell) -> str:
    """A table cell (str or rich `Text`) as one line of text."""
    return " ".join((cell.plain if isinstance(cell, Text) else str(cell)).splitlines())


# --- data: synth, info ---------------------------------------------------------------------------


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the dataset into (one subfolder per category)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    size: int = typer.Option(128, "--size", help="Image side in pixels."),
    per_defect: int = typer.Option(9, "--per-defect", help="Images per defect type."),
    good: int = typer.Option(12, "--good", help="Normal images in train/good (and as many in test/good)."),
    category: Optional[list[str]] = typer.Option(None, "--category", help="Only these categories (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty OUT, replacing its categories."),
) -> None:
    """Write the synthetic MVTec-format dataset (objects and a texture, several defect types, exact masks)."""
    from dualanodiff.synthetic import CATEGORIES, dataset_jobs, write_dataset

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; pick another OUT")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: folder is not empty; pick another OUT or pass --force to replace its categories")
    names = category or list(CATEGORIES)
    total = sum(1 for _ in dataset_jobs(names, per_defect, good))  # also rejects unknown categories
    check_writable(out)
    with progress_bars() as bars:
        bar, done = bars("rendering", total), itertools.count(1)
        written = write_dataset(out, seed, size, per_defect, good, names, lambda: bar(next(done)))
    console.print(f"wrote {len(written)} categories ({', '.join(p.name for p in written)}) to {out}")


@app.command()
def info(
    category_dir: Path = typer.Argument(..., help="Category folder (MVTec layout) or custom images/ + masks/ folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    split_rounding: str = typer.Option("floor", "--split-rounding", help="floor (disjoint, ours) or ceil (official)."),
) -> None:
    """Show a category's defect types, counts, image size and few-shot split."""
    import json

    from rich.table import Table

    from dualanodiff.data import empty_masks, few_shot_split, open_category

    cat = open_category(category_dir)
    splits = {name: few_shot_split(pairs, split_rounding) for name, pairs in cat.defects.items()}
    empty = {name: empty_masks(train) for name, (train, _) in splits.items()}
    for name, pairs in empty.items():
        if pairs:
            console.print(
                f"warning: {cat.name}/{name}: empty few-shot training mask(s), all zero: "
                f"{', '.join(str(p.mask) for p in pairs)}; train and crop-paste refuse them (--allow-empty-masks skips them)"
            )
    if as_json:
        record = {
            "category": cat.name,
            "defects": {
                name: {"train": [p.stem for p in train], "test": [p.stem for p in test], "empty_masks": [p.stem for p in empty[name]]}
                for name, (train, test) in splits.items()
            },
            "good_train": len(cat.train_good),
            "good_test": len(cat.test_good),
        }
        sys.stdout.write(json.dumps(record) + "\n")
        return
    width, height = cat.image_size()
    table = Table(title=cat.name, caption=f"{cat.layout} layout, {cat.kind}, {width}x{height} px, split {split_rounding}")
    for column in ("defect", "pairs", "train", "test"):
        table.add_column(column)
    for name, (train, test) in splits.items():
        table.add_row(name, str(len(train) + len(test)), " ".join(p.stem for p in train), " ".join(p.stem for p in test))
    good = (len(cat.train_good), len(cat.test_good))
    table.add_row("good", str(sum(good)), f"{good[0]} images", f"{good[1]} images")
    print_table(table)


# --- model: train ---------------------------------------------------------------------------------


def load_config(config: Optional[Path]) -> Config:
    """The YAML config if given (its missing keys take the defaults), else the defaults."""
    from dualanodiff.config import Config

    return Config.from_yaml(config) if config else Config()


def config_with_recipe(config: Optional[Path], base_model: Optional[str]) -> tuple[Config, str]:
    """The defaults, then the base model's own few-shot recipe (`base_recipe`), then the --config file
    (the caller's flags go on top with `Config.with_overrides`); and a line saying what the recipe set."""
    from dualanodiff.config import Config, read_yaml
    from dualanodiff.model.base import base_recipe

    file = read_yaml(config) if config else {}
    base = base_model or (file.get("model") or {}).get("base_model") or Config().model.base_model
    recipe = base_recipe(base)
    keys = [f"{section}.{name}" for section, values in recipe.items() for name in values]
    note = f"base model {base}: its recipe sets {', '.join(keys)} (where --config and flags do not)" if keys else ""
    return Config.from_layers([(recipe, f"{base} recipe"), (file, str(config))]), note


@functools.cache
def _config_defaults() -> Config:
    from dualanodiff.config import Config

    return Config()


def config_default(key: str, of_run: bool = False) -> str:
    """What ``--help`` shows for an option left None so that the config decides (typer prints
    ``[default: (train.steps: 5000)]``); ``of_run``: generate, which starts from the run's saved config."""
    section, name = key.split(".")
    value = getattr(getattr(_config_defaults(), section), name)
    shown = ("on" if value else "off") if isinstance(value, bool) else value
    return f"the run's {key}, normally {shown}" if of_run else f"{key}: {shown}"


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, "--data", help="Category folder (MVTec layout) or images/ + masks/ folder; "
                                        "required for a new run (or data.data in --config)."),
    defect: Optional[str] = typer.Option(None, "--defect", help="Defect type to learn (its few-shot training split); "
                                         "required for a new run (or data.defect in --config)."),
    out: Path = typer.Option(..., "--out", help="Run folder (config.yaml, adapters, loss curve, checkpoints)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="tiny (embedded), tiny-random, a diffusers dir or a .safetensors file.", show_default=config_default("model.base_model")),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total optimisation steps (official: 5000).", show_default=config_default("train.steps")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config; flags given here override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Delete an existing run in OUT and start over."),
    allow_empty_masks: Optional[bool] = typer.Option(
        None, "--allow-empty-masks", help="Skip few-shot pairs whose mask is empty, with a warning (else refused).",
        show_default=config_default("data.allow_empty_masks"),
    ),
    assigned: Optional[list[str]] = SET_OPTION,
) -> None:
    """Few-shot-train DualAnoDiff (dual LoRA, SAIM, BCM, text LoRA) on one defect type."""
    from dualanodiff.config import assignments
    from dualanodiff.runs import RunFolder
    from dualanodiff.training import train as train_run

    saved = RunFolder(out)  # a resumed run keeps its own settings (and length, unless --steps is given)
    start, note = (saved.load_config(), "") if resume and saved.is_run() else config_with_recipe(config, base_model)
    cfg = start.with_overrides({  # re-validated, --set's values first and the flags on top
        **assignments(assigned or []), ("data", "data"): data and str(data), ("data", "defect"): defect,
        ("model", "base_model"): base_model, ("train", "steps"): steps, ("data", "allow_empty_masks"): allow_empty_masks,
    })
    if not resume and not (cfg.data.data and cfg.data.defect):
        raise UserError("--data and --defect are required for a new run (or set data.data/data.defect in --config)")
    check_writable(out)
    from dualanodiff.devices import is_main_process

    with progress_bars() as bars:  # train() reports on the main process only: other ranks draw no bar
        notes = [note] if note else []  # said once work has started: every input check has passed
        bar = []

        def started_bars(label: str, total: int | None = None):
            """`bars`, saying the notes first: the first bar (the decoder refinement's, else the training's) is
            drawn on the main process only, after every input check."""
            while notes:
                _log(notes.pop())
            return bars(label, total)

        def report(step: int, total: int, losses: dict) -> None:
            if not bar:
                bar.append(started_bars("training"))
            bar[0](step, total, " ".join(f"{k[5:]} {v:.4f}" for k, v in losses.items()))

        run = train_run(cfg, out, resume=resume, force=force, progress=report, log=_log, bars=started_bars)
    if is_main_process():
        console.print(f"trained {run}: adapters in {run / 'adapters.safetensors'}, loss curve in {run / 'loss.png'}")

# --- generation: generate -------------------------------------------------------------------------


@app.command()
def generate(
    run: Path = typer.Argument(..., help="Run folder written by `dualanodiff train`."),
    out: Path = typer.Option(..., "--out", help="Output root; pairs go to OUT/<category>/<defect>/."),
    num: Optional[int] = typer.Option(None, "--num", help="Kept pairs wanted; a re-run with a larger number adds pairs.", show_default=config_default("generate.num", of_run=True)),
    seed: Optional[int] = typer.Option(None, "--seed", help="Base seed; attempt a uses seed + a.", show_default=config_default("generate.seed", of_run=True)),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (official: 100).", show_default=config_default("generate.steps", of_run=True)),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (official: 2.5).", show_default=config_default("generate.guidance", of_run=True)),
    use_filter: Optional[bool] = typer.Option(None, "--filter/--no-filter", help="Drop empty, too large or off-object masks.", show_default=config_default("generate.filter", of_run=True)),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config; its generate section overrides the run's."),
    normal: Optional[Path] = typer.Option(None, "--normal", help="Normal image to inpaint a defect into (with --mask)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Where the defect may go in the --normal image."),
    canvas: Optional[str] = typer.Option(None, "--canvas", help="Where sampling starts: noise (paper), few-shot or normal "
                                         "(whole images from a few-shot or train/good image), on-normals (each defect "
                                         "drawn into a real train/good image).", show_default=config_default("generate.canvas", of_run=True)),
    strength: Optional[float] = typer.Option(None, "--strength", help="The share of the schedule the canvas is noised to "
                                             "(1: the first step; 0: the canvas's own).", show_default=config_default("generate.strength", of_run=True)),
    assigned: Optional[list[str]] = SET_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace pairs made here with other settings (else refused)."),
) -> None:
    """Generate aligned anomaly image-mask pairs with a trained run (SAIM + BCM, guided, filtered)."""
    from dualanodiff.generation import generate as generate_pairs
    from dualanodiff.generation import generate_config

    cfg = generate_config(
        run, config, assigned or [], num=num, seed=seed, steps=steps, guidance=guidance, filter=use_filter, canvas=canvas,
        strength=strength,
    )
    check_writable(out)
    with progress_bars() as bars:
        bar = bars("generating", cfg.num)
        summary = generate_pairs(
            run, out, cfg, normal=normal, mask=mask,
            progress=lambda kept, total: bar(kept, total), log=_log, force=force,
        )
    console.print(f"{summary.kept} pairs in {summary.folder} ({summary.seconds:.1f} s)")
    if summary.kept < cfg.num:
        console.print(f"short of --num: {summary.kept} of {cfg.num} pairs kept (exit code {EXIT_PARTIAL})")
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def export(
    generated: Path = typer.Argument(..., help="Output root of generate or baseline (GEN/<category>/<defect>/)."),
    out: Path = typer.Option(..., "--out", help="Folder for the export, one subfolder per category."),
    layout: str = typer.Option(..., "--layout", help="mvtec (test/ + ground_truth/: anomalib MVTecAD) or folder "
                               "(<defect>/images + masks: anomalib Folder)."),
    size: str = typer.Option("model", "--size", help="model (as written), source (the dataset's image size) or N px."),
    normal_from: Optional[Path] = typer.Option(
        None, "--normal-from", help="Dataset root or category folder: its train/good (and test/good) images join the export."
    ),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty OUT, replacing the categories exported."),
) -> None:
    """Export generated pairs (kept ones only) into a layout anomalib reads, optionally resized."""
    from dualanodiff.config import parse_pair_size
    from dualanodiff.exports import export_pairs

    size_spec = parse_pair_size(size)
    check_writable(out)
    with progress_bars() as bars:
        summary = export_pairs(generated, out, layout, size_spec, normal_from, force, progress=bars("exporting"))
    normals = f" and {sum(summary.normals.values())} normal images" if summary.normals else ""
    console.print(f"exported {sum(summary.pairs.values())} pairs of {len(summary.pairs)} defect types{normals} to {out} ({layout})")

# --- baselines and evaluation: baseline, evaluate -------------------------------------------------


@app.command()
def baseline(
    method: str = typer.Argument(..., help="crop-paste (real few-shot defects pasted) or perlin (DRAEM)."),
    data: Path = typer.Option(..., "--data", help="Category folder (MVTec layout, with train/good)."),
    defect: str = typer.Option(..., "--defect", help="Defect type (crop-paste cuts its training pairs)."),
    num: int = typer.Option(..., "--num", help="Pairs wanted; a re-run with a larger number adds pairs."),
    out: Path = typer.Option(..., "--out", help="Output root; pairs go to OUT/<category>/<defect>/."),
    seed: int = typer.Option(0, "--seed", help="Base seed; pair attempt a uses seed + a."),
    split_rounding: str = typer.Option("floor", "--split-rounding", help="crop-paste: floor (disjoint) or ceil."),
    force: bool = typer.Option(False, "--force", help="Replace pairs already in OUT/<category>/<defect>/."),
    allow_empty_masks: bool = typer.Option(
        False, "--allow-empty-masks", help="crop-paste: skip few-shot pairs whose mask is empty (else refused).",
    ),
) -> None:
    """Write baseline image-mask pairs in the same layout as `generate` (crop-paste or Perlin)."""
    from dualanodiff import baselines
    from dualanodiff.data import open_category

    if method not in ("crop-paste", "perlin"):
        raise UserError(f"baseline {method}: unknown method; choose crop-paste or perlin")
    category = open_category(data)
    check_writable(out)
    with progress_bars() as bars:
        report = bars(f"{method} {category.name}/{defect}", num)
        if method == "crop-paste":
            folder = baselines.crop_paste(category, defect, num, out, seed, split_rounding, force=force, progress=report,
                                          allow_empty_masks=allow_empty_masks, log=_log)
        else:
            folder = baselines.perlin(category, defect, num, out, seed, force=force, progress=report)
    console.print(f"{method}: {num} pairs in {folder}")


@app.command()
def evaluate(
    data: Path = typer.Option(..., "--data", help="Category folder (MVTec layout) with the real test split."),
    generated: list[str] = typer.Option(
        ..., "--generated", help="Output root of generate/baseline, as DIR or NAME=DIR (repeatable: one row each)."
    ),
    combine: Optional[list[str]] = typer.Option(
        None, "--combine", help="Also a row trained on the pairs of two or more --generated rows together, named "
        "by their names joined with + (repeatable), e.g. --combine crop-paste+dualanodiff.",
    ),
    defect: Optional[list[str]] = typer.Option(None, "--defect", help="Only these defect types (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config; its `evaluate` section is used."),
    steps: Optional[int] = typer.Option(
        None, "--steps", help="Optimizer steps of each training, the same for every row (no test-set selection).",
        show_default=config_default("evaluate.steps"),
    ),
    seeds: Optional[int] = typer.Option(
        None, "--seeds", help="Train each row's localizer and classifier at this many seeds (evaluate.seed, + 1, ...) "
        "and report their mean: one seed's pixel AP can be off by tens of points.", show_default=config_default("evaluate.seeds"),
    ),
    inception_weights: Optional[Path] = typer.Option(
        None, "--inception-weights", help="For IS: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
        "(or a TorchScript Inception-v3 returning logits).",
    ),
    lpips_weights: Optional[list[Path]] = typer.Option(
        None, "--lpips-weights", help="For IC-LPIPS: torchvision's alexnet-*.pth and lpips' weights/v0.1/alex.pth "
        "(the option once for each), or one file holding both.",
    ),
    resnet_weights: Optional[Path] = typer.Option(
        None, "--resnet-weights", help="torchvision's ImageNet resnet34-*.pth for the classifier (else random init).",
    ),
    no_classification: bool = typer.Option(False, "--no-classification", help="Skip the ResNet-34 classification."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="On the CPU, trainings run at once, each on one thread; the figures are the "
        "same for any number.", show_default="one per usable core",
    ),
    report: Optional[Path] = typer.Option(None, "--report", help="Write a Markdown report, and beside it its bar chart "
                                          "(.png), the results (.json, raw fractions) and the table (.csv)."),
    assigned: Optional[list[str]] = SET_OPTION,
    force: bool = typer.Option(False, "--force", help="Overwrite existing report files."),
) -> None:
    """Compare generators: U-Net localization, ResNet-34 classification, IS and IC-LPIPS, in one table."""
    from dualanodiff.config import assignments
    from dualanodiff.evaluation import evaluate_generators, write_report
    from dualanodiff.evaluation.parallel import usable_cores
    from dualanodiff.evaluation.report import chart_path, check_outputs

    options = {("evaluate", "steps"): steps, ("evaluate", "seeds"): seeds}
    settings = load_config(config).with_overrides({**assignments(assigned or [], ("evaluate", "data")), **options})
    cfg, split_rounding = settings.evaluate, settings.data.split_rounding
    roots = generated_rows(generated, combine or [])
    json_path, csv_path = (report.with_suffix(".json"), report.with_suffix(".csv")) if report else (None, None)
    check_outputs([report, report and chart_path(report), json_path, csv_path], force)
    if report is not None:
        check_writable(report.parent)  # before the U-Net trains
    with deferred_signals() as stop:  # a stop while training writes nothing; the files are written whole
        with stop.at_once("before anything was written; run the same command again to evaluate"), progress_bars() as bars:
            results = evaluate_generators(
                data, roots, cfg, defects=defect or None, rounding=split_rounding,
                inception_weights=inception_weights, lpips_weights=lpips_weights, resnet_weights=resnet_weights,
                classification=not no_classification, workers=workers or usable_cores(), log=_log, bars=bars,
            )
        written = write_report(results, report, json_path=json_path, csv_path=csv_path, force=force)
    print_results(results)
    for path in written:
        console.print(f"wrote {path}")


def generated_rows(generated: list[str], combine: list[str]) -> dict[str, Path]:
    """The evaluation's rows: each --generated folder by its name, then each --combine of them."""
    from dualanodiff.evaluation import combined_rows, parse_generated

    roots = dict(parse_generated(spec) for spec in generated)
    if len(roots) != len(generated):
        raise UserError("--generated: two folders share a row name; label them as NAME=DIR")
    roots.update(combined_rows(combine, roots))
    return roots


def print_results(results: dict) -> None:
    """The evaluation's table on the console: a row per generator, a column per metric."""
    from rich.table import Table

    from dualanodiff.evaluation.report import COLUMNS, table_rows

    table = Table(title=f"{results['category']} ({results['protocol']['selection']})")
    for title in ["generator"] + [title for _, title, _ in COLUMNS]:
        table.add_column(title)
    for cells in table_rows(results):
        table.add_row(*cells)
    print_table(table)


# --- base model and demo: pretrain-base, demo ------------------------------------------------------


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the data, runs, pairs and report."),
    category: str = typer.Option("nut", "--category", help="Synthetic category: nut, pill or weave, or another renderable one (synthetic.FAMILIES)."),
    defect: str = typer.Option("hole", "--defect", help="Defect type of that category to learn."),
    ablation: bool = typer.Option(False, "--ablation", help="Also run with SAIM off and with BCM off, side by side, score crop-paste + our on-normals pairs together, "
                                  "and run the whole demo on the held-out category "
                                  "(bottle / contamination, never in the embedded bases' pretraining) in OUT/held-out."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config whose keys replace the demo's settings (the rest stay the demo's)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Your own category folder (MVTec layout) instead of a synthetic --category; --defect names its defect type."),
    force: bool = typer.Option(False, "--force", help="Delete OUT and start over."),
) -> None:
    """The whole method on a CPU in minutes: synthetic data, few-shot training, generation, baselines, evaluation."""
    from dualanodiff.demo import DemoHooks, demo_settings, run_demo

    cfg = demo_settings(category, defect, config, data)
    check_writable(out)
    start = time.perf_counter()
    try:
        with progress_bars(transient=False) as bars:
            report = run_demo(out, cfg, ablation=ablation, force=force, hooks=DemoHooks(log=_log, bar=bars))
    except Stopped as exc:  # a stage's own advice (train's --resume) is, for the demo, a re-run
        raise Stopped(exc.number, "with its finished work kept; run the same command again to continue") from None
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s: {report} and {report.with_suffix('.html')}")


# --- pretrain-base --------------------------------------------------------------------------------


@app.command("pretrain-base")
def pretrain_base_command(
    out: Path = typer.Option(..., "--out", help="Folder for the diffusers directory (unet, vae, text_encoder, ...)."),
    preset: str = typer.Option("v1", "--preset", help="The shipped base's runs in order: v1 (its architecture "
                               "from scratch), decoder (refine a base's VAE decoder), cpu-v1 (train a base's UNet and text "
                               "encoder on); or tiny (test size)."),
    steps_vae: Optional[int] = typer.Option(None, "--steps-vae", help="VAE training steps (default: the preset's)."),
    steps_unet: Optional[int] = typer.Option(None, "--steps-unet", help="UNet + text encoder steps (default: the preset's)."),
    steps_decoder: Optional[int] = typer.Option(None, "--steps-decoder", help="Steps refining the VAE decoder alone, "
                                                "its defect pixels weighted (default: the preset's)."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from this base (tiny or a pretrain-base "
                                            "folder) instead of the preset's; it keeps that base's VAE encoder."),
    time_budget: Optional[float] = typer.Option(
        None, "--time-budget", help="Seconds from the start after which no training step begins; the step counts "
        "become maxima. Measuring and export follow.",
    ),
    resolution: int = typer.Option(128, "--resolution", help="Image side in pixels (latents are a quarter of it)."),
    device: str = typer.Option("auto", "--device", help="auto (the GPU when there is one), cpu or cuda."),
    workers: int = typer.Option(0, "--workers", help="Processes rendering the data (0: one per CPU core, at most 16)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint/state.pt."),
    force: bool = typer.Option(False, "--force", help="Delete an earlier pretrain-base run in OUT and start over."),
) -> None:
    """Pretrain the small Stable-Diffusion-shaped base model (`--base-model tiny`) on synthetic images."""
    from dualanodiff.pretrain import PRESETS, pretrain_base

    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: unknown or removed (CHANGELOG.md); choose {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    options = chosen.options if init_from is None else dataclasses.replace(chosen.options, init_from=init_from)
    if init_from not in (None, "tiny") and not (Path(init_from).expanduser() / "unet").is_dir():
        raise UserError(f"--init-from {init_from}: not a base model folder (no unet/ in it); give tiny or a "
                        "pretrain-base output folder")
    check_writable(out)
    _log(f"preset {preset}: {chosen.about}")
    with progress_bars() as bars:
        record = pretrain_base(
            out, chosen.steps_vae if steps_vae is None else steps_vae,
            chosen.steps_unet if steps_unet is None else steps_unet, resolution, 0, options,
            resume=resume, force=force, device=device, time_budget=time_budget,
            workers=workers or min(os.cpu_count() or 1, 16), preset=preset, log=_log, bars=bars,
            steps_decoder=chosen.steps_decoder if steps_decoder is None else steps_decoder,
        )
    console.print(
        f"wrote {out}: VAE held-out PSNR {record['heldout']['vae_psnr_db']:.2f} dB, "
        f"{record['steps']['unet']} UNet and {record['steps']['decoder']} decoder steps in {record['wall_seconds']:.0f} s on {record['compute']['device']}, "
        f"samples in {out / 'samples.png'}"
    )


# --- whole-dataset runs: run-all ------------------------------------------------------------------


def split_names(values: Optional[list[str]]) -> Optional[list[str]]:
    """Repeated and comma-separated option values as one list: ``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    return [name for value in values for name in value.split(",") if name] if values else None


@app.command("run-all")
def run_all_command(
    data: Path = typer.Option(..., "--data", help="Dataset root: one category folder (MVTec layout) per category."),
    out: Path = typer.Option(..., "--out", help="Output folder: runs/, generated/, reports/, jobs/, summary.md/.csv."),
    categories: Optional[list[str]] = typer.Option(None, "--categories", "--category", help="Only these categories (repeatable or comma-separated)."),
    defects: Optional[list[str]] = typer.Option(None, "--defects", "--defect", help="Only these defect types (repeatable or comma-separated)."),
    max_defects: Optional[int] = typer.Option(None, "--max-defects", help="At most K defect types per category (first by name)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="tiny (embedded), tiny-random, a diffusers dir or a .safetensors file.", show_default=config_default("model.base_model")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config for every stage; flags given here override it."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to use: auto or ray://HOST:10001 (default: a local Ray)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="Local Ray: CPUs it may use (default: all); one per job."),
    gpus_per_job: Optional[float] = typer.Option(None, "--gpus-per-job", help="GPUs each job claims, may be a fraction (default: 1 where Ray sees GPUs, else 0)."),
    assigned: Optional[list[str]] = SET_OPTION,
) -> None:
    """Train, generate and evaluate every category and defect type of a dataset as Ray jobs; re-runs skip finished jobs."""
    from rich.table import Table

    from dualanodiff.config import assignments
    from dualanodiff.runall import (
        SUMMARY_COLUMNS,
        run_all,
        run_outcome,
        summary_cells,
        summary_rows,
    )

    cfg = config_with_recipe(config, base_model)[0].with_overrides(
        {**assignments(assigned or []), ("model", "base_model"): base_model}
    )
    check_writable(out)
    jobs, records = run_all(
        data, out, cfg, categories=split_names(categories), defects=split_names(defects), max_defects=max_defects,
        address=address, num_cpus=num_cpus, gpus_per_job=gpus_per_job, console=console,
    )
    table = Table(title=f"run-all: {data}")
    for _, title in SUMMARY_COLUMNS:
        table.add_column(title)
    for cells in summary_cells(summary_rows(jobs, records)):
        table.add_row(*cells)
    print_table(table)
    console.print(f"wrote {out / 'summary.md'} and {out / 'summary.csv'}; reports in {out / 'reports'}")
    code, message = run_outcome(jobs, records)
    if code:
        console.print(Text(message, style="bold red" if code == EXIT_FAILED else "bold yellow"))
        raise typer.Exit(code)


def _error(message: str) -> None:
    """One line on stderr, ``error: <message>``, printed verbatim."""
    console.print(Text.assemble(("error:", "bold red"), " ", " ".join(str(message).split("\n"))))


def _click_types(name: str) -> tuple[type, ...]:
    """Click's exception class ``name`` from typer's bundled copy (`typer._click`, typer 0.29) and from
    click itself, wherever they exist: neither derives from the other, so both are caught."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _usage_message(exc: Exception) -> str:
    """A click usage error as one line, with where to look: ``No such option: --stpes (see 'dualanodiff
    train --help')``."""
    ctx = getattr(exc, "ctx", None)
    message = " ".join(exc.format_message().split())
    return f"{message} (see '{ctx.command_path} --help')" if ctx is not None else message


def _os_error_message(exc: OSError) -> str:
    """``PATH: reason`` for an OSError (``[Errno 28] No space left on device: 'x'`` -> ``x: No space left on device``)."""
    reason = exc.strerror or str(exc)
    paths = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app; every failure a user can cause becomes one line on stderr and the exit
    code of `dualanodiff.errors` (``--debug``: the traceback instead)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        code = _run(args)
    finally:
        console.close_log()
    if isinstance(code, int) and code:
        sys.exit(code)


def _run(args: list[str]) -> int:
    """The app's exit code; what typer's own `main` would catch (Ctrl-C, a broken pipe) is handled here,
    so that a `Stopped` keeps its message and signal."""
    import typer.main

    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        with command.make_context("dualanodiff", list(args)) as ctx:
            command.invoke(ctx)
        sys.stdout.flush()  # here, not at exit, so that a reader gone away is noticed below
        return 0
    except UserError as exc:
        if debug:
            raise
        _error(str(exc))
        return EXIT_USAGE
    except _click_types("ClickException") as exc:  # usage mistakes
        if type(exc).__name__ == "NoArgsIsHelpError":
            stdout.print(exc.format_message())
        else:
            _error(_usage_message(exc))
        return getattr(exc, "exit_code", EXIT_USAGE) or EXIT_USAGE
    except BrokenPipeError:  # `dualanodiff ... | head -1`: the reader has gone; end quietly, as `yes | head -1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):  # what is still buffered goes nowhere, without a complaint
            os.dup2(devnull, stream.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if debug:
            raise
        _error(_os_error_message(exc))
        return EXIT_FAILED
    except Stopped as exc:  # the work saved what it had; the message says how to go on
        console.print(exc.message)
        if exc.number == signal.SIGTERM:  # end by the signal, so that the parent sees what stopped us
            sys.stdout.flush()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return EXIT_INTERRUPTED
    except (KeyboardInterrupt, typer.Abort, *_click_types("Abort")):
        console.print("interrupted; finished work is kept and a re-run resumes from it")
        return EXIT_INTERRUPTED
    except (typer.Exit, SystemExit) as exc:
        if isinstance(exc.__context__, BrokenPipeError):  # rich's way to end a broken pipe: SystemExit(1)
            return EXIT_BROKEN_PIPE
        return getattr(exc, "exit_code", getattr(exc, "code", 0))
