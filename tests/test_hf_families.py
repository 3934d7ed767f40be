"""FlashMoELayer.from_hf on whole tiny transformers models, one per MoE family: every sparse-MoE
block of a randomly initialised two-layer model (built from a local config, fp32, nothing
downloaded) is replaced by the converted layer, and the model's logits and its greedy
generate() must not change (a vision-language model's text model: its hidden states); convert()
on the same model records the router logits the original records. Routing weights are drawn
large so the top-k choices are decisive (no near-ties that rounding could flip)."""

from __future__ import annotations

import copy
import importlib
from dataclasses import replace

import pytest
import torch

from flashmoe import FlashMoELayer, MoEConfig, reference
from flashmoe.hf import FAMILIES, config_from_hf, convert, unconvert

transformers = pytest.importorskip("transformers")

from hf_models import H, MODELS, SMALL, VARIANTS, make_block

CASES = {**{name: (name, {}) for name in MODELS}, **VARIANTS}


def build_model(family, **changes):
    module_name, config_name, model_name, fields, moe_blocks = MODELS[family]
    module = importlib.import_module(f"transformers.models.{module_name}")
    config = getattr(module, config_name)(**SMALL, **{**fields, **changes})
    torch.manual_seed(0)
    model = getattr(module, model_name)(config).eval()
    return model, moe_blocks


def moe_blocks(model):
    """(parent, attribute, block) of every sparse-MoE block flashmoe converts."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if type(child).__name__ in FAMILIES]


# Router-side tensors: drawn large so the routing is decisive. Selection biases are drawn to
# change some choices without dominating the scores.
SELECTION_BIASES = ("e_score_correction_bias", "expert_bias")


@torch.no_grad()
def randomise(block, generator):
    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=generator) * std)

    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        leaf, top = name.rsplit(".", 1)[-1], name.split(".", 1)[0]
        if leaf in SELECTION_BIASES:
            normal(t, 0.1)
        elif top in ("gate", "router"):
            normal(t, 2.0 / H ** 0.5 if t.dim() == 2 else 1.0)
        elif t.dim() >= 2:
            normal(t, 1.0 / min(t.shape[-1], t.shape[-2]) ** 0.5)
        elif t.is_floating_point():
            normal(t, 0.3)                    # expert and MLP biases


def relative_error(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", CASES)
def test_whole_model_matches_transformers(case):
    family, changes = CASES[case]
    model, expected_blocks = build_model(family, **changes)
    generator = torch.Generator().manual_seed(1)
    blocks = moe_blocks(model)
    assert len(blocks) == expected_blocks
    for _, _, block in blocks:
        randomise(block, generator)
    ids = torch.randint(3, 64, (2, 8), generator=generator)
    generates = model.can_generate()         # a text model inside a vision-language one does not

    def run():
        out = model(input_ids=ids)
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False) if generates else None
        return out.logits if generates else out.last_hidden_state, tokens
    with torch.no_grad():
        expected_logits, expected_tokens = run()
        for parent, name, block in blocks:
            setattr(parent, name, FlashMoELayer.from_hf(block))
        logits, tokens = run()
    assert all(isinstance(child, FlashMoELayer) for _, _, child in moe_blocks_or_layers(model, blocks))
    assert relative_error(logits, expected_logits) < 1e-5
    if generates:
        assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("family", MODELS)
def test_convert_keeps_the_recorded_router_logits(family):
    """convert() on the whole model: every block converted, and output_router_logits=True records
    what the original model records (transformers' load-balancing loss reads it)."""
    model, expected_blocks = build_model(family)
    generator = torch.Generator().manual_seed(1)
    for _, _, block in moe_blocks(model):
        randomise(block, generator)
    ids = torch.randint(3, 64, (2, 8), generator=generator)
    original = copy.deepcopy(model)
    report = convert(model)
    assert len(report.converted) == expected_blocks and not report.left, report
    with torch.no_grad():
        theirs = original(input_ids=ids, output_router_logits=True).router_logits
        mine = model(input_ids=ids, output_router_logits=True).router_logits
    assert len(mine) == len(theirs) == expected_blocks
    for a, b in zip(mine, theirs):
        assert relative_error(a.float(), b.float()) < 1e-5


@pytest.mark.parametrize("family", ["dbrx", "minimax_m3_vl", "longcat_flash"])
def test_unconvert_writes_back_through_the_blocks_own_layout(family):
    """DBRX's experts are three [E * I, H] matrices (w2 holds down transposed), MiniMax-M3's shared
    expert one fused gate_up_proj, LongCat-Flash's gate_up_proj rows for its identity experts too,
    each read through views: unconvert writes the layers' changed weights back through the same views."""
    model, expected_blocks = build_model(family)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))

    def output():
        out = model(input_ids=ids)
        return out.logits if model.can_generate() else out.last_hidden_state
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert len(convert(model).converted) == expected_blocks
    with torch.no_grad():       # stands in for training: every converted tensor changes
        for layer in (m for m in model.modules() if isinstance(m, FlashMoELayer)):
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        trained = output()
        assert len(unconvert(model)) == expected_blocks
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        assert not any(t.is_meta for t in model.state_dict().values())
        assert relative_error(output(), trained) < 1e-5


