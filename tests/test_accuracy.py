"""flashmoe.accuracy: the tolerance rule and the check built on it."""

from __future__ import annotations

import math

import pytest
import torch

from flashmoe import FlashMoELayer, MoEConfig, reference
from flashmoe.accuracy import check, max_abs_error, tolerance


def test_max_abs_error():
    a = torch.tensor([1.0, 2.0, float("inf"), -3.0])
    assert max_abs_error(a, torch.tensor([1.0, 2.5, float("inf"), -3.0])) == 0.5
    assert max_abs_error(a, torch.tensor([1.0, 2.0, 5.0, -3.0])) == math.inf
    assert max_abs_error(a, torch.tensor([1.0, float("nan"), float("inf"), -3.0])) == math.inf
    assert max_abs_error(a.bfloat16(), a) == 0.0
    assert max_abs_error(torch.empty(0, 4), torch.empty(0, 4)) == 0.0
    with pytest.raises(ValueError, match=r"shapes differ: \(4,\) vs \(3,\)"):
        max_abs_error(a, a[:3])


def test_tolerance_is_twice_torch_error_plus_a_floor():
    assert tolerance(0.0) == 1e-3
    assert tolerance(0.01) == pytest.approx(0.021)


@pytest.fixture
def case():
    config = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2,
                       dtype="bfloat16", num_shared_experts=1)
    layer = FlashMoELayer(config).requires_grad_(False)
    x = torch.randn(48, 64, dtype=torch.bfloat16)
    return x, layer.weights(), config


def test_contract_and_native_results_pass(case):
    x, w, config = case
    for math_mode in ("contract", "native"):
        ok, err, tol = check(reference.moe_forward(x, w, config, math=math_mode), x, w, config)
        assert ok and 0 < err <= tol


def test_a_wrong_result_fails(case):
    x, w, config = case
    out = reference.moe_forward(x, w, config)
    _, _, tol = check(out, x, w, config)
    wrong = out.clone()
    wrong[7, 3] += 4 * tol
    ok, err, _ = check(wrong, x, w, config)
    assert not ok and err > tol
    # a result that skipped the shared expert is far off
    no_shared = reference.MoEWeights(w.router_weight, w.gate_up_proj, w.down_proj)
    ok, _, _ = check(reference.moe_forward(x, no_shared, config.replace(num_shared_experts=0)), x, w, config)
    assert not ok


def test_routing_override_compares_expert_math_only(case):
    x, w, config = case
    routing = reference.route(x, w, config)
    routing.ids = routing.ids.flip(-1)            # another routing, computed correctly
    out = reference.moe_forward(x, w, config, routing=routing)
    assert check(out, x, w, config, routing=routing)[0]
    assert not check(out, x, w, config)[0]
