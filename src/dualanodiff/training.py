"""Few-shot training of DualAnoDiff on one defect type (paper eq. 4/6), resumable bit-exactly.

Targets per training pair, computed in ``[-1, 1]`` space: the image ``I``, the anomaly part ``I * M``
(mid-grey outside the defect) and the background ``(1 - M_f) * I`` (mid-grey on the object). Their VAE
latent distributions are encoded once for every flip variant; each step draws pairs, latents, the
timestep (shared by a pair's rows) and the noise (independent per row, as in the paper) from one seeded
`torch.Generator` whose state is checkpointed
with the optimizer, so an interrupted and resumed run equals an uninterrupted one. Data-parallel
(``accelerate launch``, ``torchrun``): every process draws the same global batch and trains on its share.

Prompts may name the category and the defect (``a {object} with {defect}``); training fills them in and
saves the filled prompts in the run's config.

It writes a run folder (`dualanodiff.runs.RunFolder`): config.yaml with the few-shot split's file stems,
adapters.safetensors, loss.csv/loss.png (step, loss_global, loss_anomaly and loss_anomaly_defect: the
anomaly branch's error on the defect's latent cells alone), backgrounds/ and the last `KEEP_CHECKPOINTS`
checkpoints.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from dualanodiff.category import (
    CATEGORY_LR,
    CATEGORY_RANK,
    CategoryOptions,
    adapt_to_category,
    fuse_category,
    save_category,
)
from dualanodiff.config import Config, ModelConfig, TrainConfig, validated
from dualanodiff.data import (
    Category,
    Pair,
    few_shot_split,
    load_image,
    load_mask,
    open_category,
    with_marked_masks,
)
from dualanodiff.decoder import DECODER_LR, refine_decoder, save_decoder
from dualanodiff.devices import DTYPES, cast_frozen, resolve_device
from dualanodiff.errors import OtherSettings, UserError, describe_changes
from dualanodiff.images import (
    as_batch,
    resize_image,
    resize_mask,
    to_model_range,
    to_uint8,
)
from dualanodiff.io import atomic_write_bytes, atomic_write_text, save_png
from dualanodiff.masks import foreground_mask
from dualanodiff.model.base import BaseModel, load_base_model
from dualanodiff.model.dual import DualAnoDiffModel
from dualanodiff.progress import Bars, CostEstimate, no_bars
from dualanodiff.runs import RunFolder
from dualanodiff.signals import Stopped, deferred_signals

PROMPT_OPTIONS = ("global_prompt", "anomaly_prompt")  # may name the category and defect
LOSS_COLUMNS = ("step", "loss_global", "loss_anomaly", "loss_anomaly_defect")
WEIGHT_DECAY, MAX_GRAD_NORM = 1e-2, 1.0  # AdamW's, and the gradient clipping's (official)
KEEP_CHECKPOINTS = 2


@dataclass
class TrainingSet:
    """VAE latent distributions of the few-shot targets: (examples, 3 targets, C, h, w) mean and std, and
    each example's defect share per latent cell, (examples, 1, h, w)."""

    mean: torch.Tensor
    std: torch.Tensor
    defect_cells: torch.Tensor
    stems: list[str]
    backgrounds: list[np.ndarray]  # (1 - M_f) * I at training size, uint8, one per pair
    pictures: list[np.ndarray]  # I and I * M of each pair at training size, uint8 (the decoder refinement's)

    def sample(self, indices: torch.Tensor, generator: torch.Generator, scaling: float) -> torch.Tensor:
        noise = torch.randn(self.mean[indices].shape, generator=generator)
        return (self.mean[indices] + self.std[indices] * noise) * scaling


def training_targets(image: np.ndarray, mask: np.ndarray, foreground: np.ndarray) -> torch.Tensor:
    """(3, 3, H, W) in [-1, 1]: image I, anomaly part I*M, background (1-M_f)*I."""
    pixels = to_model_range(image)
    part = pixels * torch.from_numpy(mask).float()
    background = pixels * (1 - torch.from_numpy(foreground).float())
    return torch.stack([pixels, part, background])


