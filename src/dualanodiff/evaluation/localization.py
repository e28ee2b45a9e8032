"""The downstream localization protocol: train a segmentation U-Net on generated pairs, score it on
the real test split.

The network has the shape of DRAEM's discriminative sub-network (the protocol's model since
AnomalyDiffusion): six encoder blocks of two conv-bn-relu layers with channel widths b, 2b, 4b, 8b,
8b, 8b and max-pooling between them, a decoder that upsamples (bilinear, then conv-bn-relu),
concatenates the encoder block of the same scale and applies two conv-bn-relu layers, and a final 3x3
conv to two channels (normal, anomalous) whose softmax gives the anomaly map. DRAEM uses b = 64 on
6-channel input (image + reconstruction); we see the image alone (3 channels) and default to b = 16
so that a CPU can train it.

Training follows DRAEM's discriminative loss, focal loss with gamma = 2 on the softmax, on batches
that are half generated pairs, half ``train/good`` images with empty masks, for a fixed number of
optimizer steps (``evaluate.steps``, the same for every set of pairs whatever its size), after which the
batch-norm statistics are averaged once over the training images (`recalibrate_batch_norm`). The
reference code picks its checkpoint by the test score; we never look at the test split before the last
step ("fixed steps, no test-set selection").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualanodiff.config import EvaluateConfig
from dualanodiff.data import Category, few_shot_split
from dualanodiff.devices import resolve_device
from dualanodiff.errors import UserError
from dualanodiff.evaluation.inputs import load_images, load_masks
from dualanodiff.evaluation.metrics import localization_metrics
from dualanodiff.evaluation.training import (
    LEARNING_RATE,
    cycling_batches,
    recalibrate_batch_norm,
    shuffled_batches,
)
from dualanodiff.progress import Bars, loss_bar, no_bars

DEPTH = 6  # encoder blocks; the input side must be a multiple of 2 ** (DEPTH - 1)
FOCAL_GAMMA = 2.0  # DRAEM's focal loss


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(in_channels, out_channels), *_conv_bn_relu(out_channels, out_channels))


class DiscriminativeUNet(nn.Module):
    """DRAEM's discriminative network shape: (N, in_channels, H, W) -> (N, 2, H, W) logits.

    H and W must be multiples of 32 (five poolings).
    """

    def __init__(self, in_channels: int = 3, base_width: int = 16, out_channels: int = 2):
        super().__init__()
        b = base_width
        widths = [b, 2 * b, 4 * b, 8 * b, 8 * b, 8 * b]
        self.encoder = nn.ModuleList(_double_conv(i, o) for i, o in zip([in_channels] + widths[:-1], widths))
        self.pool = nn.MaxPool2d(2)
        # (deeper input, skip from the encoder, output) widths per decoder step, deepest first
        steps = [(8 * b, 8 * b, 8 * b), (8 * b, 8 * b, 4 * b), (4 * b, 4 * b, 2 * b), (2 * b, 2 * b, b), (b, b, b)]
        self.up = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *_conv_bn_relu(deep, out))
            for deep, _, out in steps
        )
        self.merge = nn.ModuleList(_double_conv(out + skip, out) for _, skip, out in steps)
        self.head = nn.Conv2d(b, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(self.pool(x) if i else x)
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Mean over pixels of ``-(1 - p_t) ** gamma * log p_t``, p_t the softmax probability of the true
    class; logits (N, C, H, W), target (N, H, W) class indices. gamma = 0 is cross-entropy.

    DRAEM's version adds label smoothing of 1e-5 to p_t; we take log p_t from log-softmax instead,
    which is exact and stable.
    """
    log_pt = F.log_softmax(logits, dim=1).gather(1, target[:, None].long())[:, 0]
    return -((1 - log_pt.exp()) ** gamma * log_pt).mean()