def moe_blocks_or_layers(model, blocks):
    return [(parent, name, getattr(parent, name)) for parent, name, _ in blocks]


def first_block(family, **changes):
    model, _ = build_model(family, **changes)
    block = moe_blocks(model)[0][2]
    randomise(block, torch.Generator().manual_seed(2))
    return block


def test_configs_read_from_the_blocks():
    c = config_from_hf(first_block("gpt_oss"))
    assert (c.activation, c.swiglu_limit, c.swiglu_alpha, c.expert_bias, c.router_bias) == \
        ("swiglu_clamped", 0.8, 1.702, True, True)
    assert (c.scoring, c.norm_topk_prob, c.intermediate_size, c.num_experts) == ("softmax", True, 24, 8)
    c = config_from_hf(first_block("llama4"))
    assert (c.scoring, c.scale_expert_input, c.norm_topk_prob, c.num_shared_experts) == ("sigmoid", True, False, 1)
    c = config_from_hf(first_block("deepseek_v2"))
    assert (c.n_group, c.topk_group, c.group_score, c.routed_scaling_factor) == (4, 2, "max", 2.0)
    assert (c.norm_topk_prob, c.num_shared_experts, c.shared_intermediate_size) == (False, 2, 16)
    c = config_from_hf(first_block("lfm2_moe"))
    assert (c.scoring, c.selection_bias, c.norm_topk_epsilon, c.routed_scaling_factor) == ("sigmoid", True, 1e-6, 1.5)
    c = config_from_hf(first_block("ernie4_5_moe"))
    assert (c.selection_bias, c.norm_topk_prob, c.shared_intermediate_total) == (True, True, 32)
    c = config_from_hf(first_block("jamba"))
    assert (c.norm_topk_prob, c.scoring) == (False, "softmax")
    c = config_from_hf(first_block("exaone_moe"))
    assert (c.selection_bias, c.n_group, c.num_shared_experts) == (True, 2, 1)
    c = config_from_hf(first_block("deepseek_v4"))
    assert (c.scoring, c.selection_bias, c.norm_topk_prob, c.routed_scaling_factor) == ("sqrtsoftplus", True, True, 1.5)
    assert (c.activation, c.swiglu_limit, c.num_shared_experts, c.shared_intermediate_size) == ("silu_clamped", 0.8, 1, 16)
    assert config_from_hf(first_block("deepseek_v4", scoring_func="sigmoid")).scoring == "sigmoid"
    c = config_from_hf(first_block("minimax_m3_vl"))
    assert (c.activation, c.swiglu_alpha, c.swiglu_limit, c.routed_scaling_factor) == ("swiglu_clamped", 1.702, 0.8, 1.5)
    assert (c.scoring, c.selection_bias, c.shared_intermediate_size) == ("sigmoid", True, 24)
    c = config_from_hf(first_block("beam"))
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.num_shared_experts) == (2, 1, 2.0, 0)
    c = config_from_hf(first_block("longcat_flash"))
    assert (c.num_experts, c.identity_experts, c.top_k, c.scoring, c.norm_topk_prob) == (8, 4, 3, "softmax", False)
    assert (c.selection_bias, c.routed_scaling_factor, c.router_bias) == (True, 2.0, False)
    c = config_from_hf(first_block("flint"))
    assert (c.scoring, c.selection_bias, c.norm_topk_prob, c.shared_intermediate_size) == ("sigmoid", False, True, 24)


# Blocks of models whose whole tiny model is too elaborate to build here (linear and indexed
# attention, vision towers): the block against the converted layer.
BLOCKS = {
    # DeepSeek-V3's routing under another name, with the SiLU clamped SwiGLU in both kinds of experts
    "glm5_next": lambda: make_block("glm5_next", "Glm5NextTextMoE", "Glm5NextTextConfig", hidden_size=H,
                                    moe_intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                                    n_group=2, topk_group=1, n_shared_experts=1, swiglu_limit=0.8),
    # DeepSeek-V2's routing under another name
    "unlimited_ocr": lambda: make_block("unlimited_ocr", "UnlimitedOcrTextMoe", "UnlimitedOcrTextConfig",
                                        hidden_size=H, num_attention_heads=2, moe_intermediate_size=16,
                                        num_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                                        topk_method="group_limited_greedy", n_group=4, topk_group=2),
}


