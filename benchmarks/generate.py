"""Generation throughput (pairs per second) and peak memory of `DualAnoDiffPipeline`, over a grid of settings.

Each grid cell (scheduler x steps x dtype x batch) samples `batch` pairs per call with classifier-free
guidance (2.5) and BCM backgrounds, including the VAE decode and the pipeline's threshold masks; file
writing is not timed. The model's trainable weights are the untrained initial ones (speed does not depend on them). One
short warm-up call per cell, then `--repeats` timed calls; the figure is the median. Prints JSON and appends
one row per cell to RESULTS.md::

    python benchmarks/generate.py --config tiny
    python benchmarks/generate.py --config sd15 --device cuda --dtype fp16,bf16 --scheduler pndm --steps 100 --batch-size 8,16
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
from contextlib import nullcontext

import numpy as np
import torch
from _common import CONFIGS, PeakMemory, append_row, build_base, environment, limit_threads, timed
from torch.utils.flop_counter import FlopCounterMode

from dualanodiff.config import ModelConfig
from dualanodiff.devices import resolve_device
from dualanodiff.pipeline import DualAnoDiffPipeline, make_scheduler
from dualanodiff.model.dual import DualAnoDiffModel

TARGET_PAIRS = 500  # DESIGN's target: 500 pairs at 512 px in <= 5 minutes on one H100
DEFAULTS = {  # per config: scheduler, steps, dtype, batch size, repeats
    "tiny": ("dpm,pndm", "10", "fp32", "4", 2),
    "sd15": ("pndm", "100", "fp16", "8", 3),  # the official sampling setting
    "test": ("dpm,pndm", "3", "fp32", "2", 1),
}


def listed(text: str, kind=str) -> list:
    return [kind(item) for item in text.split(",") if item]


def backgrounds(resolution: int, count: int = 3) -> list[np.ndarray]:
    """Stand-in few-shot backgrounds: noise with a mid-grey square where the object would be."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, resolution, resolution, 3), dtype=np.uint8)
    quarter = resolution // 4
    images[:, quarter:-quarter, quarter:-quarter] = 128
    return list(images)


@torch.no_grad()
def pair_flops(config: str, model_cfg: ModelConfig | None = None, merged: bool = True) -> dict[str, float]:
    """FLOPs per pair of one guided denoising step (one UNet call over the 6 rows of a pair) and of the VAE
    decode of its two images, counted on the meta device: what the sd15 figures cost, without a GPU.
    `merged`: with each branch's LoRA folded into the weights, as the pipeline samples (else the low-rank path)."""
    base = build_base(config, meta=True)
    model = DualAnoDiffModel(base, model_cfg or ModelConfig()).to("meta").eval()
    size, pairs = base.unet.config.sample_size, 2
    latents = torch.zeros(2 * pairs, 4, size, size, device="meta")  # [uncond; cond] rows of each block
    timesteps = torch.zeros(2 * pairs, dtype=torch.long, device="meta")
    text = model.prompt_embeddings(2 * pairs)
    with model.merged_adapters() if merged else nullcontext(), FlopCounterMode(display=False) as step:
        model.predict_noise(latents, latents, timesteps, text, latents)
    with FlopCounterMode(display=False) as decode:
        model.vae.decode(latents[:pairs])
    return {"step": step.get_total_flops() / pairs, "decode": 2 * decode.get_total_flops() / pairs}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--scheduler", default="", help="comma-separated (tiny: dpm,pndm; sd15: pndm)")
    parser.add_argument("--steps", default="", help="comma-separated (tiny: 10; sd15: 100)")
    parser.add_argument("--dtype", default="", help="comma-separated fp32/bf16/fp16 (tiny: fp32; sd15: fp16)")
    parser.add_argument("--batch-size", default="", help="comma-separated pairs per call (tiny: 4; sd15: 8)")
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per cell (tiny: 2; sd15: 3)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: 1 on a CPU, torch's default on a GPU)")
    parser.add_argument("--flops", action="store_true", help="count FLOPs per pair on the meta device instead of timing")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to RESULTS.md")
    args = parser.parse_args(argv)
    scheduler, steps, dtype, batch, repeats = DEFAULTS[args.config]
    args.scheduler = listed(args.scheduler or scheduler)
    args.steps = listed(args.steps or steps, int)
    args.dtype = listed(args.dtype or dtype)
    args.batch_size = listed(args.batch_size or batch, int)
    args.repeats = args.repeats or repeats
    return args


