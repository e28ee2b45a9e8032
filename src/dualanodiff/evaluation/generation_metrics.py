"""Generation metrics of the paper's Table 1: Inception Score (quality) and IC-LPIPS (diversity).

Both need pretrained networks, which are never downloaded here; they come from local files.

**Inception Score** follows torch-fidelity (``isc_features_to_metric``): the logits of the N images
are shuffled with ``np.random.RandomState(2020).permutation(N)``, softmaxed in float64, cut into
``splits`` consecutive parts ``[i*N//splits, (i+1)*N//splits)``; per part ``exp(mean_x KL(p(y|x) ||
p(y)))`` with p(y) the part's mean prediction; the score is the mean and (population) std over parts.

``--inception-weights`` is torch-fidelity's own weight file, as it lies in torch hub's cache
(``weights-inception-2015-12-05-6726825d.pth``, the state dict of its ``FeatureExtractorInceptionV3``),
which loads into `FidelityInceptionV3`; its IS feature ``logits_unbiased`` is what the score takes. Each
image is resized to 299x299 from its own size with TensorFlow 1's bilinear rule, as torch-fidelity
resizes (`resize_bilinear_tf1`). A TorchScript file taking that float batch (N, 3, 299, 299) of RGB
values in [0, 255] and returning logits (N, classes) is accepted too (``torch.jit.load``), e.g. an
export of another Inception.

**IC-LPIPS** (Ojha et al. 2021, as AnomalyDiffusion uses it): every generated image joins the cluster
of its nearest few-shot training image by LPIPS; the mean LPIPS over all pairs inside a cluster,
averaged over the clusters with at least two members. LPIPS (v0.1, AlexNet, as the ``lpips``
package computes it) is written out in `LPIPS`: inputs in [-1, 1] are shifted and scaled by lpips'
constants, AlexNet's five ReLU outputs are normalised to unit length over channels, the squared
differences are weighted per channel by the 1x1 ``lin`` heads, averaged over space and summed over the
layers. ``--lpips-weights`` takes the two standard files as they lie in the caches (the option twice)::

    --lpips-weights ~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth \\
    --lpips-weights .../site-packages/lpips/weights/v0.1/alex.pth

that is torchvision's AlexNet state dict (``features.{0,3,6,8,10}.{weight,bias}`` are used,
``classifier.*`` ignored) and the lpips package's linear heads (``lin{0..4}.model.1.weight``, shapes
(1, C, 1, 1), C = 64, 192, 384, 256, 256). One file holding both works too, as does
``lpips.LPIPS(net="alex").state_dict()`` saved as is (``net.slice{k}.{i}.*``, ``lins.*`` and
``scaling_layer.*`` keys; the scaling constants are lpips' and fixed here).
"""

from __future__ import annotations

import math
import re
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from dualanodiff.errors import UserError
from dualanodiff.evaluation.inception import FidelityInceptionV3
from dualanodiff.evaluation.inputs import check_state_dict, load_state_dict

INCEPTION_SIZE = 299
IS_SHUFFLE_SEED = 2020  # torch-fidelity's rng_seed
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
_ALEXNET_TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs whose outputs LPIPS compares


