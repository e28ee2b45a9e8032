"""The evaluation's localizer trainings side by side on worker processes at one thread each (what `evaluate` and
the demo do on a CPU, `evaluation.parallel`) against the same trainings one after the other on all threads,
measured in one run.

The two ways alternate `--rounds` times, so that both see the same machine load; the figure is the median
wall time per way. Prints JSON and appends one row to RESULTS.md::

    python benchmarks/evaluation_workers.py --trainings 4 --size 96
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import append_row, environment

from dualanodiff.config import EvaluateConfig
from dualanodiff.evaluation.localization import train_localization_model
from dualanodiff.evaluation.parallel import run_trainings, torch_threads, usable_cores
from dualanodiff.progress import no_bars


def train_one(job: tuple[int, int, int], bars) -> dict:
    """One localizer on seeded random images (30 pairs, 12 normals: the demo's counts) for `steps` steps."""
    seed, size, steps = job
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (30, 3, size, size), dtype=torch.uint8, generator=generator)
    masks = torch.rand(30, size, size, generator=generator) > 0.95
    normals = torch.randint(0, 255, (12, 3, size, size), dtype=torch.uint8, generator=generator)
    train_localization_model(images, masks, normals, EvaluateConfig(steps=steps, resolution=size, seed=seed), device="cpu")
    return {}


def one_after_the_other(jobs: list, threads: int) -> float:
    start = time.perf_counter()
    with torch_threads(threads):
        for job in jobs:
            train_one(job, no_bars)
    return time.perf_counter() - start


def side_by_side(jobs: list, workers: int) -> float:
    start = time.perf_counter()
    run_trainings(train_one, jobs, workers, "cpu", no_bars)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainings", type=int, default=4, help="the demo's four rows")
    parser.add_argument("--size", type=int, default=96, help="the demo's localizer side on nut")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    cores = usable_cores()
    jobs = [(seed, args.size, args.steps) for seed in range(args.trainings)]
    times: dict[str, list[float]] = {"one after the other": [], "side by side": []}
    for _ in range(args.rounds):
        times["one after the other"].append(one_after_the_other(jobs, cores))
        times["side by side"].append(side_by_side(jobs, cores))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["one after the other"] / medians["side by side"]
    env = environment(torch.device("cpu"))
    print(json.dumps({**env, "cores": cores, **{f"{name} s": t for name, t in medians.items()}, "ratio": ratio}))
    if not args.no_record:
        append_row("Evaluation workers", [env["date"], env["device"], env["torch"],
                                          f"{args.trainings} x {args.steps} steps, {args.size} px, {cores} cores",
                                          f"{medians['one after the other']:.1f}", f"{medians['side by side']:.1f}",
                                          f"{ratio:.2f}"])


if __name__ == "__main__":
    main()
