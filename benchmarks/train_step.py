"""Training-step time and peak memory: the DualAnoDiff step against a plain LoRA step and an official-style step.

One training step = forward + MSE loss + backward + gradient clipping + AdamW step, on latents already
noised (as `dualanodiff.training` does after its one-off VAE encoding). Four steps are compared:

- ``dual``: `DualAnoDiffModel.forward` with the run defaults: global + anomaly + background rows in one UNet
  call, per-branch LoRA (rank 32), SAIM, BCM, text-encoder LoRA;
- ``dual_no_bcm``: the same without BCM (no background rows), to show what the background rows cost;
- ``plain``: the stock UNet with one peft LoRA (`unet.add_adapter`, rank 32, q/k/v/out) on the same
  2 x batch images (the dual step's global + anomaly rows), frozen text encoder, as diffusers' LoRA script;
- ``official``: the official code's structure, built here only as a reference: a separate UNet pass over the
  background rows first that stores each layer's BCM states, then the main pass in which every attention
  layer runs the global and anomaly rows in separate calls in a Python loop and SAIM loops as well. It
  shares the dual model's parameters and is checked to compute the same noise predictions.

``--cuts`` instead compares the full form of the dual step (``dual_full``: ``bcm_background_grad: true``)
with it plus its FLOP cut ``dual_bg_nograd`` (``model.bcm_background_grad: false``, the default), in time and
FLOPs.

Times are measured in one process, interleaved (one step of each variant per round, rotating the order),
after warm-up; the ratios are medians of per-round ratios. Peak memory is what each variant adds while it
is built and stepped twice (on a GPU: allocated bytes above those the variants built before it hold).
Prints JSON and appends a row to RESULTS.md::

    python benchmarks/train_step.py --config tiny
    python benchmarks/train_step.py --config sd15 --device cuda --dtype bf16 --gradient-checkpointing
    python benchmarks/train_step.py --config tiny --cuts dual_bg_nograd
    python benchmarks/train_step.py --config sd15 --cuts --flops
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import CONFIGS, DTYPES, PeakMemory, append_row, autocast, build_base, environment, parameter_counts
from _common import limit_threads, place, release_memory, timed
from diffusers.models.attention_processor import Attention
from peft import LoraConfig
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dualanodiff.config import ModelConfig
from dualanodiff.devices import resolve_device
from dualanodiff.model.attention import DualBranchAttnProcessor
from dualanodiff.model.base import BaseModel
from dualanodiff.model.dual import DualAnoDiffModel

VARIANTS = ("dual", "dual_no_bcm", "plain", "official")
FULL = "dual_full"  # the dual step with no FLOP cut (the paper's form): what the cuts are measured against
CUTS = ("dual_bg_nograd",)  # the full form with one FLOP cut
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# --- the official-style reference -------------------------------------------------------------------------


class LoopedBranchProcessor(nn.Module):
    """The official code's way of computing a DualAnoDiff attention layer, on the dual processor's parameters.

    Called with ``pairs`` rows, it is the background pass: global LoRA, and a BCM layer stores its source
    states. Called with ``2 * pairs`` rows, it is the main pass: a loop over the two branches (one attention
    call each, BCM on the global branch's K/V), then SAIM with a loop over the branches. The pass is told
    apart by the row count, not by a flag, so that gradient checkpointing's re-computation stays right.
    Covers the UNet's transformer attention (no group/spatial norm, no attention mask), which is all it is used on.
    """

    def __init__(self, dual: DualBranchAttnProcessor, pairs: list[int]):
        super().__init__()
        self.dual = dual
        self.pairs = pairs  # shared one-element list: the current pair count
        self.stored: torch.Tensor | None = None

    def _linear(self, attn: Attention, name: str, x: torch.Tensor, adapter: str) -> torch.Tensor:
        layer = attn.to_out[0] if name == "to_out" else getattr(attn, name)
        lora = self.dual.lora[name]
        return layer(x) + lora.lora_B[adapter](lora.lora_A[adapter](x))

    def _attention(self, attn: Attention, x: torch.Tensor, context: torch.Tensor, adapter: str) -> torch.Tensor:
        query, key, value = (self._linear(attn, n, s, adapter) for n, s in (("to_q", x), ("to_k", context), ("to_v", context)))
        rows, heads = query.shape[0], attn.heads
        query, key, value = (t.view(rows, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value)
        return out.transpose(1, 2).reshape(rows, -1, out.shape[1] * out.shape[-1])

    def _interact(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """SAIM with one projection call per branch and the 2-token softmax written out per reading branch
        (both, or only the anomaly branch for ``saim_direction: to_anomaly``)."""
        saim = self.dual.saim
        tokens = [saim.proj_in(saim.norm(o)) for o in outs]
        key, value = ([proj(t) for t in tokens] for proj in (saim.to_k, saim.to_v))
        scale = key[0].shape[-1] ** -0.5
        readers = range(1, len(outs)) if saim.direction == "to_anomaly" else range(len(outs))
        mixed = [outs[0]] if saim.direction == "to_anomaly" else []
        for i in readers:
            query = saim.to_q(tokens[i])
            weights = torch.stack([(query * key[j]).sum(-1) * scale for j in range(len(outs))], -1).softmax(-1)
            blend = sum(weights[..., j : j + 1] * value[j] for j in range(len(outs)))
            mixed.append(outs[i] + saim.to_out(blend))
        return mixed

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        pairs = self.pairs[0]
        residual = hidden_states
        batch, channel, height, width = hidden_states.shape if hidden_states.ndim == 4 else (0, 0, 0, 0)
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        bcm = self.dual.bcm
        if hidden_states.shape[0] == pairs:  # background pass
            out = self._attention(attn, hidden_states, context, "global")
            if bcm is not None:
                self.stored = hidden_states if bcm.variant == "official" else out
            outs = [attn.to_out[1](self._linear(attn, "to_out", out, "global"))]
        else:  # main pass: one attention call per branch
            outs = []
            for branch, adapter in enumerate(("global", "anomaly")):
                rows = hidden_states[branch * pairs : (branch + 1) * pairs]
                keys_from = context[branch * pairs : (branch + 1) * pairs]
                if bcm is not None and branch == 0 and self.stored is not None:
                    keys_from = bcm(rows, self.stored)
                out = self._attention(attn, rows, keys_from, adapter)
                outs.append(attn.to_out[1](self._linear(attn, "to_out", out, adapter)))
            if self.dual.saim is not None:
                outs = self._interact(outs)
        out = torch.cat(outs)
        if batch:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def official_style(model: DualAnoDiffModel) -> Callable:
    """Swap the model's processors for looped ones; returns forward(global, anomaly, t, background)."""
    pairs = [0]
    looped = {
        name: LoopedBranchProcessor(processor, pairs) for name, processor in model.unet.attn_processors.items()
    }
    model.unet.set_attn_processor(looped)

    def forward(global_latents, anomaly_latents, timesteps, background_latents=None):
        pairs[0] = global_latents.shape[0]
        text = model.prompt_embeddings(pairs[0])
        unet = model.unet
        if background_latents is not None:  # the separate background pass; only its stored states are used
            with torch.set_grad_enabled(torch.is_grad_enabled() and model.cfg.bcm_background_grad):
                unet(background_latents, timesteps, encoder_hidden_states=text["global"]).sample
        sample = torch.cat([global_latents, anomaly_latents])
        states = torch.cat([text["global"], text["anomaly"]])
        out = unet(sample, timesteps.repeat(2), encoder_hidden_states=states).sample
        return out[: pairs[0]], out[pairs[0] :]

    return forward


# --- the variants -----------------------------------------------------------------------------------------


def variant_config(name: str) -> ModelConfig:
    """The model options of a dual-model variant: the defaults (``dual``, ``official``), ``dual_no_bcm``, the
    full form ``dual_full`` (no FLOP cut), or the full form with its cut: ``dual_bg_nograd``."""
    full = ModelConfig(bcm_background_grad=True)
    if name == "dual_no_bcm":
        return ModelConfig(bcm=False)
    if name == FULL:
        return full
    if name == "dual_bg_nograd":
        return dataclasses.replace(full, bcm_background_grad=False)
    if name in ("dual", "official"):
        return ModelConfig()
    raise ValueError(f"unknown variant {name!r}")


@dataclasses.dataclass
class Variant:
    step: Callable[[], torch.Tensor]  # one training step; returns the (detached) loss
    module: nn.Module  # keeps the model alive while the variant is in use


def build_variant(name: str, base: BaseModel, inputs: dict, device, dtype: str, checkpointing: bool) -> Variant:
    base = copy.deepcopy(base)
    if name == "plain":
        module, forward = _plain(base)
    else:
        model = DualAnoDiffModel(base, variant_config(name))
        module, forward = model, official_style(model) if name == "official" else model
    place(module, device, dtype)
    if checkpointing:
        base.unet.enable_gradient_checkpointing()
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-2)
    noisy, noise, timesteps = inputs["noisy"], inputs["noise"], inputs["timesteps"]
    background = None if name in ("plain", "dual_no_bcm") else noisy[2]

    def step() -> torch.Tensor:
        with autocast(device, dtype):
            eps_global, eps_anomaly = forward(noisy[0], noisy[1], timesteps, background)
            loss = F.mse_loss(eps_global.float(), noise[0]) + F.mse_loss(eps_anomaly.float(), noise[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Variant(step, module)


def _plain(base: BaseModel) -> tuple[nn.Module, Callable]:
    """diffusers' LoRA fine-tuning step: peft LoRA on the UNet, frozen text encoder run every step."""
    base.unet.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    module = nn.ModuleDict({"unet": base.unet, "text_encoder": base.text_encoder, "vae": base.vae})
    tokenizer = base.tokenizer
    cfg = ModelConfig()
    ids = tokenizer([cfg.global_prompt, cfg.anomaly_prompt], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids

    def forward(global_latents, anomaly_latents, timesteps, background_latents=None):
        pairs = global_latents.shape[0]
        with torch.no_grad():
            text = base.text_encoder(ids.to(global_latents.device))[0]
        states = torch.cat([text[:1].expand(pairs, -1, -1), text[1:].expand(pairs, -1, -1)])
        sample = torch.cat([global_latents, anomaly_latents])
        out = base.unet(sample, timesteps.repeat(2), encoder_hidden_states=states).sample
        return out[:pairs], out[pairs:]

    return module, forward


def make_inputs(base: BaseModel, batch: int, device) -> dict:
    """Noised latents of the three targets (global, anomaly, background), their noise, and the timesteps."""
    generator = torch.Generator().manual_seed(0)
    size = base.unet.config.sample_size
    latents = torch.randn(3, batch, 4, size, size, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(1000, (batch,), generator=generator)
    noisy = base.scheduler.add_noise(latents.flatten(0, 1), noise.flatten(0, 1), timesteps.repeat(3)).view_as(latents)
    return {"noisy": noisy.to(device), "noise": noise.to(device), "timesteps": timesteps.to(device)}


@torch.no_grad()
def official_matches_dual(base: BaseModel, inputs: dict, device) -> float:
    """Max |difference| of the noise predictions, official-style vs dual, with random trainable weights (fp32)."""
    dual = DualAnoDiffModel(copy.deepcopy(base), ModelConfig())
    generator = torch.Generator().manual_seed(1)
    for param in dual.parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    official = DualAnoDiffModel(copy.deepcopy(base), ModelConfig())
    official.load_state_dict(dual.state_dict())
    forward = official_style(official.to(device))
    args = [t[:1] for t in (inputs["noisy"][0], inputs["noisy"][1], inputs["timesteps"], inputs["noisy"][2])]
    return max((a - b).abs().max().item() for a, b in zip(dual.to(device)(*args), forward(*args)))


def step_flops(base: BaseModel, batch: int, names: tuple[str, ...] = VARIANTS) -> dict[str, int]:
    """Forward + backward FLOPs of one step per variant, counted on the meta device (nothing is computed)."""
    meta = torch.device("meta")
    inputs = make_inputs(base, batch, meta)
    flops = {}
    for name in names:
        variant = build_variant(name, base, inputs, meta, "fp32", checkpointing=False)
        with FlopCounterMode(display=False) as counter:
            variant.step()
        flops[name] = counter.get_total_flops()
    return flops


# --- measurement ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp32, or bf16/fp16 autocast")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step (official: 4)")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds (0: 20 for sd15, else 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: 1 on a CPU, torch's default on a GPU)")
    parser.add_argument("--check", action="store_true", help="only build the models and print their sizes")
    parser.add_argument("--flops", action="store_true", help="count each step's FLOPs on the meta device instead of timing")
    parser.add_argument("--cuts", nargs="?", const=",".join(CUTS), default="",
                        help=f"compare the dual step with these FLOP-cut variants instead (default: {','.join(CUTS)})")
    parser.add_argument("--no-record", action="store_true", help="do not append the row to RESULTS.md")
    return parser.parse_args(argv)


def model_sizes(config: str) -> dict:
    base = build_base(config)
    trainable = {n: p.numel() for n, p in DualAnoDiffModel(copy.deepcopy(base), ModelConfig()).named_parameters() if p.requires_grad}
    parts = {part: sum(v for n, v in trainable.items() if f".{part}." in n) for part in ("lora", "saim", "bcm", "text")}
    return {"config": config, "resolution": base.resolution, "frozen_parameters": parameter_counts(base),
            "trainable_parameters": parts}


def built_with_peaks(
    names: tuple[str, ...], base: BaseModel, inputs: dict, device, dtype: str, checkpointing: bool
) -> tuple[dict[str, Variant], dict[str, float]]:
    """The variants, each built and stepped twice in turn, and the peak memory (MiB) each adds over the ones
    built before it (its weights, optimizer state and activations); nan, and left out, where it runs out of
    GPU memory. Building each once for both figures halves a GPU run's building time."""
    variants, peak = {}, {}
    for name in names:
        variant = None
        try:
            with PeakMemory(device, growth=True) as memory:
                variant = build_variant(name, base, inputs, device, dtype, checkpointing)
                for _ in range(2):
                    variant.step()
            variants[name], peak[name] = variant, memory.mib
        except torch.OutOfMemoryError:
            variant, peak[name] = None, math.nan
        release_memory(device)
    return variants, peak


def interleaved_times(
    variants: dict[str, Variant], repeats: int, device, warmup: int = 1, deadline: float = math.inf
) -> dict[str, list[float]]:
    """Seconds of each step, one step of each variant per round with the order rotated every round, after
    `warmup` untimed steps each. A variant that runs out of GPU memory in warm-up is left out; rounds stop
    once `time.monotonic()` passes `deadline` (a GPU run's time cap)."""
    for name in list(variants):
        try:
            for _ in range(warmup):
                variants[name].step()
        except torch.OutOfMemoryError:
            del variants[name]
            release_memory(device)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        if time.monotonic() > deadline:
            break
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            times[name].append(timed(variants[name].step, device))
    return times


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median of the per-round ratios a/b (nan when either was not measured)."""
    pairs = list(zip(times.get(a, []), times.get(b, [])))
    return statistics.median(x / y for x, y in pairs) if pairs else math.nan


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def measure_steps(
    args: argparse.Namespace, device: torch.device, base: BaseModel | None = None, deadline: float = math.inf
) -> dict:
    """Peak memory of each of the four variants, then interleaved step times of all of them."""
    repeats = args.repeats or (20 if args.config == "sd15" else 10)
    base = base or build_base(args.config)
    inputs = make_inputs(base, args.batch_size, device)
    max_diff = official_matches_dual(base, inputs, device)
    release_memory(device)
    variants, peak = built_with_peaks(VARIANTS, base, inputs, device, args.dtype, args.gradient_checkpointing)
    times = interleaved_times(variants, repeats, device, args.warmup, deadline)
    del variants
    release_memory(device)
    return {
        **environment(device),
        "config": args.config, "batch_size": args.batch_size, "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing, "repeats": min(map(len, times.values()), default=0),
        "rows": {"dual": 3 * args.batch_size, "dual_no_bcm": 2 * args.batch_size, "plain": 2 * args.batch_size,
                 "official": f"{args.batch_size} + {2 * args.batch_size} (two UNet calls)"},
        "seconds_per_step": {name: median_or_nan(times.get(name, [])) for name in VARIANTS},
        "peak_memory_mib": peak,
        "ratios": {"dual/plain": median_ratio(times, "dual", "plain"),
                   "dual_no_bcm/plain": median_ratio(times, "dual_no_bcm", "plain"),
                   "official/dual": median_ratio(times, "official", "dual")},
        "official_vs_dual_max_abs_diff": max_diff,
    }


def _setting(result: dict) -> str:
    return f"{result['config']} b{result['batch_size']} {result['dtype']}{' ckpt' if result['gradient_checkpointing'] else ''}"


def steps_row(result: dict) -> list[str]:
    """The "Training step" table's row of a `measure_steps` result."""
    s, r, m = result["seconds_per_step"], result["ratios"], result["peak_memory_mib"]
    return [
        result["date"], result["device"], result["torch"], _setting(result),
        *(f"{s[n]:.3f}" for n in VARIANTS), *(f"{v:.2f}" for v in r.values()),
        *(f"{m[n]:.0f}" for n in VARIANTS), str(result["repeats"]),
    ]


def measure_flops(args: argparse.Namespace) -> dict:
    flops = step_flops(build_base(args.config, meta=True), args.batch_size)
    return {
        "date": environment(torch.device("cpu"))["date"], "config": args.config, "batch_size": args.batch_size,
        "tflop_per_step": {name: value / 1e12 for name, value in flops.items()},
        "ratios": {"dual/plain": flops["dual"] / flops["plain"], "dual_no_bcm/plain": flops["dual_no_bcm"] / flops["plain"],
                   "official/dual": flops["official"] / flops["dual"]},
    }


def flops_row(result: dict) -> list[str]:
    return [
        result["date"], f"{result['config']} b{result['batch_size']}",
        *(f"{result['tflop_per_step'][n]:.3g}" for n in VARIANTS), *(f"{v:.2f}" for v in result["ratios"].values()),
    ]


def measure_cuts(
    args: argparse.Namespace, device: torch.device, base: BaseModel | None = None, deadline: float = math.inf,
    flops: bool = True,
) -> dict:
    """The full form against each FLOP cut: FLOPs (meta device) unless `flops` is false, and, unless
    ``args.flops``, peak memory and interleaved step times on `device`."""
    cuts = tuple(args.cuts.split(","))
    names = (FULL, *cuts)
    for name in cuts:
        variant_config(name)  # an unknown name fails before anything is built
    result = {"date": environment(device)["date"], "config": args.config, "batch_size": args.batch_size, "cuts": cuts}
    if flops:
        counted = step_flops(build_base(args.config, meta=True), args.batch_size, names)
        result["tflop_per_step"] = {name: value / 1e12 for name, value in counted.items()}
    if args.flops:
        return result
    repeats = args.repeats or (20 if args.config == "sd15" else 10)
    base = base or build_base(args.config)
    inputs = make_inputs(base, args.batch_size, device)
    variants, peak = built_with_peaks(names, base, inputs, device, args.dtype, args.gradient_checkpointing)
    times = interleaved_times(variants, repeats, device, args.warmup, deadline)
    del variants
    release_memory(device)
    return result | environment(device) | {
        "dtype": args.dtype, "gradient_checkpointing": args.gradient_checkpointing,
        "repeats": min(map(len, times.values()), default=0),
        "seconds_per_step": {name: median_or_nan(times.get(name, [])) for name in names},
        "time_ratios": {name: median_ratio(times, name, FULL) for name in cuts},
        "peak_memory_mib": peak,
    }


def cut_rows(result: dict) -> list[list[str]]:
    """The "FLOP cuts" table's rows of a `measure_cuts` result, one per cut ("–" for what was not measured)."""
    timed_ = "seconds_per_step" in result
    flops = result.get("tflop_per_step")
    rows = []
    for cut in result["cuts"]:
        if timed_:
            s, m = result["seconds_per_step"], result["peak_memory_mib"]
            measured = [result["device"], result["torch"], _setting(result), cut, f"{s[FULL]:.3f}", f"{s[cut]:.3f}",
                        f"{result['time_ratios'][cut]:.2f}", f"{m[FULL]:.0f}", f"{m[cut]:.0f}"]
        else:
            measured = ["– (FLOPs only)", "–", f"{result['config']} b{result['batch_size']}", cut, "–", "–", "–", "–", "–"]
        counted = [f"{flops[FULL]:.3g}", f"{flops[cut]:.3g}", f"{flops[cut] / flops[FULL]:.2f}"] if flops else ["–"] * 3
        rows.append([result["date"], *measured, *counted, str(result.get("repeats", "–"))])
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    limit_threads(device, args.threads)
    if args.check:
        result = model_sizes(args.config)
    elif args.cuts:
        result = measure_cuts(args, device)
    elif args.flops:
        result = measure_flops(args)
    else:
        result = measure_steps(args, device)
    print(json.dumps(result, indent=2))
    if args.no_record or args.check:
        return result
    if args.cuts:
        for row in cut_rows(result):
            append_row("FLOP cuts", row)
    else:
        append_row(*(("Training FLOPs", flops_row(result)) if args.flops else ("Training step", steps_row(result))))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