def inception_score(
    predictions: torch.Tensor | np.ndarray,
    splits: int = 10,
    kind: Literal["logits", "probabilities"] = "logits",
    shuffle: bool = True,
) -> tuple[float, float]:
    """(mean, std) Inception Score of class predictions (N, classes), torch-fidelity's formula.

    Uniform predictions give 1; one-hot predictions spread evenly over k classes within every split
    give k. ``kind="probabilities"`` takes rows that sum to 1 (zeros allowed: 0 log 0 = 0).
    """
    values = torch.as_tensor(np.asarray(predictions), dtype=torch.float64)
    n = len(values)
    if values.ndim != 2 or n < splits or splits < 1:
        raise ValueError(f"need (N, classes) predictions with N >= splits >= 1, got {tuple(values.shape)}, {splits}")
    if shuffle:
        values = values[np.random.RandomState(IS_SHUFFLE_SEED).permutation(n)]
    if kind == "logits":
        p, log_p = values.softmax(dim=1), values.log_softmax(dim=1)
    else:
        p, log_p = values, values.clamp_min(torch.finfo(torch.float64).tiny).log()
    scores = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        q = p[part].mean(dim=0, keepdim=True)
        kl = torch.where(p[part] > 0, p[part] * (log_p[part] - q.log()), 0.0).sum(dim=1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


INCEPTION_FILE = "torch-fidelity's weights-inception-2015-12-05-6726825d.pth or a TorchScript Inception-v3"


def load_inception(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network of ``--inception-weights``: `FidelityInceptionV3` with torch-fidelity's state dict,
    or a TorchScript file (see the module docstring for both)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--inception-weights {path}: file not found; pass {INCEPTION_FILE}")
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript loading
                return torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise UserError(
                f"--inception-weights {path}: damaged TorchScript file ({str(exc).splitlines()[0][:80]}); "
                f"pass {INCEPTION_FILE}"
            ) from None
    model = FidelityInceptionV3()
    state = load_state_dict(path, "--inception-weights")
    check_state_dict(state, model, path, "--inception-weights", INCEPTION_FILE)
    model.load_state_dict(state)
    return model.eval()


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds its code (``*/code/``); a ``torch.save`` archive does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float (N, C, H, W) -> (N, C, size, size) by TensorFlow 1's bilinear rule (no half-pixel
    offset: output pixel i samples input position i * H / size), the resize of torch-fidelity's
    Inception: for H = 2 to size 4, ``[a, b]`` -> ``[a, (a + b) / 2, b, b]``."""

    def taps(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        position = torch.arange(size, dtype=torch.float32) * torch.tensor(length / size, dtype=torch.float32)
        low = position.long()
        return low, (low + 1).clamp_max(length - 1), (position - low).to(images.dtype)

    (y0, y1, dy), (x0, x1, dx) = taps(images.shape[2]), taps(images.shape[3])
    rows = images[:, :, y0] + (images[:, :, y1] - images[:, :, y0]) * dy[:, None]
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * dx


@torch.no_grad()
def inception_logits(network: Callable, images: list[torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """(N, classes) logits of uint8 images (3, H, W) of any sizes, each resized to 299x299 by
    `resize_bilinear_tf1` and given to ``network`` as float in [0, 255]."""
    outputs = []
    for start in range(0, len(images), max(1, batch_size)):
        chunk = images[start : start + max(1, batch_size)]
        batch = torch.cat([resize_bilinear_tf1(image[None].float(), INCEPTION_SIZE) for image in chunk])
        logits = network(batch)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != len(chunk):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise UserError(f"--inception-weights: the network returned {shape}; it must return (N, classes) logits")
        outputs.append(logits.double())
    return torch.cat(outputs)


class _LinearHead(nn.Module):
    """lpips' ``NetLinLayer``: dropout then a 1x1 conv to one channel, no bias (key ``model.1.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
        nn.init.uniform_(self.model[1].weight, 0.0, 1.0 / channels)  # lpips' trained heads are non-negative

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 with AlexNet features; images (N, 3, H, W) in [-1, 1]. Random weights until loaded
    (`load_lpips`). ``model(x, y)`` -> (N,) distances of paired images; ``model.pairwise(a, b)`` -> (N, M)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )  # torchvision's alexnet().features without its last max-pool, which LPIPS never reaches
        for k, channels in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", _LinearHead(channels))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None], persistent=False)
        self.eval()

    def normalised_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five AlexNet ReLU outputs of (N, 3, H, W) images, each of unit length over channels."""
        x = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _ALEXNET_TAPS:
                taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def heads(self) -> list[torch.Tensor]:
        """The five lin weights as (C,) vectors."""
        return [getattr(self, f"lin{k}").model[1].weight.flatten() for k in range(len(LPIPS_CHANNELS))]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        distances = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for k, (fx, fy) in enumerate(zip(self.normalised_features(x), self.normalised_features(y))):
            distances += getattr(self, f"lin{k}")((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return distances

    @torch.no_grad()
    def pairwise(self, a: torch.Tensor, b: torch.Tensor | None = None, batch_size: int = 16) -> torch.Tensor:
        """(N, M) float64 LPIPS between all of ``a`` and all of ``b`` (``b=None``: ``a`` with itself).

        Uses ``sum_c w_c (f_c - g_c)^2 = sum_c w_c f_c^2 + sum_c w_c g_c^2 - 2 sum_c w_c f_c g_c``
        so that each image goes through AlexNet once. LPIPS's heads are non-negative, so is every distance; the
        expansion's cancellation can leave -1e-18 for identical images on some CPUs, hence the clamp at 0.
        """
        fa = self._flat_features(a, batch_size)
        fb = fa if b is None else self._flat_features(b, batch_size)
        total = torch.zeros(len(fa[0][0]), len(fb[0][0]), dtype=torch.float64)
        for (xa, area), (xb, _), w in zip(fa, fb, self.heads()):
            w = w.double().repeat_interleave(area)  # features are channel-major: one weight per H*W run
            total += ((xa * xa * w).sum(1)[:, None] + (xb * xb * w).sum(1)[None, :] - 2 * (xa * w) @ xb.T) / area
        return total.clamp_(min=0.0)

    def _flat_features(self, images: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, int]]:
        """Per layer: (N, C*H*W) float64 features (channel-major) and the layer's H*W."""
        chunks = [self.normalised_features(chunk) for chunk in images.split(max(1, batch_size))]
        layers = []
        for k in range(len(LPIPS_CHANNELS)):
            stacked = torch.cat([chunk[k] for chunk in chunks])
            layers.append((stacked.flatten(1).double(), stacked.shape[2] * stacked.shape[3]))
        return layers


