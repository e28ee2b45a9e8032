"""The diffusers directory a run writes (fp16 or fp32 weights in bounded shards) and its training.json."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from dualanodiff.io import atomic_write_text
from dualanodiff.model.base import base_folder, sd_scheduler
from dualanodiff.pretrain import stage
from dualanodiff.pretrain.data import Data
from dualanodiff.pretrain.options import PretrainOptions
from dualanodiff.pretrain.run import Models, _Run
from dualanodiff.pretrain.sheets import sample_prompts
from dualanodiff.synthetic import FAMILIES, HELD_OUT, WORLD_MIX

BASE_FILES = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _storage_copy(module: torch.nn.Module, storage: str) -> torch.nn.Module:
    """The module as it is saved: a copy with fp16 parameters, or the module itself for fp32."""
    if storage == "fp32":
        return module
    copied = copy.deepcopy(module)
    for tensor in list(copied.parameters()) + list(copied.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float16)
    return copied


def _export(out: Path, models: Models, record: dict, options: PretrainOptions) -> None:
    """Stage 5: write the diffusers directory into a temporary folder, then move each component into `out`."""
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shard = options.shard_mib * 2**20
    _storage_copy(models.unet, options.storage).save_pretrained(tmp / "unet", safe_serialization=True, max_shard_size=shard)
    _storage_copy(models.vae, options.storage).save_pretrained(tmp / "vae", safe_serialization=True, max_shard_size=shard)
    _storage_copy(models.text_encoder, options.storage).save_pretrained(tmp / "text_encoder", safe_serialization=True,
                                                                        max_shard_size=shard)
    models.tokenizer.save_pretrained(tmp / "tokenizer")
    sd_scheduler().save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": record["versions"]["diffusers"],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    atomic_write_text(tmp / "model_index.json", json.dumps(index, indent=2) + "\n")
    for name in BASE_FILES[:-1]:
        shutil.rmtree(out / name, ignore_errors=True)
        (tmp / name).rename(out / name)
    (tmp / "model_index.json").replace(out / "model_index.json")
    tmp.rmdir()
    atomic_write_text(out / "training.json", json.dumps(record, indent=2) + "\n")


def _base_record(spec: str) -> dict | None:
    """The training.json of the base `spec` ('tiny' or a directory), if it has one."""
    path = base_folder(spec) / "training.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _record(run: _Run, models: Models, data: Data, scale: float, figures: dict, preset: str | None,
            workers: int) -> dict:
    import diffusers
    import transformers

    opts = run.options
    history = run.history
    device = run.device
    return {
        "what": "the project's small Stable-Diffusion-shaped base model, pretrained by `dualanodiff pretrain-base`",
        "preset": preset,
        "settings": run.settings,
        "steps": dict(run.steps),
        "planned_steps": dict(run.plans),
        "stopped_early": dict(run.stopped),
        "parameters": {"unet": _count(models.unet), "vae": _count(models.vae), "text_encoder": _count(models.text_encoder)},
        "storage": opts.storage,
        "compute": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": "bf16 autocast" if run.mixed else "fp32",
            "torch_threads": torch.get_num_threads(),
            "render_workers": workers,
            "time_budget_s": None if run.deadline is None else round(run.deadline - run.started, 1),
        },
        "data": {
            "source": "dualanodiff.synthetic.world_item (stream 0: training, 1: held out, 2: the held-out category)",
            "families": {name: sorted(FAMILIES[name].defects) for name in opts.families},
            "held_out_category": HELD_OUT,
            "mix": WORLD_MIX,
            "part_and_background": "I*M and (1 - M_f)*I taken in [-1, 1]: mid-grey (128) where multiplied away",
            "augmentation": "random flip / quarter turn; colour jitter (saturation, hue, contrast, brightness) on 30%",
            "train_images": opts.train_images,
            "heldout_images": opts.heldout_images,
            "empty_caption_share": opts.empty_caption,
            "caption_examples": data.train.captions[:8],
        },
        "latent_scaling_factor": scale,
        "seconds": history["seconds"],
        "wall_seconds": round(stage._now() - run.started, 1),
        "seconds_per_step": {
            "vae": history["seconds"].get("vae", 0.0) / max(run.steps["vae"], 1),
            "unet": history["seconds"].get("unet", 0.0) / max(run.steps["unet"], 1),
            "decoder": history["seconds"].get("decoder", 0.0) / max(run.steps["decoder"], 1),
        },
        "losses": {"vae": history["vae_loss"], "unet": history["unet_loss"], "decoder": history["decoder_loss"]},
        # a warm start's provenance: the training.json of the base it started from
        "init_from_record": _base_record(opts.init_from) if opts.init_from else None,
        "heldout": figures,
        "samples": {"scheduler": "DDIM", "steps": opts.sample_steps, "guidance": opts.guidance,
                    "rows": sample_prompts(opts.families)},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }
