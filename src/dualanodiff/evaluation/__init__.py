"""Evaluation of generated anomaly pairs, as in the paper's tables: localization metrics, the
downstream U-Net localization and ResNet-34 classification protocols, IS and IC-LPIPS, and the
comparison report (`dualanodiff evaluate`).

Modules: `metrics` (the localization metrics), `localization` (U-Net protocol), `classification`
(ResNet-34 protocol), `generation_metrics` (IS, LPIPS, IC-LPIPS), `inception` (torch-fidelity's
Inception-v3 for IS), `compare` (one run over several generators), `report` (Markdown / JSON / CSV /
chart), `inputs` (what they read), `training` (device, batches, the step bar).
"""

from dualanodiff.evaluation.classification import (
    ResNet34,
    evaluate_classification,
    load_resnet_weights,
)
from dualanodiff.evaluation.compare import evaluate_generators
from dualanodiff.evaluation.generation_metrics import (
    LPIPS,
    ic_lpips,
    inception_score,
    load_inception,
    load_lpips,
)
from dualanodiff.evaluation.inputs import (
    combined_rows,
    generated_pairs,
    pair_alignments,
    parse_generated,
)
from dualanodiff.evaluation.localization import (
    DiscriminativeUNet,
    evaluate_localization,
    focal_loss,
)
from dualanodiff.evaluation.metrics import METRIC_KEYS, localization_metrics
from dualanodiff.evaluation.report import write_report

__all__ = [
    "DiscriminativeUNet",
    "LPIPS",
    "METRIC_KEYS",
    "ResNet34",
    "combined_rows",
    "evaluate_classification",
    "evaluate_generators",
    "evaluate_localization",
    "focal_loss",
    "generated_pairs",
    "ic_lpips",
    "inception_score",
    "load_inception",
    "load_lpips",
    "load_resnet_weights",
    "localization_metrics",
    "pair_alignments",
    "parse_generated",
    "write_report",
]