@pytest.mark.parametrize("name", BLOCKS)
def test_a_block_matches_its_converted_layer(name):
    block = BLOCKS[name]().eval()
    randomise(block, torch.Generator().manual_seed(2))
    x = torch.randn(2, 9, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(FlashMoELayer.from_hf(block)(x), block(x)) < 1e-5


def test_gpt_oss_weights_are_deinterleaved_and_transposed():
    block = first_block("gpt_oss")
    layer = FlashMoELayer.from_hf(block)
    experts = block.experts
    i = layer.config.intermediate_size
    assert torch.equal(layer.gate_up_proj[:, :i], experts.gate_up_proj[:, :, 0::2].transpose(1, 2))
    assert torch.equal(layer.gate_up_proj[:, i:], experts.gate_up_proj[:, :, 1::2].transpose(1, 2))
    assert torch.equal(layer.down_proj, experts.down_proj.transpose(1, 2))
    assert torch.equal(layer.gate_up_bias[:, :i], experts.gate_up_proj_bias[:, 0::2])
    assert torch.equal(layer.down_bias, experts.down_proj_bias)
    assert torch.equal(layer.router_bias, block.router.bias)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_blocks_returning_a_pair_are_replaced_by_a_layer_returning_one(family):
    block = first_block(family)
    layer = FlashMoELayer.from_hf(block)
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        expected, _ = block(x)
        out, logits = layer(x)
    assert relative_error(out, expected.view(out.shape)) < 1e-5
    assert logits.shape == (10, layer.config.num_experts)
    # its router logits, bias included
    router = block.router
    bias = router.bias if router.bias is not None else 0
    assert relative_error(logits, x.reshape(-1, H) @ router.weight.t() + bias) < 1e-5


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "mistral4", "hy_v3", "deepseek_v4", "minimax_m3_vl",
                                    "longcat_flash"])
