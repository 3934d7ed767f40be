"""The reference forward against an independent float64 oracle (tests/oracle.py), and the
contract's properties: NaN isolation, capacity limits, empty input, the three math modes."""

from __future__ import annotations

import pytest
import torch

from flashmoe import MoEConfig, MoEWeights
from flashmoe.reference import experts_forward, moe_forward, route
from oracle import oracle_forward


def random_weights(config, scale=1.0, bias_scale=0.0):
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    dt = config.torch_dtype
    w = MoEWeights(
        router_weight=torch.randn(config.router_experts, h) * scale / h ** 0.5,
        gate_up_proj=(torch.randn(e, config.up_rows, h) / h ** 0.5).to(dt),
        down_proj=(torch.randn(e, h, i) / i ** 0.5).to(dt))
    if config.selection_bias:
        w.selection_bias = torch.randn(config.router_experts) * bias_scale
    if config.num_shared_experts:
        s = config.shared_intermediate_total
        w.shared_gate_up_proj = (torch.randn((2 if config.gated else 1) * s, h) / h ** 0.5).to(dt)
        w.shared_down_proj = (torch.randn(h, s) / s ** 0.5).to(dt)
    if config.shared_expert_gate:
        w.shared_gate_weight = torch.randn(1, h) / h ** 0.5
    return w


def small(**kw):
    fields = dict(hidden_size=12, intermediate_size=6, num_experts=8, top_k=2, dtype="float32")
    fields.update(kw)
    return MoEConfig(**fields)


