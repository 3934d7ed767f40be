"""flashmoe.experts_forward: the experts and the combine with the routing given."""

from __future__ import annotations

import pytest
import torch

from flashmoe import FlashMoELayer, KernelUnavailable, MoEConfig, accuracy, experts_forward, reference
from flashmoe.host import emulator


def make(**kw):
    fields = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=3, dtype="float32")
    fields.update(kw)
    return MoEConfig(**fields)


@pytest.mark.parametrize("fields", [dict(), dict(gated=False, activation="gelu_tanh"),
                                    dict(dtype="bfloat16", activation="relu")])
def test_given_the_layer_routing_it_computes_the_layer(fields):
    config = make(**fields)
    layer = FlashMoELayer(config).requires_grad_(False)
    x = torch.randn(2, 9, 16).to(config.torch_dtype)
    routing = reference.route(x.reshape(-1, 16), layer.weights(), config)
    out = experts_forward(x, routing.ids, routing.weights, layer.gate_up_proj, layer.down_proj,
                          activation=config.activation, gated=config.gated)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, layer(x))


def test_ids_outside_the_experts_are_skipped():
    config = make()
    layer = FlashMoELayer(config).requires_grad_(False)
    x = torch.randn(6, 16)
    ids = torch.tensor([[0, 1, -1], [8, 2, 3], [4, 5, 6], [-1, -1, -1], [7, 100, 0], [1, 1, 2]])
    w = torch.rand(6, 3)
    out = experts_forward(x, ids, w, layer.gate_up_proj, layer.down_proj)
    expected = torch.zeros(6, 16)
    for t in range(6):
        for j in range(3):
            e = int(ids[t, j])
            if 0 <= e < 8:
                y = reference.expert_mlp(x[t:t + 1], layer.gate_up_proj[e], layer.down_proj[e],
                                         config, "fp32")
                expected[t] += w[t, j] * y[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[3], torch.zeros(16))