def measure_flops(args: argparse.Namespace) -> dict:
    flops = pair_flops(args.config)
    return {
        "config": args.config, "tflop_per_pair_step": flops["step"] / 1e12, "tflop_per_pair_decode": flops["decode"] / 1e12,
        "pflop_for_500_pairs": {n: TARGET_PAIRS * (n * flops["step"] + flops["decode"]) / 1e15 for n in args.steps},
    }


def pipeline(base, device: torch.device, dtype: str) -> DualAnoDiffPipeline:
    """A pipeline around a fresh copy of `base` with untrained adapters (speed does not depend on them)."""
    return DualAnoDiffPipeline.from_model(
        DualAnoDiffModel(copy.deepcopy(base), ModelConfig()), backgrounds(base.resolution), str(device), dtype
    )


def measure_cell(
    pipe: DualAnoDiffPipeline, scheduler: str, steps: int, batch: int, guidance: float, repeats: int, device: torch.device
) -> dict:
    """Pairs per second and peak memory of `batch` pairs per call (after a 2-step warm-up call)."""
    pipe.scheduler = make_scheduler(scheduler, pipe.model.base.scheduler.config)
    seeds = list(range(batch))

    def sample(steps: int = steps) -> None:
        pipe(seeds=seeds, num_inference_steps=steps, guidance_scale=guidance, output_type="np")

    sample(steps=2)
    with PeakMemory(device) as memory:
        times = [timed(sample, device)]
    times += [timed(sample, device) for _ in range(repeats - 1)]
    pairs_per_second = batch / statistics.median(times)
    return {
        "scheduler": scheduler, "steps": steps, "batch_size": batch, "repeats": repeats,
        "seconds_per_call": statistics.median(times), "pairs_per_second": pairs_per_second,
        "minutes_for_500_pairs": TARGET_PAIRS / pairs_per_second / 60, "peak_memory_mib": memory.mib,
    }


def measure_cells(args: argparse.Namespace, device: torch.device) -> dict:
    """Pairs per second and peak memory of every (dtype, scheduler, steps, batch) cell."""
    base = build_base(args.config)
    cells = []
    for dtype in args.dtype:  # the pipeline casts its model to the dtype: one model per dtype
        pipe = pipeline(base, device, dtype)
        for scheduler, steps, batch in itertools.product(args.scheduler, args.steps, args.batch_size):
            cells.append({"dtype": dtype} | measure_cell(pipe, scheduler, steps, batch, args.guidance, args.repeats, device))
        del pipe
    return {**environment(device), "config": args.config, "resolution": base.resolution, "guidance": args.guidance,
            "cells": cells}


def cell_row(result: dict, cell: dict) -> list[str]:
    """The "Generation" table's row of one cell of a `measure_cells` result."""
    return [
        result["date"], result["device"], result["torch"], f"{result['config']} {result['resolution']}px",
        cell["scheduler"], str(cell["steps"]), cell["dtype"], str(cell["batch_size"]),
        f"{cell['pairs_per_second']:.3f}", f"{cell['minutes_for_500_pairs']:.1f}",
        f"{cell['peak_memory_mib']:.0f}", str(cell["repeats"]),
    ]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    limit_threads(device, args.threads)
    result = measure_flops(args) if args.flops else measure_cells(args, device)
    print(json.dumps(result, indent=2))
    if not args.no_record and not args.flops:
        for cell in result["cells"]:
            append_row("Generation", cell_row(result, cell))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