def flip_variants(targets: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    """The official augmentation: random horizontal and vertical flips, enumerated once."""
    if not flips:
        return [targets]
    return [targets, targets.flip(-1), targets.flip(-2), targets.flip(-1, -2)]


@torch.no_grad()
def encode_training_set(
    model: DualAnoDiffModel, pairs: list[Pair], kind: str, resolution: int, flips: bool, u2net: str = ""
) -> TrainingSet:
    variants, masks, backgrounds, pictures = [], [], [], []
    for pair in pairs:
        image = load_image(pair.image)
        mask = load_mask(pair.mask, image.shape[:2])
        fg = foreground_mask(image, kind, u2net or None)
        image, mask, fg = resize_image(image, resolution), resize_mask(mask, resolution), resize_mask(fg, resolution)
        targets = training_targets(image, mask, fg)
        backgrounds.append(to_uint8(targets[2]))
        pictures += [to_uint8(targets[0]), to_uint8(targets[1])]
        variants += flip_variants(targets, flips)
        masks += flip_variants(torch.from_numpy(mask).float()[None], flips)
    means, stds = [], []
    for targets in variants:
        dist = model.vae.encode(targets.to(model.vae.device, model.vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    cells = F.adaptive_avg_pool2d(torch.stack(masks), means[0].shape[-2:])
    return TrainingSet(torch.stack(means), torch.stack(stds), cells, [p.stem for p in pairs], backgrounds, pictures)


def fill_prompt(template: str, category: str, defect: str, kind: str) -> str:
    """A prompt template with ``{object}`` and ``{defect}`` filled in from the dataset's names.

    >>> fill_prompt("a {object} with {defect}", "metal_nut", "scratch_neck", "object")
    'a metal nut with scratch neck'

    A texture category is named as the embedded base's captions name it, "a carpet texture".
    """
    name = category.replace("_", " ") + (" texture" if kind == "texture" else "")
    return template.replace("{object}", name).replace("{defect}", defect.replace("_", " "))


def filled_prompts(model: ModelConfig, category: Category, defect: str) -> ModelConfig:
    """`model` with its prompt options filled in (`fill_prompt`), as a run saves them."""
    return dataclasses.replace(model, **{
        option: fill_prompt(getattr(model, option), category.root.name, defect, category.kind) for option in PROMPT_OPTIONS
    })


def check_trained_with(run: RunFolder, cfg: Config) -> None:
    """Refuse (`OtherSettings`) to continue or reuse `run` with model settings other than those it was trained
    with: `train --resume`, run-all and the demo ask here. The saved prompts were filled in by training, so
    ``cfg``'s are filled in the same way first: a recipe's "a {object} with {defect}" is the run's "a nut with crack"."""
    wanted = filled_prompts(cfg.model, open_category(cfg.data.data), cfg.data.defect)
    changes = describe_changes(dataclasses.asdict(run.load_config().model), dataclasses.asdict(wanted))
    if changes:
        raise OtherSettings(
            f"{run.config}: this run was trained with other model settings ({changes}); keep the run's settings, "
            "or start over in another --out (or delete the run)"
        )


def anomaly_losses(prediction: torch.Tensor, target: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The anomaly branch's training loss (MSE) and its MSE on the defect's latent cells alone (for loss.csv, which
    tells recipes apart where the plain losses do not; nan when no cell is defect)."""
    error = (prediction.float() - target) ** 2
    cells = cells.to(error.device)
    defect = (error * cells).sum() / (cells.sum() * error.shape[1])
    return error.mean(), defect.detach()


def prepare_run(cfg: Config, out: Path, resume: bool, force: bool) -> Config:
    """Check the run folder: a fresh one, an existing run to resume (with its own settings, `check_trained_with`;
    one without a checkpoint starts over with ``cfg``'s), or one to replace with --force."""
    out = Path(out)
    existing = out.exists() and any(out.iterdir())
    run = RunFolder(out)
    if resume:
        if not run.is_run():
            raise UserError(f"{out}: no run to resume here (config.yaml missing); drop --resume to start one")
        if run.latest_checkpoint() is None:  # stopped before its first checkpoint: nothing to keep, start over
            shutil.rmtree(out)
            return cfg
        check_trained_with(run, cfg)
        saved = run.load_config()
        saved.train.steps = cfg.train.steps
        return saved
    if existing and not force:
        raise UserError(f"{out}: a run already exists here; pass --resume to continue it or --force to replace it")
    if existing:
        shutil.rmtree(out)
    return cfg


def read_loss_rows(path: Path, up_to: int) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to]


def write_loss(out: Path, rows: list[dict]) -> None:
    """loss.csv (atomic) and loss.png: the per-step losses of both branches."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, LOSS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(RunFolder(out).loss_csv, buffer.getvalue())
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for key, label in (("loss_global", "global branch"), ("loss_anomaly", "anomaly branch")):
        values = np.array([float(r[key]) for r in rows])
        window = max(1, len(values) // 20)
        ax.plot(steps, values, alpha=0.25)
        ax.plot(steps, np.convolve(values, np.ones(window) / window, mode="same"), label=f"{label} (moving mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE on noise")
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    atomic_write_bytes(RunFolder(out).loss_png, image.getvalue())


def save_checkpoint(out: Path, model: DualAnoDiffModel, optimizer, generators: list[torch.Tensor], step: int, keep: int) -> Path:
    """Write checkpoints/step-N atomically (temporary folder, then rename) and prune old ones."""
    run = RunFolder(out)
    folder = run.checkpoint(step)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_trainable(tmp / run.CHECKPOINT_ADAPTERS)
    torch.save(optimizer.state_dict(), tmp / run.OPTIMIZER)
    torch.save({"step": step, "generators": generators}, tmp / run.STATE)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    for old in run.all_checkpoints()[:-keep]:
        shutil.rmtree(old)
    return folder


def _on_main_process(accelerator, work: Callable[[], Config]) -> Config:
    """Run `work` (which may delete or read the run folder) on the main process only; every process gets
    its result or its `UserError`."""
    from accelerate.utils import broadcast_object_list

    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome = [work()]
        except UserError as exc:
            outcome = [exc]
    broadcast_object_list(outcome)
    if isinstance(outcome[0], UserError):
        raise outcome[0]
    return outcome[0]


def make_accelerator(mixed_precision: str, device: str):
    """A fresh Accelerator for each run: accelerate keeps process-wide state, yet one process may train
    several runs with different precisions (demo ablations, tests). A launched process group is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    resolved = resolve_device(device)
    if resolved.index is not None:
        raise UserError(f"--device {device}: training takes auto, cpu or cuda; pick GPUs with CUDA_VISIBLE_DEVICES")
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    return Accelerator(mixed_precision=mixed_precision, cpu=resolved.type == "cpu")  # multi-process CPU needs cpu=True


def trainable_model(base: BaseModel, train_cfg: TrainConfig, model_cfg, device: torch.device) -> DualAnoDiffModel:
    """The dual model on the training device, frozen parts cast to the mixed-precision dtype."""
    model = DualAnoDiffModel(base, model_cfg)
    if train_cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.to(device)
    if train_cfg.mixed_precision != "no":
        cast_frozen(model, DTYPES[train_cfg.mixed_precision])
    return model


def few_shot_pairs(cfg: Config, log: Callable[[str], None]) -> tuple[list[Pair], str, list[Path]]:
    """The defect type's few-shot training pairs, the category's foreground kind and its `train/good` images;
    records the split in `cfg.split` and fills the category and defect names into the prompts."""
    category = open_category(cfg.data.data)
    if cfg.data.defect not in category.defects:
        raise UserError(
            f"--defect {cfg.data.defect!r}: not a defect type of {category.root}; choose one of {sorted(category.defects)}"
        )
    train_pairs, test_pairs = few_shot_split(category.defects[cfg.data.defect], cfg.data.split_rounding)
    train_pairs = with_marked_masks(train_pairs, cfg.data.allow_empty_masks, log)
    cfg.model = filled_prompts(cfg.model, category, cfg.data.defect)
    cfg.split = {"train": [p.stem for p in train_pairs], "test": [p.stem for p in test_pairs]}
    kind = category.kind if cfg.data.foreground == "auto" else cfg.data.foreground
    return train_pairs, kind, category.train_good


def make_optimizer(model: DualAnoDiffModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable set (the official settings: `WEIGHT_DECAY`, a constant learning rate)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel: one pass over all tensors, the cheaper optimizer step (docs/performance.md)
    fused = all(p.device.type in ("cpu", "cuda") for p in trainable) or None
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=WEIGHT_DECAY, fused=fused)


def training_noise(shape: torch.Size, generator: torch.Generator, cfg: TrainConfig) -> torch.Tensor:
    """The noise of a batch of pairs (B, rows, C, h, w): standard normal, plus `cfg.noise_offset` times a
    constant per row and channel (offset noise: the low frequencies a few-shot model must move to learn colours
    the base rarely draws)."""
    noise = torch.randn(shape, generator=generator)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn(shape[:3] + (1, 1), generator=generator)
    return noise


def batch_losses(ddp_model, data: TrainingSet, generator: torch.Generator, cfg: Config, base: BaseModel, accelerator):
    """One batch drawn from `generator` (pairs, latents, shared timestep, noise) and its losses:
    (total, global, anomaly, anomaly on the defect's cells). Every process draws the global batch (P
    processes x ``train.batch_size``) and keeps its share, so P processes train what one process does with
    the global batch: the all-reduced gradient is that batch's mean."""
    scheduler = base.scheduler
    rank, processes, size = accelerator.process_index, accelerator.num_processes, cfg.train.batch_size
    indices = torch.randint(len(data.mean), (processes * size,), generator=generator)
    latents = data.sample(indices, generator, base.vae.config.scaling_factor)  # (P * B, 3, C, h, w)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(indices),), generator=generator)
    noise = training_noise(latents.shape, generator, cfg.train)
    share = slice(rank * size, (rank + 1) * size)
    indices, latents, timesteps, noise = indices[share], latents[share], timesteps[share], noise[share]
    noisy = _add_noise(scheduler, latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else _velocity(scheduler, latents, noise, timesteps)
    device = accelerator.device
    with accelerator.autocast():
        eps_global, eps_anomaly = ddp_model(
            noisy[:, 0].to(device), noisy[:, 1].to(device), timesteps.to(device),
            noisy[:, 2].to(device) if cfg.model.bcm else None,
        )
        loss_global = F.mse_loss(eps_global.float(), target[:, 0].to(device))
        loss_anomaly, loss_defect = anomaly_losses(eps_anomaly, target[:, 1].to(device), data.defect_cells[indices])
    return loss_global + loss_anomaly, loss_global, loss_anomaly, loss_defect


def train(
    cfg: Config,
    out: Path,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int, dict], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
    bars: Bars = no_bars,
) -> Path:
    """Train on the few-shot split of `cfg.data.defect`; returns the run folder. See the module docstring.
    `progress` hears of each training step; the decoder's refinement, before them, draws its own bar of `bars`."""
    cfg = validated(cfg, "config")
    out = Path(out)
    run = RunFolder(out)
    resumed = resume and run.latest_checkpoint() is not None
    settings = run.load_config().train if resumed else cfg.train  # a resumed run keeps its own
    accelerator = make_accelerator(settings.mixed_precision, settings.device)
    main = accelerator.is_main_process  # under `accelerate launch` only the main process writes and logs
    log = log if main else (lambda message: None)
    cfg = _on_main_process(accelerator, lambda: prepare_run(cfg, out, resume, force))
    train_pairs, kind, normals = few_shot_pairs(cfg, log)
    base = run_base(cfg, run, main)
    adapt_base(base, cfg, normals, kind, run, accelerator, log, bars)
    # an fp32 copy, taken before mixed precision casts the frozen parts; none once the run has its decoder
    refining = cfg.train.decoder_steps > 0 and main and not run.decoder.is_file()
    vae = copy.deepcopy(base.vae).to(accelerator.device) if refining else None
    model = trainable_model(base, cfg.train, cfg.model, accelerator.device)
    data = encode_training_set(model, train_pairs, kind, cfg.data.resolution, cfg.data.flips, cfg.data.u2net_weights)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg.train)
    generator = torch.Generator().manual_seed(cfg.train.seed)  # the same global batches on every process
    last_good = run.latest_checkpoint() if resume else None
    step, rows = resumed_state(run, last_good, cfg.train.steps, model, optimizer, generator, accelerator, log)
    if main:
        save_run_inputs(run, cfg, data)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    report = step_reporter(progress if main else None, cfg.train.steps, step, log)

    def checkpoint_now() -> Path:
        generators = gather_object([generator.get_state()])  # every process's RNG, for an exact resume
        if main:
            write_loss(out, rows)
            save_checkpoint(out, model, optimizer, generators, step, KEEP_CHECKPOINTS)
        accelerator.wait_for_everyone()
        return run.checkpoint(step)

    with deferred_signals() as stop:
        # the other processes wait here for the main process's refinement, and stop with it
        stopped = agreed_stop(refine_run_decoder(vae, cfg, data, normals, run, stop, log, bars) if vae is not None else 0, accelerator)
        if stopped:
            raise Stopped(stopped, "while refining the decoder (nothing kept); continue with --resume")
        model.train()
        try:
            while step < cfg.train.steps:
                stopped = agreed_stop(stop(), accelerator)  # at one step on every process, or the gather hangs
                if stopped:
                    break
                loss, *parts = batch_losses(ddp_model, data, generator, cfg, base, accelerator)
                mean_losses = accelerator.reduce(torch.stack(parts).detach(), "mean")  # global, anomaly, defect
                if not torch.isfinite(mean_losses[:2]).all():  # decided on the mean, so all processes stop together
                    diverged(out, rows if main else None, mean_losses, step, last_good)
                apply_gradients(loss, params, optimizer, accelerator)
                step += 1
                losses = dict(zip(LOSS_COLUMNS[1:], mean_losses.tolist()))
                rows.append({"step": step, **{k: f"{v:.6f}" for k, v in losses.items()}})
                if step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                    last_good = checkpoint_now()
                report(step, losses)
        except KeyboardInterrupt:  # raised by a callback (the signals themselves stop between steps)
            if step > 0:
                checkpoint_now()
                log(f"interrupted at step {step}; checkpoint saved, continue with --resume")
            raise
        checkpoint_now()
        if stopped:  # saved at a step boundary
            raise Stopped(stopped, f"at step {step} of {cfg.train.steps}; checkpoint saved, continue with --resume")
        if main:
            model.save_trainable(run.adapters)
        accelerator.wait_for_everyone()
    return out


def run_base(cfg: Config, run: RunFolder, main: bool) -> BaseModel:
    """The run's base model, its resolution settled in `cfg` (the base's own unless set); the main process saves the
    run's config.yaml from here, so that a stop while adapting continues with --resume."""
    torch.manual_seed(cfg.train.seed)
    base = load_base_model(cfg.model.base_model)
    cfg.data.resolution = cfg.data.resolution or base.resolution
    if cfg.data.resolution % (8 * base.vae_scale_factor):
        raise UserError(f"data.resolution {cfg.data.resolution}: must be a multiple of {8 * base.vae_scale_factor}")
    if main and not run.is_run():
        cfg.to_yaml(run.config)
    return base


def resumed_state(run: RunFolder, checkpoint: Path | None, steps: int, model, optimizer, generator, accelerator,
                  log: Callable[[str], None]) -> tuple[int, list[dict]]:
    """The step and loss rows to go on from: `checkpoint`'s, its weights, optimizer and RNG loaded, or a fresh start."""
    step, rows = 0, []
    if checkpoint is not None:
        step, rows = load_checkpoint(run, checkpoint, model, optimizer, generator, accelerator.process_index,
                                     accelerator.num_processes)
        log(f"resuming {run.root} from step {step}")
    if step >= steps:
        raise UserError(f"{run.root}: already trained for {step} steps; pass a larger --steps to continue")
    return step, rows


def save_run_inputs(run: RunFolder, cfg: Config, data: TrainingSet) -> None:
    """The run's settings and the few-shot backgrounds BCM reads at generation."""
    cfg.to_yaml(run.config)
    for stem, background in zip(data.stems, data.backgrounds):
        save_png(run.backgrounds / f"{stem}.png", background)


def apply_gradients(loss: torch.Tensor, params: list[torch.Tensor], optimizer, accelerator) -> None:
    """Backward, clipping at `MAX_GRAD_NORM` (official), the optimizer's step."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_reporter(progress: Callable[[int, int, dict], None] | None, steps: int, start: int,
                  log: Callable[[str], None]) -> Callable[[int, dict], None]:
    """What hears of each step: `progress`, and a `CostEstimate` of the steps left (the paper's 5000 on a CPU)."""
    estimate = CostEstimate(steps - start, log, f"training ({steps - start} steps)", "train.steps (--steps) shortens it")

    def report(step: int, losses: dict) -> None:
        estimate.advance()
        if progress is not None:
            progress(step, steps, losses)

    return report


def agreed_stop(stopped: int, accelerator) -> int:
    """A stop signal's number as every process sees it: the largest over processes, so all stop together."""
    if accelerator.num_processes == 1:
        return stopped
    return int(accelerator.reduce(torch.tensor(stopped, device=accelerator.device), "max").item())


def diverged(out: Path, rows: list[dict] | None, losses: torch.Tensor, step: int, last_good: Path | None) -> NoReturn:
    """Stop on a loss that is not finite, keeping the losses so far (`rows`: the main process's, else None)."""
    if rows is not None:
        write_loss(out, rows)
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    raise UserError(f"{out}: loss became {losses[:2].sum().item()} at step {step + 1}; stopped, {where}; "
                    "lower train.lr or use fp32")


def adapt_base(base: BaseModel, cfg: Config, normals: list[Path], kind: str, run: RunFolder, accelerator,
               log: Callable[[str], None], bars: Bars = no_bars) -> None:
    """Fuse the run's category LoRA into `base` where `train.category_steps` asks for one (`dualanodiff.category`),
    training it first on the main process unless the run already has it (a resumed run). Every process fuses
    the saved file on the host, so all hold the same weights as `DualAnoDiffPipeline.from_run` later does."""
    if not cfg.train.category_steps:
        return
    with deferred_signals() as stop:
        if accelerator.is_main_process and not run.category.is_file():
            # named as the prompts name it: "a metal nut", and a texture "magnetic tile texture"
            caption = fill_prompt("{object}" if kind == "texture" else "a {object}", Path(cfg.data.data).name, "", kind)
            log(f"adapting the base to the category: {cfg.train.category_steps} steps on {len(normals)} normal images "
                f"under {caption!r}")
            options = CategoryOptions(cfg.train.category_steps, CATEGORY_RANK, CATEGORY_LR, cfg.train.batch_size,
                                      cfg.train.noise_offset, cfg.train.seed)
            start = time.perf_counter()
            parts = (base.unet, base.vae, base.text_encoder)
            for part in parts:
                part.to(accelerator.device)
            weights = adapt_to_category(base, normal_pictures(normals, cfg.data.resolution), caption, options, stop, bars)
            for part in parts:
                part.to("cpu")
            if weights is not None:
                save_category(weights, CATEGORY_RANK, run.category)
                log(f"category adaptation: {time.perf_counter() - start:.0f} s")
        stopped = stop()
        if accelerator.num_processes > 1:  # the others wait for the main process's adaptation, and stop with it
            stopped = int(accelerator.reduce(torch.tensor(stopped, device=accelerator.device), "max").item())
        if stopped:
            raise Stopped(stopped, "while adapting the base to the category; continue with --resume")
    fuse_category(base.unet, run.category)


def normal_pictures(normals: list[Path], resolution: int) -> torch.Tensor:
    """The category's `train/good` images at training size, as one uint8 batch."""
    return as_batch([resize_image(load_image(path), resolution) for path in normals])


def refine_run_decoder(vae, cfg: Config, data: TrainingSet, normals: list[Path], run: RunFolder,
                       stop: Callable[[], int], log: Callable[[str], None], bars: Bars = no_bars) -> int:
    """`decoder.refine_decoder` on the category's `normals` and the few-shot images and parts, written to the
    run's decoder.safetensors; returns the signal that stopped it (0 when done, and nothing written else)."""
    images = torch.cat([normal_pictures(normals, cfg.data.resolution), as_batch(data.pictures)])
    log(f"refining the VAE decoder on {len(normals)} normal and {len(data.pictures)} few-shot images "
        f"({cfg.train.decoder_steps} steps)")
    weights = refine_decoder(vae, images, cfg.train.decoder_steps, DECODER_LR, cfg.train.seed, stop, bars)
    if weights is None:
        return stop()
    save_decoder(weights, run.decoder)
    return 0


def load_checkpoint(run: RunFolder, checkpoint: Path, model: DualAnoDiffModel, optimizer, generator: torch.Generator,
                    rank: int, processes: int) -> tuple[int, list[dict]]:
    """Restore the trainable set, optimizer and this process's random state; return the step and loss rows."""
    model.load_trainable(checkpoint / run.CHECKPOINT_ADAPTERS)
    optimizer.load_state_dict(torch.load(checkpoint / run.OPTIMIZER, map_location="cpu"))
    state = torch.load(checkpoint / run.STATE, map_location="cpu")
    if len(state["generators"]) != processes:
        raise UserError(
            f"{checkpoint}: saved by {len(state['generators'])} process(es), resumed with {processes}; "
            "resume with the same number of processes"
        )
    generator.set_state(state["generators"][rank])
    return state["step"], read_loss_rows(run.loss_csv, state["step"])


def _add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion of all targets of a pair at the pair's timestep."""
    flat_t = timesteps.repeat_interleave(latents.shape[1])
    return scheduler.add_noise(latents.flatten(0, 1), noise.flatten(0, 1), flat_t).view_as(latents)


def _velocity(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    flat_t = timesteps.repeat_interleave(latents.shape[1])
    return scheduler.get_velocity(latents.flatten(0, 1), noise.flatten(0, 1), flat_t).view_as(latents)
