"""The paper's additions as one diffusers attention processor per attention layer of a stock UNet.

A UNet batch is laid out as ``[global | anomaly | background]`` sub-batches of ``P`` rows each (the
background block may be absent). ``RowLayout`` tells every processor ``P`` for the current call. Each
processor then, in one call:

- applies the *global* LoRA to global and background rows and the *anomaly* LoRA to anomaly rows, on
  the q, k, v and out projections (peft cannot mix adapters in one training batch); for sampling,
  `DualLoRA.merge` folds each adapter into a copy of its layer's weight;
- BCM (self-attention only, paper eq. 5): adds ``gamma * MLP(b)`` to the global rows' states from which
  K and V are computed (Q keeps the unmodified states); ``b`` is the background rows' self-attention
  output at this layer (``paper``) or their input states with interpolation (``official``). Without
  autograd through the background (``bcm_background_grad: false``), a no-grad call over the background
  rows alone first keeps each BCM layer's ``b`` (``store_background``), and the paired call reads it
  (``stored_background``) instead of carrying background rows;
- SAIM (paper eq. 3): after the attention, every spatial position's global and anomaly tokens form a
  2-token sequence that attends over itself; the result is added back as a residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

GAMMA_INIT = 0.1  # BCM's gamma at step 0 (the paper)


@dataclass
class RowLayout:
    """How many (global, anomaly) pairs the current UNet call holds, and whether background rows follow."""

    pairs: int = 0
    background: bool = False
    capture_attention: bool = False  # store anomaly rows' cross-attention probabilities (for masks)
    store_background: bool = False  # this call holds background rows only: BCM layers keep their source states
    stored_background: bool = False  # BCM layers read the states kept by the last storing call


class DualLoRA(nn.Module):
    """Two LoRA adapters for one linear (or convolution) layer; keys follow peft (`lora_A.<adapter>.weight`).

    For a convolution, A is a convolution of the layer's own kernel, stride and padding into ``rank``
    channels and B a 1x1 convolution back, as in peft's Conv2d LoRA. The scale alpha / rank is 1 (alpha = rank,
    as the official scripts keep it).
    """

    ADAPTERS = ("global", "anomaly")

    def __init__(self, in_features: int, out_features: int, rank: int, conv: nn.Conv2d | None = None):
        super().__init__()

        def down() -> nn.Module:
            if conv is None:
                return nn.Linear(in_features, rank, bias=False)
            return nn.Conv2d(in_features, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)

        def up() -> nn.Module:
            return nn.Linear(rank, out_features, bias=False) if conv is None else nn.Conv2d(rank, out_features, 1, bias=False)

        self.lora_A = nn.ModuleDict({a: down() for a in self.ADAPTERS})
        self.lora_B = nn.ModuleDict({a: up() for a in self.ADAPTERS})
        for adapter in self.ADAPTERS:
            nn.init.kaiming_uniform_(self.lora_A[adapter].weight, a=5**0.5)
            nn.init.zeros_(self.lora_B[adapter].weight)  # step 0 is the base model
        self.merged: dict[str, torch.Tensor] | None = None  # per adapter W + B A, while merged

    def adapted(self, layer: nn.Linear | nn.Conv2d, x: torch.Tensor, pairs: int) -> torch.Tensor:
        """`layer`'s output with each row's LoRA, for rows laid out as [global | anomaly | background].

        Merged (and without autograd, which merged weights do not carry), each branch's rows go through
        `layer` with its merged weight: the base layer's cost instead of a low-rank path on top of it.
        """
        if self.merged is None or torch.is_grad_enabled():
            return layer(x) + self._by_branch(self._delta, x, pairs)
        return self._by_branch(lambda adapter, rows: _with_weight(layer, rows, self.merged[adapter]), x, pairs)

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B[adapter](self.lora_A[adapter](x))

    @staticmethod
    def _by_branch(run, x: torch.Tensor, pairs: int) -> torch.Tensor:
        """`run(adapter, rows)` on each branch's rows, reassembled in the rows' order."""
        if pairs == 0:  # plain batch: global adapter everywhere
            return run("global", x)
        anomaly = run("anomaly", x[pairs : 2 * pairs])
        glob = run("global", torch.cat([x[:pairs], x[2 * pairs :]]))
        return torch.cat([glob[:pairs], anomaly, glob[pairs:]])

    @torch.no_grad()
    def merge(self, layer: nn.Linear | nn.Conv2d) -> None:
        """Fold each adapter into a copy of `layer`'s weight, W + B A (computed in fp32), for sampling.

        A convolution's A has the layer's kernel, stride and padding and B is 1x1, so B A is one kernel of
        the layer's shape. Undo with `unmerge`; the merged copies go stale if the adapters change meanwhile.
        """
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError(f"{layer}: merging LoRA into a grouped convolution is not supported")
        weight = layer.weight.float()
        self.merged = {}
        for adapter in self.ADAPTERS:
            down, up = self.lora_A[adapter].weight.float(), self.lora_B[adapter].weight.float()
            product = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) if down.ndim == 4 else up @ down
            self.merged[adapter] = (weight + product).to(layer.weight.dtype)

    def unmerge(self) -> None:
        self.merged = None


def _with_weight(layer: nn.Linear | nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`layer` applied to `x` with another weight of its shape (its bias, stride and padding kept)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


def attention_projections(attn: Attention) -> dict[str, nn.Linear]:
    """The projections of an attention layer that carry LoRA, by the names its adapters are saved under."""
    return {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out": attn.to_out[0]}


class BranchLoRALayer(DualLoRA):
    """A frozen UNet linear or convolution (feed-forward, ResNet) with one LoRA per branch on its rows.

    Replaces the layer in its parent, peft-style: the frozen layer becomes ``<name>.base_layer``, the
    adapters ``<name>.lora_A.<branch>`` / ``<name>.lora_B.<branch>``.
    """

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, layout: RowLayout, rank: int):
        if isinstance(base_layer, nn.Conv2d):
            super().__init__(base_layer.in_channels, base_layer.out_channels, rank, conv=base_layer)
        else:
            super().__init__(base_layer.in_features, base_layer.out_features, rank)
        self.base_layer = base_layer
        self.layout = [layout]  # a list keeps the shared layout out of the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapted(self.base_layer, x, self.layout[0].pairs)


class SelfAttentionInteraction(nn.Module):
    """SAIM: per-position 2-token attention between the global and anomaly rows (one head).

    Full width, as the paper. ``init="official"`` keeps nn.Linear's default init on every projection, as
    the reference code does, so the branches are coupled from step 0; ``"zero"`` starts the output
    projection at zero (the identity at step 0), which was measured to leave the branches uncoupled
    after a few hundred few-shot steps. ``direction="to_anomaly"`` (ours) updates only the anomaly
    rows: the part image reads the whole image, while the whole image is never pulled toward the flat
    part image (measured on the embedded base: a two-way SAIM at lr 1e-3 turns the global branch's
    nuts into grey texture within 300 steps).
    """

    def __init__(self, dim: int, init: str = "official", direction: str = "both"):
        super().__init__()
        self.direction = direction
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim, bias=False)  # a bias shared by both tokens cancels in the softmax
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        if init == "zero":
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden_states: torch.Tensor, pairs: int) -> torch.Tensor:
        paired = hidden_states[: 2 * pairs]
        x = self.proj_in(self.norm(paired))  # per token: no need to regroup the rows into 2-token sequences
        # the rows that read from their pair: both (paper), or only the anomaly rows (`to_anomaly`)
        start = pairs if self.direction == "to_anomaly" else 0
        q = self.to_q(x[start:]).unflatten(0, (-1, pairs))  # (readers, P, L, W)
        k, v = (proj(x).unflatten(0, (2, pairs)) for proj in (self.to_k, self.to_v))  # (2, P, L, W)
        # a softmax over the two tokens (global, anomaly) is the sigmoid of the logit difference
        weight = torch.sigmoid((q * (k[0] - k[1])).sum(-1, keepdim=True) * q.shape[-1] ** -0.5)
        update = self.to_out((v[1] + weight * (v[0] - v[1])).flatten(0, 1))
        return torch.cat([paired[:start], paired[start:] + update, hidden_states[2 * pairs :]])


class BackgroundCompensation(nn.Module):
    """BCM: MLP of the background rows' states (as wide as the layer), scaled by a learnable gamma (starting at
    `GAMMA_INIT`, the paper's 0.1), fed to global K/V."""

    def __init__(self, dim: int, variant: str = "paper"):
        super().__init__()
        self.variant = variant
        if variant == "official":  # two linear layers without activation, as in the reference code
            self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Linear(dim, dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gamma = nn.Parameter(torch.tensor(GAMMA_INIT))

    def forward(self, global_states: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        injected = self.gamma * self.mlp(background)
        if self.variant == "official":
            return (1 - self.gamma) * global_states + injected
        return global_states + injected


class DualBranchAttnProcessor(nn.Module):
    """Stock scaled-dot-product attention plus per-branch LoRA, BCM and SAIM (see module docstring)."""

    def __init__(
        self,
        attn: Attention,
        layout: RowLayout,
        rank: int,
        saim: bool,
        bcm: bool,
        bcm_variant: str = "paper",
        saim_init: str = "official",
        saim_direction: str = "both",
    ):
        super().__init__()
        self.layout = [layout]  # a list keeps the shared layout out of the module tree
        self.is_cross = attn.is_cross_attention
        self.lora = nn.ModuleDict(
            {
                name: DualLoRA(layer.in_features, layer.out_features, rank)
                for name, layer in attention_projections(attn).items()
            }
        )
        dim = attn.to_out[0].out_features
        self.saim = SelfAttentionInteraction(dim, saim_init, saim_direction) if saim else None
        self.bcm = (
            BackgroundCompensation(attn.to_q.in_features, bcm_variant)
            if bcm and not self.is_cross
            else None
        )
        self.attention_maps: list[torch.Tensor] = []
        self.background_source: torch.Tensor | None = None  # BCM's detached `b`, kept by a storing call

    def _project(self, attn: Attention, name: str, x: torch.Tensor, pairs: int) -> torch.Tensor:
        return self.lora[name].adapted(attention_projections(attn)[name], x, pairs)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        layout = self.layout[0]
        pairs = layout.pairs
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        if self.bcm is not None and (layout.background or layout.stored_background) and pairs:
            out = self._attend_with_background(attn, hidden_states, attention_mask, pairs, layout.stored_background)
        else:
            query = self._project(attn, "to_q", hidden_states, pairs)
            out = self._attend(attn, query, context, attention_mask, pairs, capture=self.is_cross and layout.capture_attention)
            if self.bcm is not None and layout.store_background:
                self.background_source = (hidden_states if self.bcm.variant == "official" else out).detach()

        out = self._project(attn, "to_out", out, pairs)
        out = attn.to_out[1](out)
        if self.saim is not None and pairs:
            out = self.saim(out, pairs)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend_with_background(
        self, attn: Attention, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, pairs: int, stored: bool
    ) -> torch.Tensor:
        """Self-attention where the global rows' K/V input carries gamma * MLP(background states).

        Q is projected once for all rows and K/V once per block, so no projection runs twice. `stored`: the
        call holds the pairs only and the background states come from the storing call.
        """
        paired, background = hidden_states[: 2 * pairs], hidden_states[2 * pairs :]
        query = self._project(attn, "to_q", hidden_states, pairs)
        masks = (None, None) if attention_mask is None else (attention_mask[2 * pairs :], attention_mask[: 2 * pairs])
        if stored:
            source, background_out = self.background_source, None
        else:
            background_out = self._attend(attn, query[2 * pairs :], background, masks[0], pairs=0)  # global adapter
            source = background if self.bcm.variant == "official" else background_out
        context = torch.cat([self.bcm(paired[:pairs], source), paired[pairs:]])
        paired_out = self._attend(attn, query[: 2 * pairs], context, masks[1], pairs)
        return paired_out if background_out is None else torch.cat([paired_out, background_out])

    def _attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        context: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pairs: int,
        capture: bool = False,
    ) -> torch.Tensor:
        """Multi-head attention of projected queries over `context`, with per-row LoRA on k/v (rows keep the layout)."""
        key = self._project(attn, "to_k", context, pairs)
        value = self._project(attn, "to_v", context, pairs)
        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        if capture and pairs:
            self._capture(query, key, pairs)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

    def _capture(self, query: torch.Tensor, key: torch.Tensor, pairs: int) -> None:
        """Keep the anomaly rows' head-averaged cross-attention probabilities (rows, queries, tokens)."""
        anomaly = slice(pairs, 2 * pairs)
        scores = query[anomaly] @ key[anomaly].transpose(-1, -2) * query.shape[-1] ** -0.5
        self.attention_maps.append(scores.softmax(-1).mean(1).detach().float())
