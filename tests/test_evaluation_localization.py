"""The localization protocol: DRAEM-shaped U-Net, focal loss, seeded training, the real test split."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualanodiff.config import EvaluateConfig
from dualanodiff.data import few_shot_split, open_category
from dualanodiff.errors import UserError
from dualanodiff.evaluation.localization import (
    DiscriminativeUNet,
    check_resolution,
    focal_loss,
    predict_anomaly_maps,
    real_test_split,
    train_localization_model,
)
from dualanodiff.evaluation.metrics import localization_metrics


def test_focal_loss_hand_computed_and_cross_entropy_at_gamma_zero():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)  # softmax (1/4, 3/4)
    target = torch.ones(1, 1, 1, dtype=torch.long)
    # -(1 - 3/4)^2 * log(3/4)
    assert focal_loss(logits, target).item() == pytest.approx(0.0625 * -math.log(0.75), rel=1e-6)
    random_logits = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    random_target = torch.randint(0, 2, (2, 5, 5), generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(random_logits, random_target)
    assert focal_loss(random_logits, random_target, gamma=0.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_unet_has_draem_widths_and_keeps_the_input_size():
    model = DiscriminativeUNet(base_width=4)
    assert [block[0].out_channels for block in model.encoder] == [4, 8, 16, 32, 32, 32]
    assert [merge[0].in_channels for merge in model.merge] == [64, 48, 24, 12, 8]  # DRAEM: b*(8+8), b*(4+8), ...
    assert model(torch.rand(2, 3, 64, 32)).shape == (2, 2, 64, 32)


def test_resolution_must_be_a_multiple_of_32():
    check_resolution(64)
    with pytest.raises(UserError, match="evaluate.resolution 48"):
        check_resolution(48)


def _squares(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy images with one bright square each, and its mask."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, size, size, generator=g) * 60).to(torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        y, x = torch.randint(0, size - 8, (2,), generator=g).tolist()
        masks[i, y : y + 8, x : x + 8] = True
        images[i, :, y : y + 8, x : x + 8] = 220
    return images, masks


def test_training_is_seeded_and_learns_a_trivial_defect():
    images, masks = _squares(8)
    normal = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 60).to(torch.uint8)
    cfg = EvaluateConfig(steps=60, batch_size=8, resolution=32, seed=3)
    first = train_localization_model(images, masks, normal, cfg, base_width=4, device="cpu")
    second = train_localization_model(images, masks, normal, cfg, base_width=4, device="cpu")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    test_images, test_masks = _squares(4, seed=7)
    maps = predict_anomaly_maps(first, test_images)
    assert maps.shape == (4, 32, 32) and 0 <= maps.min() and maps.max() <= 1
    assert localization_metrics(maps, test_masks.numpy())["pixel_auroc"] > 0.95


@pytest.mark.parametrize("pairs", [3, 20])
def test_training_takes_the_same_number_of_steps_whatever_the_number_of_pairs(pairs, monkeypatch, recorded_bars):
    counted = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: counted.append(1) or step(self, *a, **k))
    images, masks = _squares(pairs)
    normal = images[:2] // 4
    cfg = EvaluateConfig(steps=7, batch_size=4, resolution=32)
    train_localization_model(images, masks, normal, cfg, base_width=4, device="cpu", bars=recorded_bars)
    assert len(counted) == 7
    assert recorded_bars.totals == {"localization U-Net": 7}  # each step counted on the bar
    assert recorded_bars.updates["localization U-Net"] == [(step, None) for step in range(1, 8)]


def test_real_test_split_is_the_part_after_the_few_shot_training_images(synthetic_root):
    category = open_category(synthetic_root / "nut")
    split = real_test_split(category, ["crack", "hole"], rounding="floor")
    assert list(split) == ["crack", "hole", "good"]
    train, test = few_shot_split(category.defects["crack"])
    assert [image for image, _ in split["crack"]] == [p.image for p in test]
    assert not {p.image for p in train} & {image for image, _ in split["crack"]}
    assert split["good"] == [(path, None) for path in category.test_good]

