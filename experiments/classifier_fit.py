"""Does a ResNet-34 from random initialisation fit a generator's pairs of a category's defect types?

    python experiments/classifier_fit.py DATA/nut PAIRS_ROOT --steps 600 --size 64

PAIRS_ROOT is a `generate` or `baseline` output holding <category>/<type>/image/ for every defect type of the
category. Prints the classifier's accuracy on those pairs and on the real test split (experiments/CLASSIFICATION.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dualanodiff.config import EvaluateConfig
from dualanodiff.data import open_category
from dualanodiff.evaluation.classification import ResNet34, predict_classes, train_classifier
from dualanodiff.evaluation.inputs import load_images
from dualanodiff.evaluation.localization import real_test_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    category = open_category(args.data)
    defects = sorted(category.defects)
    pairs = {d: sorted((args.pairs / category.name / d / "image").glob("*.png")) for d in defects}
    images = torch.cat([load_images(pairs[d], args.size) for d in defects])
    labels = torch.cat([torch.full((len(pairs[d]),), k) for k, d in enumerate(defects)])
    cfg = EvaluateConfig(steps=args.steps, resolution=args.size, seed=args.seed)
    torch.manual_seed(args.seed)
    model = ResNet34(num_classes=len(defects))
    start = time.time()
    train_classifier(model, images, labels, cfg, "cpu")
    fitted = (predict_classes(model, images) == labels).float().mean().item()
    test = real_test_split(category, defects, "floor")
    hits = [predict_classes(model, load_images([image for image, _ in test[d]], args.size)) == k for k, d in enumerate(defects)]
    per_type = " / ".join(f"{100 * h.float().mean().item():.0f}" for h in hits)
    print(f"{args.pairs}: {args.steps} steps at {args.size} px: accuracy on its pairs {100 * fitted:.1f} %, "
          f"on the real test split {100 * torch.cat(hits).float().mean().item():.1f} % ({' / '.join(defects)}: "
          f"{per_type}), {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
