"""The evaluation report: one table per category, rows = generators, columns as the paper's Table 2
(pixel and image AUROC / AP / F1-max) and pixel AUPRO (MVTec AD's metric), plus IS, IC-LPIPS, classification accuracy, and the number of
pairs and their mean image-mask alignment score, written as Markdown (with a bar chart PNG beside it),
JSON and CSV.

Percent columns show ``100 * value`` with one decimal as the paper does; IS, IC-LPIPS and alignment two
decimals; "–" where a value was not computed. The JSON keeps the raw fractions (``null`` for not
computed) and the protocol; the CSV holds the table's numbers (empty for not computed).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from dualanodiff.errors import UserError
from dualanodiff.io import atomic_write_bytes, atomic_write_text, jsonable

NOT_COMPUTED = "–"
TITLES = {  # results key -> column title
    "pairs": "pairs", "pixel_auroc": "pixel AUROC", "pixel_ap": "pixel AP", "pixel_f1max": "pixel F1-max",
    "pixel_aupro": "pixel AUPRO", "image_auroc": "image AUROC", "image_ap": "image AP", "image_f1max": "image F1-max",
    "is": "IS", "ic_lpips": "IC-LPIPS", "accuracy": "accuracy", "alignment": "alignment", "area_ratio": "mask area ×few-shot",
}
NOT_PERCENT = {"pairs", "is", "ic_lpips", "alignment", "area_ratio"}  # counts and ratios, shown as they are
COLUMNS = tuple((key, title, key not in NOT_PERCENT) for key, title in TITLES.items())  # (key, title, percent?)


def format_value(value: float | int | None, percent: bool) -> str:
    """``0.9234, True`` -> ``"92.3"``; ``1.8765, False`` -> ``"1.88"``; a count ``12`` -> ``"12"``;
    ``nan``/``None`` -> ``"–"``."""
    if isinstance(value, int):
        return str(value)
    if value is None or math.isnan(value):
        return NOT_COMPUTED
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def table_rows(results: dict) -> list[list[str]]:
    """One row of formatted cells per generator: name, then `COLUMNS`."""
    return [
        [row["name"]] + [format_value(row["metrics"].get(key), percent) for key, _, percent in COLUMNS]
        for row in results["generators"]
    ]


def check_outputs(paths: list[Path | None], force: bool) -> None:
    """`UserError` if an output exists and ``force`` is off (checked before any work is done)."""
    for path in paths:
        if path is not None and Path(path).exists() and not force:
            raise UserError(f"{path}: already exists; pick another file or pass --force to overwrite it")


def chart_path(out_md: Path) -> Path:
    """The bar chart written beside a Markdown report: ``report.md`` -> ``report.png``."""
    return Path(out_md).with_suffix(".png")


def write_report(
    results: dict,
    out_md: Path | None = None,
    *,
    json_path: Path | None = None,
    csv_path: Path | None = None,
    force: bool = False,
) -> list[Path]:
    """Write the Markdown report and its bar chart (``out_md`` and `chart_path`), the JSON and the CSV,
    each atomically and only those asked for; refuses to overwrite without ``force``. Returns the
    paths written."""
    targets = ([Path(out_md), chart_path(out_md)] if out_md else []) + [p for p in (json_path, csv_path) if p]
    check_outputs(targets, force)
    if out_md:
        atomic_write_bytes(chart_path(out_md), bar_chart_png(results))
        atomic_write_text(Path(out_md), markdown(results, chart_path(out_md).name))
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n")
    if csv_path:
        atomic_write_text(Path(csv_path), csv_text(results))
    return targets


def markdown(results: dict, chart_name: str | None = None) -> str:
    """The report page: protocol, the table, notes, the chart and per-defect-type tables."""
    protocol = results["protocol"]
    test = ", ".join(f"{name} {count}" for name, count in protocol["test_images"].items())
    lines = [
        f"# Evaluation: {results['category']}",
        "",
        f"Dataset `{results['category_dir']}`; real test split ({protocol['split_rounding']} rounding): {test} images.",
        "",
        f"- Localization: {protocol['localization']}.",
        f"- Classification: {protocol['classification']}.",
        f"- Generation: {protocol['generation']}.",
        f"- Alignment: {protocol['alignment']}.",
        f"- Mask area: {protocol['mask_area']}.",
        "",
        markdown_table(["generator"] + [title for _, title, _ in COLUMNS], table_rows(results)),
        "",
        f"Percent except IS, IC-LPIPS, alignment and mask area; {NOT_COMPUTED} = not computed.",
    ]
    lines += [""] + [f"- {note}" for note in results["notes"]] if results["notes"] else []
    if protocol.get("seeds", 1) > 1:
        lines += ["", "Pixel AP of each training (seed: value), then their mean ± standard deviation:", ""] + [
            f"- {row['name']}: " + ", ".join(f"{one['seed']}: {format_value(one['pixel_ap'], True)}" for one in row["per_seed"])
            + f"; {seed_spread(row['per_seed'])}"
            for row in results["generators"]
        ]
    if chart_name:
        lines += ["", f"![metrics per generator]({chart_name})"]
    lines += ["", "## Per defect type"]
    for defect in results["defects"]:
        rows = [
            [row["name"]] + [format_value(row["per_defect"][defect].get(key), percent) for key, _, percent in COLUMNS]
            for row in results["generators"]
        ]
        header = ["generator"] + [title for _, title, _ in COLUMNS]
        lines += ["", f"### {defect}", "", "Localization on this type's test images plus all test/good.", ""]
        lines += [markdown_table(header, rows)]
    return "\n".join(lines) + "\n"


def seed_spread(per_seed: list[dict], key: str = "pixel_ap") -> str:
    """``"53.8 ± 2.1"``: the mean and sample standard deviation (percent) of a row's trainings at its seeds."""
    values = 100 * np.array([one[key] for one in per_seed], dtype=float)
    spread = values.std(ddof=1) if len(values) > 1 else math.nan
    return f"{values.mean():.1f} ± {spread:.1f}"


