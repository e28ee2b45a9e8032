"""`pretrain_base`: a loadable diffusers directory (fp16, sharded), held-out figures, exact resume, time
budgets, no silent overwrite; the world it trains on leaves the held-out category out; the GPU script's
tiny CPU path runs end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dualanodiff import pretrain
from dualanodiff.cli import main
from dualanodiff.errors import UserError
from dualanodiff.evaluation.metrics import psnr
from dualanodiff.model.base import (
    ARCHITECTURES,
    build_base,
    build_tokenizer,
    load_base_model,
    tiny_architecture,
)
from dualanodiff.pretrain import (
    PRESETS,
    TIMESTEP_BUCKETS,
    _Stage,
    latent_scaling_factor,
    measure_base,
    pretrain_base,
    render_corpus,
    tokenizer_words,
    vae_loss,
)
from dualanodiff.synthetic import FAMILIES, HELD_OUT, PRETRAIN_FAMILIES, world_item

TINY = PRESETS["tiny"].options
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(out, steps_vae=3, steps_unet=4, options=TINY, **kwargs):
    return pretrain_base(out, steps_vae, steps_unet, resolution=32, options=options, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "base"
    return out, run(out)


def test_run_writes_a_directory_that_loads_as_a_base_model(finished):
    out, record = finished
    base = load_base_model(str(out))
    assert base.resolution == 32 and base.vae_scale_factor == 4
    assert base.unet.config.sample_size == 8
    assert list(base.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3, "attention at every level"
    assert base.vae.config.scaling_factor == pytest.approx(record["latent_scaling_factor"])
    assert base.vae.config.scaling_factor != 0.18215  # measured, not SD's constant
    assert all(not p.requires_grad for p in base.unet.parameters())
    on_disk = json.loads((out / "training.json").read_text())
    assert on_disk["steps"] == {"vae": 3, "unet": 4, "decoder": 0} and on_disk["init_from_record"] is None
    assert [step for step, _ in on_disk["losses"]["unet"]] == [2, 4]
    assert on_disk["compute"]["device"] == "cpu" and on_disk["compute"]["precision"] == "fp32"
    assert on_disk["wall_seconds"] > 0 and on_disk["data"]["held_out_category"] == HELD_OUT
    assert HELD_OUT not in on_disk["data"]["families"]
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert sorted(p.name for p in out.rglob("*.safetensors")) == [
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors", "model.safetensors",
    ]
    assert (out / "samples.png").is_file() and (out / "reconstructions.png").is_file()
    assert not (out / ".export.tmp").exists()


def test_training_json_holds_the_held_out_figures(finished):
    _, record = finished
    heldout = record["heldout"]
    assert set(heldout) >= {"vae_psnr_db", "vae_psnr_db_by_kind", "vae_psnr_db_flat_grey", "vae_psnr_db_unseen_category",
                            "denoising_mse_by_timestep", "denoising_mse_by_timestep_unseen_category"}
    assert list(heldout["denoising_mse_by_timestep"]) == [f"{low}-{high - 1}" for low, high in TIMESTEP_BUCKETS]
    assert all(np.isfinite(v) for v in heldout["denoising_mse_by_timestep"].values())


def test_weights_are_stored_in_fp16_and_load_in_fp32(finished):
    out, _ = finished
    stored = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    base = load_base_model(str(out))
    assert {p.dtype for m in (base.unet, base.vae, base.text_encoder) for p in m.parameters()} == {torch.float32}
    name, tensor = next(iter(stored.items()))
    assert torch.equal(base.unet.state_dict()[name], tensor.float())


def test_large_weights_are_split_into_files_of_at_most_the_shard_size(tmp_path):
    options = dataclasses.replace(TINY, shard_mib=0.2)
    out = tmp_path / "sharded"
    run(out, 1, 1, options=options)
    shards = sorted((out / "unet").glob("*.safetensors"))
    assert len(shards) >= 2 and (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert all(p.stat().st_size <= 0.2 * 2**20 + 64 * 2**10 for p in out.rglob("*.safetensors")), "+ the header"
    assert load_base_model(str(out)).unet.config.block_out_channels == list(TINY.architecture.unet_channels)


def test_vae_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    _, vae, _ = tiny_architecture(build_tokenizer(), 32, (8, 16), (8, 16, 16), 16, 1, 4)
    images = torch.stack([
        torch.from_numpy(world_item(0, 0, i, 32).image).permute(2, 0, 1).float() / 127.5 - 1 for i in range(4)
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


def test_the_weighted_l1_term_is_the_mean_of_each_pixels_error_times_its_weight():
    """Hand check: with a weight of 1 + w on some pixels, the loss grows by w times those pixels' L1 share."""
    vae = build_base(TINY.architecture, 32)[2].eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    weight = torch.ones(2, 1, 16, 16)
    weight[0, :, 4:8, 4:8] = 10.0

    def loss(w):
        return vae_loss(vae, images, 1e-5, torch.Generator().manual_seed(0), w)

    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))).sample
        extra = 9.0 * (recon - images).abs()[0, :, 4:8, 4:8].sum() / recon.numel()
        assert loss(torch.ones(2, 1, 16, 16)).item() == pytest.approx(loss(None).item(), abs=1e-6)
        assert loss(weight).item() == pytest.approx(loss(None).item() + extra.item(), rel=1e-5)


