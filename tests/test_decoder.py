"""The category decoder: its loss by hand, what the refinement trains and leaves, determinism, stop, files."""

from __future__ import annotations

import signal

import pytest
import torch

from dualanodiff.data import load_image
from dualanodiff.decoder import (
    decoder_state,
    load_decoder,
    reconstruction_loss,
    refine_decoder,
    save_decoder,
)
from dualanodiff.errors import UserError
from dualanodiff.images import as_batch
from dualanodiff.model.base import tiny_random_base
from dualanodiff.synthetic import write_dataset


def test_reconstruction_loss_by_hand():
    images = torch.ones(1, 3, 8, 8)
    recon = torch.zeros(1, 3, 8, 8)
    recon[:, :, :, 4:] = 2.0  # |error| 1 everywhere; one vertical edge of height 2; 4x4 means off by 1
    # L1 1 + 0.5 x gradient (8 of the 8 x 7 horizontal differences are 2: mean 2/7) + colour 1
    assert reconstruction_loss(recon, images).item() == pytest.approx(1 + 0.5 * 16 / 56 + 1)
    weight = torch.full((1, 1, 8, 8), 3.0)
    assert reconstruction_loss(recon, images, weight).item() == pytest.approx(3 + 0.5 * 16 / 56 + 1)


@pytest.fixture(scope="module")
def nut_images(tmp_path_factory) -> torch.Tensor:
    root = tmp_path_factory.mktemp("nut")
    write_dataset(root, seed=0, size=32, per_defect=2, good=6)
    return as_batch([load_image(p) for p in sorted((root / "nut" / "train" / "good").glob("*.png"))])


def _decoded_error(vae, images: torch.Tensor) -> float:
    from dualanodiff.images import batch_to_model_range

    with torch.no_grad():
        x = batch_to_model_range(images)
        return (vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean().item()


def test_refinement_trains_the_decoder_alone_and_lowers_its_error_on_the_images(nut_images):
    vae = tiny_random_base().vae
    before = {name: value.clone() for name, value in vae.state_dict().items()}
    error = _decoded_error(vae, nut_images)
    weights = refine_decoder(vae, nut_images, steps=30, lr=1e-3, seed=0)
    assert set(weights) == set(decoder_state(vae)) and all(k.startswith(("decoder.", "post_quant_conv.")) for k in weights)
    changed = {name for name, value in vae.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and changed <= set(weights)  # the encoder and quant_conv, so every latent, stay bit-identical
    assert _decoded_error(vae, nut_images) < 0.8 * error
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_a_seed_fixes_the_weights_and_a_stop_returns_none_at_once(nut_images, recorded_bars):
    first = refine_decoder(tiny_random_base().vae, nut_images, steps=4, lr=1e-3, seed=3, bars=recorded_bars)
    assert recorded_bars.totals == {"VAE decoder": 4}
    assert [done for done, _ in recorded_bars.updates["VAE decoder"]] == [1, 2, 3, 4]
    again = refine_decoder(tiny_random_base().vae, nut_images, steps=4, lr=1e-3, seed=3)
    other = refine_decoder(tiny_random_base().vae, nut_images, steps=4, lr=1e-3, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    polls = iter([0, 0, signal.SIGINT])  # before steps 1, 2 and 3
    assert refine_decoder(tiny_random_base().vae, nut_images, steps=4, lr=1e-3, seed=3, stop=lambda: next(polls)) is None
    assert next(polls, None) is None


def test_saved_weights_load_back_and_a_foreign_file_is_refused(nut_images, tmp_path):
    weights = refine_decoder(tiny_random_base().vae, nut_images, steps=2, lr=1e-3, seed=0)
    save_decoder(weights, tmp_path / "decoder.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["decoder.safetensors"]  # no temporary file left
    vae = tiny_random_base().vae
    load_decoder(vae, tmp_path / "decoder.safetensors")
    assert all(torch.equal(value, weights[name]) for name, value in decoder_state(vae).items())
    save_decoder({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="other.safetensors: not a decoder of this base model"):
        load_decoder(vae, tmp_path / "other.safetensors")