def verdict(ours: list[dict], other: list[dict], key: str = "pixel_ap") -> str:
    """"above", "below" or "level": `ours` against `other`, trained at the same seeds, by the mean of their per-seed
    differences against those differences' standard deviation (one seed's localizer can move pixel AP by tens of
    points, so a gap smaller than that spread is no gap). One seed alone is "level": it shows no spread.

    >>> verdict([{"pixel_ap": 0.5}, {"pixel_ap": 0.6}], [{"pixel_ap": 0.3}, {"pixel_ap": 0.35}])
    'above'
    """
    differences = np.array([a[key] - b[key] for a, b in zip(ours, other, strict=True)], dtype=float)
    if len(differences) < 2:
        return "level"
    mean, spread = differences.mean(), differences.std(ddof=1)
    return "level" if abs(mean) <= spread else ("above" if mean > 0 else "below")


def csv_text(results: dict) -> str:
    """The table as CSV: ``generator`` then the `COLUMNS` keys, numbers as in the Markdown table."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["generator"] + [key for key, _, _ in COLUMNS])
    for cells in table_rows(results):
        writer.writerow(["" if cell == NOT_COMPUTED else cell for cell in cells])
    return buffer.getvalue()


def bar_chart_png(results: dict) -> bytes:
    """Grouped bars: the percent metrics on the x axis, one bar per generator (not computed: no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    keys = [(key, title) for key, title, percent in COLUMNS if percent]
    generators = results["generators"]
    width = 0.8 / max(1, len(generators))
    figure = Figure(figsize=(max(6.0, 1.1 * len(keys)), 3.6), dpi=100)
    axes = figure.add_subplot()
    positions = np.arange(len(keys))
    for g, row in enumerate(generators):
        values = [100 * row["metrics"].get(key, math.nan) for key, _ in keys]
        axes.bar(positions + (g - (len(generators) - 1) / 2) * width, values, width, label=row["name"])
    axes.set_xticks(positions, [title for _, title in keys], rotation=20, ha="right")
    axes.set_ylim(0, 100)
    axes.set_ylabel("%")
    axes.set_title(f"{results['category']}: downstream metrics per generator")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])