def train_localization_model(
    anomalous: torch.Tensor,
    masks: torch.Tensor,
    normal: torch.Tensor,
    cfg: EvaluateConfig,
    base_width: int = 16,
    device: str = "auto",
    bars: Bars = no_bars,
) -> DiscriminativeUNet:
    """Train from scratch on anomalous images (N, 3, S, S) uint8 with masks (N, S, S) bool and normal
    images (M, 3, S, S) uint8 for ``cfg.steps`` steps: each takes ``batch_size // 2`` anomalous pairs
    and as many normal images, each set cycling through its own seeded shuffled order; each step advances
    the bar "localization U-Net" of ``bars``."""
    if len(anomalous) == 0 or len(normal) == 0:
        raise ValueError("localization training needs both generated pairs and normal images")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    target_device = resolve_device(device)
    # channels-last: the convolutions' fast layout on the CPU (benchmarks/RESULTS.md#localizer)
    model = DiscriminativeUNet(base_width=base_width).to(target_device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    half = max(1, cfg.batch_size // 2)
    anomalous_batches = cycling_batches(len(anomalous), half, generator)
    normal_batches = cycling_batches(len(normal), half, generator)
    model.train()
    advance = loss_bar(bars, "localization U-Net", cfg.steps)
    for _ in range(cfg.steps):
        batch, picked = next(anomalous_batches), next(normal_batches)
        images = _network_input(torch.cat([anomalous[batch], normal[picked]]), target_device)
        target = torch.cat([masks[batch], masks.new_zeros((half, *masks.shape[1:]))]).to(target_device)
        loss = focal_loss(model(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        advance(loss.item())
    training_images = torch.cat([anomalous, normal])
    chunks = shuffled_batches(len(training_images), cfg.batch_size, generator)
    return recalibrate_batch_norm(model, (_network_input(training_images[c], target_device) for c in chunks))


def _network_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float in [0, 1] on ``device``, channels-last like the network's weights."""
    return (images.to(device).float() / 255).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_anomaly_maps(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """(N, S, S) float anomaly maps in [0, 1]: the softmax probability of the anomalous class."""
    device = next(model.parameters()).device
    model.eval()
    maps = [
        F.softmax(model(_network_input(chunk, device)), dim=1)[:, 1].cpu()
        for chunk in images.split(max(1, batch_size))
    ]
    return torch.cat(maps).numpy() if maps else np.zeros((0, *images.shape[2:]), np.float32)


def check_resolution(resolution: int) -> None:
    """The U-Net pools five times: the side must be a positive multiple of 32."""
    step = 2 ** (DEPTH - 1)
    if resolution <= 0 or resolution % step:
        raise UserError(f"evaluate.resolution {resolution}: must be a positive multiple of {step} (the U-Net pools 5 times)")


def real_test_split(category: Category, defects: list[str], rounding: str = "floor") -> dict[str, list]:
    """Defect type -> (image, mask) files of its few-shot test part (what follows the training split);
    ``"good"`` -> (image, None) for every ``test/good`` image."""
    split = {d: [(p.image, p.mask) for p in few_shot_split(category.defects[d], rounding)[1]] for d in defects}
    return {**split, "good": [(path, None) for path in category.test_good]}


def evaluate_localization(
    category: Category,
    pairs: list[tuple[Path, Path]],
    cfg: EvaluateConfig,
    rounding: str = "floor",
    defects: list[str] | None = None,
    base_width: int = 16,
    device: str = "auto",
    bars: Bars = no_bars,
) -> dict:
    """Train the U-Net on generated ``pairs`` (image, mask files of all defect types) + ``train/good``,
    then score it on the real test split of ``defects`` (default: all of the category's) plus all of
    ``test/good``, everything resized to ``cfg.resolution``.

    Returns the `localization_metrics` keys over the whole test split, ``"per_defect"`` (the same
    metrics on each defect type's test part plus all of ``test/good``) and ``"num_test"``.
    """
    check_resolution(cfg.resolution)
    if not category.train_good:
        raise UserError(f"{category.root}: no train/good images; localization training needs normal images")
    if not pairs:
        raise UserError(f"{category.root}: no generated pairs to train the localization U-Net on")
    defects = list(category.defects) if defects is None else defects
    size = cfg.resolution
    model = train_localization_model(
        load_images([image for image, _ in pairs], size),
        load_masks([mask for _, mask in pairs], size),
        load_images(category.train_good, size),
        cfg,
        base_width,
        device,
        bars,
    )
    test = real_test_split(category, defects, rounding)
    maps, masks = {}, {}
    for name, items in test.items():
        maps[name] = predict_anomaly_maps(model, load_images([image for image, _ in items], size), cfg.batch_size)
        masks[name] = load_masks([mask for _, mask in items], size).numpy()
    result = localization_metrics(np.concatenate(list(maps.values())), np.concatenate(list(masks.values())))
    result["per_defect"] = {
        defect: localization_metrics(
            np.concatenate([maps[defect], maps["good"]]), np.concatenate([masks[defect], masks["good"]])
        )
        for defect in defects
    }
    result["num_test"] = sum(len(items) for items in test.values())
    return result
