"""Sampling with each branch's LoRA merged into the weights against the low-rank path, measured in one run.

`DualAnoDiffPipeline` samples inside `DualAnoDiffModel.merged_adapters()`: every adapted layer runs each
branch's rows with W + scale * B A instead of W x + B A x per row. The two ways alternate call by call on
one pipeline (same seeds, so the same work), the figure is the median per way; FLOPs per pair-step are
counted on the meta device for both. The tiny config uses the embedded base's recipe (LoRA on attention,
feed-forward and ResNet convolutions, rank 32); sd15 the paper's settings. Prints JSON and appends one row
to RESULTS.md::

    python benchmarks/merged_sampling.py --threads 2
    python benchmarks/merged_sampling.py --config sd15 --flops
    python benchmarks/merged_sampling.py --config sd15 --device cuda --dtype bf16 --batch-size 8   # a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext

import torch
from _common import CONFIGS, append_row, build_base, environment, limit_threads
from generate import backgrounds, pair_flops
from train_step import Variant, interleaved_times

from dualanodiff.config import GenerateConfig, ModelConfig
from dualanodiff.devices import resolve_device
from dualanodiff.model.base import base_recipe
from dualanodiff.model.dual import DualAnoDiffModel
from dualanodiff.pipeline import DualAnoDiffPipeline

WAYS = ("low-rank", "merged")


def model_config(config: str) -> ModelConfig:
    """The model settings a user of `config` trains with: the embedded base's recipe, else the defaults."""
    return ModelConfig(**base_recipe("tiny").get("model", {})) if config == "tiny" else ModelConfig()


def flops(config: str) -> dict[str, float]:
    """TFLOP per pair of one guided denoising step, each way."""
    cfg = model_config(config)
    return {way: pair_flops(config, cfg, merged=way == "merged")["step"] / 1e12 for way in WAYS}


def call_times(config: str, device: torch.device, dtype: str, batch: int, steps: int, calls: int) -> dict[str, float]:
    """Median seconds per pipeline call (`batch` pairs, `steps` DPM-Solver steps, guidance 2.5) each way,
    the ways' calls interleaved (`train_step.interleaved_times`: order rotated per round) after one warm-up call each. The adapters get random non-zero weights."""
    base = build_base(config)
    model = DualAnoDiffModel(base, model_config(config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    pipe = DualAnoDiffPipeline.from_model(model, backgrounds(base.resolution), str(device), dtype)
    pipe.use_config(GenerateConfig(steps=steps, scheduler="dpm"))
    merge = model.merged_adapters

    def sample(way: str) -> None:
        model.merged_adapters = merge if way == "merged" else nullcontext  # the pipeline enters what it finds
        pipe(seeds=list(range(batch)), output_type="np")

    variants = {way: Variant(step=lambda way=way: sample(way), module=model) for way in WAYS}
    times = interleaved_times(variants, calls, device)
    model.merged_adapters = merge
    return {way: statistics.median(values) for way, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 1)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="the pipeline's (GPU: bf16)")
    parser.add_argument("--batch-size", type=int, default=6, help="the demo's")
    parser.add_argument("--steps", type=int, default=25, help="the tiny recipe's DPM-Solver steps")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per way")
    parser.add_argument("--flops", action="store_true", help="count FLOPs only (no timing; sd15 needs no GPU)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    device = resolve_device(args.device)
    limit_threads(device, args.threads)
    counted = flops(args.config)
    times = {way: float("nan") for way in WAYS} if args.flops else call_times(
        args.config, device, args.dtype, args.batch_size, args.steps, args.calls)
    env = environment(device)
    result = {**env, "config": args.config, "dtype": args.dtype, "batch": args.batch_size, "steps": args.steps,
              **{f"{way} s/call": t for way, t in times.items()}, **{f"{way} TFLOP/pair-step": f for way, f in counted.items()}}
    print(json.dumps(result))
    if not args.no_record:
        setting = "FLOPs only" if args.flops else f"dpm {args.steps} b{args.batch_size} {args.dtype}"
        append_row("Merged adapters at sampling", [
            env["date"], "meta (counted)" if args.flops else env["device"], env["torch"], args.config, setting,
            f"{times['low-rank']:.2f}", f"{times['merged']:.2f}", f"{times['low-rank'] / times['merged']:.2f}",
            f"{counted['low-rank']:.4g}", f"{counted['merged']:.4g}", f"{counted['low-rank'] / counted['merged']:.2f}",
        ])


if __name__ == "__main__":
    main()
