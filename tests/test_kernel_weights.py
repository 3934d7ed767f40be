"""KernelWeights (host/weights.py): the views the kernel reads are checked, follow every change
of a weight (an optimizer step, load_state_dict) and are not rebuilt otherwise; the wgmma
engine's tensor maps follow the views."""

import pytest
import torch

from flashmoe.checks import Case, make_inputs
from flashmoe.config import MoEConfig
from flashmoe.host.spec import KernelSpec, wgmma_spec
from flashmoe.host.weights import KernelWeights

CPU = torch.device("cpu")


def setup(routing="router", **kw):
    config = MoEConfig(**{**dict(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2,
                                 dtype="bfloat16"), **kw})
    _, weights = make_inputs(Case("weights", config, world=1, tokens=1), CPU)
    return config, weights, KernelWeights(config, CPU, config.num_experts, routing, emulate=True)


def test_views_are_kept_until_a_weight_changes_in_place():
    """An in-place update (what an optimizer step and load_state_dict do) must reach the kernel,
    also through a view that is a copy: the router with the shared-expert gate appended."""
    config, weights, kw = setup(shared_expert_gate=True, num_shared_experts=1)
    first = kw.views(weights)
    assert kw.views(weights) is first                          # nothing changed: nothing rebuilt
    assert torch.equal(first["router"], torch.cat([weights.router_weight, weights.shared_gate_weight]))
    with torch.no_grad():
        weights.shared_gate_weight.add_(1.0)
        weights.gate_up_proj.mul_(2.0)
    second = kw.views(weights)
    assert second is not first
    assert torch.equal(second["router"][-1:], weights.shared_gate_weight)
    assert kw.pointer("gate_up") == weights.gate_up_proj.data_ptr()   # no copy of an aligned weight
    assert kw.pointer("bias") == 0                             # the config has no selection bias


def test_a_replaced_weight_is_read_from_its_new_storage():
    config, weights, kw = setup()
    kw.views(weights)
    weights.down_proj = weights.down_proj.clone()
    kw.views(weights)
    assert kw.pointer("down") == weights.down_proj.data_ptr()


def test_wrong_weights_are_named_with_what_was_expected():
    config, weights, kw = setup()
    weights.down_proj = weights.down_proj[:, :, :16]
    with pytest.raises(ValueError, match=r"down_proj has shape \(4, 64, 16\), expected \(4, 64, 32\)"):
        kw.views(weights)
    config, weights, kw = setup(selection_bias=True)
    weights.selection_bias = None
    with pytest.raises(ValueError, match="needs weight selection_bias but it is None"):
        kw.views(weights)


def test_given_routing_reads_no_router():
    config, weights, kw = setup(routing="given")
    weights.router_weight = None
    assert set(kw.views(weights)) == {"gate_up", "down"} and kw.pointer("router") == 0


def test_tensor_maps_follow_the_views():
    """One set of maps per B box, encoded once, and encoded again for new views (they hold the
    weights' addresses); mma_sync specs take none."""
    config, weights, kw = setup()
    kw.views(weights)
    spec = wgmma_spec(config.dtype, config.gated, stages=3)
    maps = kw.maps(spec)
    assert set(maps) >= {"gate_up", "down"} and kw.maps(spec) is maps
    assert kw.maps(KernelSpec(arch="sm_80", dtype=config.dtype, gated=config.gated)) is None
    weights.gate_up_proj = weights.gate_up_proj.clone()
    kw.views(weights)
    assert kw.maps(spec) is not maps and kw.maps(spec)["gate_up"] != maps["gate_up"]
