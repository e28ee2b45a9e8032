"""What both benchmark scripts share: the base models, devices and precisions, memory peaks, the results table.

`--config tiny` is the embedded base (128 px, 32x32 latents) that runs on a CPU; `--config sd15` is Stable
Diffusion 1.5's UNet / VAE / CLIP text encoder architecture with random weights, for GPU runs (speed and
memory do not depend on the weights, and the package downloads no weights); `test` is the random test-size
base (32 px), for checking a benchmark's whole path in seconds.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dualanodiff.devices import cast_frozen
from dualanodiff.io import atomic_write_text
from dualanodiff.model.base import BaseModel, build_tokenizer, load_base_model, sd_scheduler, tiny_random_base

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CONFIGS = ("tiny", "sd15", "test")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


def build_base(config: str, seed: int = 0, meta: bool = False) -> BaseModel:
    """The frozen base of a benchmark configuration (random weights for sd15, seeded).

    `meta`: weights on the meta device (shapes only, nothing allocated), for counting FLOPs.
    """
    if config in ("tiny", "test"):
        base = load_base_model("tiny") if config == "tiny" else tiny_random_base()
        for part in (base.unet, base.vae, base.text_encoder):
            part.to("meta" if meta else "cpu")
        return base
    if meta:
        with torch.device("meta"):
            base = build_base(config, seed)
        base.scheduler = sd_scheduler()  # its noise schedule must hold real numbers
        return base
    tokenizer = build_tokenizer(max_length=77)  # our small vocabulary; ids stay below SD's 49408
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **special))
    return BaseModel(unet, vae, text_encoder, tokenizer, sd_scheduler(), resolution=512).freeze()


def parameter_counts(base: BaseModel) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(base, name).parameters()) for name in ("unet", "vae", "text_encoder")}


def limit_threads(device: torch.device, threads: int) -> None:
    """CPU runs default to one thread: on a shared machine, oversubscribed intra-op threads spin and make
    a step several times slower and far noisier than a single thread does."""
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
    elif threads:
        torch.set_num_threads(threads)


def autocast(device: torch.device, dtype: str):
    """fp32 runs without autocast; bf16/fp16 autocast as accelerate's mixed precision does."""
    return nullcontext() if DTYPES[dtype] is None else torch.autocast(device.type, dtype=DTYPES[dtype])


def place(module: torch.nn.Module, device: torch.device, dtype: str) -> torch.nn.Module:
    """Move to the device; frozen weights in half precision, trainable ones fp32 (as training.py does)."""
    module.to(device)
    return module if DTYPES[dtype] is None else cast_frozen(module, DTYPES[dtype])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory(device: torch.device) -> None:
    """Hand freed memory back (glibc's heap pages, CUDA's cached blocks), so that the next peak starts clean."""
    gc.collect()
    try:  # glibc keeps freed heap pages; hand them back so the next resident-set baseline is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory of a block, in MiB, in `self.mib`.

    CUDA: `torch.cuda.max_memory_allocated` since the block began (everything allocated on the GPU), or with
    `growth` only what the block adds above what was allocated when it began (models built inside it count,
    models held from before do not). CPU: growth of the process's resident set above its level at the
    block's start, sampled every 2 ms; a rough figure (allocator caching), but comparable between blocks run
    the same way.
    """

    def __init__(self, device: torch.device, growth: bool = False):
        self.device = device
        self.growth = growth
        self.mib = float("nan")

    def __enter__(self) -> PeakMemory:
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) if self.growth else 0
            return self
        self._start = self._peak = _resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _resident_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _resident_bytes())
        self.mib = (self._peak - self._start) / 2**20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, str]:
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def _table(lines: list[str], section: str) -> tuple[int, int]:
    """Indices of the first (header) and last line of the table under `## <section>`."""
    heading = lines.index(f"## {section}")
    first = next(i for i in range(heading, len(lines)) if lines[i].startswith("|"))
    last = first
    while last + 1 < len(lines) and lines[last + 1].startswith("|"):
        last += 1
    return first, last


def table_header(section: str) -> list[str]:
    """The header and separator lines of RESULTS.md's table under `## <section>`."""
    lines = RESULTS.read_text().splitlines()
    first, _ = _table(lines, section)
    return lines[first : first + 2]


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def append_row(section: str, cells: list[str]) -> None:
    """Add a row to the table under `## <section>` in RESULTS.md (after that table's last row)."""
    lines = RESULTS.read_text().splitlines()
    _, last = _table(lines, section)
    lines.insert(last + 1, markdown_row(cells))
    atomic_write_text(RESULTS, "\n".join(lines) + "\n")

