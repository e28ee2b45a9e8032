"""DualAnoDiffPipeline: joint guided sampling, generators and seeds, outputs, inpainting, loading and the command."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

from dualanodiff.config import GenerateConfig, ModelConfig
from dualanodiff.data import load_image, load_mask
from dualanodiff.decoder import decoder_state, save_decoder
from dualanodiff.errors import UserError
from dualanodiff.generation import generate
from dualanodiff.images import resize_image
from dualanodiff.masks import part_onto, part_to_mask
from dualanodiff.model.base import load_base_model, tiny_random_base
from dualanodiff.pipeline import DualAnoDiffPipeline, make_scheduler
from dualanodiff.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return DualAnoDiffPipeline.from_run(tiny_run, device="cpu")


def using(pipe: DualAnoDiffPipeline, scheduler: str) -> DualAnoDiffPipeline:
    pipe.scheduler = make_scheduler(scheduler, pipe.model.base.scheduler.config)
    return pipe


def test_output_is_aligned_images_masks_and_parts_in_either_type(pipe):
    out = using(pipe, "ddim")(seeds=[0, 1], num_inference_steps=3, output_type="np", return_attention=True)
    assert out.seeds == [0, 1] and len(out.images) == len(out.masks) == len(out.parts) == 2
    for image, mask, part, attention in zip(out.images, out.masks, out.parts, out.attention):
        assert image.shape == part.shape == (32, 32, 3) and image.dtype == part.dtype == np.uint8
        assert mask.dtype == bool and np.array_equal(mask, part_to_mask(part))  # the run's mask method
        assert attention.shape == (16, 16) and 0 <= attention.min() and attention.max() <= 1
    pil = pipe(seeds=[0, 1], num_inference_steps=3)
    assert [i.mode for i in pil.images] == ["RGB", "RGB"] and [m.mode for m in pil.masks] == ["L", "L"]
    assert pil.attention is None
    for k in range(2):
        assert np.array_equal(np.asarray(pil.images[k]), out.images[k])
        assert np.array_equal(np.asarray(pil.masks[k]), out.masks[k].astype(np.uint8) * 255)
    with pytest.raises(ValueError, match="output_type"):
        pipe(seeds=[0], num_inference_steps=1, output_type="latent")


def test_a_seed_regenerates_bit_exactly_and_independently_of_its_batch(pipe):
    using(pipe, "ddpm")  # DDPM draws noise in every step too: each pair takes it from its own generator
    batch = pipe(seeds=[4, 5, 6], num_inference_steps=3, output_type="np")
    again = pipe(num_images=3, num_inference_steps=3, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    alone = pipe(seeds=[5], num_inference_steps=3, output_type="np")
    for name in ("images", "parts", "masks"):
        assert all(np.array_equal(a, b) for a, b in zip(getattr(batch, name), getattr(again, name)))
        assert np.abs(getattr(alone, name)[0].astype(int) - getattr(batch, name)[1]).max() <= 1  # float rounding only
    assert np.abs(batch.images[0].astype(int) - batch.images[1]).mean() > 5  # seeds matter
    torch.manual_seed(7)
    drawn = pipe(num_images=2, num_inference_steps=2, output_type="np")
    torch.manual_seed(7)
    assert pipe(num_images=2, num_inference_steps=2, output_type="np").seeds == drawn.seeds


def test_the_scheduler_swaps_as_in_diffusers(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim = pipe(seeds=[3], num_inference_steps=3, output_type="np")
    assert np.array_equal(ddim.images[0], using(pipe, "ddim")(seeds=[3], num_inference_steps=3, output_type="np").images[0])
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert not np.array_equal(ddim.images[0], pipe(seeds=[3], num_inference_steps=3, output_type="np").images[0])


def test_guided_noise_of_one_batched_call_equals_two_separate_calls(tiny_run):
    pipe = DualAnoDiffPipeline.from_run(tiny_run, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # make SAIM and BCM matter, so a wrong row pairing would show
        for processor in pipe.model.processors:
            processor.saim.to_out.weight.normal_(0, 0.2)
            if processor.bcm is not None:
                processor.bcm.gamma.fill_(0.5)
    x_global, x_anomaly, x_background = torch.randn(3, 2, 4, 16, 16)
    t, guidance = torch.tensor(500), 2.5
    with torch.inference_mode():
        eps_global, eps_anomaly = pipe.guided_noise(x_global, x_anomaly, t, x_background, guidance)
        model = pipe.model
        uncond = model.predict_noise(x_global, x_anomaly, t, model.prompt_embeddings(2, unconditional=True), x_background)
        cond = model.predict_noise(x_global, x_anomaly, t, model.prompt_embeddings(2), x_background)
    assert not torch.allclose(uncond[0], cond[0], atol=1e-3)
    torch.testing.assert_close(eps_global, uncond[0] + guidance * (cond[0] - uncond[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_anomaly, uncond[1] + guidance * (cond[1] - uncond[1]), atol=1e-5, rtol=1e-5)


def test_inpainting_keeps_the_normal_image_outside_the_defect_and_labels_only_inside(pipe, synthetic_root):
    normals = [resize_image(load_image(p), 32) for p in sorted((synthetic_root / "nut" / "train" / "good").glob("*.png"))[:2]]
    region = np.zeros((32, 32), bool)
    region[9:20, 11:22] = True  # not aligned with the 2-pixel latent cells
    sampler = using(pipe, "pndm")
    alone = sampler(seeds=[0, 1], num_inference_steps=4, normal_image=normals[0], mask=region, output_type="np")
    each = sampler(seeds=[0, 1], num_inference_steps=4, normal_image=normals, mask=[region, region], output_type="np")
    assert np.array_equal(alone.images[0], each.images[0]) and np.array_equal(alone.masks[0], each.masks[0])
    drawn = 0
    for image, pair_mask, part, normal in zip(each.images, each.masks, each.parts, normals):
        assert np.array_equal(pair_mask, part_to_mask(part) & region)
        assert np.array_equal(image, part_onto(normal, part, pair_mask))
        assert np.array_equal(image[~pair_mask], normal[~pair_mask])
        drawn += int(pair_mask.any() and np.abs(image.astype(int) - normal)[pair_mask].mean() > 2)
    assert drawn >= 1  # a defect was drawn inside
    with pytest.raises(ValueError, match="go together"):
        pipe(seeds=[0], num_inference_steps=1, normal_image=normals[0])
    with pytest.raises(ValueError, match="one per pair"):
        pipe(seeds=[0], num_inference_steps=1, normal_image=normals, mask=region)


def test_lay_part_lays_each_parts_defect_onto_its_own_image_inside_its_mask_and_nowhere_else(pipe):
    drawn = using(pipe, "ddim")(seeds=[0, 1, 2, 3], num_inference_steps=3, output_type="np")
    laid = pipe(seeds=[0, 1, 2, 3], num_inference_steps=3, output_type="np", lay_part=True)
    original = pipe.generate_config
    pipe.generate_config = replace(original, lay_part=True)
    try:
        from_config = pipe(seeds=[0, 1, 2, 3], num_inference_steps=3, output_type="np")
    finally:
        pipe.generate_config = original  # the module's other tests share this pipeline
    changed = 0
    for k, (image, mask, part) in enumerate(zip(drawn.images, drawn.masks, drawn.parts)):
        assert np.array_equal(laid.parts[k], part) and np.array_equal(laid.masks[k], mask)
        assert np.array_equal(laid.images[k], part_onto(image, part, mask))
        assert np.array_equal(laid.images[k][~mask], image[~mask])
        assert np.array_equal(from_config.images[k], laid.images[k])
        changed += int(np.abs(laid.images[k].astype(int) - image)[mask].sum() > 0)
    assert changed >= 1  # some part's defect differed from what the global branch drew under the mask


def test_a_strength_below_one_starts_from_the_init_images_noised_to_that_share_of_the_schedule(pipe, synthetic_root, monkeypatch):
    image = resize_image(load_image(sorted((synthetic_root / "nut" / "train" / "good").glob("*.png"))[0]), 32)
    part = np.full_like(image, 128)
    part[10:18, 12:20] = 30
    calls = []
    monkeypatch.setattr(pipe, "guided_noise", lambda *args, wrapped=pipe.guided_noise: calls.append(args) or wrapped(*args))
    sampler = using(pipe, "ddim")  # 10 steps: timesteps 901, 801, ..., 1; DDIM does not scale its input
    sampler(seeds=[7], num_inference_steps=10, init_image=image, init_part=part, strength=0.35, output_type="np")
    assert [int(args[2]) for args in calls] == [301, 201, 101, 1]  # int(10 * 0.65) = 6 steps skipped
    with torch.inference_mode():
        clean = pipe.encode([image, part])
        assert torch.equal(clean, torch.cat([pipe.encode([image]), pipe.encode([part])]))  # no batch-size path
    draw = torch.randn((1, *clean.shape[1:]), generator=torch.Generator().manual_seed(7))  # shared by both rows
    alpha = pipe.scheduler.alphas_cumprod[301]
    expected = alpha.sqrt() * clean + (1 - alpha).sqrt() * draw
    torch.testing.assert_close(torch.cat([calls[0][0], calls[0][1]]), expected, atol=1e-5, rtol=1e-5)
    # strength 1 (as diffusers' img2img): every step, from the init images noised to the first one
    calls.clear()
    sampler(seeds=[7], num_inference_steps=10, init_image=image, init_part=part, output_type="np")
    assert [int(args[2]) for args in calls] == list(range(901, 0, -100))
    alpha = pipe.scheduler.alphas_cumprod[901]
    expected = alpha.sqrt() * clean + (1 - alpha).sqrt() * draw
    torch.testing.assert_close(torch.cat([calls[0][0], calls[0][1]]), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="strength 0"):
        sampler(seeds=[0], num_inference_steps=2, init_image=image, init_part=part, strength=0.0)
    with pytest.raises(ValueError, match="go together"):
        sampler(seeds=[0], num_inference_steps=2, init_image=image)


def test_shared_initial_noise_starts_both_rows_from_one_draw():
    """With one prompt, no SAIM/BCM and zero LoRA both rows are the same model: a shared draw gives
    identical image and part, independent draws do not."""
    from dualanodiff.model.base import tiny_random_base
    from dualanodiff.model.dual import DualAnoDiffModel

    cfg = ModelConfig(rank=4, text_rank=4, saim=False, bcm=False, global_prompt="sks", anomaly_prompt="sks")
    pipe = using(DualAnoDiffPipeline.from_model(DualAnoDiffModel(tiny_random_base(), cfg), [], device="cpu"), "ddim")
    shared = pipe(seeds=[3, 4], num_inference_steps=3, initial_noise="shared", output_type="np")
    independent = pipe(seeds=[3, 4], num_inference_steps=3, initial_noise="independent", output_type="np")
    assert all(np.array_equal(i, p) for i, p in zip(shared.images, shared.parts))
    assert all(np.abs(i.astype(int) - p).mean() > 5 for i, p in zip(independent.images, independent.parts))
    alone = pipe(seeds=[3], num_inference_steps=3, initial_noise="shared", output_type="np")
    assert np.array_equal(shared.images[0], alone.images[0])


def test_from_pretrained_then_load_adapters_is_from_run(tiny_run, pipe):
    loaded = DualAnoDiffPipeline.from_pretrained(  # the run's prompts are taken over
        "tiny-random", ModelConfig(rank=4, text_rank=4, global_prompt="other"), device="cpu", resolution=32,
    ).load_adapters(tiny_run)
    assert loaded.model.cfg.global_prompt == pipe.model.cfg.global_prompt
    assert loaded.generate_config == pipe.generate_config and loaded.background_names == pipe.background_names
    for p in (loaded, pipe):
        using(p, "ddim")
    a, b = (p(seeds=[2], num_inference_steps=2, output_type="np") for p in (loaded, pipe))
    assert np.array_equal(a.images[0], b.images[0]) and np.array_equal(a.parts[0], b.parts[0])
    other = DualAnoDiffPipeline.from_pretrained("tiny-random", ModelConfig(rank=8), device="cpu")
    with pytest.raises(UserError, match="model settings differ"):
        other.load_adapters(tiny_run)


def test_a_saved_pipeline_is_a_diffusers_pipeline_that_reloads_to_the_same_pairs_bit_for_bit(tiny_run, tmp_path):
    """save_pretrained -> from_pretrained keeps the base, adapters, settings, backgrounds and the swapped
    scheduler; the folder's base is a diffusers directory that `load_base_model` reads."""
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    pipe = DualAnoDiffPipeline.from_run(tiny_run, device="cpu")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe, DiffusionPipeline) and set(pipe.components) == {"model", "scheduler"}
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "DualAnoDiffPipeline" and index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert load_base_model(str(tmp_path / "saved" / "model")).resolution == pipe.resolution
    loaded = DualAnoDiffPipeline.from_pretrained(tmp_path / "saved", device="cpu")
    assert type(loaded.scheduler) is EulerDiscreteScheduler and loaded.generate_config == pipe.generate_config
    assert loaded.background_names == pipe.background_names and loaded.model.cfg == pipe.model.cfg
    before, after = (p(seeds=[0, 5], num_inference_steps=3, output_type="np") for p in (pipe, loaded))
    for key in ("images", "masks", "parts"):
        assert all(np.array_equal(a, b) for a, b in zip(getattr(before, key), getattr(after, key)))
    assert loaded.to("cpu", torch.float32) is loaded and loaded.device == torch.device("cpu")
    again = loaded(seeds=[0], num_inference_steps=3, output_type="np")
    assert np.array_equal(again.images[0], before.images[0])