def test_a_converted_block_runs_on_the_kernel(family):
    """GPT-OSS's block (router bias, expert biases, clamped SwiGLU with a limit that binds),
    Llama4's (the routing weight scales the expert's input; a shared expert), Mistral 4's (groups
    over softmax scores), HY-V3's (sigmoid with a selection bias, scaled), DeepSeek-V4's (sqrt(softplus)
    scores, the SiLU clamped SwiGLU), MiniMax-M3's (GPT-OSS's SwiGLU with a shared expert) and
    LongCat-Flash's (identity experts)
    converted and run on the emulated kernel, within the accuracy rule of the reference that the
    tests above hold to the blocks themselves."""
    from flashmoe import accuracy
    from flashmoe.host import emulator
    if emulator.emulator_available() is not None:
        pytest.skip(f"emulator unavailable: {emulator.emulator_available()}")
    layer = FlashMoELayer.from_hf(first_block(family), backend="emulated")
    x = torch.randn(37, H, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = layer(x)
    out = out[0] if layer.returns_router_logits else out
    assert layer.last_backend == "emulated"
    ok, err, tol = accuracy.check(out, x, layer.weights(), layer.config)
    assert ok, f"error {err:.3g} above tolerance {tol:.3g}"


def test_kernel_specs_match_the_layers_input_scaling():
    """scale_expert_input is compiled into the kernel (KernelSpec.scale_input): a spec of the
    other kind is refused by name, and the layer's specs take the layer's."""
    from flashmoe.host.plan import DeviceInfo, kernel_support, layer_specs
    from flashmoe.host.spec import KernelSpec
    spec = KernelSpec(arch="sm_90", gated=True)
    gpt_oss = MoEConfig(hidden_size=64, intermediate_size=64, num_experts=8, top_k=2, activation="swiglu_clamped",
                        swiglu_limit=0.5, expert_bias=True, router_bias=True, norm_topk_prob=True)
    llama4 = MoEConfig(hidden_size=64, intermediate_size=64, num_experts=8, top_k=1, scoring="sigmoid",
                       scale_expert_input=True, num_shared_experts=1)
    assert kernel_support(gpt_oss, spec, 1) is None
    assert kernel_support(llama4, replace(spec, scale_input=True), 1) is None
    reason = kernel_support(llama4, spec, 1)
    assert reason == "spec scale_input=False differs from config scale_expert_input=True"
    for config in (gpt_oss, llama4):
        specs = layer_specs(config, 1, DeviceInfo.for_arch("sm_90a"))
        assert specs and all(s.scale_input == config.scale_expert_input for s in specs)


def test_new_config_fields_are_validated():
    base = dict(hidden_size=32, intermediate_size=16, num_experts=4, top_k=2)
    for clamped in ("swiglu_clamped", "silu_clamped"):
        with pytest.raises(ValueError, match=rf"activation='{clamped}' is defined for gated experts only"):
            MoEConfig(**base, activation=clamped, gated=False)
    with pytest.raises(ValueError, match=r"scoring='softplus': allowed are softmax, sigmoid, sqrtsoftplus"):
        MoEConfig(**base, scoring="softplus")
    for name, bad in (("swiglu_alpha", 0.0), ("swiglu_limit", float("inf")), ("norm_topk_epsilon", -1.0)):
        with pytest.raises(ValueError, match=name):
            MoEConfig(**base, **{name: bad})
    for name in ("expert_bias", "router_bias", "scale_expert_input"):
        with pytest.raises(ValueError, match=name):
            MoEConfig(**base, **{name: 1})


def test_expert_biases_reach_the_reference_and_autograd():
    config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2, dtype="float32",
                       activation="swiglu_clamped", expert_bias=True, router_bias=True,
                       swiglu_limit=0.5)
    layer = FlashMoELayer(config, backend="reference")
    with torch.no_grad():
        for p in (layer.router_bias, layer.gate_up_bias, layer.down_bias):
            p.normal_()
    x = torch.randn(6, 16, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    for p in (layer.router_bias, layer.gate_up_bias, layer.down_bias):
        assert p.grad is not None
    assert layer.router_bias.grad.abs().sum() > 0 and layer.down_bias.grad.abs().sum() > 0
    # one token through its experts by hand, with torch's own functions
    w = layer.weights()
    with torch.no_grad():
        logits = x[:1] @ w.router_weight.t() + w.router_bias
        top, ids = torch.softmax(logits, -1).topk(2)
        total = 0
        for weight, e in zip(top[0], ids[0]):
            pre = x[:1] @ w.gate_up_proj[e].t() + w.gate_up_bias[e]
            g, u = pre.chunk(2, -1)
            g = g.clamp(max=0.5)
            h = g * torch.sigmoid(1.702 * g) * (u.clamp(-0.5, 0.5) + 1)
            total = total + weight * (h @ w.down_proj[e].t() + w.down_bias[e])
        assert relative_error(out[:1].detach(), total) < 1e-5


def test_grouped_experts_with_biases_equal_one_expert_at_a_time():
    """The reference's grouped GEMM path (CPU bfloat16) adds the biases as the per-expert loop
    does: bitwise the same."""
    config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=3, top_k=1,
                       activation="swiglu_clamped", expert_bias=True, swiglu_limit=1.0)
    g = torch.Generator().manual_seed(4)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).bfloat16()

    x, gate_up, down = rnd(9, 16), rnd(3, 16, 16), rnd(3, 16, 8)
    gate_up_bias, down_bias = rnd(3, 16), rnd(3, 16)
    rows = [4, 0, 5]
    grouped = reference.run_experts(x, rows, gate_up, down, config, "mixed", gate_up_bias, down_bias)
    one_by_one = torch.cat([
        reference.expert_mlp(x[:4], gate_up[0], down[0], config, "mixed", gate_up_bias[0], down_bias[0]),
        reference.expert_mlp(x[4:], gate_up[2], down[2], config, "mixed", gate_up_bias[2], down_bias[2])])
    assert torch.equal(grouped, one_by_one)


def test_a_bfloat16_gpt_oss_block_converts_within_rounding():
    block = first_block("gpt_oss").to(torch.bfloat16)
    layer = FlashMoELayer.from_hf(block)
    assert layer.config.dtype == "bfloat16" and layer.gate_up_bias.dtype == torch.bfloat16
    assert layer.router_bias.dtype == torch.float32
    x = torch.randn(1, 9, H, dtype=torch.bfloat16)
    with torch.no_grad():
        ideal, _ = FlashMoELayer.from_hf(block.float())(x.float())
        out, _ = layer(x)
    assert relative_error(out.float(), ideal) < 2e-2


def test_lfm2_normalisation_epsilon_is_its_own():
    """LFM2-MoE divides by (top-k sum + 1e-6): visible when the chosen sigmoid scores are small."""
    block = first_block("lfm2_moe")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        block.gate.weight.copy_(-0.6 * torch.rand(block.gate.weight.shape, generator=g))
        x = torch.rand(1, 7, H, generator=g) + 0.5          # logits around -10: scores ~1e-5
        layer = FlashMoELayer.from_hf(block)
        assert relative_error(layer(x), block(x)) < 1e-5
