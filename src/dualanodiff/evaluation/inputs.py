"""What the evaluation reads: generated pairs of a category (and their alignment scores), images at
the evaluation resolution, and local weight files (state dicts) for the networks it scores with.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dualanodiff.alignment import alignment_score
from dualanodiff.data import load_image, load_mask
from dualanodiff.errors import UserError
from dualanodiff.images import as_batch
from dualanodiff.masks import foreground_mask
from dualanodiff.pairs import discover_generated, kept_rows, read_pairs

PairPaths = list[tuple[Path, Path]]  # (image, mask) files


def parse_generated(spec: str) -> tuple[str, Path]:
    """``--generated`` value ``DIR`` or ``NAME=DIR`` -> (row label, output root); DIR labels by its folder name."""
    name, sep, folder = spec.partition("=")
    if not sep:
        path = Path(spec)
        return path.resolve().name or spec, path
    if not name or not folder:
        raise UserError(f"--generated {spec}: expected DIR or NAME=DIR; give both a name and a folder")
    return name, Path(folder)


def combined_rows(specs: list[str], roots: dict[str, Path]) -> dict[str, list[Path]]:
    """``--combine A+B`` values -> rows trained on the union of the named rows' pairs::

        combined_rows(["crop-paste+ours"], {"crop-paste": cp, "ours": gen}) == {"crop-paste+ours": [cp, gen]}
    """
    rows = {}
    for spec in specs:
        names = spec.split("+")
        unknown = [name for name in names if name not in roots]
        if len(names) < 2 or unknown:
            raise UserError(
                f"--combine {spec}: expected two or more --generated row names joined by + "
                f"(rows: {', '.join(roots)})"
            )
        if spec in roots or spec in rows:
            raise UserError(f"--combine {spec}: a row of that name exists already; give each row once")
        rows[spec] = [roots[name] for name in names]
    return rows


def generated_pairs(root: Path, category: str, defects: list[str] | None = None) -> dict[str, PairPaths]:
    """Defect type -> (image, mask) paths of the kept pairs under ``root/<category>/<defect>``.

    ``defects`` given: every one must have pairs (a `UserError` names the missing folder). Otherwise
    all defect types found. No pair at all for ``category`` is a `UserError` naming ``root``.
    """
    found = {defect: folder for (cat, defect), folder in discover_generated(root).items() if cat == category}
    wanted = defects if defects is not None else list(found)
    pairs = {}
    for defect in wanted:
        folder = found.get(defect)
        listed = read_pairs(folder) if folder is not None else []
        if not listed and defects is not None:
            raise UserError(
                f"{Path(root) / category / defect}: no generated pairs for defect type '{defect}'; "
                f"generate them or leave '{defect}' out of --defect"
            )
        if listed:
            pairs[defect] = listed
    if not pairs:
        raise UserError(
            f"{root}: no generated pairs for category '{category}' (expected {root}/{category}/<defect>/image "
            "and mask/); pass the --out folder of `dualanodiff generate` or `dualanodiff baseline`"
        )
    return pairs


def pair_alignments(pairs: PairPaths, kind: str) -> list[float]:
    """The `alignment_score` of each pair: its manifest row's ``alignment`` where the row has one
    (null: not scorable, nan), else computed from the files with the image's foreground (`kind`:
    "object" or "texture", the category's)."""
    recorded = {}
    for folder in {image.parent.parent for image, _ in pairs}:
        recorded.update({folder / row["image"]: row["alignment"] for row in kept_rows(folder) if "alignment" in row})
    scores = []
    for image_path, mask_path in pairs:
        if image_path in recorded:
            value = recorded[image_path]
            scores.append(math.nan if value is None else float(value))
            continue
        image = load_image(image_path)
        region = foreground_mask(image, kind=kind)
        scores.append(alignment_score(image, load_mask(mask_path, shape=image.shape[:2]), region))
    return scores


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8 RGB, each image resized bilinearly to size x size."""
    if not paths:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return as_batch([np.asarray(Image.fromarray(load_image(p)).resize((size, size), Image.BILINEAR)) for p in paths])


def load_masks(paths: list[Path | None], size: int) -> torch.Tensor:
    """(N, size, size) bool, resized by nearest neighbour; ``None`` stands for an empty mask (a normal image)."""
    masks = torch.zeros((len(paths), size, size), dtype=torch.bool)
    for i, path in enumerate(paths):
        if path is not None:
            resized = Image.fromarray(load_mask(path)).resize((size, size), Image.NEAREST)
            masks[i] = torch.from_numpy(np.array(resized))
    return masks


def load_state_dict(path: Path, option: str) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` file or a ``torch.save``-d ``.pth``/``.pt``/``.bin`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: file not found; pass a local weights file (.pth or .safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader's own error type: damaged file, pickled module, ...
        raise UserError(
            f"{option} {path}: cannot read a state dict ({type(exc).__name__}); save `model.state_dict()` "
            "with torch.save or safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{option} {path}: not a state dict of tensors; save `model.state_dict()` instead")
    return state


def check_state_dict(
    state: dict[str, torch.Tensor], model: torch.nn.Module, path: Path | str, option: str, expected: str
) -> None:
    """`UserError` naming the ``expected`` file unless ``state`` has exactly the keys and shapes of
    ``model.state_dict()``. Batch-norm ``num_batches_tracked`` may be absent: files saved before
    PyTorch 0.4.1 (early torchvision weights) lack it and ``load_state_dict`` fills it in."""
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in wanted]
    wrong = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape for", wrong)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise UserError(f"{option} {path}: {what} key(s) {shown}; expected {expected}")