def relative_error(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_every_activation_matches_the_oracle(activation, gated):
    config = small(activation=activation, gated=gated)
    w = random_weights(config)
    x = torch.randn(10, 12)
    assert relative_error(moe_forward(x, w, config, math="fp32"), oracle_forward(x, w, config)) < 1e-5


@pytest.mark.parametrize("activation", ["swiglu_clamped", "silu_clamped"])
def test_clamped_swiglus_match_the_oracle(activation):
    # a limit of 0.5 clamps many gate and up elements of O(1) pre-activations, on both sides
    config = small(activation=activation, swiglu_limit=0.5, swiglu_alpha=1.3, num_shared_experts=1)
    w = random_weights(config)
    x = torch.randn(10, 12)
    assert relative_error(moe_forward(x, w, config, math="fp32"), oracle_forward(x, w, config)) < 1e-5


@pytest.mark.parametrize("options", [
    dict(norm_topk_prob=True),
    dict(scoring="sqrtsoftplus", selection_bias=True, norm_topk_prob=True,    # DeepSeek-V4
         routed_scaling_factor=1.5, activation="silu_clamped", swiglu_limit=0.7),
    dict(scoring="sigmoid", routed_scaling_factor=2.5),
    dict(scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, norm_topk_prob=True),
    dict(scoring="softmax", n_group=2, topk_group=1, group_score="max", top_k=3),
    dict(num_shared_experts=1),
    dict(num_shared_experts=2, shared_intermediate_size=3, shared_expert_gate=True),
    dict(num_shared_experts=1, shared_expert_gate=True, gated=False, activation="relu"),
    dict(scoring="sigmoid", scale_expert_input=True, num_shared_experts=1),   # Llama4, at k = 2
    dict(identity_experts=4, top_k=4, selection_bias=True, routed_scaling_factor=6.0,   # LongCat-Flash
         num_shared_experts=1),
    dict(identity_experts=4, top_k=3, scoring="sigmoid", n_group=3, topk_group=2),     # groups over E + Z
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_routing_options_and_shared_experts_match_the_oracle(options):
    config = small(**options)
    w = random_weights(config, scale=3.0, bias_scale=0.3)
    x = torch.randn(16, 12)
    assert relative_error(moe_forward(x, w, config, math="fp32"), oracle_forward(x, w, config)) < 1e-5


def test_shared_gate_scales_only_the_shared_output():
    config = small(num_shared_experts=1, shared_expert_gate=True)
    w = random_weights(config)
    x = torch.randn(6, 12)
    routed_only = moe_forward(x, MoEWeights(w.router_weight, w.gate_up_proj, w.down_proj),
                              small(), math="fp32")
    ungated = moe_forward(x, w, config.replace(shared_expert_gate=False), math="fp32")
    gated = moe_forward(x, w, config, math="fp32")
    gate = torch.sigmoid(x @ w.shared_gate_weight.t())
    torch.testing.assert_close(gated - routed_only, gate * (ungated - routed_only), rtol=1e-5, atol=1e-6)


def test_dropless_equals_capacity_with_a_huge_factor():
    config = small(top_k=3)
    w = random_weights(config, scale=3.0)
    x = torch.randn(40, 12)
    huge = config.replace(capacity_factor=1e6)
    assert route(x, w, huge).kept.all()
    for math in ("contract", "fp32", "native"):
        assert torch.equal(moe_forward(x, w, config, math=math), moe_forward(x, w, huge, math=math))


def test_capacity_bounds_rows_per_expert():
    config = small(top_k=2, capacity_factor=0.5)
    w = random_weights(config, scale=4.0)
    x = torch.randn(64, 12)
    routing = route(x, w, config)
    cap = config.capacity(64)
    assert cap == 8
    per_expert = torch.bincount(routing.ids[routing.kept], minlength=8)
    assert per_expert.max() <= cap
    # every expert that had more candidates than room is full, none is over
    wanted = torch.bincount(routing.ids.reshape(-1), minlength=8)
    assert torch.equal(per_expert, wanted.clamp(max=cap))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("math", ["contract", "fp32", "native"])
def test_a_poisoned_row_changes_no_other_row_dropless(poison, math):
    config = small(num_shared_experts=1, shared_expert_gate=True)
    w = random_weights(config)
    x = torch.randn(12, 12)
    clean = moe_forward(x, w, config, math=math)
    x[5, 3] = poison
    out = moe_forward(x, w, config, math=math)
    others = torch.arange(12) != 5
    assert torch.isfinite(out[others]).all()
    torch.testing.assert_close(out[others], clean[others], rtol=1e-6, atol=1e-6)


def test_a_nan_row_ranks_lowest_under_capacity():
    config = small(top_k=2, capacity_factor=0.5)
    w = random_weights(config, scale=4.0)
    x = torch.randn(32, 12)
    x[0] = float("nan")
    routing = route(x, w, config)
    # token 0 would win every tie as the lowest index; as NaN it loses to every real weight,
    # so the others keep exactly what they keep without it competing
    from flashmoe.reference import capacity_keep
    rest = capacity_keep(routing.ids[1:], routing.weights[1:], config, torch.arange(1, 32), 32)
    assert torch.equal(routing.kept[1:], rest)
    full = torch.bincount(routing.ids[1:][rest], minlength=8) >= config.capacity(32)
    assert not routing.kept[0][full[routing.ids[0]]].any()
    out = moe_forward(x, w, config)
    assert torch.isfinite(out[1:]).all()


@pytest.mark.parametrize("shape", [(0, 12), (3, 0, 12)])
def test_zero_tokens(shape):
    config = small(capacity_factor=1.0, num_shared_experts=1)
    w = random_weights(config)
    out = moe_forward(torch.randn(shape), w, config)
    assert out.shape == shape and out.dtype == torch.float32


def test_math_modes_agree_closely_in_fp32():
    config = small(num_shared_experts=1)
    w = random_weights(config)
    x = torch.randn(32, 12)
    ideal = moe_forward(x, w, config, math="fp32")
    for math in ("contract", "native"):
        # both use TF32 operands for float32 (10 mantissa bits): agree to ~1e-3 relative
        assert relative_error(moe_forward(x, w, config, math=math), ideal) < 5e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_math_modes_differ_by_rounding_in_low_precision(dtype):
    config = small(num_shared_experts=1, dtype=dtype, hidden_size=64, intermediate_size=32)
    w = random_weights(config)
    x = torch.randn(64, 64).to(config.torch_dtype)
    ideal = moe_forward(x, w, config, math="fp32")
    eps = torch.finfo(config.torch_dtype).eps
    errors = {}
    for math in ("contract", "native", "mixed"):
        out = moe_forward(x, w, config, math=math)
        assert out.dtype == config.torch_dtype
        errors[math] = relative_error(out, ideal)
        # a few roundings of size eps/2 each, not a different computation
        assert 0 < errors[math] < 8 * eps
    # contract keeps fp32 arithmetic between its roundings; native rounds after every op;
    # mixed rounds the first GEMM's result once more than contract
    assert errors["contract"] <= errors["native"]
    assert errors["mixed"] <= errors["native"]


def _experts_both_ways(config, x, gate_up, down):
    """run_experts on x's routed rows, and the same experts one matmul each (expert_mlp), with the
    gradients of both (to x and the weights) for one random output gradient."""
    from flashmoe import fast_matmul, reference
    tok, _, rows = reference.expert_rows(route(x.cpu(), random_weights(config), config), config.num_experts)
    leaves = [t.detach().requires_grad_() for t in (x[tok.to(x.device)], gate_up, down)]

    def one_by_one(rows_x, gu, dn):
        pieces, start = [], 0
        for e, n in enumerate(rows):
            pieces.append(reference.expert_mlp(rows_x[start:start + n], gu[e], dn[e], config, "mixed"))
            start += n
        return torch.cat(pieces)
    grad = torch.randn(len(tok), config.hidden_size, device=x.device).to(x.dtype)
    results = []
    for run in (lambda *t: reference.run_experts(t[0], rows, t[1], t[2], config, "mixed"), one_by_one):
        out = run(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    return fast_matmul.grouped_mm_serves(leaves[0], rows, gate_up, down), results


@pytest.mark.parametrize("dtype,tokens", [("bfloat16", 3), ("bfloat16", 200), ("float16", 3),
                                          ("float16", 200)])
def test_mixed_experts_grouped_or_one_by_one_are_bitwise_equal(dtype, tokens):
    # run_experts takes one grouped GEMM per projection where it can (CPU bf16; fp16 with few
    # rows per expert), else a matmul per expert: the same products either way, in the forward
    # and in the backward a training step runs
    config = small(dtype=dtype, hidden_size=64, intermediate_size=32, num_experts=8)
    w = random_weights(config)
    x = torch.randn(tokens, 64).to(config.torch_dtype)
    grouped, (ours, loop) = _experts_both_ways(config, x, w.gate_up_proj, w.down_proj)
    assert grouped == (dtype == "bfloat16" or tokens == 3)
    for a, b in zip(ours, loop):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hidden,intermediate,layout", [
    (12, 32, ""), (64, 20, ""), (64, 32, "gate_up with strides (1, 2I + 1)"), (64, 20, "down stored [I, H]")])
def test_experts_torch_cannot_group_run_one_by_one(hidden, intermediate, layout):
    # torch's grouped GEMM refuses a row that is not a multiple of 16 bytes (a hidden or
    # intermediate size that is not a multiple of 8 in bf16; h [n, I] whatever down's layout) and
    # a weight whose rows are neither contiguous nor 16-byte strided; such experts run one matmul
    # each instead of raising
    config = small(dtype="bfloat16", hidden_size=hidden, intermediate_size=intermediate)
    w = random_weights(config)
    gate_up, down = w.gate_up_proj, w.down_proj
    if layout.startswith("gate_up"):
        padded = torch.randn(config.num_experts, hidden, config.up_rows + 1).to(config.torch_dtype)
        gate_up = padded[..., :config.up_rows].transpose(1, 2)
    elif layout:
        down = down.transpose(1, 2).contiguous().transpose(1, 2)
    x = torch.randn(40, hidden).to(config.torch_dtype)
    grouped, (ours, loop) = _experts_both_ways(config, x, gate_up, down)
    assert not grouped
    for a, b in zip(ours, loop):
        assert torch.equal(a, b)


def test_grouped_operand_rule_is_torchs():
    # grouped_mm_operand says yes exactly where torch's grouped GEMM runs and no where it raises
    import torch.nn.functional as F
    from flashmoe import fast_matmul
    base = torch.randn(6, 40, 40).to(torch.bfloat16)
    x = torch.randn(12, 16).to(torch.bfloat16)
    offs = torch.tensor([4, 8, 12, 12, 12, 12], dtype=torch.int32)
    cases = [base[:, :16, :24], base[:, :16, :16].transpose(1, 2), base[:, :16, 1:25],
             base[:, :16, :24].contiguous(), base[:, :16, :24].transpose(1, 2).contiguous().transpose(1, 2),
             torch.randn(6, 24, 16).to(torch.bfloat16).transpose(1, 2),
             torch.randn(6, 16, 12).to(torch.bfloat16), torch.randn(6, 12, 16).to(torch.bfloat16).transpose(1, 2)]
    for b in cases:
        try:
            F.grouped_mm(x, b, offs=offs)
            runs = True
        except RuntimeError:
            runs = False
        assert fast_matmul.grouped_mm_operand(b) == runs, (b.shape, b.stride())
    assert {fast_matmul.grouped_mm_operand(b) for b in cases} == {True, False}


def test_a_bf16_layer_of_any_width_trains_on_the_cpu():
    # a bf16 layer whose sizes torch's grouped GEMM refuses used to raise "strides should be
    # multiple of 16 bytes" on the reference backend; it runs, forward and backward, as the oracle
    from flashmoe import FlashMoELayer
    config = small(dtype="bfloat16", hidden_size=12, intermediate_size=20, num_experts=4)
    layer = FlashMoELayer(config)
    x = torch.randn(64, 12).to(torch.bfloat16).requires_grad_()
    out = layer(x)
    out.float().square().sum().backward()
    assert layer.last_backend == "reference"
    want = oracle_forward(x.detach(), layer.weights(), config)
    assert relative_error(out.detach(), want) < 0.02
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.gpu
def test_cuda_grouped_experts_match_one_by_one_forward_and_backward():
    # on a GPU run_experts takes torch's grouped GEMM (one kernel on sm_90 in bf16): the forward
    # and every gradient are the per-expert matmuls' up to bf16 rounding of the GEMMs' results
    config = small(dtype="bfloat16", hidden_size=256, intermediate_size=128, num_experts=16, top_k=4)
    w = random_weights(config)
    x = torch.randn(1000, 256).to(config.torch_dtype).cuda()      # routed on the CPU, computed here
    grouped, (ours, loop) = _experts_both_ways(config, x, w.gate_up_proj.cuda(), w.down_proj.cuda())
    assert grouped
    for name, a, b in zip(("out", "d rows", "d gate_up", "d down"), ours, loop):
        assert relative_error(a.detach(), b.detach()) < 2 ** -6, name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_experts_forward_is_the_routed_part_of_moe_forward_with_input_scaling(dtype):
    """Given the router's choice, experts_forward computes what moe_forward does, Llama4's input
    scaling included: the weight scales the input and the output is summed with weight 1."""
    config = small(scoring="sigmoid", scale_expert_input=True, dtype=dtype)
    w = random_weights(config)
    x = torch.randn(16, 12).to(config.torch_dtype)
    routing = route(x, w, config)
    got = experts_forward(x, routing.ids, routing.weights, w.gate_up_proj, w.down_proj, config)
    assert torch.equal(got, moe_forward(x, w, config, routing=routing))


def test_routing_override_is_used():
    config = small()
    w = random_weights(config)
    x = torch.randn(4, 12)
    routing = route(x, w, config)
    routing.ids = (routing.ids + 1) % 8          # a different (still valid) choice
    assert not torch.equal(moe_forward(x, w, config, routing=routing), moe_forward(x, w, config))


def test_unknown_math_mode_is_refused():
    config = small()
    with pytest.raises(ValueError, match=r"math='tf32': allowed are contract, fp32, native"):
        moe_forward(torch.randn(2, 12), random_weights(config), config, math="tf32")
