"""Few-shot training: loss goes down, run folder contents, bit-exact resume, refusal and NaN handling."""

from __future__ import annotations

import csv
import os
import random
import signal
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from dualanodiff.cli import main
from dualanodiff.config import Config, TrainConfig
from dualanodiff.data import few_shot_split, open_category
from dualanodiff.errors import UserError
from dualanodiff.runs import RunFolder
from dualanodiff.signals import Stopped
from dualanodiff.training import train, training_noise, training_targets


def tiny_config(synthetic_root, steps: int = 3, **train_options) -> Config:
    cfg = Config()
    cfg.data.data = str(synthetic_root / "nut")
    cfg.data.defect = "hole"
    cfg.model.base_model = "tiny-random"
    cfg.model.rank, cfg.model.text_rank = 4, 4
    cfg.train.steps = steps
    cfg.train.lr = 1e-3
    cfg.train.batch_size = 2
    cfg.train.checkpoint_every = 2
    cfg.train.device = "cpu"
    for name, value in train_options.items():
        setattr(cfg.train, name, value)
    return cfg


def losses(run) -> list[dict]:
    with (run / "loss.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_training_targets_follow_the_paper():
    image = np.full((4, 4, 3), 255, np.uint8)
    image[0, 0] = 0
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True
    foreground = np.zeros((4, 4), bool)
    foreground[:2] = True
    whole, part, background = training_targets(image, mask, foreground)
    assert whole[:, 0, 0].tolist() == [-1.0] * 3 and whole[:, 3, 3].tolist() == [1.0] * 3
    assert part[:, 0, 0].tolist() == [-1.0] * 3 and part[:, 0, 1].tolist() == [1.0] * 3
    assert torch.count_nonzero(part) == 2 * 3  # zero ([-1, 1] mid-grey) outside the defect
    assert torch.count_nonzero(background[:, :2]) == 0 and torch.equal(background[:, 2:], whole[:, 2:])


def test_offset_noise_adds_a_constant_per_row_and_channel():
    shape = torch.Size((2, 3, 4, 5, 5))
    plain = training_noise(shape, torch.Generator().manual_seed(7), TrainConfig())
    offset = training_noise(shape, torch.Generator().manual_seed(7), TrainConfig(noise_offset=0.5))
    generator = torch.Generator().manual_seed(7)
    base, constants = torch.randn(shape, generator=generator), torch.randn(shape[:3] + (1, 1), generator=generator)
    expected = base + 0.5 * constants
    assert torch.equal(plain, base)  # no offset: the same random stream as without the option, draw for draw
    assert torch.equal(offset, expected)
    spatial = (offset - plain).flatten(3)
    assert torch.allclose(spatial, spatial[..., :1].expand_as(spatial))


def test_a_run_folder_holds_config_losses_plot_adapters_and_split(synthetic_root, tmp_path):
    run = train(tiny_config(synthetic_root, steps=3), tmp_path / "run")
    rows = losses(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss_global"])) and np.isfinite(float(r["loss_anomaly"])) for r in rows)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    train_pairs, test_pairs = few_shot_split(open_category(synthetic_root / "nut").defects["hole"])
    assert saved["split"] == {"train": [p.stem for p in train_pairs], "test": [p.stem for p in test_pairs]}
    assert saved["data"]["resolution"] == 32 and saved["train"]["steps"] == 3
    assert sorted(p.stem for p in (run / "backgrounds").glob("*.png")) == saved["split"]["train"]
    adapters = load_file(str(run / "adapters.safetensors"))
    assert all(".processor." in key or ".text." in key for key in adapters)
    assert RunFolder(run).latest_checkpoint().name == "step-000003"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000002", "step-000003"]


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(synthetic_root, tmp_path):
    from dualanodiff.model.base import load_base_model
    from dualanodiff.model.dual import DualAnoDiffModel
    from dualanodiff.training import encode_training_set

    cfg = tiny_config(synthetic_root)
    base = load_base_model("tiny-random")
    torch.manual_seed(0)
    model = DualAnoDiffModel(base, cfg.model)
    pairs, _ = few_shot_split(open_category(cfg.data.data).defects["hole"])
    data = encode_training_set(model, pairs, "object", 32, flips=False)
    generator = torch.Generator().manual_seed(0)
    latents = data.sample(torch.tensor([0, 1]), generator, base.vae.config.scaling_factor)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.tensor([300, 600])
    noisy = torch.stack([base.scheduler.add_noise(latents[:, i], noise[:, i], t) for i in range(3)], 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)

    def loss() -> torch.Tensor:
        eps_global, eps_anomaly = model(noisy[:, 0], noisy[:, 1], t, noisy[:, 2])
        return (eps_global - noise[:, 0]).square().mean() + (eps_anomaly - noise[:, 1]).square().mean()

    first = loss()
    first.backward()
    optimizer.step()
    for _ in range(9):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert loss() < 0.9 * first.detach()  # 2.27 -> 1.97 here


def test_resumed_training_equals_uninterrupted_training(synthetic_root, tmp_path):
    whole = train(tiny_config(synthetic_root, steps=5), tmp_path / "whole")
    part = train(tiny_config(synthetic_root, steps=3), tmp_path / "part")
    resumed = train(tiny_config(synthetic_root, steps=5), part, resume=True)
    expected, actual = load_file(str(whole / "adapters.safetensors")), load_file(str(resumed / "adapters.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert losses(whole) == losses(resumed)


def test_an_interrupted_run_checkpoints_and_resumes_to_the_same_weights(synthetic_root, tmp_path):
    def interrupt(step, total, values):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(synthetic_root, steps=5, checkpoint_every=100), tmp_path / "run", progress=interrupt)
    assert RunFolder(tmp_path / "run").latest_checkpoint().name == "step-000003"
    resumed = train(tiny_config(synthetic_root, steps=5), tmp_path / "run", resume=True)
    whole = train(tiny_config(synthetic_root, steps=5, checkpoint_every=100), tmp_path / "whole")
    expected, actual = load_file(str(whole / "adapters.safetensors")), load_file(str(resumed / "adapters.safetensors"))
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def _same_adapters(first, second) -> bool:
    expected, actual = load_file(str(first / "adapters.safetensors")), load_file(str(second / "adapters.safetensors"))
    return expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_real_sigint_at_a_random_moment_resumes_bit_exactly(synthetic_root, tmp_path):
    """A SIGINT lands somewhere inside a random step; training finishes that step, checkpoints, re-raises."""
    rng = random.Random()
    fire_after, delay = rng.randint(1, 6), rng.uniform(0.0, 0.05)

    def arm(step, total, values):
        if step == fire_after:
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()

    cfg = tiny_config(synthetic_root, steps=10, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=arm)
    stopped_at = int(RunFolder(tmp_path / "run").latest_checkpoint().name.split("-")[1])
    assert fire_after <= stopped_at < 10, (fire_after, delay)
    assert len(losses(tmp_path / "run")) == stopped_at
    assert not (tmp_path / "run" / "adapters.safetensors").exists()  # only finished runs have final adapters
    resumed = train(tiny_config(synthetic_root, steps=10), tmp_path / "run", resume=True)
    whole = train(tiny_config(synthetic_root, steps=10, checkpoint_every=100), tmp_path / "whole")
    assert _same_adapters(whole, resumed), (fire_after, delay)
    assert losses(whole) == losses(resumed)


def test_training_leaves_the_base_weights_bit_identical(synthetic_root, tmp_path, monkeypatch):
    import dualanodiff.training as training

    kept = {}
    original = training.DualAnoDiffModel

    def spy(base, cfg):
        model = original(base, cfg)
        kept["model"] = model
        kept["frozen"] = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        kept["trainable"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return model

    monkeypatch.setattr(training, "DualAnoDiffModel", spy)
    train(tiny_config(synthetic_root, steps=2), tmp_path / "run")
    model = kept["model"]
    assert all(torch.equal(p, kept["frozen"][n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, kept["trainable"][n]) for n, p in model.named_parameters() if p.requires_grad)


def test_existing_runs_are_refused_without_resume_or_force(synthetic_root, tmp_path):
    run = train(tiny_config(synthetic_root, steps=1), tmp_path / "run")
    before = (run / "adapters.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists.*--resume.*--force"):
        train(tiny_config(synthetic_root, steps=1), run)
    assert (run / "adapters.safetensors").read_bytes() == before
    with pytest.raises(UserError, match="already trained for 1 steps"):
        train(tiny_config(synthetic_root, steps=1), run, resume=True)
    with pytest.raises(UserError, match="no run to resume"):
        train(tiny_config(synthetic_root, steps=1), tmp_path / "nothing", resume=True)
    train(tiny_config(synthetic_root, steps=2, seed=7), run, force=True)
    assert len(losses(run)) == 2


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path, monkeypatch):
    import dualanodiff.training as training

    kept = {}
    original = training.DualAnoDiffModel
    monkeypatch.setattr(training, "DualAnoDiffModel", lambda base, cfg: kept.setdefault("model", original(base, cfg)))

    def poison(step, total, values):
        if step == 2:
            with torch.no_grad():
                next(p for p in kept["model"].parameters() if p.requires_grad).fill_(float("nan"))

    with pytest.raises(UserError, match=r"loss became nan at step 3.*step-000002"):
        train(tiny_config(synthetic_root, steps=5), tmp_path / "run", progress=poison)
    run = tmp_path / "run"
    assert RunFolder(run).latest_checkpoint().name == "step-000002"
    assert all(torch.isfinite(t).all() for t in load_file(str(RunFolder(run).latest_checkpoint() / "adapters.safetensors")).values())
    assert len(losses(run)) == 2 and not (run / "adapters.safetensors").exists()


def test_bad_defect_is_a_clear_error(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root)
    cfg.data.defect = "dent"
    with pytest.raises(UserError, match="--defect 'dent'.*choose one of"):
        train(cfg, tmp_path / "run")


def test_cli_train_writes_a_run_and_rejects_bad_options(synthetic_root, tmp_path, capsys):
    args = ["train", "--data", str(synthetic_root / "pill"), "--defect", "stain", "--base-model", "tiny-random",
            "--steps", "2", "--set", "model.rank=4", "--set", "train.batch_size=1", "--set", "model.saim=false",
            "--set", "train.device=cpu"]
    main(args + ["--out", str(tmp_path / "run")])
    saved = Config.from_yaml(tmp_path / "run" / "config.yaml")
    assert (saved.model.rank, saved.model.saim, saved.train.batch_size) == (4, False, 1)
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(tmp_path / "other"), "--set", "model.bcm_variant=foo"])
    assert exit_info.value.code == 2 and not (tmp_path / "other").exists()
    assert "--set model.bcm_variant" in capsys.readouterr().err


def test_cli_train_takes_the_base_models_recipe_below_the_config_file_and_flags(synthetic_root, tmp_path, capsys):
    args = ["train", "--data", str(synthetic_root / "nut"), "--defect", "hole", "--steps", "1", "--set", "train.batch_size=1",
            "--set", "train.device=cpu", "--set", "model.rank=4"]
    (tmp_path / "short.yaml").write_text("train:\n  decoder_steps: 2\n")  # the recipe's 100 take 45 s
    main(args + ["--base-model", "tiny", "--config", str(tmp_path / "short.yaml"), "--out", str(tmp_path / "tiny")])
    saved = Config.from_yaml(tmp_path / "tiny" / "config.yaml")
    assert (saved.train.lr, saved.train.steps, saved.generate.scheduler) == (1e-3, 1, "dpm")  # recipe, flag, recipe
    assert (saved.train.decoder_steps, saved.generate.canvas) == (2, "normal")  # the file, the recipe
    assert RunFolder(tmp_path / "tiny").decoder.is_file()
    err = capsys.readouterr().err
    assert saved.model.anomaly_prompt == "hole" and "its recipe sets" in err
    # the recipe's note once every input check has passed, then the refinement's own bar, then the training's
    assert err.index("its recipe sets") < err.index("VAE decoder 2/2 (100%) loss") < err.index("training 1/1")
    (tmp_path / "mine.yaml").write_text("train:\n  lr: 0.0005\n  decoder_steps: 0\n")
    main(args + ["--base-model", "tiny", "--config", str(tmp_path / "mine.yaml"), "--out", str(tmp_path / "mine")])
    assert Config.from_yaml(tmp_path / "mine" / "config.yaml").train.lr == 5e-4  # the file wins over the recipe
    assert not RunFolder(tmp_path / "mine").decoder.exists()
    main(args + ["--base-model", "tiny-random", "--out", str(tmp_path / "sd")])
    assert Config.from_yaml(tmp_path / "sd" / "config.yaml").train.lr == Config().train.lr  # no recipe: the paper's


@pytest.mark.slow
def test_twenty_steps_on_the_embedded_base(synthetic_root, tmp_path):
    (tmp_path / "short.yaml").write_text("train:\n  decoder_steps: 5\n")
    main(["train", "--data", str(synthetic_root / "nut"), "--defect", "crack", "--steps", "20", "--config",
          str(tmp_path / "short.yaml"), "--out", str(tmp_path / "run")])
    rows = losses(tmp_path / "run")
    assert len(rows) == 20 and Config.from_yaml(tmp_path / "run" / "config.yaml").data.resolution == 128


def test_bf16_with_gradient_checkpointing_tracks_fp32_and_saves_fp32_adapters(synthetic_root, tmp_path):
    full = train(tiny_config(synthetic_root, steps=1), tmp_path / "fp32")
    half = train(tiny_config(synthetic_root, steps=1, mixed_precision="bf16", gradient_checkpointing=True), tmp_path / "bf16")
    for key in ("loss_global", "loss_anomaly"):
        assert float(losses(half)[0][key]) == pytest.approx(float(losses(full)[0][key]), rel=0.05)
    assert all(t.dtype == torch.float32 for t in load_file(str(half / "adapters.safetensors")).values())


# `dualanodiff train` as torchrun runs it in each process, then what this rank's model holds is saved (only
# rank 0 writes the run): the ranks' adapters, which the run folder cannot show.
RANK_ADAPTERS = """
import sys

import torch

from dualanodiff import cli, training

models, build = [], training.trainable_model
training.trainable_model = lambda *args, **kwargs: models.append(build(*args, **kwargs)) or models[-1]
try:
    cli.main(sys.argv[1:])
except SystemExit as exc:
    if exc.code:
        raise
out = sys.argv[sys.argv.index("--out") + 1]
models[0].save_trainable(f"{out}/rank-{torch.distributed.get_rank()}.safetensors")
"""


@pytest.mark.slow
def test_two_processes_train_what_one_process_does_with_the_same_global_batch(synthetic_root, tmp_path):
    """`torchrun --nproc_per_node 2 -m dualanodiff train` (what `accelerate launch` runs), gloo on the CPU:
    one writer, both ranks' RNG saved, a resume with another process count refused. Two processes of batch
    1 against one process of batch 2, same seed: every process draws the global batch and keeps its share,
    so the gradients are the same batch mean. Both ranks hold the very same adapters (DDP all-reduces the
    gradients, each rank steps the same optimizer). Against one process they agree to float32 rounding
    only, hence a tolerance: the batch mean is summed in another order (each rank's row, then the
    all-reduce) and batch-1 kernels round differently, and Adam divides each gradient by its own running
    size, so a rounding error in a gradient near Adam's eps (1e-8) moves its weight by a share of lr.
    Measured 5e-6 after 2 steps at lr 1e-3; the bound, 5e-5, is 5 % of one step's update, while a run of
    other batches (one process of batch 1) differs by 4e-3."""
    import subprocess
    import sys

    run, script = tmp_path / "run", tmp_path / "ranks.py"
    script.write_text(RANK_ADAPTERS)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "train",
               "--data", str(synthetic_root / "nut"), "--defect", "hole", "--base-model", "tiny-random", "--steps", "2",
               "--set", "model.rank=4", "--set", "train.batch_size=1", "--set", "train.lr=1e-3", "--set", "train.device=cpu",
               "--out", str(run)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("trained ") == 1
    state = torch.load(run / "checkpoints" / "step-000002" / "state.pt")
    assert len(state["generators"]) == 2 and torch.equal(*state["generators"])  # both drew the global batches
    assert [int(r["step"]) for r in losses(run)] == [1, 2]
    first, second = (load_file(str(run / f"rank-{rank}.safetensors")) for rank in (0, 1))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    def one_process(batch_size: int, out) -> dict:
        cfg = Config.from_yaml(run / "config.yaml")
        cfg.train.batch_size = batch_size
        return load_file(str(train(cfg, out) / "adapters.safetensors"))

    one, other = one_process(2, tmp_path / "one"), one_process(1, tmp_path / "other")
    assert one.keys() == first.keys() == other.keys()
    difference = max((one[k] - first[k]).abs().max().item() for k in one)
    other_batches = max((other[k] - first[k]).abs().max().item() for k in one)  # what a wrong batch looks like
    assert difference <= 5e-5 and other_batches >= 1e-3, (difference, other_batches)
    cfg = Config.from_yaml(run / "config.yaml")
    cfg.train.steps = 3
    with pytest.raises(UserError, match="saved by 2 process"):
        train(cfg, run, resume=True)


def test_an_empty_training_mask_is_refused_before_anything_is_written(synthetic_root, tmp_path):
    import shutil

    data = tmp_path / "nut"
    shutil.copytree(synthetic_root / "nut", data)
    train_pairs, _ = few_shot_split(open_category(data).defects["hole"])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(train_pairs[1].mask)
    cfg = tiny_config(synthetic_root)
    cfg.data.data = str(data)
    with pytest.raises(UserError, match=rf"{train_pairs[1].mask.name}: mask is empty.*fix the mask"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_real_sigint_inside_the_decoder_refinement_keeps_nothing_and_resume_gives_an_uninterrupted_run(synthetic_root, tmp_path, monkeypatch):
    """`train.decoder_steps`: the refinement runs before the first step; a SIGINT at a random moment of a
    random refinement step stops it with no decoder and no checkpoint written, and --resume then gives the
    decoder and adapters of an uninterrupted run. The refinement touches nothing the adapters learn from."""
    import dualanodiff.decoder as decoder

    rng = random.Random()
    fire_at, delay = rng.randint(1, 4), rng.uniform(0.0, 0.05)
    calls, loss = [], decoder.reconstruction_loss

    def armed(*args, **kwargs):
        calls.append(1)
        if len(calls) == fire_at:
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
        return loss(*args, **kwargs)

    monkeypatch.setattr(decoder, "reconstruction_loss", armed)
    with pytest.raises(Stopped, match="while refining the decoder"):
        train(tiny_config(synthetic_root, steps=3, decoder_steps=40), tmp_path / "run")
    monkeypatch.undo()
    run = RunFolder(tmp_path / "run")
    assert not run.decoder.exists() and run.latest_checkpoint() is None, (fire_at, delay)
    train(tiny_config(synthetic_root, steps=3, decoder_steps=40), run.root, resume=True)
    whole = RunFolder(train(tiny_config(synthetic_root, steps=3, decoder_steps=40), tmp_path / "whole"))
    expected, actual = load_file(str(whole.decoder)), load_file(str(run.decoder))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert _same_adapters(whole.root, run.root)
    plain = train(tiny_config(synthetic_root, steps=3), tmp_path / "plain")
    assert _same_adapters(plain, whole.root) and not RunFolder(plain).decoder.exists()
