"""flashmoe.moe_forward: torch tensors in, torch out; DLPack arrays in, the same library out."""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest
import torch

import flashmoe
from flashmoe import FlashMoELayer, MoEConfig, MoEWeights, moe_forward

CONFIG = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2, dtype="float32",
                   num_shared_experts=1, shared_expert_gate=True)


@pytest.fixture
def layer():
    return FlashMoELayer(CONFIG).requires_grad_(False)


def convert(weights, fn):
    return MoEWeights(**{f.name: (None if getattr(weights, f.name) is None else fn(getattr(weights, f.name)))
                         for f in dataclasses.fields(MoEWeights)})


def test_torch_in_torch_out_equals_the_layer(layer):
    x = torch.randn(2, 5, 16)
    out = moe_forward(x, layer.weights(), CONFIG)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    assert torch.equal(out, layer(x))
    assert torch.equal(moe_forward(x, layer.weights(), CONFIG, backend="reference"), out)


def test_numpy_in_numpy_out(layer):
    x = torch.randn(7, 16)
    out = moe_forward(x.numpy(), convert(layer.weights(), lambda t: t.numpy()), CONFIG)
    assert isinstance(out, np.ndarray) and out.shape == (7, 16)
    np.testing.assert_array_equal(out, layer(x).numpy())


class FakeCupyArray:
    """A cupy-like array: owns a tensor, exposes it through DLPack only."""

    def __init__(self, tensor):
        self._t = tensor

    def __dlpack__(self, **kwargs):
        return self._t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_cupy_arrays_come_back_as_cupy(layer, monkeypatch):
    fake = types.ModuleType("cupy")
    monkeypatch.setattr(FakeCupyArray, "__module__", "cupy")
    fake.ndarray = FakeCupyArray
    fake.from_dlpack = lambda a: FakeCupyArray(torch.from_dlpack(a))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    x = torch.randn(3, 16)
    # x as cupy; weights mixed: some cupy, some torch
    weights = layer.weights()
    weights = dataclasses.replace(weights, gate_up_proj=FakeCupyArray(weights.gate_up_proj),
                                  down_proj=FakeCupyArray(weights.down_proj))
    out = moe_forward(FakeCupyArray(x), weights, CONFIG)
    assert isinstance(out, FakeCupyArray)
    assert torch.equal(torch.from_dlpack(out), layer(x))


def test_non_arrays_are_refused(layer):
    with pytest.raises(TypeError, match=r"x is a list: expected a torch.Tensor or an array with __dlpack__"):
        moe_forward([[0.0] * 16], layer.weights(), CONFIG)
    bad = dataclasses.replace(layer.weights(), down_proj="weights")
    with pytest.raises(TypeError, match=r"weights.down_proj is a str"):
        moe_forward(torch.randn(2, 16), bad, CONFIG)


def test_weight_checks_name_the_tensor(layer):
    w = layer.weights()
    with pytest.raises(ValueError, match=r"weights.gate_up_proj has shape \(8, 16, 15\): expected \(8, 16, 16\)"):
        moe_forward(torch.randn(2, 16), dataclasses.replace(w, gate_up_proj=w.gate_up_proj[..., :15]), CONFIG)
    with pytest.raises(ValueError, match=r"weights.shared_gate_weight is None: the config needs it"):
        moe_forward(torch.randn(2, 16), dataclasses.replace(w, shared_gate_weight=None), CONFIG)
    with pytest.raises(TypeError, match=r"weights.router_weight has dtype torch.bfloat16: expected torch.float32"):
        moe_forward(torch.randn(2, 16), dataclasses.replace(w, router_weight=w.router_weight.bfloat16()), CONFIG)


def test_kernel_backend_without_gpu_raises(layer):
    with pytest.raises(flashmoe.KernelUnavailable, match="CUDA devices only"):
        moe_forward(torch.randn(2, 16), layer.weights(), CONFIG, backend="kernel")


@pytest.mark.gpu
def test_real_cupy_round_trip():
    cupy = pytest.importorskip("cupy")
    layer = FlashMoELayer(CONFIG.replace(dtype="float16"), device="cuda").requires_grad_(False)
    x = torch.randn(64, 16, device="cuda", dtype=torch.float16)
    out = moe_forward(cupy.from_dlpack(x), layer.weights(), layer.config)
    assert isinstance(out, cupy.ndarray)
    assert torch.equal(torch.from_dlpack(out), moe_forward(x, layer.weights(), layer.config))