def test_a_decoder_refinement_changes_the_decoder_alone_and_records_its_base(finished, tmp_path):
    """From a finished base, decoder steps only: encoder, latent scale, UNet and text encoder stay bit for bit
    (so the UNet's latents are the same), the decoder moves, and training.json carries the base's own record."""
    base_dir, base_record = finished
    out = tmp_path / "refined"
    record = run(out, steps_vae=0, steps_unet=0, options=dataclasses.replace(TINY, init_from=str(base_dir)),
                 steps_decoder=4)
    assert record["steps"] == {"vae": 0, "unet": 0, "decoder": 4}
    assert [step for step, _ in record["losses"]["decoder"]] == [2, 4]
    assert record["init_from_record"]["steps"] == base_record["steps"]
    assert record["latent_scaling_factor"] == base_record["latent_scaling_factor"]
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        before, after = load_file(base_dir / part), load_file(out / part)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), part
    before, after = (load_file(d / "vae" / "diffusion_pytorch_model.safetensors") for d in (base_dir, out))
    same = {k for k in before if torch.equal(before[k], after[k])}
    assert {k for k in before if k.startswith(("encoder.", "quant_conv."))} <= same
    assert any(k.startswith("decoder.") and k not in same for k in before)
    with pytest.raises(UserError, match="at least one step of either"):
        run(tmp_path / "none", steps_vae=0, steps_unet=0, options=dataclasses.replace(TINY, init_from=str(base_dir)))


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


def test_each_stage_advances_its_bar_to_its_step_count_and_a_resumed_one_starts_at_its_checkpoint(tmp_path, recorded_bars):
    def interrupt(message: str) -> None:
        if message.startswith("UNet step 4"):  # after step 4's bar and log, before its checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", steps_vae=3, steps_unet=4, log=interrupt, bars=recorded_bars)
    assert recorded_bars.totals == {"VAE": 3, "UNet": 4}
    assert recorded_bars.updates == {"VAE": [(1, 3), (2, 3), (3, 3)], "UNet": [(1, 4), (2, 4), (3, 4), (4, 4)]}
    assert set(recorded_bars.notes["UNet"]) == {""}  # the losses are in the log lines

    resumed = type(recorded_bars)()
    run(tmp_path / "run", steps_vae=3, steps_unet=4, resume=True, bars=resumed)  # the VAE is frozen: no VAE bar
    assert resumed.updates == {"UNet": [(2, 4), (3, 4), (4, 4)]}  # from the checkpoint at step 2


def test_a_time_budget_stops_each_stage_by_the_clock_and_plans_its_steps(tmp_path, monkeypatch):
    ticks = iter(range(10**9))
    monkeypatch.setattr(pretrain.stage, "_now", lambda: next(ticks) * 0.05)  # a clock that moves only when read
    monkeypatch.setattr(_Stage, "CALIBRATE", (1, 3))
    record = run(tmp_path / "timed", steps_vae=10**6, steps_unet=10**6, time_budget=2.0, steps_decoder=10**6)
    assert 3 <= record["steps"]["vae"] < record["steps"]["unet"] < 100, "the VAE has a fifth of the time"
    assert 3 <= record["steps"]["decoder"] < record["steps"]["unet"], "the decoder a fifth of what is left"
    assert set(record["planned_steps"]) == {"vae", "decoder", "unet"}
    assert all(record["steps"][stage] <= planned <= record["steps"][stage] + 1
               for stage, planned in record["planned_steps"].items()), "the plan is what fits"
    assert record["compute"]["time_budget_s"] == 2.0
    assert load_base_model(str(tmp_path / "timed")).resolution == 32


def test_every_stage_takes_a_step_even_when_the_budget_is_spent(tmp_path, monkeypatch):
    ticks = iter(range(10**9))
    monkeypatch.setattr(pretrain.stage, "_now", lambda: next(ticks) * 100.0)
    record = run(tmp_path / "late", steps_vae=50, steps_unet=50, time_budget=1.0)
    assert record["steps"] == {"vae": 1, "unet": 1, "decoder": 0}
    assert set(record["stopped_early"]) == {"vae", "unet"}


