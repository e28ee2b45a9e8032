"""ResNet-34: torchvision's architecture and key layout, local weights, and a training run that fits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dualanodiff.config import EvaluateConfig
from dualanodiff.errors import UserError
from dualanodiff.evaluation.classification import (
    ResNet34,
    load_resnet_weights,
    predict_classes,
    train_classifier,
)


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


def torchvision_resnet34_file(blocks=(3, 4, 6, 3), num_batches_tracked=True, seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under the keys and shapes of torchvision's ``resnet34-*.pth``, written from
    torchvision's ResNet definition (BasicBlock: conv1/bn1/conv2/bn2, downsample.0/1 on the first
    block of layers 2-4; fc 1000 x 512), independently of `ResNet34`."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name, out_channels, in_channels, k):
        state[f"{name}.weight"] = torch.randn(out_channels, in_channels, k, k, generator=g) * 0.05

    def bn(name, channels):
        state[f"{name}.weight"] = torch.rand(channels, generator=g) + 0.5
        state[f"{name}.bias"] = torch.randn(channels, generator=g) * 0.1
        state[f"{name}.running_mean"] = torch.randn(channels, generator=g) * 0.1
        state[f"{name}.running_var"] = torch.rand(channels, generator=g) + 0.5
        if num_batches_tracked:
            state[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    in_channels = 64
    for layer, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for b in range(count):
            prefix = f"layer{layer}.{b}"
            conv(f"{prefix}.conv1", width, in_channels if b == 0 else width, 3)
            bn(f"{prefix}.bn1", width)
            conv(f"{prefix}.conv2", width, width, 3)
            bn(f"{prefix}.bn2", width)
            if b == 0 and layer > 1:
                conv(f"{prefix}.downsample.0", width, in_channels, 1)
                bn(f"{prefix}.downsample.1", width)
        in_channels = width
    state["fc.weight"] = torch.randn(1000, 512, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_imagenet_file_loads_into_a_defect_classifier_with_a_fresh_fc(tmp_path, suffix):
    state = torchvision_resnet34_file()
    path = tmp_path / f"resnet34-b627a593{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(0)
    model = ResNet34(num_classes=3)
    fc_before = model.fc.weight.clone()
    load_resnet_weights(model, path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert torch.equal(model.fc.weight, fc_before)
    model.eval()
    logits = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    imagenet = ResNet34()  # 1000 classes: fc comes from the file too
    load_resnet_weights(imagenet, path)
    assert torch.equal(imagenet.fc.weight, state["fc.weight"])


def test_an_old_torchvision_file_without_num_batches_tracked_loads(tmp_path):
    state = torchvision_resnet34_file(num_batches_tracked=False)  # resnet34-333f7ec4.pth predates the buffer
    torch.save(state, tmp_path / "resnet34-333f7ec4.pth")
    model = ResNet34(num_classes=2)
    load_resnet_weights(model, tmp_path / "resnet34-333f7ec4.pth")
    assert torch.equal(model.layer4[2].bn2.running_var, state["layer4.2.bn2.running_var"])


def test_another_resnet_file_names_the_file_expected(tmp_path):
    torch.save(torchvision_resnet34_file(blocks=(2, 2, 2, 2)), tmp_path / "resnet18.pth")
    with pytest.raises(UserError) as error:
        load_resnet_weights(ResNet34(2), tmp_path / "resnet18.pth")
    message = str(error.value)
    assert "resnet18.pth: missing key(s) layer1.2.conv1.weight" in message and "\n" not in message
    assert message.endswith("expected torchvision's resnet34 state dict (resnet34-*.pth)")


@pytest.mark.parametrize("images", [3, 12])
def test_training_takes_the_same_number_of_steps_whatever_the_number_of_images(images, monkeypatch, recorded_bars):
    counted = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: counted.append(1) or step(self, *a, **k))
    data = (torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    labels = torch.arange(images) % 2
    train_classifier(ResNet34(num_classes=2), data, labels, EvaluateConfig(steps=3, batch_size=4), "cpu", recorded_bars)
    assert len(counted) == 3
    assert recorded_bars.totals == {"classification ResNet-34": 3}  # each step counted on the bar
    assert recorded_bars.updates["classification ResNet-34"] == [(1, None), (2, None), (3, None)]


def test_a_short_training_run_fits_two_classes():
    g = torch.Generator().manual_seed(0)
    dark = (torch.rand(4, 3, 32, 32, generator=g) * 80).to(torch.uint8)
    bright = (175 + torch.rand(4, 3, 32, 32, generator=g) * 80).to(torch.uint8)
    images, labels = torch.cat([dark, bright]), torch.tensor([0] * 4 + [1] * 4)
    torch.manual_seed(0)
    cfg = EvaluateConfig(steps=5, batch_size=8, seed=0)
    model = train_classifier(ResNet34(num_classes=2), images, labels, cfg, "cpu")
    assert not model.training
    assert torch.equal(predict_classes(model, images), labels)
