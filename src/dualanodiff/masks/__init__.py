"""Masks: of generated defects (from part images, cross-attention or U²-Net: `part`), of the object's
foreground (`foreground`, BCM's M_f and the quality filter's region), and the one optional U²-Net
(`u2net`). Everything is importable from here::

    from dualanodiff.masks import foreground_mask, part_to_mask
"""

from dualanodiff.masks.foreground import foreground_mask
from dualanodiff.masks.part import (
    area_ratio,
    attention_to_mask,
    clean_mask,
    filter_verdict,
    mask_overlay,
    pair_consistency,
    part_onto,
    part_to_mask,
    u2net_part_mask,
)
from dualanodiff.masks.u2net import load_u2net, u2net_saliency

__all__ = [
    "area_ratio", "attention_to_mask", "clean_mask", "filter_verdict", "foreground_mask", "load_u2net", "mask_overlay",
    "pair_consistency", "part_onto", "part_to_mask", "u2net_part_mask", "u2net_saliency",
]