def test_a_runs_refined_decoder_decodes_its_pairs_and_a_run_without_one_gets_the_base_decoder_back(tiny_run, pipe, tmp_path):
    refined = tmp_path / "refined"
    shutil.copytree(tiny_run, refined)
    weights = {name: value + 0.05 for name, value in decoder_state(tiny_random_base().vae).items()}
    save_decoder(weights, RunFolder(refined).decoder)
    loaded = DualAnoDiffPipeline.from_run(refined, device="cpu")
    assert all(torch.equal(value, weights[name]) for name, value in decoder_state(loaded.model.vae).items())
    using(loaded, "ddim")
    using(pipe, "ddim")
    plain = pipe(seeds=[2], num_inference_steps=2, output_type="np")
    decoded = loaded(seeds=[2], num_inference_steps=2, output_type="np")
    assert not np.array_equal(decoded.images[0], plain.images[0]) and not np.array_equal(decoded.parts[0], plain.parts[0])
    using(loaded.load_adapters(tiny_run), "ddim")  # loading takes the run's sampler too
    again = loaded(seeds=[2], num_inference_steps=2, output_type="np")
    assert np.array_equal(again.images[0], plain.images[0]) and np.array_equal(again.parts[0], plain.parts[0])


def test_the_generate_command_writes_exactly_the_pipelines_pairs(tiny_run, pipe, tmp_path):
    cfg = GenerateConfig(num=3, steps=2, scheduler="ddim", device="cpu", batch_size=2, filter=False, seed=10)
    summary = generate(tiny_run, tmp_path, cfg)
    # in generate's batches: floating-point kernels may round differently for another number of rows
    out = [using(pipe, "ddim")(seeds=s, num_inference_steps=2, guidance_scale=cfg.guidance, output_type="np")
           for s in ([10, 11], [12])]
    images, masks, parts = ([x for o in out for x in getattr(o, field)] for field in ("images", "masks", "parts"))
    rows = [json.loads(line) for line in (summary.folder / "manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [10, 11, 12]
    for row, image, mask, part in zip(rows, images, masks, parts, strict=True):
        assert np.array_equal(load_image(summary.folder / row["image"]), image)
        assert np.array_equal(load_mask(summary.folder / row["mask"]), mask)
        assert np.array_equal(load_image(summary.folder / row["part"]), part)
    assert Image.open(summary.folder / rows[0]["mask"]).mode == "L"