def test_refuses_to_overwrite_and_to_resume_other_settings(finished, tmp_path):
    out, _ = finished
    with pytest.raises(UserError, match="not empty"):
        run(out)
    with pytest.raises(UserError, match="other settings"):
        pretrain_base(out, 3, 4, resolution=32, seed=1, options=TINY, resume=True)
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
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain-base", "--out", str(tmp_path / "new"), "--preset", "huge"])
    assert exit_info.value.code == 2 and "--preset huge" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a preset that built no shipped base is gone, in one line
        main(["pretrain-base", "--out", str(tmp_path / "new"), "--preset", "gpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].endswith("--preset gpu: unknown or removed (CHANGELOG.md); choose v1, "
                                                          "decoder, cpu-v1, tiny")
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain-base", "--out", str(tmp_path / "new"), "--preset", "decoder", "--init-from", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].endswith(f"--init-from {tmp_path}: not a base model folder (no unet/ in "
                                                          "it); give tiny or a pretrain-base output folder")
    assert not (tmp_path / "new").exists()


def test_the_pretraining_corpus_leaves_the_held_out_category_out_and_renders_the_same_in_parallel():
    corpus = render_corpus(0, 0, 80, 32, workers=2)
    serial = render_corpus(0, 0, 80, 32, workers=1)
    assert torch.equal(corpus.images, serial.images) and corpus.captions == serial.captions
    assert corpus.images.shape == (80, 3, 32, 32) and corpus.images.dtype == torch.uint8
    assert not any(HELD_OUT in caption for caption in corpus.captions)
    assert {"normal", "defective", "part"} <= set(corpus.kinds)
    unseen = render_corpus(0, 2, 8, 32, families=(HELD_OUT,))
    assert all(HELD_OUT in c for c, k in zip(unseen.captions, unseen.kinds) if k in ("normal", "defective"))


def test_the_v2_tokenizer_keeps_caption_words_whole_and_spells_names():
    words = tokenizer_words(ARCHITECTURES["v2"], PRETRAIN_FAMILIES)
    tokenizer = build_tokenizer(ARCHITECTURES["v2"].text_length, words)
    assert len(tokenizer("contamination", add_special_tokens=False).input_ids) == 1
    assert len(tokenizer("vfx", add_special_tokens=False).input_ids) == 1
    assert len(tokenizer(HELD_OUT, add_special_tokens=False).input_ids) > 1, "an unseen name is spelled"
    longest = max((f"a {n} texture with {d}" for n, s in FAMILIES.items() for d in s.defects), key=len)
    assert len(tokenizer(longest).input_ids) <= ARCHITECTURES["v2"].text_length


def test_v2_fits_the_package_budget_in_fp16():
    tokenizer, unet, vae, text_encoder = build_base(ARCHITECTURES["v2"], 128, tokenizer_words(ARCHITECTURES["v2"],
                                                                                             PRETRAIN_FAMILIES))
    parameters = sum(p.numel() for m in (unet, vae, text_encoder) for p in m.parameters())
    assert parameters * 2 <= 38 * 2**20, "fp16 weights within 40 MiB with room for configs"
    assert set(unet.config.down_block_types) == {"CrossAttnDownBlock2D"}
    assert unet.config.sample_size == 32 and unet.config.block_out_channels[0] >= 96


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
    where = np.zeros((1, 4, 4), bool)
    where[0, 0, 0] = True  # one pixel: mse = 48^2 / 3
    assert psnr(reference, image, where)[0] == pytest.approx(10 * np.log10(255**2 / (48**2 / 3)))


def test_measure_base_repeats_the_runs_own_figures(finished):
    out, record = finished
    figures = measure_base(str(out), resolution=32, options=TINY, device="cpu")
    assert figures["vae_psnr_db"] == pytest.approx(record["heldout"]["vae_psnr_db"], abs=0.2)
    for bucket, value in record["heldout"]["denoising_mse_by_timestep"].items():
        assert figures["denoising_mse_by_timestep"][bucket] == pytest.approx(value, rel=0.02)


def test_the_shipped_base_loads_in_fp32_within_40_mib_in_files_of_at_most_16_mib():
    from dualanodiff.model.base import EMBEDDED_BASE

    base = load_base_model("tiny")
    record = json.loads((EMBEDDED_BASE / "training.json").read_text())
    assert base.resolution == record["settings"]["resolution"] == 128
    assert base.vae.config.scaling_factor == pytest.approx(record["latent_scaling_factor"])
    assert {p.dtype for m in (base.unet, base.vae, base.text_encoder) for p in m.parameters()} == {torch.float32}
    # docs/base-model.md's account: the v1 run (5500 UNet steps), its decoder refined (--preset decoder), then its UNet
    # and text encoder trained on on the wider world (--preset cpu-v1, 1990 steps)
    assert record["preset"] == "cpu-v1" and record["steps"] == {"vae": 0, "unet": 1990, "decoder": 0}
    decoder = record["init_from_record"]
    assert decoder["preset"] == "decoder" and decoder["steps"] == {"vae": 0, "unet": 0, "decoder": 2200}
    assert decoder["init_from_record"]["steps"] == {"vae": 2400, "unet": 5500}
    assert record["latent_scaling_factor"] == decoder["latent_scaling_factor"]
    files = [p.stat().st_size for p in EMBEDDED_BASE.rglob("*") if p.is_file()]
    assert sum(files) <= 40 * 2**20 and max(files) <= 16 * 2**20


def test_the_gpu_script_runs_start_to_finish_at_its_tiny_setting_on_the_cpu(tmp_path):
    """What one GPU run does, at test size: wheels skipped (they are in this environment), a tiny
    pretraining, the run packed into files of at most 16 MiB under $OUT, unpacked the base loads."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"),
           "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1", "NAME": "candidate"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "pretrain_gpu.sh"), "--tiny"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    parts = sorted(out.glob("candidate.tar.part-*"))
    assert parts and {p.name for p in files} == {p.name for p in parts} | {"candidate.log"}
    joined = tmp_path / "candidate.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    unpacked = tmp_path / "unpacked"
    base = load_base_model(str(unpacked / "tiny-base"))
    assert base.resolution == 32 and (unpacked / "tiny-base" / "samples.png").is_file()
    assert not (unpacked / "tiny-base" / "checkpoint").exists()
    record = json.loads((unpacked / "tiny-base" / "training.json").read_text())
    assert record["preset"] == "tiny" and record["compute"]["device"] == "cpu"
    log = (out / "candidate.log").read_text()
    assert "UNet step at batch 4, 32 px on cpu:" in log and "aten::" in log  # the step profile
    before = json.loads((unpacked / "before.json").read_text())
    assert before["heldout"].keys() == record["heldout"].keys()


def test_a_warm_start_adds_attention_blocks_that_start_as_the_identity(tmp_path):
    """From a base without attention at the full latent level: every base weight carries over, the new
    blocks add nothing at first (the UNets agree), and the run keeps the base's VAE and latent scale."""
    without = dataclasses.replace(TINY.architecture, attention_levels=(1, 2))
    base_dir = tmp_path / "base"
    run(base_dir, options=dataclasses.replace(TINY, architecture=without))
    base = load_base_model(str(base_dir))
    tokenizer, unet, vae, text_encoder = build_base(TINY.architecture, 32)
    assert any("down_blocks.0.attentions" in key for key in unet.state_dict())
    tokenizer, unet, vae, text_encoder = pretrain.warm_start(unet, str(base_dir))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    context = torch.randn(2, TINY.architecture.text_length, TINY.architecture.text_width)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context).sample, base.unet(x, t, context).sample)
    assert vae.config.scaling_factor == base.vae.config.scaling_factor and text_encoder.training
    warm = run(tmp_path / "warm", steps_vae=0, steps_unet=2, options=dataclasses.replace(TINY, init_from=str(base_dir)))
    assert warm["steps"]["vae"] == 0 and warm["latent_scaling_factor"] == base.vae.config.scaling_factor
    with pytest.raises(UserError, match="does not fit this architecture"):
        pretrain.warm_start(build_base(dataclasses.replace(TINY.architecture, unet_channels=(16, 16, 32)), 32)[1],
                            str(base_dir))


