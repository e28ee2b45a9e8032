"""DualAnoDiffModel against stock diffusers and peft: equality at initialisation, branch coupling, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig

from dualanodiff.config import ModelConfig
from dualanodiff.errors import UserError
from dualanodiff.model.base import tiny_random_base
from dualanodiff.model.dual import DualAnoDiffModel

PAIRS = 2


def build(**overrides) -> tuple[DualAnoDiffModel, torch.nn.Module]:
    """A model on a fresh tiny random base, and an untouched copy of the stock UNet."""
    base = tiny_random_base()
    stock = copy.deepcopy(base.unet)
    torch.manual_seed(1)
    cfg = ModelConfig(rank=4, text_rank=4, **overrides)
    return DualAnoDiffModel(base, cfg).eval(), stock


def inputs(seed: int = 0, background: bool = False):
    generator = torch.Generator().manual_seed(seed)
    shape = (PAIRS, 4, 16, 16)
    latents = [torch.randn(shape, generator=generator) for _ in range(3 if background else 2)]
    timesteps = torch.tensor([10, 700])
    return latents, timesteps


def randomise_trainable(model: DualAnoDiffModel, seed: int = 3, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


@torch.no_grad()
def stock_prediction(stock, latents, timesteps, text):
    return stock(latents, timesteps, encoder_hidden_states=text).sample


@pytest.mark.parametrize(
    "saim, targets", [(False, "attention"), (True, "attention"), (False, "attention+ff+conv"), (True, "attention+ff")]
)
@torch.no_grad()
def test_zero_initialised_branches_equal_the_stock_unet(saim, targets):
    model, stock = build(saim=saim, saim_init="zero", bcm=False, lora_targets=targets)
    (x_global, x_anomaly), t = inputs()
    text = model.prompt_embeddings(PAIRS)
    eps_global, eps_anomaly = model.predict_noise(x_global, x_anomaly, t, text)
    reference_global = stock_prediction(stock, x_global, t, text["global"])
    reference_anomaly = stock_prediction(stock, x_anomaly, t, text["anomaly"])
    assert (eps_global - reference_global).abs().max() <= 1e-5
    assert (eps_anomaly - reference_anomaly).abs().max() <= 1e-5
    assert (eps_global - eps_anomaly).abs().max() > 1e-2  # different inputs and prompts: not trivially equal


@torch.no_grad()
def test_zero_initialised_text_lora_leaves_the_text_encoder_unchanged():
    base = tiny_random_base()
    reference = copy.deepcopy(base.text_encoder)
    model = DualAnoDiffModel(base, ModelConfig(rank=4, text_rank=4))
    ids = base.tokenizer(["a vfx with sks", "sks"], padding="max_length", return_tensors="pt").input_ids
    assert any(".text." in name for name, _ in model.text_encoder.named_parameters())
    assert torch.equal(model.text_encoder(ids)[0], reference(ids)[0])


def test_only_the_trainable_set_requires_grad():
    model, _ = build()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable, "nothing to train"
    assert all(".processor." in name or ".lora_" in name and ".text." in name for name in trainable)  # attention only
    assert any(name.startswith("text_encoder.") for name in trainable)
    assert any(".saim." in name for name in trainable) and any(".bcm." in name for name in trainable)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    assert all(name.startswith(("unet.", "vae.", "text_encoder.")) for name in frozen)
    assert not any(".processor." in name for name in frozen)
    stock_names = {f"unet.{name}" for name, _ in tiny_random_base().unet.named_parameters()}
    assert stock_names <= frozen


def test_one_step_changes_only_the_trainable_set():
    model, stock = build()
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    (x_global, x_anomaly, x_background), t = inputs(background=True)
    eps_global, eps_anomaly = model(x_global, x_anomaly, t, x_background)
    (eps_global.square().mean() + eps_anomaly.square().mean()).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        assert torch.equal(param, frozen_before[name]), name
    changed = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[name])]
    assert any(".saim." in n for n in changed) and any(".bcm." in n for n in changed)
    assert any(n.startswith("text_encoder.") for n in changed)


def _coupling(saim: bool, direction: str = "both") -> float:
    """Largest change of the anomaly prediction when only the global input changes, after one step."""
    model, _ = build(saim=saim, saim_direction=direction, bcm=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    (x_global, x_anomaly), t = inputs()
    eps_global, eps_anomaly = model(x_global, x_anomaly, t)
    (eps_global - torch.randn_like(eps_global)).square().mean().add(eps_anomaly.square().mean()).backward()
    optimizer.step()
    with torch.no_grad():
        _, first = model(x_global, x_anomaly, t)
        _, second = model(x_global + torch.randn_like(x_global), x_anomaly, t)
    return float((first - second).abs().max())


def test_saim_couples_the_branches_after_one_step_and_nothing_else_does():
    assert _coupling(saim=True, direction="both") > 1e-4
    assert _coupling(saim=True, direction="to_anomaly") > 1e-4
    assert _coupling(saim=False) <= 1e-6


@pytest.mark.parametrize("init, coupled", [("official", True), ("zero", False)])
@torch.no_grad()
def test_official_saim_init_couples_the_branches_from_step_zero(init, coupled):
    """The reference code's nn.Linear init: the anomaly branch reads the global rows before any training."""
    model, _ = build(saim=True, saim_init=init, bcm=False)
    (x_global, x_anomaly), t = inputs()
    text = model.prompt_embeddings(PAIRS)
    _, first = model.predict_noise(x_global, x_anomaly, t, text)
    _, second = model.predict_noise(x_global + torch.randn_like(x_global), x_anomaly, t, text)
    assert ((first - second).abs().max() > 1e-3) == coupled


