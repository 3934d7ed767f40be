"""flashmoe.experts_forward: the experts and the combine with the routing given."""

from __future__ import annotations

import pytest
import torch

from flashmoe import FlashMoELayer, MoEConfig, accuracy, experts_forward, reference


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
    with pytest.raises(ValueError, match=r"expected \[E, 8, 16\] \(I=8\)"):
        experts_forward(x, ids, w, gu, dn, gated=False)
    with pytest.raises(TypeError, match="down_proj has dtype torch.bfloat16: expected x's dtype"):
        experts_forward(x, ids, w, gu, dn.bfloat16())
    with pytest.raises(ValueError, match="activation='swish'"):
        experts_forward(x, ids, w, gu, dn, activation="swish")
    with pytest.raises(ValueError, match="backend='kernel': the routing-given form runs on"):
        experts_forward(x, ids, w, gu, dn, backend="kernel")
    assert experts_forward(x, ids, w, gu, dn).shape == (5, 16)
