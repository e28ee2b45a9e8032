"""Exports of generated pairs into the layouts anomalib reads (checked against anomalib's source at
commit b7233686, version 2.6.1.dev0: ``make_mvtec_ad_dataset`` and ``make_folder_dataset``)::

    mvtec:   OUT/<category>/test/<defect>/000.png            folder:  OUT/<category>/<defect>/images/000.png
             OUT/<category>/ground_truth/<defect>/000_mask.png         OUT/<category>/<defect>/masks/000.png
             OUT/<category>/train/good/<stem>.png  (--normal-from)    OUT/<category>/good/<stem>.png  (--normal-from)
             OUT/<category>/test/good/<stem>.png   (--normal-from, where the dataset has test/good)
             OUT/<category>/export.jsonl: per pair, its exported files and the source pair they came from

    summary = export_pairs(Path("gen"), Path("gen-mvtec"), "mvtec", normal_from=Path("mvtec"))

Only a folder's kept pairs are exported (its manifest rows; `pairs.read_pairs`), never an orphan PNG.
anomalib pairs masks with images by sorted path, so every file name of an export has the same number
of digits (three, more past 999 pairs): ``1000.png`` would sort before ``101.png`` but ``1000_mask.png``
after ``100_mask.png``. anomalib's MVTec AD loader reads ``.png``/``.PNG`` only, so every file is a PNG;
masks are 0/255. Normal images are hard links to the dataset's files where they can be (same file
system, PNG, no resize), else converted copies.

Each category is built in a temporary folder beside OUT and then renamed into place, so a killed export
leaves each category whole or absent (and its hidden ``.OUT.<category>.*.tmp`` folder, safe to delete). A non-empty OUT is refused unless ``force``, which replaces the
categories the export writes and leaves anything else in OUT alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dualanodiff.data import Category, load_image, load_mask, open_category
from dualanodiff.errors import UserError
from dualanodiff.images import resize_image, resize_mask
from dualanodiff.io import DIR_MODE, atomic_write_text, save_png
from dualanodiff.pairs import discover_generated, kept_rows, pair_size, read_pairs
from dualanodiff.runs import RunFolder

LAYOUTS = ("mvtec", "folder")
PROVENANCE = "export.jsonl"
MIN_DIGITS = 3  # MVTec AD's own names: 000.png
Sources = dict[str, dict[str, tuple[Path, list[tuple[Path, Path]]]]]  # category -> defect -> (folder, pairs)


@dataclass
class ExportSummary:
    out: Path
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)  # (category, defect) -> pairs exported
    normals: dict[str, int] = field(default_factory=dict)  # category -> normal images exported


def export_pairs(
    generated: Path,
    out: Path,
    layout: str,
    size: int | str = "model",
    normal_from: Path | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Export every ``generated/<category>/<defect>/`` folder into ``out`` in ``layout`` (see the module
    docstring); ``size`` as `pairs.pair_size` ("model": as written); ``normal_from`` is the dataset (its
    root or the category folder) whose normal images join the export."""
    generated, out = Path(generated), Path(out)
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout}: unknown; choose {' or '.join(LAYOUTS)}")
    sources = _pairs_by_category(generated)
    _check_out(out, generated, list(sources), force)
    normals = {category: _normal_category(normal_from, category) for category in sources} if normal_from else {}
    sizes = {category: _export_size(size, normals.get(category), defects) for category, defects in sources.items()}
    counts = [len(pairs) for defects in sources.values() for _, pairs in defects.values()]
    digits, total, done = max(MIN_DIGITS, len(str(max(counts) - 1))), sum(counts), 0
    summary = ExportSummary(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for category, defects in sources.items():
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{category}.", suffix=".tmp"))
        os.chmod(staging, DIR_MODE)
        try:
            rows = []
            for defect, (_, pairs) in defects.items():
                for number, (image, mask) in enumerate(pairs):
                    rows.append(_export_pair(staging, layout, defect, f"{number:0{digits}d}", image, mask, sizes[category]))
                    done += 1
                    if progress is not None:
                        progress(done, total)
                summary.pairs[(category, defect)] = len(pairs)
            atomic_write_text(staging / PROVENANCE, "".join(json.dumps(row) + "\n" for row in rows))
            if category in normals:
                summary.normals[category] = _export_normals(staging, layout, normals[category], sizes[category])
            _replace(staging, out / category)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return summary


def _pairs_by_category(generated: Path) -> Sources:
    """Each defect folder with its kept (image, mask) paths; folders without kept pairs are left out."""
    found: Sources = {}
    for (category, defect), folder in discover_generated(generated).items():
        if defect == "good":
            raise UserError(f"{folder}: a defect type named good would mix with the normal images; rename the folder")
        pairs = read_pairs(folder)
        if pairs:
            found.setdefault(category, {})[defect] = (folder, pairs)
    if not found:
        raise UserError(
            f"{generated}: no kept pairs in any <category>/<defect>/ folder with image/ and mask/; "
            "pass the --out folder of `dualanodiff generate` or `dualanodiff baseline`"
        )
    return found


def _check_out(out: Path, generated: Path, categories: list[str], force: bool) -> None:
    """Refuse an OUT that is a file, that is not empty (without ``force``), or whose replaced categories
    would delete the pairs being exported or other generated pairs."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; pick a folder")
    source, target = generated.resolve(), out.resolve()
    replaced = [target / category for category in categories if source.is_relative_to(target / category)]
    if target.is_relative_to(source) or replaced:
        raise UserError(
            f"--out {out}: the export would overwrite the pairs it reads ({(replaced or [source])[0]}); "
            f"pick an --out outside {generated}"
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: folder is not empty; pick another --out or pass --force to replace its categories")
    held = sorted({category for category, _ in discover_generated(out)} & set(categories)) if out.is_dir() else []
    if held:
        raise UserError(
            f"--out {out}: {out / held[0]} holds generated pairs (the native layout) that the export would replace; "
            "pick another --out"
        )


def _normal_category(data: Path, category: str) -> Category:
    """The MVTec-layout ``category`` of ``data``, which is a dataset root holding it or the category itself."""
    data = Path(data)
    folder = data / category if (data / category).is_dir() else data if data.name == category else None
    if folder is None:
        raise UserError(
            f"--normal-from {data}: has no {category}/ folder; pass the dataset root holding {category}/ "
            f"or the {category} category folder itself"
        )
    found = open_category(folder)
    if not found.train_good:
        raise UserError(f"--normal-from {folder}: no train/good/ images to export; pass an MVTec-layout category")
    return found


def _export_size(size: int | str, normal: Category | None, defects: dict) -> tuple[int, int] | None:
    """`pair_size` of a category; "source" reads the --normal-from dataset, else the dataset of the
    training run the pairs' manifest names (baseline pairs name none)."""
    if size != "source" or normal is not None:
        return pair_size(size, normal.root if normal else "")
    folders = [folder for folder, _ in defects.values()]
    runs = [Path(row["run"]) for folder in folders for row in kept_rows(folder) if row.get("run")]
    if not runs or not RunFolder(runs[0]).is_run():
        raise UserError(
            f"--size source: {folders[0]} names no training run whose dataset gives the size (baseline pairs are "
            "already at the dataset's size); pass --normal-from DATA or --size N"
        )
    return pair_size("source", RunFolder(runs[0]).load_config().data.data)


def _export_pair(
    staging: Path, layout: str, defect: str, stem: str, image_path: Path, mask_path: Path, size: tuple[int, int] | None
) -> dict:
    """Write one pair under ``staging`` (the category's folder-to-be); its provenance row."""
    image = load_image(image_path)
    mask = load_mask(mask_path, shape=image.shape[:2])
    if size is not None:
        image, mask = resize_image(image, size, Image.Resampling.LANCZOS), resize_mask(mask, size)
    if layout == "mvtec":
        files = (f"test/{defect}/{stem}.png", f"ground_truth/{defect}/{stem}_mask.png")
    else:
        files = (f"{defect}/images/{stem}.png", f"{defect}/masks/{stem}.png")
    save_png(staging / files[0], image)
    save_png(staging / files[1], mask.astype(np.uint8) * 255)
    return {"defect": defect, "image": files[0], "mask": files[1],
            "source_image": str(image_path.resolve()), "source_mask": str(mask_path.resolve())}


def _export_normals(staging: Path, layout: str, category: Category, size: tuple[int, int] | None) -> int:
    """Link or convert the category's normal images: mvtec train/good (and test/good), folder good/."""
    if layout == "mvtec":
        groups = {"train/good": category.train_good, "test/good": category.test_good}
    else:
        groups = {"good": category.train_good}
    count = 0
    for folder, paths in groups.items():
        names = set()
        for path in paths:
            target = staging / folder / f"{path.stem}.png"
            if target.name in names:
                raise UserError(f"{path}: two images in {path.parent} share the name {path.stem}; rename one")
            names.add(target.name)
            _link_or_convert(path, target, size)
            count += 1
    return count


def _link_or_convert(source: Path, target: Path, size: tuple[int, int] | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        as_is = source.suffix.lower() == ".png" and image.format == "PNG" and size in (None, image.size)
    if as_is:
        try:
            os.link(source, target)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, target)
        return
    image = load_image(source)
    save_png(target, image if size is None else resize_image(image, size, Image.Resampling.LANCZOS))


def _replace(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder to ``target``; an earlier ``target`` is renamed aside
    first and deleted after, so ``target`` is never half old, half new."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = staging.with_name(staging.name + ".old")
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(staging, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()
