"""Two bases side by side on the same held-out images: the before/after of the embedded base in experiments/BASE_MODELS.md.

    python experiments/compare_bases.py OLD_DIR tiny --preset cpu-v1 > base_comparison.json

Held-out denoising MSE by timestep on the pretraining families and on the category pretraining never
saw, and the VAE's PSNR (all, grey, part images, background targets), from `pretrain.measure_base`.
"""

from __future__ import annotations

import argparse
import json

import torch

from dualanodiff.pretrain import PRESETS, measure_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bases", nargs="+", help="base specs: tiny, a diffusers directory, ...")
    parser.add_argument("--preset", default="cpu-v1", choices=sorted(PRESETS), help="whose held-out images to use")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {spec: measure_base(spec, options=PRESETS[args.preset].options, device="cpu") for spec in args.bases}
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
