"""The GPU rows of RESULTS.md from one run (issue 17), each written as soon as it is measured.

`benchmarks/gpu.sh` runs the three parts below as processes of their own, each capped by `timeout`, so a
slow compile or a full budget costs only what had not been measured yet. At SD-1.5 scale (random weights),
bf16, batch 4 pairs per training step:

- ``train``: the four steps of `train_step.py` (dual, no-BCM, plain LoRA, official-style) with and without
  gradient checkpointing (the default options): peak memory of each and interleaved step times; then the
  full form (autograd through the background, full-width SAIM) against each FLOP cut
  (``bcm_background_grad: false``) without and with checkpointing;
- ``generate``: pairs per second at 512 px, DPM-Solver 25 steps and PNDM 100 steps, batch 8 and 16;
- ``compile``: the dual training step, then one DPM-Solver sampling call, with the UNet under
  `torch.compile` against the same model eager (the first compiled call includes the compilation).

Rows go to OUT/rows.jsonl (``{"section", "cells", "result"}`` per line) and OUT/rows.md (the same rows under
RESULTS.md's headings and table headers); skipped measurements leave a note. ``--dry-run`` runs all of it at
the test size on the CPU (inductor replaced by dynamo's eager backend) in under 2 minutes of CPU time.
Afterwards, in the repository::

    python benchmarks/gpu_bench.py --record OUT/rows.jsonl    # append the measured rows to RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

from _common import append_row, build_base, environment, limit_threads, markdown_row, release_memory, table_header, timed
from generate import cell_row, measure_cell, pipeline
from train_step import CUTS, build_variant, cut_rows, interleaved_times, make_inputs, measure_cuts, measure_steps
from train_step import median_or_nan, median_ratio, steps_row

from dualanodiff.devices import resolve_device
from dualanodiff.io import atomic_write_text


@dataclasses.dataclass(frozen=True)
class Settings:
    config: str
    device: str
    dtype: str
    batch_size: int  # pairs per training step
    repeats: int  # timed rounds of interleaved training steps
    warmup: int
    cells: tuple[tuple[str, int, int, int], ...]  # generation: scheduler, steps, batch, timed calls
    compile_cell: tuple[str, int, int]  # scheduler, steps, batch of the compiled sampling call
    backend: str  # torch.compile backend


GPU = Settings("sd15", "cuda", "bf16", 4, 10, 2,
               (("dpm", 25, 8, 2), ("dpm", 25, 16, 2), ("pndm", 100, 8, 1), ("pndm", 100, 16, 1)),
               ("dpm", 25, 16), "inductor")
DRY_RUN = Settings("test", "cpu", "bf16", 1, 1, 1,
                   (("dpm", 2, 1, 1), ("dpm", 2, 2, 1), ("pndm", 3, 1, 1), ("pndm", 3, 2, 1)),
                   ("dpm", 2, 2), "eager")
PARTS = ("train", "generate", "compile")


class Rows:
    """Measured rows, appended to OUT/rows.jsonl and re-rendered into OUT/rows.md after each one."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.markdown = out / "rows.jsonl", out / "rows.md"

    def add(self, section: str, cells: list[str], result: dict) -> None:
        self._append({"section": section, "cells": cells, "result": result})

    def note(self, text: str) -> None:
        print(text, flush=True)
        self._append({"note": text})

    def _append(self, new: dict) -> None:
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(new, default=str) + "\n")
        entries = read_entries(self.jsonl)
        sections: dict[str, list[str]] = {}
        for entry in entries:
            if "section" in entry:
                sections.setdefault(entry["section"], []).append(markdown_row(entry["cells"]))
        text = "".join(f"## {name}\n\n" + "\n".join(table_header(name) + rows) + "\n\n" for name, rows in sections.items())
        notes = [f"- {entry['note']}" for entry in entries if "note" in entry]
        atomic_write_text(self.markdown, text + ("Notes:\n\n" + "\n".join(notes) + "\n" if notes else ""))


def read_entries(path: Path) -> list[dict]:
    """The entries of a rows.jsonl file; a last line cut off by a kill is left out."""
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


