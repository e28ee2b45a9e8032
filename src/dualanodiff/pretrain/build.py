"""`pretrain_base`: the stages in order, from the request to the exported, loadable base."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dualanodiff.errors import UserError
from dualanodiff.model.base import load_base_model
from dualanodiff.pretrain.export import _export, _record
from dualanodiff.pretrain.measure import _measure
from dualanodiff.pretrain.options import PRESETS, PretrainOptions
from dualanodiff.pretrain.run import _build_models, _render_data, _start_run
from dualanodiff.pretrain.sheets import _write_sheets
from dualanodiff.pretrain.stage import _raise_if_stopped
from dualanodiff.pretrain.unet import _train_unet
from dualanodiff.pretrain.vae import _encode_corpus, _refine_decoder, _train_vae
from dualanodiff.progress import Bars, no_bars
from dualanodiff.signals import deferred_signals


def pretrain_base(
    out: Path,
    steps_vae: int,
    steps_unet: int,
    resolution: int = 128,
    seed: int = 0,
    options: PretrainOptions = PRESETS["v1"].options,
    *,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    time_budget: float | None = None,
    workers: int = 1,
    preset: str | None = None,
    log: Callable[[str], None] = lambda message: None,
    bars: Bars = no_bars,
    steps_decoder: int = 0,
) -> dict:
    """Train the VAE, refine its decoder (`steps_decoder`), then train the UNet + text encoder; write the
    diffusers directory `out`; return training.json. With `options.init_from` the base's VAE is the start
    and either later stage may be skipped (0 steps).

    A re-run with `resume` continues from ``out/checkpoint/state.pt`` (written every
    `options.checkpoint_every` steps, at each stage's end, and at the step where SIGINT or SIGTERM stopped a
    stage, which then raises `Stopped`) and gives the same weights as an uninterrupted run; with more steps
    than before it trains on, with as many or fewer it only (re)exports.
    `time_budget` (seconds from this call): no training step starts later; measuring and export follow.
    `workers`: processes rendering the data. `preset`: the name recorded in training.json. `bars`: a
    bar per training stage ("VAE", "UNet") advanced at each step (`dualanodiff.progress`), beside the
    `log` lines every `options.log_every` steps.
    """
    out = Path(out)
    if options.init_from:
        if steps_unet < 0 or steps_decoder < 0 or steps_unet + steps_decoder < 1:
            raise UserError("--steps-unet/--steps-decoder: a warm start needs at least one step of either")
    elif steps_vae < 1 or steps_unet < 1:
        raise UserError("--steps-vae/--steps-unet: need at least one step of each (no VAE steps with init_from)")
    run = _start_run(out, resolution, seed, options, resume, force, device, time_budget, log)
    data = _render_data(run, resolution, seed, workers)
    models = _build_models(run, resolution, seed)
    scale = models.vae.config.scaling_factor
    with deferred_signals() as run.stop:
        if not options.init_from:  # a warm start keeps its base's VAE
            _train_vae(run, models, data, steps_vae, bars)
            _raise_if_stopped(run)
        _refine_decoder(run, models, data, steps_decoder, bars, options.vae_share if steps_unet else 1.0)
        _raise_if_stopped(run)
        if steps_unet:  # a warm start without UNet steps keeps its base's UNet and text encoder
            latents = _encode_corpus(run, models, data)
            scale = latents[2]
            _train_unet(run, models, data, latents, steps_unet, bars).copy_to(models.trainable())  # the EMA weights
            _raise_if_stopped(run)
    models.unet.eval()
    models.text_encoder.eval()
    figures, sheets = _measure(run, models, data, seed)
    _write_sheets(run, models, seed, sheets, figures["vae_psnr_db"])
    record = _record(run, models, data, scale, figures, preset, workers)
    _export(out, models, record, options)
    load_base_model(str(out))  # the directory must load the way users will load it
    return record
