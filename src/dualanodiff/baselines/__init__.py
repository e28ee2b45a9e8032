"""The baseline generators the paper compares against (`crop_paste`, `perlin`), writing the same layout as
`generate`; what they share is in `common`.

* **Crop-paste**: the real few-shot defects (training split only) are cut out with their masks,
  flipped, rotated (any angle for objects, multiples of 90 degrees for textures) and scaled
  (0.75-1.25), and pasted onto a random ``train/good`` image; on object categories only where the
  object is (the position is chosen among those whose overlap with the foreground is largest).
* **Perlin** (DRAEM): a thresholded, rotated Perlin-noise mask, with a procedural colour texture
  blended in as ``img * (1 - m) + (1 - beta) * src * m + beta * img * m``, ``beta ~ U(0, 0.8)``;
  on object categories the mask is restricted to the foreground.

The mask of a pair is exactly the set of pixels the generator wrote, and the part image follows the
generator's anomaly-part convention (the pair's pixels inside the mask, flat mid-grey 127 outside).
Each manifest row holds the pair's ``alignment`` (`alignment_score` on the target's foreground): the
positive control for the generated pairs' score.
Pair ``i`` is made from ``np.random.default_rng(seed + attempt)`` alone, so any pair regenerates
exactly from the seed in its manifest row and a re-run with a larger ``num`` only adds pairs::

    cat = open_category("mvtec/hazelnut")
    out_dir = crop_paste(cat, "crack", num=100, out=Path("baselines/crop-paste"))
    rows = PairWriter(Path("baselines/crop-paste"), "hazelnut", "crack").kept()
    pair = crop_paste_pair(np.random.default_rng(rows[5]["seed"]), training_defects(cat, "crack"),
                           NormalPool(cat), cat.kind)   # == pair 5 on disk
"""

from dualanodiff.baselines.common import (
    PART_GREY,
    BaselinePair,
    Defect,
    Normal,
    NormalPool,
    anomaly_part,
    load_defects,
    training_defects,
)
from dualanodiff.baselines.crop_paste import (
    crop_paste,
    crop_paste_pair,
    place_defect,
    transform_patch,
)
from dualanodiff.baselines.perlin import (
    blend,
    gradient_noise,
    perlin,
    perlin_mask,
    perlin_noise,
    perlin_pair,
    procedural_texture,
)

__all__ = [
    "PART_GREY", "BaselinePair", "Defect", "Normal", "NormalPool", "anomaly_part", "blend", "crop_paste",
    "crop_paste_pair", "gradient_noise", "load_defects", "perlin", "perlin_mask", "perlin_noise", "perlin_pair",
    "place_defect", "procedural_texture", "training_defects", "transform_patch",
]
