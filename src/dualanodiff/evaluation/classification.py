"""The downstream classification protocol (DFMGAN's, used by DualAnoDiff Table 3): a ResNet-34 trained
on the generated images of all defect types of a category, labels = defect types, scored by its
accuracy on the real test split.

The network is torchvision's ResNet-34 architecture written out here, with the same state-dict key
names (``conv1``, ``bn1``, ``layer1``..``layer4`` of BasicBlocks with ``downsample.0/1``, ``fc``), so
torchvision's ImageNet file (``resnet34-b627a593.pth`` in torch hub's cache, or the older
``resnet34-333f7ec4.pth``) loads as is from a local path (``--resnet-weights``). With it the backbone
starts from ImageNet and ``fc`` is new whenever the class count differs; without, it starts from
torchvision's random init.
Inputs are scaled to [0, 1] and normalised with the ImageNet mean and std that torchvision's weights
expect. Training: Adam at `LEARNING_RATE`, ``evaluate.steps`` optimizer steps on batches cycling through
the generated images (the same number for every set), no augmentation, no test-set selection; then
the batch-norm statistics are averaged once over the generated images (`recalibrate_batch_norm`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dualanodiff.config import EvaluateConfig
from dualanodiff.data import Category
from dualanodiff.devices import resolve_device
from dualanodiff.errors import UserError
from dualanodiff.evaluation.inputs import check_state_dict, load_images, load_state_dict
from dualanodiff.evaluation.localization import real_test_split
from dualanodiff.evaluation.training import (
    LEARNING_RATE,
    cycling_batches,
    recalibrate_batch_norm,
    shuffled_batches,
)
from dualanodiff.progress import Bars, loss_bar, no_bars

RESNET34_BLOCKS = (3, 4, 6, 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET34_FILE = "torchvision's resnet34 state dict (resnet34-*.pth)"


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers with a residual connection (1x1 conv-bn ``downsample`` when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet34(nn.Module):
    """torchvision's ``resnet34`` (same layers, key names and init): (N, 3, H, W) -> (N, num_classes) logits."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for index, (blocks, width) in enumerate(zip(RESNET34_BLOCKS, (64, 128, 256, 512)), start=1):
            stride = 1 if index == 1 else 2
            layer = [BasicBlock(in_channels, width, stride)] + [BasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load_resnet_weights(model: ResNet34, path: Path) -> None:
    """Load a torchvision ResNet-34 state dict (``--resnet-weights``); ``fc`` is kept fresh when its
    class count differs from the model's (ImageNet's 1000 vs the defect types)."""
    state = load_state_dict(path, "--resnet-weights")
    if state.get("fc.weight") is not None and state["fc.weight"].shape != model.fc.weight.shape:
        state = {**state, "fc.weight": model.fc.weight.detach(), "fc.bias": model.fc.bias.detach()}
    check_state_dict(state, model, path, "--resnet-weights", RESNET34_FILE)
    model.load_state_dict(state)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
    return (images.float() / 255 - mean) / std


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: EvaluateConfig,
    device: str = "auto",
    bars: Bars = no_bars,
) -> nn.Module:
    """Fit ``model`` to uint8 images (N, 3, S, S) and integer labels (N,) with cross-entropy; each step
    advances the bar "classification ResNet-34" of ``bars``."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    target_device = resolve_device(device)
    model.to(target_device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    batches = cycling_batches(len(images), max(2, cfg.batch_size), generator)  # batch norm needs 2 samples
    advance = loss_bar(bars, "classification ResNet-34", cfg.steps)
    for _ in range(cfg.steps):
        batch = next(batches)
        logits = model(_normalise(images[batch].to(target_device)))
        loss = F.cross_entropy(logits, labels[batch].to(target_device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        advance(loss.item())
    chunks = shuffled_batches(len(images), cfg.batch_size, generator)
    return recalibrate_batch_norm(model, (_normalise(images[c].to(target_device)) for c in chunks))


@torch.no_grad()
def predict_classes(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N,) predicted class indices for uint8 images (N, 3, S, S)."""
    device = next(model.parameters()).device
    model.eval()
    chunks = images.split(max(1, batch_size))
    predictions = [model(_normalise(chunk.to(device))).argmax(dim=1).cpu() for chunk in chunks]
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def evaluate_classification(
    category: Category,
    pairs_by_defect: dict[str, list[tuple[Path, Path]]],
    cfg: EvaluateConfig,
    rounding: str = "floor",
    resnet_weights: Path | None = None,
    device: str = "auto",
    bars: Bars = no_bars,
) -> dict:
    """Train a ResNet-34 on the generated images (labels = the defect types of ``pairs_by_defect``),
    return ``{"accuracy", "per_defect": {defect: accuracy}, "num_test"}`` on the real test parts."""
    defects = list(pairs_by_defect)
    if len(defects) < 2:
        raise UserError(f"{category.root}: classification needs at least 2 defect types, got {defects}")
    size = cfg.resolution
    images = torch.cat([load_images([image for image, _ in pairs_by_defect[d]], size) for d in defects])
    labels = torch.cat([torch.full((len(pairs_by_defect[d]),), k) for k, d in enumerate(defects)])
    torch.manual_seed(cfg.seed)
    model = ResNet34(num_classes=len(defects))
    if resnet_weights is not None:
        load_resnet_weights(model, resnet_weights)
    train_classifier(model, images, labels, cfg, device, bars)
    test = real_test_split(category, defects, rounding)
    correct = {
        d: (predict_classes(model, load_images([image for image, _ in test[d]], size), cfg.batch_size) == k)
        for k, d in enumerate(defects)
    }
    hits = torch.cat(list(correct.values()))
    return {
        "accuracy": float(hits.float().mean()) if len(hits) else float("nan"),
        "per_defect": {d: float(c.float().mean()) if len(c) else float("nan") for d, c in correct.items()},
        "num_test": len(hits),
    }