class Clock:
    """The part's time cap: seconds left, and whether a measurement expected to take `seconds` still fits."""

    def __init__(self, deadline: float):
        self.end = time.monotonic() + (deadline - time.time())

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return self.left() > seconds


TRAIN_GROUPS = ("steps", "steps with checkpointing", "cuts", "cuts with checkpointing")


def train_part(settings: Settings, rows: Rows, clock: Clock, groups: tuple[str, ...] = TRAIN_GROUPS) -> None:
    """The four steps, then the FLOP cuts, each without and with gradient checkpointing, while time is left;
    `groups` (of TRAIN_GROUPS) picks some, in that order: the rows still missing."""
    device = resolve_device(settings.device)
    base = build_base(settings.config)
    last = 0.0  # seconds the previous group took: the estimate for the next
    for label in groups:
        kind, checkpointing = label.split()[0], label.endswith("checkpointing")
        if not clock.fits(last):
            rows.note(f"train: {label} skipped, {clock.left():.0f} s left of the cap (the last group took {last:.0f} s)")
            continue
        args = argparse.Namespace(config=settings.config, batch_size=settings.batch_size, dtype=settings.dtype,
                                  gradient_checkpointing=checkpointing, repeats=settings.repeats, warmup=settings.warmup,
                                  cuts=",".join(CUTS), flops=False)
        start = time.monotonic()
        if kind == "steps":
            result = measure_steps(args, device, base, clock.end)
            rows.add("Training step", steps_row(result), result)
        else:
            result = measure_cuts(args, device, base, clock.end, flops=False)
            for row in cut_rows(result):
                rows.add("FLOP cuts", row, result)
        last = time.monotonic() - start
        print(f"train: {label} took {last:.0f} s", flush=True)


def generate_part(settings: Settings, rows: Rows, clock: Clock) -> None:
    """Pairs per second of each sampling cell, skipping a cell its predicted time would not fit (the first
    one always runs: it is what the prediction comes from)."""
    device = resolve_device(settings.device)
    base = build_base(settings.config)
    pipe = pipeline(base, device, settings.dtype)
    env = {**environment(device), "config": settings.config, "resolution": base.resolution}
    per_pair_step = 0.0  # seconds per pair per denoising step, from the cells measured so far
    for scheduler, steps, batch, repeats in settings.cells:
        predicted = per_pair_step * batch * (steps * repeats + 2)
        if not clock.fits(predicted):
            rows.note(f"generate: {scheduler} {steps} steps batch {batch} skipped (about {predicted:.0f} s, "
                      f"{clock.left():.0f} s left)")
            continue
        cell = {"dtype": settings.dtype} | measure_cell(pipe, scheduler, steps, batch, 2.5, repeats, device)
        per_pair_step = max(per_pair_step, cell["seconds_per_call"] / (batch * steps))
        rows.add("Generation", cell_row(env, cell), env | cell)


