"""Training step of the evaluation's localization U-Net in the two memory layouts, measured in one run.

The demo trains four of these networks (200 steps each), the largest share of its run time; the evaluation
trains them channels-last (`evaluation.localization`). Steps alternate between the layouts, so that both
see the same machine load; the figure is the median per layout. Prints JSON and appends one row to
RESULTS.md::

    python benchmarks/localizer.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _common import append_row, environment, limit_threads
from train_step import Variant, interleaved_times

from dualanodiff.devices import resolve_device
from dualanodiff.evaluation.localization import DiscriminativeUNet, focal_loss

LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


def step_times(device: torch.device, batch: int, size: int, width: int, steps: int) -> dict[str, float]:
    """Median seconds per optimizer step of each layout, the layouts' steps interleaved
    (`train_step.interleaved_times`) after two warm-up steps each."""
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size, device=device)
    target = torch.rand(batch, size, size, device=device) > 0.95

    def variant(layout: torch.memory_format) -> Variant:
        model = DiscriminativeUNet(base_width=width).to(device, memory_format=layout)
        optimizer, x = torch.optim.Adam(model.parameters(), 1e-3), images.contiguous(memory_format=layout)

        def step() -> torch.Tensor:
            loss = focal_loss(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.detach()

        return Variant(step=step, module=model)

    times = interleaved_times({name: variant(layout) for name, layout in LAYOUTS.items()}, steps, device, warmup=2)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="the evaluation's default")
    parser.add_argument("--size", type=int, default=128, help="the evaluation's default resolution")
    parser.add_argument("--base-width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    device = resolve_device(args.device)
    limit_threads(device, args.threads)
    times = step_times(device, args.batch_size, args.size, args.base_width, args.steps)
    env = environment(device)
    ratio = times["contiguous"] / times["channels-last"]
    print(json.dumps({**env, **{f"{name} s/step": t for name, t in times.items()}, "ratio": ratio}))
    if not args.no_record:
        append_row("Localizer", [env["date"], env["device"], env["torch"], f"b{args.batch_size} {args.size} px w{args.base_width}",
                                 f"{times['contiguous']:.3f}", f"{times['channels-last']:.3f}", f"{ratio:.2f}"])


if __name__ == "__main__":
    main()
