"""ResNet-34: torchvision's architecture and key layout, local weights, and a training run that fits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dualanodiff.config import EvaluateConfig
from dualanodiff.errors import UserError
from dualanodiff.evaluation.classification import ResNet34, load_resnet_weights, predict_classes, train_classifier


def test_state_dict_matches_torchvision_resnet34_layout():
    model = ResNet34()
    state = model.state_dict()
    # torchvision resnet34: conv1 + bn1 (1 + 5), 16 BasicBlocks x 12 entries, 3 downsamples x 6, fc (2)
    assert len(state) == 218
    assert list(state)[:2] == ["conv1.weight", "bn1.weight"] and list(state)[-2:] == ["fc.weight", "fc.bias"]
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.2.conv2.weight"].shape == (64, 64, 3, 3)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer2.0.downsample.1.running_var"].shape == (128,)
    assert state["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert state["layer4.2.bn2.num_batches_tracked"].shape == ()
    assert "layer1.0.downsample.0.weight" not in state and "layer3.6.conv1.weight" not in state
    assert state["fc.weight"].shape == (1000, 512)
    assert sum(p.numel() for p in model.parameters()) == 21_797_672
    assert ResNet34(num_classes=5).state_dict()["fc.weight"].shape == (5, 512)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_imagenet_weights_load_into_a_defect_classifier_with_a_fresh_fc(tmp_path, suffix):
    torch.manual_seed(0)
    imagenet = ResNet34()
    path = tmp_path / f"resnet34{suffix}"
    state = {k: v.contiguous() for k, v in imagenet.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = ResNet34(num_classes=3)
    fc_before = model.fc.weight.clone()
    load_resnet_weights(model, path)
    assert torch.equal(model.layer3[5].conv2.weight, imagenet.layer3[5].conv2.weight)
    assert torch.equal(model.bn1.running_var, imagenet.bn1.running_var)
    assert torch.equal(model.fc.weight, fc_before)


def test_bad_weight_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--resnet-weights .*missing.pth: file not found"):
        load_resnet_weights(ResNet34(2), tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="missing key"):
        load_resnet_weights(ResNet34(2), tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read a state dict"):
        load_resnet_weights(ResNet34(2), tmp_path / "junk.pth")


@pytest.mark.parametrize("images", [3, 12])
def test_training_takes_the_same_number_of_steps_whatever_the_number_of_images(images, monkeypatch):
    counted = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: counted.append(1) or step(self, *a, **k))
    data = (torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    labels = torch.arange(images) % 2
    train_classifier(ResNet34(num_classes=2), data, labels, EvaluateConfig(steps=3, batch_size=4), "cpu")
    assert len(counted) == 3


def test_a_short_training_run_fits_two_classes():
    g = torch.Generator().manual_seed(0)
    dark = (torch.rand(4, 3, 32, 32, generator=g) * 80).to(torch.uint8)
    bright = (175 + torch.rand(4, 3, 32, 32, generator=g) * 80).to(torch.uint8)
    images, labels = torch.cat([dark, bright]), torch.tensor([0] * 4 + [1] * 4)
    torch.manual_seed(0)
    cfg = EvaluateConfig(steps=5, batch_size=8, lr=1e-3, seed=0)
    model = train_classifier(ResNet34(num_classes=2), images, labels, cfg, "cpu")
    assert not model.training
    assert torch.equal(predict_classes(model, images), labels)
