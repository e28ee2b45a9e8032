"""DualAnoDiff on a stock diffusers UNet: the frozen base plus the trainable set, in one batched call.

The trainable set is one `DualBranchAttnProcessor` per UNet attention layer (two LoRA sets, SAIM, BCM
MLP and gamma), optionally per-branch LoRA on the feed-forward and ResNet layers (`lora_targets`), a
peft LoRA on the text encoder's attention projections shared by both prompts. Processors are registered
inside their `Attention` modules, so their parameters carry the layer's name: a saved key reads
``unet.<layer>.processor.lora.to_q.lora_A.global.weight``, ``unet.<layer>.conv1.lora_A.anomaly.weight``,
or ``text_encoder.<layer>.q_proj.lora_A.text.weight``::

    model = DualAnoDiffModel(load_base_model("tiny"), cfg.model)
    eps_global, eps_anomaly = model.predict_noise(x_global, x_anomaly, t, model.prompt_embeddings(2), x_background)
    model.save_trainable(run / "adapters.safetensors")
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save
from torch import nn
from transformers import CLIPTextModel

from dualanodiff.config import ModelConfig
from dualanodiff.errors import UserError
from dualanodiff.io import atomic_write_bytes
from dualanodiff.model.attention import (
    BranchLoRALayer,
    DualBranchAttnProcessor,
    RowLayout,
    attention_projections,
)
from dualanodiff.model.base import BaseModel

TEXT_ADAPTER = "text"
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def base_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state without the adapters: LoRA factors and attention processors dropped, peft's wrapped
    ``base_layer`` weights under their stock names."""
    adapter = (".lora_A.", ".lora_B.", ".processor.")
    return {name.replace(".base_layer.", "."): value for name, value in module.state_dict().items()
            if not any(part in name for part in adapter)}


