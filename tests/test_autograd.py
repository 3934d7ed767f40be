"""Autograd two ways: in eager mode the reference runs as plain torch and autograd keeps its
activations (nothing is computed twice); in a compiled or exported graph the custom ops run, and
their backward recomputes the forward from the inputs. Both differentiate the same code, so
they must give the same bits."""

from __future__ import annotations

import pytest
import torch

from flashmoe import FlashMoELayer, MoEConfig, experts_forward, ops, reference

LAYERS = {
    "deepseek_groups_shared_gate": dict(
        hidden_size=16, intermediate_size=8, num_experts=8, top_k=2, dtype="float32", scoring="sigmoid",
        selection_bias=True, n_group=4, topk_group=2, norm_topk_prob=True, num_shared_experts=2,
        shared_intermediate_size=4, shared_expert_gate=True),
    "bf16_capacity": dict(hidden_size=32, intermediate_size=16, num_experts=8, top_k=2, dtype="bfloat16",
                          capacity_factor=0.75),
    "gpt_oss_biases": dict(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2, dtype="float32",
                           router_bias=True, expert_bias=True, activation="swiglu_clamped"),
    "llama4_scaled_input": dict(hidden_size=16, intermediate_size=8, num_experts=4, top_k=1, dtype="float32",
                                scoring="sigmoid", scale_expert_input=True, num_shared_experts=1,
                                shared_intermediate_size=8),
}


def _through_the_op(monkeypatch):
    """Make every forward take the op, as a compiled graph does."""
    monkeypatch.setattr(ops, "autograd_in_eager", lambda grad, backend: False)


def _layer_grads(layer, x, g):
    leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]
    out = layer(x)
    return [out.detach(), *torch.autograd.grad(out, leaves, g)]


def _random_layer(fields):
    layer = FlashMoELayer(MoEConfig(**fields))
    with torch.no_grad():       # fresh values everywhere, the zero-initialised biases included
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_the_layer_gives_the_same_bits_eager_and_through_the_op(name, monkeypatch):
    torch.manual_seed(0)
    layer = _random_layer(LAYERS[name])
    x = torch.randn(2, 13, layer.config.hidden_size).to(layer.config.torch_dtype).requires_grad_()
    g = torch.randn_like(x)
    eager = _layer_grads(layer, x, g)
    _through_the_op(monkeypatch)
    op = _layer_grads(layer, x, g)
    names = ["out", "x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    assert len(eager) == len(names) > 4
    for n, a, b in zip(names, eager, op):
        assert torch.equal(a, b), n
        assert n == "out" or a.abs().sum() > 0, f"{n}: no gradient reached it"


def test_autocast_gives_the_same_bits_eager_and_through_the_op(monkeypatch):
    """The forward under autocast, the backward outside it, as torch documents autocast (a
    backward under autocast would also run the eager router's backward matmuls in bf16)."""
    torch.manual_seed(1)
    layer = _random_layer(LAYERS["deepseek_groups_shared_gate"])
    x, g = torch.randn(11, 16, requires_grad=True), torch.randn(11, 16, dtype=torch.bfloat16)
    leaves = [x, *layer.parameters()]

    def grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        return [out.detach(), *torch.autograd.grad(out, leaves, g)]
    eager = grads()
    _through_the_op(monkeypatch)
    op = grads()
    assert eager[0].dtype == torch.bfloat16 and layer.router_weight.dtype == torch.float32
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


class _CountExperts:
    """Counts the reference's expert computations (reference.run_experts calls)."""

    def __init__(self, monkeypatch):
        self.calls, real = 0, reference.run_experts

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(reference, "run_experts", counted)


@pytest.mark.parametrize("through_op", [False, True])
def test_only_the_op_computes_the_forward_again_in_the_backward(through_op, monkeypatch):
    layer = _random_layer(LAYERS["bf16_capacity"])
    x = torch.randn(9, 32, dtype=torch.bfloat16, requires_grad=True)
    if through_op:
        _through_the_op(monkeypatch)
    count = _CountExperts(monkeypatch)
    out = layer(x)
    assert count.calls == 1
    out.float().square().sum().backward()
    assert count.calls == (2 if through_op else 1)
    assert layer.last_backend == "reference"


def test_the_routing_returned_under_autograd_is_the_ops():
    """ids, weights, kept and the shared gate are decisions without a graph, as the op returns
    them; the logits are differentiable (a load-balancing loss reaches the router)."""
    torch.manual_seed(2)
    layer = _random_layer(LAYERS["deepseek_groups_shared_gate"])
    x = torch.randn(7, 16, requires_grad=True)
    _, routing = layer(x, return_routing=True)
    with torch.no_grad():
        _, plain = layer(x, return_routing=True)
    for field in ("ids", "weights", "kept", "shared_gate", "logits"):
        got, want = getattr(routing, field), getattr(plain, field)
        assert torch.equal(got, want) and got.dtype == want.dtype, field
        assert got.requires_grad == (field == "logits"), field
    routing.logits.logsumexp(-1).square().mean().backward()
    assert layer.router_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("extras", [dict(), dict(scale_expert_input=True),
                                    dict(activation="swiglu_clamped", biases=True)])
def test_the_routing_given_experts_give_the_same_bits_eager_and_through_the_op(extras, monkeypatch):
    torch.manual_seed(3)
    E, H, I = 4, 16, 8
    extras = dict(extras)
    biases = extras.pop("biases", False)
    ids = torch.tensor([[0, 1], [2, -1], [3, 3], [1, 2], [0, 3], [2, 0]])    # a skip and a repeat
    leaves = [torch.randn(6, H), torch.rand(6, 2), torch.randn(E, 2 * I, H), torch.randn(E, H, I) * 0.3]
    if biases:
        leaves += [torch.randn(E, 2 * I), torch.randn(E, H)]
    g = torch.randn(6, H)

    def grads():
        inputs = [t.clone().requires_grad_() for t in leaves]
        x, w, gate_up, down, *bias = inputs
        out = experts_forward(x, ids, w, gate_up, down, **extras,
                              **(dict(gate_up_bias=bias[0], down_bias=bias[1]) if biases else {}))
        return [out.detach(), *torch.autograd.grad(out, inputs, g)]
    count = _CountExperts(monkeypatch)
    eager = grads()
    assert count.calls == 1
    _through_the_op(monkeypatch)
    op = grads()
    assert count.calls == 3
    for a, b in zip(eager, op):
        assert torch.equal(a, b)
    assert all(t.abs().sum() > 0 for t in eager[1:])