def test_the_cpu_v1_preset_trains_on_from_the_shipped_base_itself():
    """Their architecture is the shipped base's to the last weight: the warm-started UNet computes what the
    shipped one does, and the VAE, tokenizer and text encoder are the shipped ones (the demo's CPU cost stays)."""
    options = PRESETS["cpu-v1"].options
    assert options.init_from == "tiny" and PRESETS["cpu-v1"].steps_vae == 0
    shipped = load_base_model("tiny")
    tokenizer, unet, vae, text_encoder = build_base(options.architecture, 128)
    tokenizer, unet, vae, text_encoder = pretrain.warm_start(unet, "tiny")
    assert unet.state_dict().keys() == shipped.unet.state_dict().keys()
    x, t = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])

    def encode(tokenizer, encoder, prompt):
        return encoder(tokenizer([prompt], padding="max_length", return_tensors="pt").input_ids)[0]

    with torch.no_grad():
        context = encode(shipped.tokenizer, shipped.text_encoder, "a nut with hole").expand(2, -1, -1)
        torch.testing.assert_close(unet(x, t, context).sample, shipped.unet(x, t, context).sample)
        torch.testing.assert_close(encode(tokenizer, text_encoder, "a gear with misprint"),
                                   encode(shipped.tokenizer, shipped.text_encoder, "a gear with misprint"))
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), shipped.vae.state_dict().values()))