def compile_part(settings: Settings, rows: Rows, clock: Clock) -> None:
    """The UNet under torch.compile against eager: the dual training step, then one sampling call. A
    failure to compile is noted and the next measurement still runs."""
    device = resolve_device(settings.device)
    base = build_base(settings.config)
    env = environment(device)
    first = 0.0
    try:
        inputs = make_inputs(base, settings.batch_size, device)
        variants = {name: build_variant("dual", base, inputs, device, settings.dtype, False) for name in ("eager", "compiled")}
        variants["compiled"].module.unet.compile(backend=settings.backend)
        first = timed(variants["compiled"].step, device)
        times = interleaved_times(variants, settings.repeats, device, settings.warmup, clock.end)
        _compile_row(rows, env, settings, f"dual step b{settings.batch_size} {settings.dtype}", times, first)
    except Exception as exc:  # noqa: BLE001 - any failure to compile or run compiled is the finding
        rows.note(f"compile: the training step failed: {_first_line(exc)}")
    variants = None
    release_memory(device)

    scheduler, steps, batch = settings.compile_cell
    if not clock.fits(first):  # the sampling graph compiles about as long as the training step's did
        rows.note(f"compile: sampling skipped, {clock.left():.0f} s left (the training step compiled in {first:.0f} s)")
        return
    try:
        pipe = pipeline(base, device, settings.dtype)
        eager = measure_cell(pipe, scheduler, steps, batch, 2.5, 1, device)
        pipe.model.unet.compile(backend=settings.backend)
        first = timed(lambda: pipe(seeds=list(range(batch)), num_inference_steps=2, guidance_scale=2.5, output_type="np"), device)
        compiled = measure_cell(pipe, scheduler, steps, batch, 2.5, 1, device)
        times = {"eager": [eager["seconds_per_call"]], "compiled": [compiled["seconds_per_call"]]}
        _compile_row(rows, env, settings, f"sampling {scheduler} {steps} steps b{batch} {settings.dtype}", times, first)
    except Exception as exc:  # noqa: BLE001 - any failure to compile or run compiled is the finding
        rows.note(f"compile: sampling failed: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _compile_row(rows: Rows, env: dict, settings: Settings, what: str, times: dict, first: float) -> None:
    eager, compiled = (median_or_nan(times[name]) for name in ("eager", "compiled"))
    ratio = median_ratio(times, "eager", "compiled")
    cells = [env["date"], env["device"], env["torch"], settings.config, what, f"{eager:.3f}", f"{compiled:.3f}",
             f"{ratio:.2f}", f"{first:.1f}", str(min(map(len, times.values())))]
    rows.add("torch.compile", cells, env | {"what": what, "seconds": times, "first_call_seconds": first,
                                            "backend": settings.backend})


def record(path: Path) -> int:
    """Append every measured row of a rows.jsonl file to RESULTS.md; returns how many."""
    entries = [entry for entry in read_entries(path) if "section" in entry]
    for entry in entries:
        append_row(entry["section"], entry["cells"])
    return len(entries)


def _cell_name(cell: tuple[str, int, int, int]) -> str:
    scheduler, steps, batch, _ = cell
    return f"{scheduler}:{steps}:{batch}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS)
    parser.add_argument("--out", type=Path, help="folder of rows.jsonl and rows.md")
    parser.add_argument("--deadline", type=float, default=math.inf, help="stop measuring at this Unix time")
    parser.add_argument("--train-groups", default=",".join(TRAIN_GROUPS),
                        help=f"the train part's groups, comma-separated, in order (default: {','.join(TRAIN_GROUPS)})")
    parser.add_argument("--generate-cells", default="",
                        help="the generate part's cells, comma-separated SCHEDULER:STEPS:BATCH, in order (default: "
                             f"{','.join(_cell_name(cell) for cell in GPU.cells)}; with --dry-run its own sizes)")
    parser.add_argument("--dry-run", action="store_true", help="the test size on the CPU, seconds per part")
    parser.add_argument("--record", type=Path, help="append the rows of this rows.jsonl to RESULTS.md and exit")
    args = parser.parse_args(argv)
    if args.record:
        print(f"{record(args.record)} rows appended to RESULTS.md")
        return
    if not (args.part and args.out):
        parser.error("--part and --out are needed (or --record)")
    groups = tuple(group.strip() for group in args.train_groups.split(",") if group.strip())
    if unknown := set(groups) - set(TRAIN_GROUPS):
        parser.error(f"--train-groups: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TRAIN_GROUPS)}")
    settings = DRY_RUN if args.dry_run else GPU
    if args.generate_cells:
        cells = {_cell_name(cell): cell for cell in settings.cells}
        wanted = [name.strip() for name in args.generate_cells.split(",") if name.strip()]
        if unknown := [name for name in wanted if name not in cells]:
            parser.error(f"--generate-cells: unknown {', '.join(unknown)}; choose from {', '.join(cells)}")
        settings = dataclasses.replace(settings, cells=tuple(cells[name] for name in wanted))
    device = resolve_device(settings.device)
    limit_threads(device, 0)
    rows = Rows(args.out)
    part = {"train": functools.partial(train_part, groups=groups), "generate": generate_part,
            "compile": compile_part}[args.part]
    try:
        part(settings, rows, Clock(args.deadline))
    except Exception as exc:  # a part's failure is a finding to report, not the end of the run
        rows.note(f"{args.part}: stopped by {_first_line(exc)}")
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
