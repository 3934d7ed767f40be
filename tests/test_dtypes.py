"""Dtypes as a torch user changes them: casts of the layer or its model, and autocast. The
router side stays fp32 by contract; the experts follow the cast; results follow the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flashmoe import FlashMoELayer, MoEConfig, accuracy, reference

FULL = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2, dtype="float32",
            scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, norm_topk_prob=True,
            num_shared_experts=1, shared_expert_gate=True)
ROUTER_SIDE = ("router_weight", "selection_bias", "shared_gate_weight")
EXPERT_SIDE = ("gate_up_proj", "down_proj", "shared_gate_up_proj", "shared_down_proj")

CASTS = {
    "to(bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "to(float16)": (lambda m: m.to(dtype=torch.float16), torch.float16),
    "half()": (lambda m: m.half(), torch.float16),
    "bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16),
    "float()": (lambda m: m.float(), torch.float32),
    "to('cpu', bfloat16)": (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
}


def new_layer():
    layer = FlashMoELayer(MoEConfig(**FULL))
    with torch.no_grad():
        layer.selection_bias.normal_()
    return layer


def check_follows(layer, dtype, router_before):
    assert layer.config.dtype == {torch.bfloat16: "bfloat16", torch.float16: "float16",
                                  torch.float32: "float32"}[dtype]
    for name in EXPERT_SIDE:
        assert getattr(layer, name).dtype == dtype, name
    for name in ROUTER_SIDE:
        assert getattr(layer, name).dtype == torch.float32, name
    # fp32 kept, not rounded through the low dtype and back
    assert torch.equal(layer.router_weight, router_before)
    x = torch.randn(9, 16).to(dtype)
    with torch.no_grad():
        out, routing = layer(x, return_routing=True)
        assert out.dtype == dtype
        ok, err, tol = accuracy.check(out, x, layer.weights(), layer.config)
    assert ok, (err, tol)
    assert torch.equal(routing.ids, reference.route(x, layer.weights(), layer.config).ids)


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_a_cast_layer_keeps_working_and_its_router_stays_fp32(cast):
    fn, dtype = CASTS[cast]
    layer = new_layer()
    router = layer.router_weight.detach().clone()
    assert fn(layer) is layer
    check_follows(layer, dtype, router)
    layer.float()                                      # and back
    check_follows(layer, torch.float32, router)


def test_casting_the_model_reaches_the_layer():
    model = nn.Sequential(nn.Linear(16, 16), new_layer())
    router = model[1].router_weight.detach().clone()
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    check_follows(model[1], torch.bfloat16, router)


def test_a_cast_keeps_gradients_of_the_router_fp32():
    layer = new_layer()
    layer(torch.randn(3, 16)).sum().backward()
    layer.half()
    assert layer.router_weight.grad.dtype == torch.float32
    assert layer.gate_up_proj.grad.dtype == torch.float16


def test_state_dict_of_a_cast_layer_loads_into_a_new_one():
    a = new_layer().bfloat16()
    b = FlashMoELayer(MoEConfig(**{**FULL, "dtype": "bfloat16"}))
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_follows_its_dtype_with_an_fp32_router(dtype):
    layer = new_layer()
    x = torch.randn(11, 16)
    with torch.autocast("cpu", dtype=dtype):
        out, routing = layer(x, return_routing=True)
    assert out.dtype == dtype
    assert routing.logits.dtype == torch.float32
    # exactly the layer cast to the autocast dtype, whose router is fp32
    cast = new_layer()
    cast.load_state_dict(layer.state_dict())
    cast.to(dtype)
    with torch.no_grad():
        expected, expected_routing = cast(x.to(dtype), return_routing=True)
    assert torch.equal(routing.ids, expected_routing.ids)
    assert torch.equal(routing.logits, reference.router_logits(x.to(dtype), layer.router_weight))
    assert torch.equal(out, expected)
    # gradients reach the fp32 parameters through the casts, as with nn.Linear under autocast
    out.float().sum().backward()
    assert layer.gate_up_proj.grad.dtype == torch.float32 and layer.gate_up_proj.grad.abs().sum() > 0
    assert layer.router_weight.grad.abs().sum() > 0


def test_autocast_leaves_the_router_of_a_low_precision_layer_fp32():
    layer = new_layer().bfloat16()
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out, routing = layer(x, return_routing=True)       # fp32 input accepted and cast
    assert out.dtype == torch.bfloat16
    plain = reference.route(x.bfloat16(), layer.weights(), layer.config)
    assert torch.equal(routing.ids, plain.ids) and torch.equal(routing.weights, plain.weights)


def test_numpy_integers_are_accepted_where_ints_are():
    config = MoEConfig(hidden_size=np.int64(16), intermediate_size=np.int32(8),
                       num_experts=np.int64(8), top_k=np.int16(2), dtype="float32",
                       routed_scaling_factor=np.float32(1.5), capacity_factor=np.float64(2.0))
    assert config == MoEConfig(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2,
                               dtype="float32", routed_scaling_factor=1.5, capacity_factor=2.0)
    assert type(config.hidden_size) is int and hash(config)
    layer = FlashMoELayer(config, virtual_world=np.int64(2), max_tokens=np.int32(64))
    assert type(layer.virtual_world) is int and type(layer.max_tokens) is int
    with pytest.raises(ValueError, match="top_k=True: must be an integer"):
        MoEConfig(hidden_size=16, intermediate_size=8, num_experts=8, top_k=True)


def test_a_copy_or_a_pickle_is_a_layer_of_its_own():
    import copy
    import io
    layer = new_layer()
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert other._owner != layer._owner
        layer.last_backend = None
        with torch.no_grad():
            assert torch.equal(other(x), expected)
        assert other.last_backend == "reference" and layer.last_backend is None
