"""IS (torch-fidelity's formula, splits, resize and network file), LPIPS (lpips v0.1, AlexNet) and
IC-LPIPS, by hand.

The torch-fidelity and lpips packages import torchvision, which cannot be installed here, so the
formulas are checked against hand-computed values, exact properties and independent functional
references, and the standard weight files are built from the packages' public definitions.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from dualanodiff.errors import UserError
from dualanodiff.evaluation.generation_metrics import (
    LPIPS,
    ic_lpips,
    inception_logits,
    inception_score,
    load_inception,
    load_lpips,
    resize_bilinear_tf1,
)


def _absolute_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, None] - b[None, :]).abs()


# ------------------------------------------------------------------------------------------------ IS


def test_uniform_predictions_score_one():
    assert inception_score(torch.zeros(20, 7)) == (pytest.approx(1.0), pytest.approx(0.0))


def test_one_hot_predictions_over_k_classes_score_k():
    one_hot = torch.eye(4).repeat(10, 1)  # every consecutive 4 rows hold each class once
    assert inception_score(one_hot, splits=10, kind="probabilities", shuffle=False) == (pytest.approx(4.0), 0.0)
    assert inception_score(one_hot, splits=1, kind="probabilities")[0] == pytest.approx(4.0)  # any order
    assert inception_score(20.0 * one_hot, splits=10, shuffle=False)[0] == pytest.approx(4.0, rel=1e-6)  # logits


def test_hand_computed_score():
    # p1 = (1, 0), p2 = (1/2, 1/2); marginal (3/4, 1/4); KL1 = log(4/3), KL2 = (log(2/3) + log 2) / 2
    expected = math.exp((math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2)) / 2)
    rows = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert inception_score(rows, splits=1, kind="probabilities")[0] == pytest.approx(expected)
    assert expected == pytest.approx(1.2408, abs=1e-4)


def test_splits_are_consecutive_slices_and_std_is_over_splits():
    a, b = [1.0, 0.0], [0.0, 1.0]
    # splits [0:2] and [2:4]: each holds one class only -> IS 1 per split
    assert inception_score(np.array([a, a, b, b]), splits=2, kind="probabilities", shuffle=False) == (1.0, 0.0)
    # N = 5, splits = 2 -> [0:2] = {a, b} scores 2, [2:5] = {a, a, a} scores 1: mean 1.5, std 0.5
    mean, std = inception_score(np.array([a, b, a, a, a]), splits=2, kind="probabilities", shuffle=False)
    assert (mean, std) == (pytest.approx(1.5), pytest.approx(0.5))


def test_shuffle_uses_torch_fidelity_seed_2020():
    rows = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    order = np.random.RandomState(2020).permutation(6)
    shuffled = inception_score(rows, splits=3, kind="probabilities", shuffle=True)
    assert shuffled == inception_score(rows[order], splits=3, kind="probabilities", shuffle=False)


def test_fewer_images_than_splits_is_an_error():
    with pytest.raises(ValueError, match="N >= splits"):
        inception_score(torch.zeros(3, 5), splits=10)


# ------------------------------------------------------------------------------------------------ Inception network


class _TinyClassifier(torch.nn.Module):
    def __init__(self, classes: int = 6):
        super().__init__()
        self.linear = torch.nn.Linear(3, classes)

    def forward(self, x):
        return self.linear(torch.nn.functional.adaptive_avg_pool2d(x / 255, 1).flatten(1))


def test_torchscript_network_gives_logits_at_299(tmp_path):
    path = tmp_path / "inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
        torch.jit.trace(_TinyClassifier(), torch.zeros(1, 3, 299, 299)).save(str(path))
    network = load_inception(path)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    logits = inception_logits(network, images, batch_size=2)
    assert logits.shape == (5, 6) and logits.dtype == torch.float64
    seen = []
    inception_logits(lambda x: seen.append(x) or torch.zeros(len(x), 2), images)
    assert seen[0].shape == (5, 3, 299, 299) and 0 <= seen[0].min() and seen[0].max() <= 255


def test_bad_inception_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--inception-weights .*file not found"):
        load_inception(tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(UserError) as error:
        load_inception(tmp_path / "state.pt")
    assert str(error.value) == (  # 94 BasicConv2d x (conv.weight + 4 bn tensors) + fc (2) = 472 keys, 3 named
        f"--inception-weights {tmp_path / 'state.pt'}: missing key(s) Conv2d_1a_3x3.conv.weight, "
        "Conv2d_1a_3x3.bn.weight, Conv2d_1a_3x3.bn.bias and 469 more; expected torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth or a TorchScript Inception-v3"
    )
    with pytest.raises(UserError, match=r"must return \(N, classes\) logits"):
        inception_logits(lambda x: torch.zeros(len(x), 2, 2), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def torch_fidelity_inception_file(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the keys and shapes of torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth``, written from its FeatureExtractorInceptionV3
    (BasicConv2d = conv without bias + bn; blocks A-E; fc 1008 x 2048), independently of our module."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name, out_channels, in_channels, kh, kw=None):
        kw = kh if kw is None else kw
        fan_in = in_channels * kh * kw
        state[f"{name}.conv.weight"] = torch.randn(out_channels, in_channels, kh, kw, generator=g) * (2 / fan_in) ** 0.5
        state[f"{name}.bn.weight"] = torch.ones(out_channels)
        state[f"{name}.bn.bias"] = torch.randn(out_channels, generator=g) * 0.1
        state[f"{name}.bn.running_mean"] = torch.zeros(out_channels)
        state[f"{name}.bn.running_var"] = torch.ones(out_channels)
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)

    for name, shape in {"Conv2d_1a_3x3": (32, 3, 3), "Conv2d_2a_3x3": (32, 32, 3), "Conv2d_2b_3x3": (64, 32, 3),
                        "Conv2d_3b_1x1": (80, 64, 1), "Conv2d_4a_3x3": (192, 80, 3)}.items():
        conv(name, *shape)
    for name, c_in, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):  # InceptionA
        conv(f"{name}.branch1x1", 64, c_in, 1)
        conv(f"{name}.branch5x5_1", 48, c_in, 1)
        conv(f"{name}.branch5x5_2", 64, 48, 5)
        conv(f"{name}.branch3x3dbl_1", 64, c_in, 1)
        conv(f"{name}.branch3x3dbl_2", 96, 64, 3)
        conv(f"{name}.branch3x3dbl_3", 96, 96, 3)
        conv(f"{name}.branch_pool", pool, c_in, 1)
    conv("Mixed_6a.branch3x3", 384, 288, 3)  # InceptionB
    conv("Mixed_6a.branch3x3dbl_1", 64, 288, 1)
    conv("Mixed_6a.branch3x3dbl_2", 96, 64, 3)
    conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):  # InceptionC
        conv(f"{name}.branch1x1", 192, 768, 1)
        conv(f"{name}.branch7x7_1", c, 768, 1)
        conv(f"{name}.branch7x7_2", c, c, 1, 7)
        conv(f"{name}.branch7x7_3", 192, c, 7, 1)
        conv(f"{name}.branch7x7dbl_1", c, 768, 1)
        conv(f"{name}.branch7x7dbl_2", c, c, 7, 1)
        conv(f"{name}.branch7x7dbl_3", c, c, 1, 7)
        conv(f"{name}.branch7x7dbl_4", c, c, 7, 1)
        conv(f"{name}.branch7x7dbl_5", 192, c, 1, 7)
        conv(f"{name}.branch_pool", 192, 768, 1)
    conv("Mixed_7a.branch3x3_1", 192, 768, 1)  # InceptionD
    conv("Mixed_7a.branch3x3_2", 320, 192, 3)
    conv("Mixed_7a.branch7x7x3_1", 192, 768, 1)
    conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1)
    conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    for name, c_in in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):  # InceptionE_1, InceptionE_2
        conv(f"{name}.branch1x1", 320, c_in, 1)
        conv(f"{name}.branch3x3_1", 384, c_in, 1)
        conv(f"{name}.branch3x3_2a", 384, 384, 1, 3)
        conv(f"{name}.branch3x3_2b", 384, 384, 3, 1)
        conv(f"{name}.branch3x3dbl_1", 448, c_in, 1)
        conv(f"{name}.branch3x3dbl_2", 384, 448, 3)
        conv(f"{name}.branch3x3dbl_3a", 384, 384, 1, 3)
        conv(f"{name}.branch3x3dbl_3b", 384, 384, 3, 1)
        conv(f"{name}.branch_pool", 192, c_in, 1)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.02
    state["fc.bias"] = torch.full((1008,), 100.0)  # logits_unbiased leave it out
    return state


def test_torch_fidelity_inception_file_loads_and_gives_unbiased_logits(tmp_path):
    state = torch_fidelity_inception_file()
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    network = load_inception(path)
    shapes = {}
    for name in ("Mixed_5d", "Mixed_6e", "Mixed_7c"):  # the sizes torch-fidelity's forward notes
        getattr(network, name).register_forward_hook(lambda m, i, out, name=name: shapes.update({name: out.shape[1:]}))
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 64, 80), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 299, 299), generator=g, dtype=torch.uint8)]
    logits = inception_logits(network, images)
    assert logits.shape == (2, 1008) and torch.isfinite(logits).all()
    assert shapes == {"Mixed_5d": (288, 35, 35), "Mixed_6e": (768, 17, 17), "Mixed_7c": (2048, 8, 8)}
    with torch.no_grad():
        features = network.features(images[1][None].float())
    unbiased = features.double() @ state["fc.weight"].double().T  # the file's fc.bias (100) is left out
    torch.testing.assert_close(logits[1], unbiased[0], rtol=1e-4, atol=1e-4)


def test_tf1_bilinear_resize_samples_without_half_pixel_offset():
    row = torch.tensor([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    assert resize_bilinear_tf1(row, 4)[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    image = torch.rand(2, 3, 11, 7, generator=torch.Generator().manual_seed(0))
    for size in (4, 16):
        # output (i, j) samples input (i * H / size, j * W / size), linear, clamped at the last row/column
        rows = np.arange(size) * np.float32(11 / size)
        cols = np.arange(size) * np.float32(7 / size)
        grid = np.meshgrid(rows, cols, indexing="ij")
        expected = np.stack([[ndimage.map_coordinates(channel.numpy(), grid, order=1, mode="nearest")
                              for channel in picture] for picture in image])
        np.testing.assert_allclose(resize_bilinear_tf1(image, size).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(resize_bilinear_tf1(image[..., :7, :], 7), image[..., :7, :])  # same size: unchanged


# ------------------------------------------------------------------------------------------------ LPIPS


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return LPIPS()


def _images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_is_zero_on_identical_images_symmetric_and_positive(lpips):
    x, y = _images(3, 0), _images(3, 1)
    assert torch.equal(lpips(x, x), torch.zeros(3))
    torch.testing.assert_close(lpips(x, y), lpips(y, x))
    assert (lpips(x, y) > 0).all()


def test_lpips_pairwise_matrix_equals_pairwise_calls(lpips):
    a, b = _images(3, 2), _images(2, 3)
    matrix = lpips.pairwise(a, b, batch_size=2)
    expected = torch.stack([lpips(a[i : i + 1].expand(2, -1, -1, -1), b) for i in range(3)]).double()
    torch.testing.assert_close(matrix, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lpips.pairwise(a).diagonal(), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    copies = torch.cat([a, a])
    assert (lpips.pairwise(copies) >= 0).all()  # never below 0, also where identical images cancel to rounding


def test_lpips_combines_layers_by_hand():
    """Features and heads set by hand: d = sum over layers of the space-mean of sum_c w_c (fx - fy)^2."""
    model = LPIPS()
    for k in range(5):
        torch.nn.init.zeros_(getattr(model, f"lin{k}").model[1].weight)
    model.lin0.model[1].weight.data[0, :2] = torch.tensor([0.5, 2.0]).view(2, 1, 1)
    model.lin1.model[1].weight.data[0, 0] = 1.0

    def features(images):  # image value v: layer 0 holds (0.6v, 0.8v) at pixel 0; layer 1 holds v at 1 of 4 pixels
        v = images[:, 0, 0, 0]
        taps = [torch.zeros(len(images), c, 2, 1) if k == 0 else torch.zeros(len(images), c, 2, 2)
                for k, c in enumerate((64, 192, 384, 256, 256))]
        taps[0][:, 0, 0, 0], taps[0][:, 1, 0, 0], taps[1][:, 0, 1, 1] = 0.6 * v, 0.8 * v, v
        return taps

    model.normalised_features = features
    x, y = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    # layer 0: (0.5 * 0.36 + 2 * 0.64) / 2 pixels = 0.73; layer 1: 1 * 1 / 4 pixels = 0.25
    assert model(x, y).item() == pytest.approx(0.73 + 0.25)
    assert model.pairwise(x, y).item() == pytest.approx(0.73 + 0.25)


def test_lpips_features_have_unit_length_over_channels(lpips):
    taps = lpips.normalised_features(_images(2, 4))
    assert [t.shape[1] for t in taps] == [64, 192, 384, 256, 256]
    for tap in taps:
        norms = tap.norm(dim=1)
        assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))


def test_lpips_weights_layout_and_loading(tmp_path, lpips):
    state = lpips.state_dict()
    assert list(state) == [
        *(f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")),
        *(f"lin{k}.model.1.weight" for k in range(5)),
    ]
    assert state["features.3.weight"].shape == (192, 64, 5, 5) and state["lin2.model.1.weight"].shape == (1, 384, 1, 1)
    x, y = _images(2, 5), _images(2, 6)
    torch.save(state, tmp_path / "lpips.pth")
    torch.testing.assert_close(load_lpips(tmp_path / "lpips.pth")(x, y), lpips(x, y))
    # the lpips package's own state dict: net.slice{k}.{i}.* plus the scaling layer's buffers
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    package = {
        (f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}" if k.startswith("features.") else k): v
        for k, v in state.items()
    }
    package["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    package.update({f"lins.{k}.model.1.weight": state[f"lin{k}.model.1.weight"] for k in range(5)})  # lpips 0.1.4
    torch.save(package, tmp_path / "package.pth")
    torch.testing.assert_close(load_lpips(tmp_path / "package.pth")(x, y), lpips(x, y))
    del state["lin4.model.1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="--lpips-weights .*missing key.*lin4.model.1.weight"):
        load_lpips(tmp_path / "partial.pth")


def torchvision_alexnet_file(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the keys and shapes of torchvision's ``alexnet-owt-7be5be79.pth`` (from
    torchvision's AlexNet: five convs in ``features``, three linears in ``classifier``). The
    classifier, which LPIPS never uses, is a broadcast zero: the right shape in a few bytes on disk."""
    g = torch.Generator().manual_seed(seed)
    convs = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
    state = {}
    for index, (out_channels, in_channels, k) in convs.items():
        state[f"features.{index}.weight"] = torch.randn(out_channels, in_channels, k, k, generator=g) / (in_channels * k * k) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(out_channels, generator=g) * 0.1
    for index, (out_features, in_features) in {1: (4096, 9216), 4: (4096, 4096), 6: (1000, 4096)}.items():
        state[f"classifier.{index}.weight"] = torch.zeros(()).expand(out_features, in_features)
        state[f"classifier.{index}.bias"] = torch.zeros(()).expand(out_features)
    return state