def test_extra_lora_targets_add_per_branch_adapters_with_peft_keys():
    model, _ = build(lora_targets="attention+ff+conv")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    convs = {n for n in trainable if ".resnets." in n and ".conv1.lora_A." in n}
    ffs = {n for n in trainable if ".ff.net.2.lora_B." in n or ".ff.net.0.proj.lora_A." in n}
    assert convs and ffs
    assert {n.rsplit(".", 2)[-2] for n in convs | ffs} == {"global", "anomaly"}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert any(n.endswith(".conv1.base_layer.weight") for n in frozen)


def test_extra_lora_adapts_each_branch_on_its_own_rows_only():
    """After changing only the anomaly adapters of the conv/ff layers, the global rows are unchanged."""
    model, _ = build(saim=False, bcm=False, lora_targets="attention+ff+conv")
    (x_global, x_anomaly), t = inputs()
    text = model.prompt_embeddings(PAIRS)
    with torch.no_grad():
        before = model.predict_noise(x_global, x_anomaly, t, text)
        for name, param in model.named_parameters():
            if "base_layer" not in name and ".lora_B.anomaly." in name and ".processor." not in name:
                param.normal_(std=0.05)
        after = model.predict_noise(x_global, x_anomaly, t, text)
    assert torch.equal(before[0], after[0])
    assert (before[1] - after[1]).abs().max() > 1e-3


@torch.no_grad()
def test_bcm_with_zero_gamma_is_an_exact_no_op():
    model, stock = build(saim=False, bcm=True)
    for processor in model.processors:
        if processor.bcm is not None:
            processor.bcm.gamma.zero_()
    (x_global, x_anomaly, x_background), t = inputs(background=True)
    text = model.prompt_embeddings(PAIRS)
    with_background = model.predict_noise(x_global, x_anomaly, t, text, x_background)
    without = model.predict_noise(x_global, x_anomaly, t, text)
    assert torch.equal(with_background[0], without[0]) and torch.equal(with_background[1], without[1])
    assert (with_background[0] - stock_prediction(stock, x_global, t, text["global"])).abs().max() <= 1e-5


@torch.no_grad()
def test_bcm_with_gamma_feeds_the_background_into_the_global_branch_only():
    model, _ = build(saim=False, bcm=True)
    assert model.gammas() and all(g == pytest.approx(0.1) for g in model.gammas())
    (x_global, x_anomaly, x_background), t = inputs(background=True)
    text = model.prompt_embeddings(PAIRS)
    first = model.predict_noise(x_global, x_anomaly, t, text, x_background)
    second = model.predict_noise(x_global, x_anomaly, t, text, x_background + 1.0)
    assert (first[0] - second[0]).abs().max() > 1e-4
    assert torch.equal(first[1], second[1])


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@torch.no_grad()
def test_batched_call_equals_separate_peft_lora_calls():
    """Independent reference: a stock UNet with two peft LoRA adapters holding the same weights."""
    model, stock = build(saim=False, bcm=False)
    randomise_trainable(model)
    stock.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), "global")
    stock.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), "anomaly")
    peft_params = dict(stock.named_parameters())
    copied = 0
    for name, param in model.unet.named_parameters():
        if ".processor.lora." not in name:
            continue
        layer, rest = name.split(".processor.lora.")
        projection, tail = rest.split(".", 1)
        projection = "to_out.0" if projection == "to_out" else projection
        peft_params[f"{layer}.{projection}.{tail}"].copy_(param)
        copied += 1
    assert copied == sum(".lora_" in n for n in peft_params)
    (x_global, x_anomaly), t = inputs()
    text = model.prompt_embeddings(PAIRS)
    eps_global, eps_anomaly = model.predict_noise(x_global, x_anomaly, t, text)
    stock.set_adapter("global")
    reference_global = stock_prediction(stock, x_global, t, text["global"])
    stock.set_adapter("anomaly")
    reference_anomaly = stock_prediction(stock, x_anomaly, t, text["anomaly"])
    assert (eps_global - reference_global).abs().max() <= 1e-5
    assert (eps_anomaly - reference_anomaly).abs().max() <= 1e-5
    stock.disable_adapters()
    assert (eps_global - stock_prediction(stock, x_global, t, text["global"])).abs().max() > 1e-3


