"""Defects drawn into real normal images (`generate --canvas on-normals`): which start strength teaches a localizer.

Takes a finished demo folder (its trained run, its data and its baseline pairs), generates the run's
pairs on normal images at each strength, and trains the demo's localizer on every set at several
evaluation seeds (the localizer at 200 steps is noisy: one seed decides nothing). Writes a Markdown table
of pixel AP / AUROC per set and seed, their mean, kept/attempts, alignment and, for the on-normals sets, how
far the drawn defects are from the pasted real defects they started from (PSNR inside each pair's region);
finished folders and evaluations are reused::

    python experiments/on_normals.py --demo demo_out --out runs/on-normals --strengths 1,0.85,0.7,0.5 \
        --seeds 0,1,2 --table experiments/ON_NORMALS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from dualanodiff.config import Config
from dualanodiff.data import load_image
from dualanodiff.demo import OURS, pair_figures
from dualanodiff.evaluation import evaluate_generators
from dualanodiff.evaluation.metrics import psnr
from dualanodiff.evaluation.report import markdown_table
from dualanodiff.generation import NormalCanvas, foreground_kind, generate
from dualanodiff.pairs import kept_rows


def pair_sets(demo: Path, out: Path, strengths: list[float]) -> dict[str, Path]:
    """The on-normals folders, generated here when missing, beside the demo's own sets."""
    cfg = Config.of_run(demo / "runs" / OURS / "config.yaml")
    sets = {}
    for strength in strengths:
        name = f"on-normals-{strength:g}"
        settings = Config.from_dict(cfg.to_dict()).generate
        settings.canvas, settings.strength = "on-normals", strength
        generate(demo / "runs" / OURS, out / name, settings)
        sets[name] = out / name
    return sets | {name: demo / "generated" / name for name in (OURS, "crop-paste", "perlin")}


def evaluation(demo: Path, out: Path, sets: dict[str, Path], seed: int) -> dict[str, dict]:
    """Every set's localization metrics at one evaluation seed (cached in OUT/evaluation-SEED.json)."""
    path = out / f"evaluation-{seed}.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    missing = {name: folder for name, folder in sets.items() if name not in cached}
    if missing:
        cfg = Config.of_run(demo / "runs" / OURS / "config.yaml")
        cfg.evaluate.seed = seed
        results = evaluate_generators(cfg.data.data, missing, cfg.evaluate, defects=[cfg.data.defect],
                                      classification=False, device=cfg.train.device)
        cached |= {row["name"]: row["metrics"] for row in results["generators"]}
        path.write_text(json.dumps(cached, indent=1) + "\n")
    return cached


def distance_from_pasted(cfg: Config, folder: Path) -> float:
    """Mean PSNR, inside each kept pair's region, between the pair's image and the pasted real defect its
    sampling started from (recomputed from the row's seed): high means the model changed little."""
    canvas = NormalCanvas(cfg, foreground_kind(cfg), None)
    values = []
    for row in kept_rows(folder):
        inputs, _ = canvas.inputs([row["seed"]], strength=0.5)  # any strength below 1 returns the init image
        region = inputs["mask"][0]
        values.append(psnr(load_image(folder / row["image"])[None], inputs["init_image"][0][None], region[None])[0])
    return float(np.mean(values))


def table(demo: Path, sets: dict[str, Path], by_seed: dict[int, dict[str, dict]]) -> str:
    cfg = Config.of_run(demo / "runs" / OURS / "config.yaml")
    data = cfg.data
    seeds = sorted(by_seed)
    rows = []
    for name, folder in sets.items():
        pairs = folder / Path(data.data).name / data.defect
        figures = pair_figures(pairs)
        started = f"{distance_from_pasted(cfg, pairs):.1f}" if name.startswith("on-normals") else "–"
        aps = [100 * by_seed[s][name]["pixel_ap"] for s in seeds]
        aurocs = [100 * by_seed[s][name]["pixel_auroc"] for s in seeds]
        rows.append([name, f"{figures['kept']} / {figures['kept'] + figures['dropped']}", f"{figures['alignment_mean']:.2f}", started,
                     " / ".join(f"{a:.1f}" for a in aps), f"{statistics.fmean(aps):.1f}", f"{statistics.fmean(aurocs):.1f}"])
    headers = ["pairs", "kept / attempts", "alignment", "PSNR to pasted (dB)", f"pixel AP at seeds {', '.join(map(str, seeds))}", "mean AP", "mean AUROC"]
    return markdown_table(headers, rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `dualanodiff demo` folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strengths", default="1,0.85,0.7,0.5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--table", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sets = pair_sets(args.demo, args.out, [float(s) for s in args.strengths.split(",")])
    by_seed = {seed: evaluation(args.demo, args.out, sets, seed) for seed in map(int, args.seeds.split(","))}
    text = table(args.demo, sets, by_seed)
    print(text)
    if args.table:
        args.table.write_text(text)


if __name__ == "__main__":
    main()
