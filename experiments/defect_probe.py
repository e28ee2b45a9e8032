"""How much of a run's `--on-normals` gap to crop-paste is the VAE's, and how much the anomaly branch's redraw?

    python experiments/defect_probe.py RUN OUT [--num 30]
    dualanodiff evaluate --data DATA --defect DEFECT --generated through-vae=OUT/through-vae \
        --generated pasted=OUT/pasted --config RUN/config.yaml --seeds 3 --no-classification

Writes two pair sets from the placements `generate --on-normals` starts from (pair seed k: the k-th pair of
both, and of crop-paste with the same seed), with no sampling:
- ``pasted``: the real few-shot defect pasted and its placed mask (crop-paste's pairs);
- ``through-vae``: that defect's part image encoded and decoded by the run's VAE (its category decoder where
  it has one), the mask thresholded from it inside the grown region and the part laid on, as `--on-normals`
  does: `--on-normals` at strength 0.
The run's `--on-normals` pairs at strength 0.3 add the redraw (`ON_NORMALS.md`, the defect-probe study, 2026-11-28).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dualanodiff.baselines import anomaly_part, place_defect
from dualanodiff.generation import NormalCanvas, drawing_region, foreground_kind
from dualanodiff.images import to_uint8
from dualanodiff.masks import part_onto, part_to_mask
from dualanodiff.pairs import PairWriter
from dualanodiff.pipeline import DualAnoDiffPipeline
from dualanodiff.runs import RunFolder


def probe(run: Path, out: Path, num: int) -> None:
    cfg = RunFolder(run).load_config()
    kind = foreground_kind(cfg)
    canvas = NormalCanvas(cfg, kind, None)
    pipe = DualAnoDiffPipeline.from_run(run, device="cpu")
    floor, min_component = pipe.config.mask_floor, pipe.config.min_component
    category, defect = Path(cfg.data.data).name, cfg.data.defect
    writers = {name: PairWriter(out / name, category, defect) for name in ("pasted", "through-vae")}
    for writer in writers.values():
        writer.clear()
    for seed in range(num):
        target, pasted, placed, _ = place_defect(np.random.default_rng(seed), canvas.defects, canvas.normals, kind)
        part = anomaly_part(pasted, placed)
        with torch.inference_mode():
            decoded = to_uint8(pipe.model.vae.decode(pipe.encode([part]) / pipe.scaling).sample.float())[0]
        mask = part_to_mask(decoded, floor, min_component) & drawing_region(placed, target.foreground)
        record = {"attempt": seed, "seed": seed, "onto": target.stem}
        writers["pasted"].write(pasted, placed, part, record)
        if mask.any():
            writers["through-vae"].write(part_onto(target.image, decoded, mask), mask, decoded, record)
    for writer in writers.values():
        writer.write_contact_sheet()
        writer.close()
        print(f"{writer.dir}: {len(writer.kept())} pairs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=30)
    args = parser.parse_args()
    probe(args.run, args.out, args.num)
