"""Masks: of generated defects (from part images, cross-attention or U²-Net: `part`), of the object's
foreground (`foreground`, BCM's M_f and the quality filter's region), and the one optional U²-Net
(`u2net`). Everything is importable from here::

    from dualanodiff.masks import foreground_mask, part_to_mask
"""

from dualanodiff.masks import part
from dualanodiff.masks.foreground import foreground_mask
from dualanodiff.masks.part import *  # noqa: F403 (its __all__)
from dualanodiff.masks.u2net import load_u2net, u2net_saliency

__all__ = ["foreground_mask", "load_u2net", "u2net_saliency", *part.__all__]