@pytest.mark.parametrize("targets", ["attention", "attention+ff+conv"])
@torch.no_grad()
def test_merged_adapters_give_the_unmerged_outputs(targets):
    """Sampling with each branch's LoRA folded into the weights equals the low-rank path (BCM rows included),
    takes the merged path only inside the block and without autograd, and unmerges on leaving."""
    model, _ = build(lora_targets=targets)
    randomise_trainable(model)
    (x_global, x_anomaly, x_background), t = inputs(background=True)
    text = model.prompt_embeddings(PAIRS)
    expected = model.predict_noise(x_global, x_anomaly, t, text, x_background)
    with model.merged_adapters():
        merged = model.predict_noise(x_global, x_anomaly, t, text, x_background)
        for name, param in model.named_parameters():
            if ".lora_B." in name and "text_encoder" not in name:
                param.zero_()  # the merged copies, not the adapters, are what runs now
        stale = model.predict_noise(x_global, x_anomaly, t, text, x_background)
        with torch.enable_grad():  # with autograd: the adapters as they now are
            grad_path = model.predict_noise(x_global, x_anomaly, t, text, x_background)
    for reference, actual in zip(expected, merged):
        assert (reference - actual).abs().max() <= 1e-4 * reference.abs().max()
    assert all(torch.equal(a, b) for a, b in zip(merged, stale))
    assert (grad_path[0] - merged[0]).abs().max() > 1e-3
    unmerged = model.predict_noise(x_global, x_anomaly, t, text, x_background)
    assert (unmerged[0] - expected[0]).abs().max() > 1e-3  # left the block: the zeroed adapters run


@torch.no_grad()
def test_save_then_load_reproduces_outputs(tmp_path):
    model, _ = build()
    randomise_trainable(model)
    model.save_trainable(tmp_path / "adapters.safetensors")
    fresh, _ = build()
    fresh.load_trainable(tmp_path / "adapters.safetensors")
    (x_global, x_anomaly, x_background), t = inputs(background=True)
    expected = model(x_global, x_anomaly, t, x_background)
    actual = fresh(x_global, x_anomaly, t, x_background)
    assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])


def test_loading_adapters_of_another_config_is_a_clear_error(tmp_path):
    model, _ = build(saim=False)
    model.save_trainable(tmp_path / "adapters.safetensors")
    other, _ = build(saim=True)
    with pytest.raises(UserError, match="do not match the run's model config"):
        other.load_trainable(tmp_path / "adapters.safetensors")
    with pytest.raises(UserError, match="not found"):
        other.load_trainable(tmp_path / "missing.safetensors")


def test_cross_attention_capture_keeps_anomaly_rows_only():
    model, _ = build()
    (x_global, x_anomaly), t = inputs()
    with torch.no_grad(), model.capturing_attention() as processors:
        model.predict_noise(x_global, x_anomaly, t, model.prompt_embeddings(PAIRS))
    maps = [m for p in processors for m in p.attention_maps]
    assert maps and all(m.shape[0] == PAIRS for m in maps)
    for m in maps:
        assert torch.allclose(m.sum(-1), torch.ones(m.shape[:2]), atol=1e-5)  # probabilities over tokens
    with torch.no_grad():
        model.predict_noise(x_global, x_anomaly, t, model.prompt_embeddings(PAIRS))
    assert len([m for p in processors for m in p.attention_maps]) == len(maps)  # nothing captured outside