class DualAnoDiffModel(nn.Module):
    """Frozen base (UNet, VAE, text encoder) with DualAnoDiff's trainable processors and text LoRA."""

    def __init__(self, base: BaseModel, cfg: ModelConfig):
        super().__init__()
        base.freeze()
        self.cfg = cfg
        self.base = base
        self.unet = base.unet
        self.vae = base.vae
        self.text_encoder = base.text_encoder
        self.layout = RowLayout()
        processors = {}
        for name, module in self.unet.named_modules():
            if isinstance(module, Attention):
                processors[f"{name}.processor"] = DualBranchAttnProcessor(
                    module, self.layout, cfg.rank, cfg.saim, cfg.bcm, cfg.bcm_variant, cfg.saim_init, cfg.saim_direction
                )
        self.processors = list(processors.values())
        self.unet.set_attn_processor(processors)  # pops the entries of `processors`
        for parent, child, layer in _extra_lora_layers(self.unet, cfg.lora_targets):
            setattr(parent, child, BranchLoRALayer(layer, self.layout, cfg.rank))
        if cfg.text_rank > 0:
            lora = LoraConfig(r=cfg.text_rank, lora_alpha=cfg.text_rank, target_modules=TEXT_TARGETS, init_lora_weights=True)
            inject_adapter_in_model(lora, self.text_encoder, adapter_name=TEXT_ADAPTER)
            for name, param in self.text_encoder.named_parameters():
                param.requires_grad_(f".{TEXT_ADAPTER}." in name)

    # --- the trainable set -----------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.named_parameters() if param.requires_grad}

    def save_trainable(self, path: Path) -> None:
        tensors = {name: t.float().contiguous().cpu() for name, t in self.trainable_state_dict().items()}
        atomic_write_bytes(Path(path), save(tensors, metadata={"format": "dualanodiff-adapters"}))

    def load_trainable(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: adapter weights not found; train first or pass the run folder it lives in")
        tensors = load_file(str(path))
        own = dict(self.named_parameters())
        expected = {name for name, param in own.items() if param.requires_grad}
        missing, unexpected = expected - set(tensors), set(tensors) - expected
        if missing or unexpected:
            raise UserError(
                f"{path}: weights do not match the run's model config ({len(missing)} missing, "
                f"{len(unexpected)} unexpected keys, e.g. {sorted(missing or unexpected)[0]}); use the config.yaml saved with them"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor)

    # --- the batched forward ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The frozen weights' device (as diffusers' models have it, which `DiffusionPipeline` reads)."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def save_base(self, directory: Path) -> None:
        """The base under the adapters as a diffusers directory that `load_base_model` reads: the UNet and text
        encoder without their LoRA layers and processors (with a fused category LoRA, as loaded), the VAE (with a
        refined decoder where one is loaded), the tokenizer and the training scheduler."""
        unet = UNet2DConditionModel.from_config(self.unet.config)
        unet.load_state_dict(base_weights(self.unet))
        text_encoder = CLIPTextModel(self.text_encoder.config)
        text_encoder.load_state_dict(base_weights(self.text_encoder))
        parts = {"unet": unet, "vae": self.vae, "text_encoder": text_encoder, "tokenizer": self.base.tokenizer,
                 "scheduler": self.base.scheduler}
        for name, part in parts.items():
            part.save_pretrained(Path(directory) / name)

    def prompt_embeddings(self, pairs: int, unconditional: bool = False) -> dict[str, torch.Tensor]:
        """Text states for `pairs` rows of each branch (empty prompts for classifier-free guidance)."""
        prompts = ("", "") if unconditional else (self.cfg.global_prompt, self.cfg.anomaly_prompt)
        encoded = self.encode_text(list(prompts))
        return {"global": encoded[:1].expand(pairs, -1, -1), "anomaly": encoded[1:].expand(pairs, -1, -1)}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.base.tokenizer
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def predict_noise(
        self,
        global_latents: torch.Tensor,
        anomaly_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        background_latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise predictions of both branches from ONE UNet call over [global | anomaly | background] rows.

        Row i of each block belongs to pair i and shares its timestep ``timesteps[i]``. Background rows
        (BCM's noised background latents) use the global prompt and adapter; their output is discarded.
        With ``bcm_background_grad: false`` and autograd on, they run first in a call of their own without
        autograd (same outputs; the layout stays set, as gradient checkpointing re-runs the paired call).
        """
        pairs = global_latents.shape[0]
        timesteps = timesteps.expand(pairs) if timesteps.ndim == 0 else timesteps
        blocks = [global_latents, anomaly_latents]
        states = [text["global"], text["anomaly"]]
        stored = background_latents is not None and not self.cfg.bcm_background_grad and torch.is_grad_enabled()
        if stored:
            self._store_background(background_latents, timesteps, text["global"])
        elif background_latents is not None:
            blocks.append(background_latents)
            states.append(text["global"])
        sample = torch.cat(blocks)
        self.layout.pairs = pairs
        self.layout.background = len(blocks) == 3
        self.layout.stored_background = stored
        out = self.unet(sample, timesteps.repeat(len(blocks)), encoder_hidden_states=torch.cat(states).to(sample.dtype)).sample
        return out[:pairs], out[pairs : 2 * pairs]

    @torch.no_grad()
    def _store_background(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> None:
        """A UNet call over the background rows alone (global adapter) in which BCM layers keep their source."""
        self.layout.pairs, self.layout.background, self.layout.stored_background = 0, False, False
        self.layout.store_background = True
        try:
            self.unet(latents, timesteps, encoder_hidden_states=text.to(latents.dtype))
        finally:
            self.layout.store_background = False

    def forward(
        self,
        global_latents: torch.Tensor,
        anomaly_latents: torch.Tensor,
        timesteps: torch.Tensor,
        background_latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward (what accelerate/DDP wraps): prompts encoded with the text LoRA, then one UNet call."""
        text = self.prompt_embeddings(global_latents.shape[0])
        return self.predict_noise(global_latents, anomaly_latents, timesteps, text, background_latents)

    @contextmanager
    def capturing_attention(self):
        """Collect the anomaly rows' cross-attention maps of every layer while the block runs."""
        for processor in self.processors:
            processor.attention_maps.clear()
        self.layout.capture_attention = True
        try:
            yield self.processors
        finally:
            self.layout.capture_attention = False

    @contextmanager
    def merged_adapters(self):
        """Sampling with each branch's LoRA folded into its UNet layers' weights (`DualLoRA.merge`): the
        same outputs up to rounding, at the frozen UNet's cost per row. Leave it before changing the adapters."""
        adapted = []
        for module in self.unet.modules():
            if isinstance(module, BranchLoRALayer):
                adapted.append((module, module.base_layer))
            elif isinstance(module, Attention):
                adapted += [(module.processor.lora[name], layer) for name, layer in attention_projections(module).items()]
        for lora, layer in adapted:
            lora.merge(layer)
        try:
            yield
        finally:
            for lora, _ in adapted:
                lora.unmerge()

    def gammas(self) -> list[float]:
        return [float(p.bcm.gamma) for p in self.processors if p.bcm is not None]


def _extra_lora_layers(unet: nn.Module, targets: str) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, layer) of the UNet layers beyond attention that `lora_targets` adapts:
    the transformer blocks' feed-forward linears (``ff``) and the ResNet blocks' two convolutions (``conv``)."""
    from diffusers.models.resnet import ResnetBlock2D

    found = []
    for name, module in unet.named_modules():
        if "ff" in targets and name.endswith(".ff.net"):
            found += [(module[0], "proj", module[0].proj), (module, "2", module[2])]
        if "conv" in targets and isinstance(module, ResnetBlock2D):
            found += [(module, "conv1", module.conv1), (module, "conv2", module.conv2)]
    return found