def test_gradients_reach_the_input_the_weights_and_the_experts():
    config = make()
    layer = FlashMoELayer(config)
    x = torch.randn(10, 16, requires_grad=True)
    logits = x @ layer.router_weight.t()
    w, ids = torch.softmax(logits, -1).topk(3)
    out = experts_forward(x, ids, w, layer.gate_up_proj, layer.down_proj)
    out.square().sum().backward()
    got = [x.grad, layer.router_weight.grad, layer.gate_up_proj.grad, layer.down_proj.grad]
    x.grad = None
    layer.zero_grad()
    logits = x @ layer.router_weight.t()
    w, ids = torch.softmax(logits, -1).topk(3)
    reference.experts_forward(x, ids, w, layer.gate_up_proj, layer.down_proj, config,
                              math="fp32").square().sum().backward()
    for a, b in zip(got, [x.grad, layer.router_weight.grad, layer.gate_up_proj.grad,
                          layer.down_proj.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_is_within_the_accuracy_rule():
    config = make(dtype="bfloat16", hidden_size=64, intermediate_size=32, top_k=2)
    layer = FlashMoELayer(config).requires_grad_(False)
    x = torch.randn(50, 64, dtype=torch.bfloat16)
    routing = reference.route(x, layer.weights(), config)
    out = experts_forward(x, routing.ids, routing.weights, layer.gate_up_proj, layer.down_proj)
    ok, err, tol = accuracy.check(out, x, layer.weights(), config, routing=routing)
    assert ok and err > 0, (err, tol)


def test_bad_inputs_say_what_was_expected():
    gu, dn = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    x, ids, w = torch.randn(5, 16), torch.zeros(5, 2, dtype=torch.long), torch.rand(5, 2)
    with pytest.raises(ValueError, match=r"topk_ids has shape \(4, 2\).*\[5, k\]"):
        experts_forward(x, ids[:4], w[:4], gu, dn)
    with pytest.raises(ValueError, match="topk_ids .* dtype torch.float32: expected integer ids"):
        experts_forward(x, w, w, gu, dn)
    with pytest.raises(ValueError, match=r"topk_weights has shape \(5, 3\)"):
        experts_forward(x, ids, torch.rand(5, 3), gu, dn)
    with pytest.raises(ValueError, match=r"expected \[4, 8, 16\] and \[4, 16, 8\], i.e. \[E, I, H\]"):
        experts_forward(x, ids, w, gu, dn, gated=False)
    with pytest.raises(ValueError, match=r"\[E, H, 2I\] and \[E, I, H\] with I=16 \(transposed\)"):
        experts_forward(x, ids, w, gu, dn, transposed=True)
    with pytest.raises(TypeError, match="down_proj has dtype torch.bfloat16: expected x's dtype"):
        experts_forward(x, ids, w, gu, dn.bfloat16())
    with pytest.raises(ValueError, match="activation='swish'"):
        experts_forward(x, ids, w, gu, dn, activation="swish")
    with pytest.raises(ValueError, match="give both gate_up_bias and down_bias"):
        experts_forward(x, ids, w, gu, dn, gate_up_bias=torch.zeros(4, 16))
    with pytest.raises(ValueError, match=r"down_bias is \(4, 8\): expected a tensor of shape \[4, 16\]"):
        experts_forward(x, ids, w, gu, dn, gate_up_bias=torch.zeros(4, 16), down_bias=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="interleaved=True .* needs gated=True"):
        experts_forward(x, ids, w, gu[:, :8], dn, gated=False, interleaved=True)
    with pytest.raises(ValueError, match="virtual_world=0"):
        experts_forward(x, ids, w, gu, dn, virtual_world=0)
    with pytest.raises(KernelUnavailable, match="backend='kernel' cannot run: the input is on cpu"):
        experts_forward(x, ids, w, gu, dn, backend="kernel")
    assert experts_forward(x, ids, w, gu, dn).shape == (5, 16)


def _loop(x, ids, w, gate_up, down, config, gate_up_bias=None, down_bias=None):
    """The routing-given formula token by token, slot by slot, in fp32 (with
    config.scale_expert_input the weight scales the slot's input, and its output is added as it is)."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < gate_up.shape[0]:
                scale, w_out = (w[t, j], 1.0) if config.scale_expert_input else (1.0, w[t, j])
                h = (scale * x[t:t + 1].float()) @ gate_up[e].float().t()
                if gate_up_bias is not None:
                    h = h + gate_up_bias[e].float()
                g, u = h.chunk(2, dim=-1)
                if config.activation == "swiglu_clamped":
                    g = g.clamp(max=config.swiglu_limit)
                    u = u.clamp(-config.swiglu_limit, config.swiglu_limit)
                    h = g * torch.sigmoid(config.swiglu_alpha * g) * (u + 1)
                else:
                    h = torch.nn.functional.silu(g) * u
                y = h @ down[e].float().t()
                if down_bias is not None:
                    y = y + down_bias[e].float()
                out[t] += w_out * y[0]
    return out


def test_transposed_interleaved_biased_experts_as_gpt_oss_stores_them():
    """GPT-OSS's layout: gate_up_proj [E, H, 2I] with gate and up columns alternating, down_proj
    [E, I, H], biases, the clamped SwiGLU: against a loop over the formula."""
    torch.manual_seed(0)
    E, H, I = 4, 16, 8
    gate_up, down = torch.randn(E, H, 2 * I), torch.randn(E, I, H) * 0.3
    gate_up_bias, down_bias = torch.randn(E, 2 * I), torch.randn(E, H)
    x, w = torch.randn(7, H), torch.rand(7, 2)
    ids = torch.tensor([[0, 1], [2, 3], [3, -1], [1, 0], [2, 2], [0, 3], [1, 2]])
    out = experts_forward(x, ids, w, gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias,
                          transposed=True, interleaved=True, activation="swiglu_clamped",
                          swiglu_alpha=1.5, swiglu_limit=2.0)
    # The loop's layout: [E, 2I, H] with gate rows then up rows.
    concat = torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1).transpose(1, 2)
    bias = torch.cat([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], dim=-1)
    config = make(activation="swiglu_clamped", swiglu_alpha=1.5, swiglu_limit=2.0)
    expected = _loop(x, ids, w, concat, down.transpose(1, 2), config, bias, down_bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the clamp is reached: a limit of 2 changes the result
    loose = experts_forward(x, ids, w, gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias,
                            transposed=True, interleaved=True, activation="swiglu_clamped",
                            swiglu_alpha=1.5, swiglu_limit=50.0)
    assert not torch.allclose(loose, out)


def test_weights_that_scale_the_inputs_as_llama4_applies_them():
    """scale_expert_input=True (Llama4; vLLM's apply_router_weight_on_input): expert(w x) summed
    unweighted, against the loop; weights of either sign, a skipped slot, and a repeated expert,
    whose one input is scaled by the summed weight (the slots merge before the expert runs)."""
    torch.manual_seed(2)
    E, H, I = 4, 16, 8
    gate_up, down = torch.randn(E, 2 * I, H), torch.randn(E, H, I) * 0.3
    x, w = torch.randn(6, H), torch.randn(6, 2)
    ids = torch.tensor([[0, 1], [2, -1], [3, 0], [1, 2], [0, 3], [2, 1]])
    config = make(scale_expert_input=True)
    out = experts_forward(x, ids, w, gate_up, down, scale_expert_input=True)
    torch.testing.assert_close(out, _loop(x, ids, w, gate_up, down, config), rtol=1e-5, atol=1e-5)
    # a nonlinear expert: scaling the input is not scaling the output
    assert not torch.allclose(out, experts_forward(x, ids, w, gate_up, down), rtol=1e-3, atol=1e-3)
    repeated = experts_forward(x[:1], torch.tensor([[2, 2]]), w[:1], gate_up, down, scale_expert_input=True)
    merged = _loop(x[:1], torch.tensor([[2]]), w[:1].sum(1, keepdim=True), gate_up, down, config)
    torch.testing.assert_close(repeated, merged, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scale_expert_input=1: must be True or False"):
        experts_forward(x, ids, w, gate_up, down, scale_expert_input=1)


def test_gradients_of_scaled_inputs_reach_the_weights_and_the_input():
    """Backward with scale_expert_input: d/dw goes through the expert, not through a product with
    its output; against autograd through the loop."""
    torch.manual_seed(3)
    E, H, I = 4, 16, 8
    ids = torch.tensor([[0, 1], [2, -1], [3, 0], [1, 2], [0, 3]])
    leaves = [torch.randn(5, H), torch.randn(5, 2), torch.randn(E, 2 * I, H), torch.randn(E, H, I) * 0.3]
    grads = []
    for run in (lambda x, w, gu, dn: experts_forward(x, ids, w, gu, dn, scale_expert_input=True),
                lambda x, w, gu, dn: _loop(x, ids, w, gu, dn, make(scale_expert_input=True))):
        inputs = [t.clone().requires_grad_() for t in leaves]
        run(*inputs).square().sum().backward()
        grads.append([t.grad for t in inputs])
    for name, got, want in zip(("x", "topk_weights", "gate_up_proj", "down_proj"), *grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_gradients_reach_the_biases():
    E, H, I = 4, 16, 8
    gate_up, down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    gate_up_bias = torch.randn(E, 2 * I, requires_grad=True)
    down_bias = torch.randn(E, H, requires_grad=True)
    x, w = torch.randn(6, H), torch.rand(6, 2)
    ids = torch.tensor([[0, 1], [2, 3], [3, -1], [1, 0], [2, 1], [0, 3]])
    experts_forward(x, ids, w, gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias).sum().backward()
    # d out / d down_bias[e] = the sum of the weights routed to e, for every column
    routed = torch.zeros(E)
    for t in range(6):
        for j in range(2):
            if ids[t, j] >= 0:
                routed[ids[t, j]] += w[t, j]
    torch.testing.assert_close(down_bias.grad, routed[:, None].expand(E, H), rtol=1e-5, atol=1e-6)
    assert gate_up_bias.grad.abs().sum() > 0


def test_an_expert_map_runs_this_ranks_share_of_the_experts():
    """expert_map (vLLM's expert parallelism): a rank holds some of the experts, the map turns
    global ids into its local ones, and the ranks' outputs sum to the whole layer's. Slots held
    elsewhere (-1, or 255 in an unsigned map) and ids outside the map are skipped."""
    torch.manual_seed(4)
    G, H, I = 8, 16, 8
    gate_up, down = torch.randn(G, 2 * I, H), torch.randn(G, H, I) * 0.3
    x, w = torch.randn(7, H), torch.randn(7, 3)
    ids = torch.stack([torch.randperm(G)[:3] for _ in range(7)])
    ids[2, 1], ids[4, 0] = -1, G
    held = (torch.tensor([5, 0, 3, 6]), torch.tensor([1, 2, 4, 7]))     # neither in order
    parts = []
    for experts, dtype, elsewhere in zip(held, (torch.int32, torch.uint8), (-1, 255)):
        expert_map = torch.full((G,), elsewhere, dtype=dtype)
        expert_map[experts] = torch.arange(4, dtype=dtype)
        local = torch.tensor([[experts.tolist().index(e) if e in experts else -1 for e in row]
                              for row in ids.tolist()])
        part = experts_forward(x, ids, w, gate_up[experts], down[experts], expert_map=expert_map)
        torch.testing.assert_close(part, _loop(x, local, w, gate_up[experts], down[experts], make()),
                                   rtol=1e-5, atol=1e-5)
        parts.append(part)
    torch.testing.assert_close(parts[0] + parts[1], experts_forward(x, ids, w, gate_up, down),
                               rtol=1e-5, atol=1e-5)
    # an unsigned map of 256 experts, where 255 is a real one: ids outside the map stay skipped
    big = torch.randn(256, 2 * I, H), torch.randn(256, H, I)
    edge = torch.tensor([[-1, 3], [300, 255]])
    out = experts_forward(x[:2], edge, w[:2, :2], *big, expert_map=torch.arange(256).to(torch.uint8))
    torch.testing.assert_close(out, _loop(x[:2], edge, w[:2, :2], *big, make()), rtol=1e-5, atol=1e-5)
    for bad, says in ((torch.zeros(G), "dtype torch.float32"), (torch.zeros(2, G, dtype=torch.long), r"shape \(2, 8\)"),
                      (torch.zeros(0, dtype=torch.long), r"shape \(0,\)"), (list(range(G)), "a list")):
        with pytest.raises(ValueError, match=f"expert_map has .*{says}.*1-D integer tensor"):
            experts_forward(x, ids, w, gate_up, down, expert_map=bad)
    with pytest.raises(ValueError, match="expert_map is on meta but topk_ids is on cpu"):
        experts_forward(x, ids, w, gate_up, down, expert_map=torch.zeros(G, dtype=torch.long, device="meta"))


def test_more_slots_than_experts():
    """k > E: the slots can only repeat or skip; the reference takes it."""
    gate_up, down = torch.randn(2, 16, 16), torch.randn(2, 16, 8)
    x, w = torch.randn(3, 16), torch.rand(3, 3)
    ids = torch.tensor([[0, 1, 0], [1, -1, 1], [0, 0, 0]])
    out = experts_forward(x, ids, w, gate_up, down)
    torch.testing.assert_close(out, _loop(x, ids, w, gate_up, down, make()), rtol=1e-5, atol=1e-5)
    with pytest.raises(KernelUnavailable, match="3 slots per token for 2 experts"):
        experts_forward(x, ids, w, gate_up, down, backend="emulated")


needs_emulator = pytest.mark.skipif(emulator.emulator_available() is not None,
                                    reason=f"emulator unavailable: {emulator.emulator_available()}")


@needs_emulator
@pytest.mark.parametrize("world,scale", [(1, False), (4, False), (2, True)])
def test_the_kernel_serves_it_on_the_emulator(world, scale):
    """backend='emulated': the kernel's source with the router replaced by the given routing (and
    with scale_expert_input, the kernel built to scale its GEMM0 rows)."""
    torch.manual_seed(1)
    E, H, I = 8, 64, 32
    gate_up = (torch.randn(E, 2 * I, H) * H ** -0.5).bfloat16()
    down = (torch.randn(E, I, H) * I ** -0.5).bfloat16()      # transposed: a copy in its layout
    x = torch.randn(2, 20, H).bfloat16()
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(40)])
    ids[5, 1] = -1
    w = torch.rand(40, 2)
    out = experts_forward(x, ids, w, gate_up.transpose(1, 2), down, transposed=True, backend="emulated",
                          virtual_world=world, scale_expert_input=scale)
    config = make(dtype="bfloat16", hidden_size=H, intermediate_size=I, num_experts=E, top_k=2,
                  scale_expert_input=scale)
    routing = reference.given_routing(ids, w, E)
    weights = reference.MoEWeights(router_weight=None, gate_up_proj=gate_up, down_proj=down.transpose(1, 2))
    ok, err, tol = accuracy.check(out.reshape(40, H), x.reshape(40, H), weights, config, routing=routing)
    assert ok, (err, tol)
    with pytest.raises(KernelUnavailable, match="autograd is recording"):
        experts_forward(x, ids, w.requires_grad_(), gate_up, down.transpose(1, 2), backend="emulated")
