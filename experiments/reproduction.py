"""Few-shot reproduction over training seeds: issue 13's yardstick of a base, without the demo's filter.

    python experiments/reproduction.py OUT --category nut --defect hole --seeds 0 1 2 [--config cfg.yaml]

For each training seed: the demo's few-shot training (its settings, a --config file's keys on top, e.g.
``model: {base_model: runs/my-base}``), 30 pairs generated with the quality filter off, and the mean PSNR of
each generated image to its nearest few-shot training image, beside real images of the defect type that
were not in the few-shot set (`demo.few_shot_reproduction`). Prints one JSON line per seed and their mean.
Each seed's folder is kept, so a re-run skips what is done.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dualanodiff.demo import DATA_SIDE, OURS, demo_settings, few_shot_reproduction
from dualanodiff.generation import generate
from dualanodiff.runs import RunFolder
from dualanodiff.synthetic import write_dataset
from dualanodiff.training import train


def reproduce(out: Path, category: str, defect: str, seed: int, config: Path | None) -> dict:
    data = out / "data"
    if not (data / category).is_dir():
        write_dataset(data, seed=0, size=DATA_SIDE, categories=[category])  # the demo's data (its seed is 0)
    cfg = demo_settings(category, defect, config)
    cfg.data.data = str(data / category)
    cfg.train.seed = seed
    cfg.generate.filter = False
    folder = out / f"seed-{seed}"
    run = RunFolder(folder / "runs" / OURS)
    if not run.adapters.is_file():
        train(cfg, run.root, resume=run.is_run(), force=False)
    generate(run.root, folder / "generated" / OURS, cfg.generate)
    return {"seed": seed, **few_shot_reproduction(folder, cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--category", default="nut")
    parser.add_argument("--defect", default="hole")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, help="YAML keys over the demo's settings")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [reproduce(args.out, args.category, args.defect, seed, args.config) for seed in args.seeds]
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"mean_generated": statistics.mean(r["generated"] for r in rows), "real": rows[0]["real"]}))


if __name__ == "__main__":
    main()
