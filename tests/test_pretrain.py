"""`pretrain_base`: a loadable diffusers directory, a VAE that learns, exact resume, no silent overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dualanodiff.cli import main
from dualanodiff.errors import UserError
from dualanodiff.model.base import build_tokenizer, load_base_model, tiny_architecture
from dualanodiff.pretrain import (
    Architecture,
    PretrainOptions,
    corpus_item,
    latent_scaling_factor,
    pretrain_base,
    psnr,
    vae_loss,
)
from dualanodiff.synthetic import CATEGORIES

TINY = PretrainOptions(
    architecture=Architecture(
        unet_channels=(8, 16, 32), attention_levels=(1, 2), vae_channels=(8, 16, 16), text_width=16, text_layers=1,
        heads=4,
    ),
    train_images=16,
    heldout_images=4,
    vae_batch=4,
    unet_batch=4,
    warmup=2,
    checkpoint_every=2,
    log_every=2,
    sample_steps=2,
)


def run(out, steps_vae=3, steps_unet=4, **kwargs):
    return pretrain_base(out, steps_vae, steps_unet, resolution=32, options=TINY, show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "base"
    return out, run(out)


def test_run_writes_a_directory_that_loads_as_a_base_model(finished):
    out, record = finished
    base = load_base_model(str(out))
    assert base.resolution == 32 and base.vae_scale_factor == 4
    assert base.unet.config.sample_size == 8
    assert list(base.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert base.vae.config.scaling_factor == pytest.approx(record["latent_scaling_factor"])
    assert base.vae.config.scaling_factor != 0.18215  # measured, not SD's constant
    assert all(not p.requires_grad for p in base.unet.parameters())
    on_disk = json.loads((out / "training.json").read_text())
    assert on_disk["steps"] == {"vae": 3, "unet": 4}
    assert [step for step, _ in on_disk["losses"]["unet"]] == [2, 4]
    assert set(on_disk["heldout"]) >= {"vae_psnr_db", "denoising_mse_by_timestep"}
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert sorted(p.name for p in out.rglob("*.safetensors")) == [
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors", "model.safetensors",
    ]
    assert (out / "samples.png").is_file() and (out / "reconstructions.png").is_file()
    assert not (out / ".export.tmp").exists()


def test_vae_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    _, vae, _ = tiny_architecture(build_tokenizer(), 32, (8, 16), (8, 16, 16), 16, 1, 4)
    images = torch.stack([
        torch.from_numpy(corpus_item(0, 0, i, 32)[0]).permute(2, 0, 1).float() / 127.5 - 1 for i in range(4)
    ])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = vae_loss(vae, images, 1e-5, torch.Generator().manual_seed(0))  # same latent noise every step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[5:10])


def test_resume_gives_the_weights_of_an_uninterrupted_run(finished, tmp_path):
    out, _ = finished
    stopped = tmp_path / "stopped"

    def interrupt(message: str) -> None:
        if message.startswith("UNet step 4"):  # after step 4's log, before its checkpoint: step 2 was saved last
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(stopped, log=interrupt)
    assert not (stopped / "unet").exists()
    messages = []
    run(stopped, resume=True, log=messages.append)
    assert "resuming at VAE step 3, UNet step 2" in messages
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        expected, got = load_file(out / part), load_file(stopped / part)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), part


def test_resume_in_the_vae_stage_continues_from_its_checkpoint(tmp_path):
    def interrupt(message: str) -> None:
        if message.startswith("VAE step 4"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", steps_vae=5, steps_unet=1, log=interrupt)
    messages = []
    record = run(tmp_path / "run", steps_vae=5, steps_unet=1, resume=True, log=messages.append)
    assert messages[0] == "resuming at VAE step 2, UNet step 0"
    assert [step for step, _ in record["losses"]["vae"]] == [2, 4, 5]


def test_refuses_to_overwrite_and_to_resume_other_settings(finished, tmp_path):
    out, _ = finished
    with pytest.raises(UserError, match="not empty"):
        run(out)
    with pytest.raises(UserError, match="other settings"):
        pretrain_base(out, 3, 4, resolution=32, seed=1, options=TINY, resume=True, show_progress=False)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(UserError, match="not one"):
        run(foreign, force=True)
    assert (foreign / "holiday.jpg").exists()


def test_cli_refuses_a_non_empty_out_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain-base", "--out", str(tmp_path), "--steps-vae", "1", "--steps-unet", "1"])
    assert exit_info.value.code == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_corpus_covers_every_category_and_defect_and_is_reproducible():
    captions = [corpus_item(0, 0, i, 32)[1] for i in range(1000)]
    for category, spec in CATEGORIES.items():
        assert any(category in c for c in captions)
        for defect in spec.defects:
            assert any(c.endswith("with " + defect.replace("_", " ")) for c in captions), defect
            assert defect.replace("_", " ") in captions  # part images: the defect alone
    share_normal = np.mean([("with" not in c) and c not in {d.replace("_", " ") for s in CATEGORIES.values()
                                                            for d in s.defects} for c in captions])
    assert 0.35 < share_normal < 0.55
    image, caption = corpus_item(0, 0, 7, 32)
    again, caption_again = corpus_item(0, 0, 7, 32)
    assert np.array_equal(image, again) and caption == caption_again
    assert not np.array_equal(image, corpus_item(0, 1, 7, 32)[0])  # held-out stream differs


def test_scaling_factor_and_psnr_match_hand_computations():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(64, 4, 8, 8, generator=generator) * 3 + 1
    stds = torch.full_like(means, 4.0)
    samples = means + stds * torch.randn(means.shape, generator=generator)
    assert latent_scaling_factor(means, stds) == pytest.approx(1 / samples.std().item(), rel=0.02)
    reference = np.zeros((1, 4, 4, 3), np.uint8)
    image = reference.copy()
    image[0, 0, 0, 0] = 48  # mse = 48^2 / 48 = 48
    assert psnr(reference, image)[0] == pytest.approx(10 * np.log10(255**2 / 48))


def test_the_shipped_base_loads_in_fp32_within_25_mb():
    from dualanodiff.model.base import EMBEDDED_BASE

    base = load_base_model("tiny")
    record = json.loads((EMBEDDED_BASE / "training.json").read_text())
    assert base.resolution == record["settings"]["resolution"] == 128
    assert base.vae.config.scaling_factor == pytest.approx(record["latent_scaling_factor"])
    assert {p.dtype for m in (base.unet, base.vae, base.text_encoder) for p in m.parameters()} == {torch.float32}
    assert sum(p.stat().st_size for p in EMBEDDED_BASE.rglob("*.safetensors")) <= 25 * 2**20
