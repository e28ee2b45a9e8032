"""Category adaptation: a LoRA learned on the category's normal images, fused into the base for the run, the
same weights in training and in every pipeline built from the run."""

from __future__ import annotations

import copy
import os
import random
import signal

import pytest
import torch
from peft.utils import set_peft_model_state_dict

from dualanodiff.category import (
    ADAPTER,
    CategoryOptions,
    adapt_to_category,
    fuse_category,
    lora_config,
    save_category,
)
from dualanodiff.config import Config
from dualanodiff.errors import UserError
from dualanodiff.model.base import load_base_model
from dualanodiff.pipeline import DualAnoDiffPipeline
from dualanodiff.signals import Stopped
from dualanodiff.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = CategoryOptions(steps=3, rank=4, lr=1e-2, batch_size=2, noise_offset=0.1, seed=5)


def images(count: int = 3, side: int = 32) -> torch.Tensor:
    return (torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), text).sample


def test_adaptation_is_seeded_and_leaves_the_base_as_it_was():
    base = load_base_model("tiny-random").freeze()
    before = copy.deepcopy(base.unet.state_dict())
    first = adapt_to_category(base, images(), "a nut", OPTIONS)
    assert base.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[name]) for name, value in base.unet.state_dict().items())
    second = adapt_to_category(base, images(), "a nut", OPTIONS)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(key.endswith("lora_B.weight") and first[key].abs().max() > 0 for key in first)  # it learned
    assert {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in first} >= {"to_q", "conv1", "proj_in"}


def test_a_stop_before_a_step_returns_nothing_and_restores_the_base():
    base = load_base_model("tiny-random").freeze()
    before = unet_output(base.unet)
    assert adapt_to_category(base, images(), "a nut", OPTIONS, stop=lambda: 15) is None
    assert torch.equal(unet_output(base.unet), before)


def test_fused_weights_predict_what_peft_predicts_with_the_adapter_unfused(tmp_path):
    base = load_base_model("tiny-random").freeze()
    weights = adapt_to_category(base, images(), "a nut", OPTIONS)
    reference = copy.deepcopy(base.unet)
    reference.add_adapter(lora_config(OPTIONS.rank), adapter_name=ADAPTER)
    set_peft_model_state_dict(reference, weights, adapter_name=ADAPTER)
    plain = unet_output(base.unet)
    save_category(weights, OPTIONS.rank, tmp_path / "category.safetensors")
    fuse_category(base.unet, tmp_path / "category.safetensors")
    fused = unet_output(base.unet)
    assert not any("lora" in name for name, _ in base.unet.named_modules())  # a stock UNet again
    torch.testing.assert_close(fused, unet_output(reference), rtol=0, atol=1e-5)
    assert (fused - plain).abs().max() > 1e-3


def test_a_file_that_is_not_a_category_adaptation_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a category adaptation"):
        fuse_category(load_base_model("tiny-random").unet, tmp_path / "other.safetensors")


def adapted_config(synthetic_root, steps: int = 2) -> Config:
    cfg = Config()
    cfg.data.data, cfg.data.defect = str(synthetic_root / "nut"), "hole"
    cfg.model.base_model = "tiny-random"
    cfg.model.rank, cfg.model.text_rank = 4, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.device = steps, 2, 1e-3, "cpu"
    cfg.train.category_steps = 3
    return cfg


def test_a_run_keeps_its_category_and_every_pipeline_of_it_uses_the_same_weights(synthetic_root, tmp_path):
    messages = []
    run = train(adapted_config(synthetic_root), tmp_path / "run", log=messages.append)
    assert (run / "category.safetensors").is_file()
    assert any(m.startswith("adapting the base to the category: 3 steps on 6 normal images under 'a nut'") for m in messages)
    pipe = DualAnoDiffPipeline.from_run(run, device="cpu")
    expected = load_base_model("tiny-random").unet
    fuse_category(expected, run / "category.safetensors")
    fused = dict(pipe.model.base.unet.named_parameters())
    changed = [name for name, value in expected.named_parameters() if name in fused and not torch.equal(fused[name], value)]
    assert not changed  # the pipeline's frozen base is the fused one (the dual model's own LoRA sits beside it)
    one = pipe(seeds=[3], num_inference_steps=2, output_type="np")
    again = DualAnoDiffPipeline.from_run(run, device="cpu")(seeds=[3], num_inference_steps=2, output_type="np")
    assert (one.images[0] == again.images[0]).all()
    with pytest.raises(UserError, match="adapted to its category"):
        DualAnoDiffPipeline.from_pretrained("tiny-random", pipe.model.cfg, device="cpu").load_adapters(run)


def test_a_stop_while_adapting_continues_with_resume_and_adapts_once(synthetic_root, tmp_path, monkeypatch):
    import dualanodiff.training as training

    cfg = adapted_config(synthetic_root)
    real, polls, at = training.adapt_to_category, [], random.randint(1, 3)

    def signalled(base, pictures, caption, options, stop, bars):
        def poll() -> int:  # a real SIGTERM arrives before step `at`
            polls.append(1)
            if len(polls) == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return stop()
        return real(base, pictures, caption, options, poll, bars)

    monkeypatch.setattr(training, "adapt_to_category", signalled)
    with pytest.raises(Stopped, match="while adapting the base to the category"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "category.safetensors").exists()
    calls = []
    monkeypatch.setattr(training, "adapt_to_category", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    train(cfg, tmp_path / "run", resume=True)
    weights = (tmp_path / "run" / "category.safetensors").read_bytes()
    cfg.train.steps = 3
    train(cfg, tmp_path / "run", resume=True)  # a resumed run fuses its saved LoRA instead of adapting again
    assert calls == [1] and (tmp_path / "run" / "category.safetensors").read_bytes() == weights