def lpips_heads_file(seed: int = 0) -> dict[str, torch.Tensor]:
    """The keys and shapes of the lpips package's ``weights/v0.1/alex.pth`` (non-negative, as trained)."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) / c for k, c in enumerate((64, 192, 384, 256, 256))}


def _lpips_reference(alexnet: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 from the two files with functional ops, as lpips computes it: ScalingLayer (shift
    (-.030, -.088, -.188), scale (.458, .448, .450)), AlexNet's ReLU outputs relu1..relu5, unit
    length over channels (eps 1e-10), lin heads, spatial mean, sum over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def conv(h, index, **kwargs):
        return F.relu(F.conv2d(h, alexnet[f"features.{index}.weight"], alexnet[f"features.{index}.bias"], **kwargs))

    def relus(images):
        relu1 = conv((images - shift) / scale, 0, stride=4, padding=2)
        relu2 = conv(F.max_pool2d(relu1, 3, 2), 3, padding=2)
        relu3 = conv(F.max_pool2d(relu2, 3, 2), 6, padding=1)
        relu4 = conv(relu3, 8, padding=1)
        return [relu1, relu2, relu3, relu4, conv(relu4, 10, padding=1)]

    total = torch.zeros(len(x))
    for k, (a, b) in enumerate(zip(relus(x), relus(y))):
        a, b = (t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for t in (a, b))
        total += (heads[f"lin{k}.model.1.weight"] * (a - b) ** 2).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_loads_torchvision_alexnet_and_the_lpips_heads_as_two_files(tmp_path):
    alexnet, heads = torchvision_alexnet_file(), lpips_heads_file()
    torch.save(alexnet, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads, tmp_path / "alex.pth")
    assert (tmp_path / "alexnet-owt-7be5be79.pth").stat().st_size < 20_000_000  # the classifier is broadcast
    model = load_lpips([tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "alex.pth"])
    x, y = _images(3, 9), _images(3, 10)
    torch.testing.assert_close(model(x, y), _lpips_reference(alexnet, heads, x, y), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.pairwise(x, y).diagonal().float(), model(x, y), rtol=1e-4, atol=1e-6)


def test_lpips_without_the_heads_file_names_both_files(tmp_path):
    torch.save(torchvision_alexnet_file(), tmp_path / "alexnet.pth")
    with pytest.raises(UserError) as error:
        load_lpips([tmp_path / "alexnet.pth"])
    message = str(error.value)
    assert "alexnet.pth: missing key(s) lin0.model.1.weight, lin1.model.1.weight, lin2.model.1.weight and 2 more" in message
    assert "expected torchvision's AlexNet state dict (alexnet-*.pth) plus the lpips package's linear heads" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------------ IC-LPIPS


def test_ic_lpips_hand_computed():
    generated = torch.tensor([0.0, 1.0, 10.0, 11.0, 13.0, 50.0])
    train = torch.tensor([0.0, 10.0, 60.0])
    # clusters {0, 1}: 1; {10, 11, 13}: (1 + 3 + 2) / 3 = 2; {50} alone: skipped
    assert ic_lpips(generated, train, _absolute_difference) == pytest.approx(1.5)


def test_ic_lpips_without_a_cluster_of_two_is_nan():
    assert math.isnan(ic_lpips(torch.tensor([0.0, 10.0]), torch.tensor([0.0, 10.0]), _absolute_difference))


def test_ic_lpips_with_real_lpips_is_zero_for_copies(lpips):
    train = _images(2, 7)
    copies = torch.cat([train[:1]] * 3 + [train[1:]] * 2)
    assert ic_lpips(copies, train, lpips.pairwise) == pytest.approx(0.0, abs=1e-9)
    assert ic_lpips(_images(4, 8), train, lpips.pairwise) >= 0