def test_saim_closed_form_equals_two_token_softmax_attention():
    """SAIM's sigmoid form against the definition: each position's (global, anomaly) pair as a 2-token sequence."""
    import torch.nn.functional as F

    from dualanodiff.model.attention import SelfAttentionInteraction

    torch.manual_seed(0)
    saim = SelfAttentionInteraction(dim=12).double()
    for layer in (saim.to_out, saim.to_k):
        torch.nn.init.normal_(layer.weight)
    pairs, length = 3, 5
    states = torch.randn(3 * pairs, length, 12, dtype=torch.float64)  # global, anomaly, background blocks
    out = saim(states, pairs)
    tokens = states[: 2 * pairs].view(2, pairs, length, 12).permute(1, 2, 0, 3).reshape(pairs * length, 2, 12)
    x = saim.proj_in(saim.norm(tokens))
    mixed = F.scaled_dot_product_attention(saim.to_q(x), saim.to_k(x), saim.to_v(x))
    update = saim.to_out(mixed).view(pairs, length, 2, 12).permute(2, 0, 1, 3).reshape(2 * pairs, length, 12)
    assert torch.allclose(out[: 2 * pairs], states[: 2 * pairs] + update, atol=1e-12)
    assert torch.equal(out[2 * pairs :], states[2 * pairs :])  # background rows untouched