LPIPS_FILES = (
    "torchvision's AlexNet state dict (alexnet-*.pth) plus the lpips package's linear heads "
    "(lpips/weights/v0.1/alex.pth): give --lpips-weights once for each"
)


def load_lpips(paths: Path | Sequence[Path]) -> LPIPS:
    """`LPIPS` with the weights of ``--lpips-weights``: the union of the state dicts of ``paths``
    (key layouts in the module docstring)."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    model = LPIPS()
    state = {}
    for path in paths:
        for key, value in load_state_dict(path, "--lpips-weights").items():
            key = re.sub(r"^net\.slice\d\.", "features.", key)  # lpips.LPIPS().state_dict() layout
            if not key.startswith(("classifier.", "scaling_layer.", "lins.")):  # lins.k: lin{k} again
                state[key] = value
    check_state_dict(state, model, " + ".join(map(str, paths)), "--lpips-weights", LPIPS_FILES)
    model.load_state_dict(state)
    return model.eval()


def ic_lpips(
    generated: torch.Tensor, train_images: torch.Tensor, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> float:
    """Intra-cluster pairwise LPIPS: cluster ``generated`` by the nearest of ``train_images`` under
    ``distance(a, b) -> (len(a), len(b))`` (ties: the first), average ``distance`` over the pairs
    i < j inside each cluster of two or more, then over those clusters; ``nan`` if there is none.

    Example with 1-D "images" and ``distance = |a - b|``: generated (0, 1, 10, 11, 13, 50), training
    (0, 10, 60): clusters {0, 1} -> 1, {10, 11, 13} -> (1 + 3 + 2) / 3 = 2, {50} skipped; IC-LPIPS 1.5.
    """
    nearest = distance(generated, train_images).argmin(dim=1)
    means = []
    for k in range(len(train_images)):
        members = generated[nearest == k]
        if len(members) < 2:
            continue
        i, j = torch.triu_indices(len(members), len(members), offset=1)
        means.append(float(distance(members, members)[i, j].double().mean()))
    return float(np.mean(means)) if means else math.nan