def _heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out: (L, heads * d) -> (L, heads * d)."""
    q, k, v = (t.view(t.shape[0], heads, -1).transpose(0, 1) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    return ((weights / weights.sum(-1, keepdim=True)) @ v).transpose(0, 1).reshape(q.shape[1], -1)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("stored", [False, True], ids=["background-rows", "stored-background"])
@torch.no_grad()
def test_bcm_equals_a_hand_written_reference_of_its_formula(variant, stored):
    """BCM on one self-attention layer in float64 against the formula written out: the global rows' keys and
    values come from c = h + gamma * MLP(b) (paper eq. 5, b the background rows' attention output at this
    layer) or c = (1 - gamma) h + gamma * MLP(b) (the reference code, b the background rows' input states),
    their queries from h alone; anomaly and background rows attend plainly, each row with its branch's LoRA
    (W + B A; the background takes the global one). `stored`: the background comes from a separate
    storing call, as in training without autograd through it."""
    from diffusers.models.attention_processor import Attention

    from dualanodiff.model.attention import DualBranchAttnProcessor, RowLayout

    torch.manual_seed(0)
    dim, heads, pairs, length, gamma = 8, 2, 2, 5, 0.3
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, out_bias=True).double().eval()
    layout = RowLayout()
    processor = DualBranchAttnProcessor(attn, layout, rank=2, saim=False, bcm=True, bcm_variant=variant).double()
    for param in processor.parameters():  # LoRA B starts at zero: random everywhere, so every term counts
        param.normal_()
    processor.bcm.gamma.fill_(gamma)
    attn.set_processor(processor)
    states = torch.randn(3, pairs, length, dim, dtype=torch.float64)  # global, anomaly, background rows
    if stored:
        layout.store_background = True
        attn(states[2])
        layout.store_background, layout.pairs, layout.stored_background = False, pairs, True
        out = attn(states[:2].flatten(0, 1))
    else:
        layout.pairs, layout.background = pairs, True
        out = attn(states.flatten(0, 1))

    def weight(name: str, branch: str) -> torch.Tensor:
        lora = processor.lora[name]
        layer = {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out": attn.to_out[0]}[name]
        return layer.weight + lora.lora_B[branch].weight @ lora.lora_A[branch].weight

    def attention(h: torch.Tensor, context: torch.Tensor, branch: str) -> torch.Tensor:
        q, k, v = (x @ weight(name, branch).T for x, name in ((h, "to_q"), (context, "to_k"), (context, "to_v")))
        return _heads_attention(q, k, v, heads)

    def out_projection(x: torch.Tensor, branch: str) -> torch.Tensor:
        return x @ weight("to_out", branch).T + attn.to_out[0].bias

    mlp = processor.bcm.mlp
    first, second = mlp[0], mlp[-1]
    activation = torch.nn.functional.gelu if variant == "paper" else (lambda x: x)  # the reference code's has none
    expected = []
    for row in range(pairs):
        h, anomaly, background = states[0, row], states[1, row], states[2, row]
        b = attention(background, background, "global") if variant == "paper" else background
        injected = gamma * (activation(b @ first.weight.T + first.bias) @ second.weight.T + second.bias)
        c = h + injected if variant == "paper" else (1 - gamma) * h + injected
        expected.append((out_projection(attention(h, c, "global"), "global"),
                         out_projection(attention(anomaly, anomaly, "anomaly"), "anomaly"),
                         out_projection(attention(background, background, "global"), "global")))
    for block in range(2 if stored else 3):
        reference = torch.stack([rows[block] for rows in expected])
        error = (out[block * pairs : (block + 1) * pairs] - reference).abs().max()
        assert error <= 1e-12 * reference.abs().max(), (block, error)  # float64 rounding; a float32 gamma is 1e-7


@torch.no_grad()
def test_one_way_saim_leaves_the_global_rows_alone_and_feeds_the_anomaly_rows():
    model, _ = build(saim=True, saim_init="official", saim_direction="to_anomaly", bcm=False)
    plain, _ = build(saim=False, bcm=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".saim." not in k}, strict=False)
    (x_global, x_anomaly), t = inputs()
    text = model.prompt_embeddings(PAIRS)
    eps_global, first = model.predict_noise(x_global, x_anomaly, t, text)
    assert torch.allclose(eps_global, plain.predict_noise(x_global, x_anomaly, t, text)[0], atol=1e-6)
    _, second = model.predict_noise(x_global + torch.randn_like(x_global), x_anomaly, t, text)
    assert (first - second).abs().max() > 1e-3  # the part reads the whole image


def _background_grad_run(background_grad: bool, gamma_zero: bool = False, checkpointing: bool = False, **overrides):
    """float64 outputs and gradients of one training forward + backward (random trainable set, fixed loss weights)."""
    model, _ = build(bcm_background_grad=background_grad, **overrides)
    model.double()
    randomise_trainable(model)
    if gamma_zero:
        with torch.no_grad():
            for processor in model.processors:
                if processor.bcm is not None:
                    processor.bcm.gamma.zero_()
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    latents, t = inputs(background=True)
    outputs = model(*(x.double() for x in latents[:2]), t, latents[2].double())
    generator = torch.Generator().manual_seed(5)
    sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum() for out in outputs).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grad is not None for grad in grads.values())
    return [out.detach() for out in outputs], grads


@pytest.mark.parametrize("variant, targets", [("paper", "attention"), ("official", "attention+ff+conv")])
def test_background_without_autograd_changes_only_the_global_and_text_gradients(variant, targets):
    """Same outputs; the anomaly LoRA, SAIM, BCM MLP and gamma gradients are unchanged; the global-branch LoRA
    (background rows use the global adapter and prompt) and the text LoRA lose their path through the background."""
    with_grad, grads = _background_grad_run(True, bcm_variant=variant, lora_targets=targets)
    without, grads_without = _background_grad_run(False, bcm_variant=variant, lora_targets=targets)
    for a, b in zip(with_grad, without):
        assert (a - b).abs().max() <= 1e-12
    changed = {name for name in grads if not torch.allclose(grads[name], grads_without[name], rtol=1e-9, atol=1e-15)}
    assert changed and all(".global." in name or ".text." in name for name in changed)
    assert any(".global." in name for name in changed) and any(".text." in name for name in changed)
    assert not any(".anomaly." in name or ".saim." in name or ".bcm." in name for name in changed)


def test_background_without_autograd_with_zero_gamma_leaves_every_gradient_unchanged():
    """With gamma 0 the background path carries no gradient, so the two forms agree on every parameter."""
    _, grads = _background_grad_run(True, gamma_zero=True)
    _, grads_without = _background_grad_run(False, gamma_zero=True)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_without[name], rtol=1e-9, atol=1e-15), name


def test_background_without_autograd_under_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointing re-runs the paired call in backward: it must still read the stored background states."""
    outputs, grads = _background_grad_run(False)
    outputs_ckpt, grads_ckpt = _background_grad_run(False, checkpointing=True)
    assert all(torch.equal(a, b) for a, b in zip(outputs, outputs_ckpt))
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=1e-9, atol=1e-15), name


def test_background_without_autograd_keeps_forward_flops_and_cuts_backward_flops():
    from torch.utils.flop_counter import FlopCounterMode

    def flops(background_grad: bool) -> tuple[int, int]:
        model, _ = build(bcm_background_grad=background_grad)
        latents, t = inputs(background=True)
        with FlopCounterMode(display=False) as forward:
            outputs = model(*latents[:2], t, latents[2])
        with FlopCounterMode(display=False) as backward:
            sum(out.square().mean() for out in outputs).backward()
        return forward.get_total_flops(), backward.get_total_flops()

    (forward_on, backward_on), (forward_off, backward_off) = flops(True), flops(False)
    assert forward_on == forward_off  # the same projections and attention, split over two calls
    assert backward_off < backward_on
