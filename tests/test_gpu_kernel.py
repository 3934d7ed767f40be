"""The kernel on a real GPU against the reference (``pytest -m gpu``; skipped without one).

The same checks as ``python -m flashmoe.selftest`` (flashmoe.checks): poisoned outputs, fresh
random inputs, routing compared up to near ties, expert math under the project tolerance. This
file runs the quick grid; the selftest adds the large cases, timing, sanitizers and the soak.
"""

from __future__ import annotations

import pytest
import torch

from flashmoe import selftest
from flashmoe.checks import Case, check_determinism, check_fault, check_fault_unchecked, check_graph, run_case

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def make():
    device = torch.device("cuda", torch.cuda.current_device())
    return selftest._backend_factory(device, emulate=False, timeout_s=10.0)


@pytest.mark.parametrize("case", selftest.gpu_cases(quick=True), ids=lambda c: c.name)
def test_kernel_matches_reference(make, case: Case):
    device = torch.device("cuda", torch.cuda.current_device())
    result = run_case(make(case.config, case.world), case, device)
    assert result.passed, result.detail


def test_bitwise_deterministic_across_runs_and_virtual_ranks(make):
    case = Case("determinism", selftest._cfg(num_experts=64, top_k=4), tokens=999, routing="skewed")
    ok, detail = check_determinism(make, case, torch.device("cuda", torch.cuda.current_device()))
    assert ok, detail


def test_stalled_rank_is_named_and_the_layer_recovers(make):
    case = Case("fault", selftest._cfg(num_experts=8, top_k=2), world=4, tokens=200)
    ok, detail = check_fault(make, case, torch.device("cuda", torch.cuda.current_device()), stalled_rank=1)
    assert ok, detail


def test_layer_backend_kernel_on_cuda():
    from flashmoe import FlashMoELayer
    from flashmoe.accuracy import check
    layer = FlashMoELayer(selftest._cfg(num_experts=16, top_k=2), device="cuda", backend="kernel",
                          virtual_world=2, kernel_options={"error_check": "sync"})
    x = torch.randn(3, 77, 512, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        out, routing = layer(x, return_routing=True)
    assert layer.last_backend == "kernel" and out.shape == x.shape
    ok, err, tol = check(out.reshape(-1, 512), x.reshape(-1, 512), layer.weights(), layer.config, routing)
    assert ok, f"error {err} above {tol}"


def test_routing_given_kernel():
    """flashmoe.experts_forward's kernel: "no expert" ids, repeats, 1 to 999 tokens, W = 1 and 4."""
    ok, detail = selftest.routing_given(torch.device("cuda", torch.cuda.current_device()), emulate=False,
                                        timeout_s=10.0)
    assert ok, detail


def _cuda_experts(num_experts: int):
    """Random experts at the selftest's shape (H = 512, I = 256), bf16 on the GPU."""
    from flashmoe import reference
    return reference.MoEWeights(
        router_weight=None,
        gate_up_proj=torch.randn(num_experts, 512, 512, device="cuda", dtype=torch.bfloat16) / 512 ** 0.5,
        down_proj=torch.randn(num_experts, 512, 256, device="cuda", dtype=torch.bfloat16) / 256 ** 0.5)


def test_experts_forward_runs_the_kernel_on_cuda():
    from flashmoe import experts_forward, reference
    from flashmoe.accuracy import check
    config = selftest._cfg(num_experts=16, top_k=2)
    layer_weights = _cuda_experts(16)
    x = torch.randn(200, 512, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 16, (200, 2), device="cuda")
    w = torch.rand(200, 2, device="cuda")
    with torch.inference_mode():
        out = experts_forward(x, ids, w, layer_weights.gate_up_proj.transpose(1, 2),
                              layer_weights.down_proj.transpose(1, 2), transposed=True, backend="kernel",
                              virtual_world=2)
    routing = reference.given_routing(ids, w, 16)
    ok, err, tol = check(out, x, layer_weights, config, routing)
    assert ok, f"error {err} above {tol}"


def test_experts_forward_maps_global_ids_on_cuda():
    """expert_map (vLLM's expert parallelism): this rank holds 8 of 16 global experts in a
    shuffled order; the kernel runs the slots whose experts it holds and skips the others."""
    from flashmoe import experts_forward, reference
    from flashmoe.accuracy import check
    config = selftest._cfg(num_experts=8, top_k=2)
    held = torch.randperm(16, device="cuda")[:8]
    expert_map = torch.full((16,), -1, device="cuda", dtype=torch.int32)
    expert_map[held] = torch.arange(8, device="cuda", dtype=torch.int32)
    weights = _cuda_experts(8)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 16, (300, 2), device="cuda")
    w = torch.rand(300, 2, device="cuda")
    with torch.inference_mode():
        out = experts_forward(x, ids, w, weights.gate_up_proj, weights.down_proj, backend="kernel",
                              expert_map=expert_map)
    ok, err, tol = check(out, x, weights, config, reference.given_routing(expert_map.long()[ids], w, 8))
    assert ok, f"error {err} above {tol}"


def test_unchecked_stalled_launch_spoils_nothing_and_raises_at_synchronize(make):
    case = Case("fault-none", selftest._cfg(num_experts=8, top_k=2), world=4, tokens=200)
    ok, detail = check_fault_unchecked(make, case, torch.device("cuda", torch.cuda.current_device()), stalled_rank=1)
    assert ok, detail


def test_cuda_graph_replays_with_changing_token_counts(make):
    ok, detail = check_graph(make, selftest._cfg(num_experts=64, top_k=4), torch.device("cuda", torch.cuda.current_device()))
    assert ok, detail


@pytest.mark.parametrize("tokens", [1, 333])
def test_mma_sync_engine_forced_on_this_gpu(tokens):
    device = torch.device("cuda", torch.cuda.current_device())
    make_mma = selftest._backend_factory(device, emulate=False, timeout_s=10.0, gemm="mma_sync")
    case = Case(f"mma_sync-t{tokens}", selftest._cfg(), tokens=tokens)
    result = run_case(make_mma(case.config, case.world), case, device)
    assert result.passed, result.detail


def test_the_component_probes_pass():
    """The bring-up kit's probes of the first probe build of this GPU (flashmoe/bringup/probes.py)."""
    from flashmoe.bringup import probes as P
    from flashmoe.bringup.stages import gpu_probe_specs
    from flashmoe.host.spec import arch_for_capability
    device = torch.device("cuda", torch.cuda.current_device())
    spec = gpu_probe_specs(arch_for_capability(*torch.cuda.get_device_capability(device)))[0]
    runner = P.ProbeRunner(spec, device)
    results = [P.check_tile(runner, nb, 200, use_tma=spec.gemm == "wgmma") for nb in (2, 1)]
    results += [P.check_router(runner, selftest._cfg(num_experts=64, top_k=4), tokens) for tokens in (300, 70, 5)]
    results += [P.check_wait(runner),
                P.check_trace(runner)]
    if spec.gemm == "wgmma":
        results += [P.check_tma_box(runner), P.check_tma_box(runner, expect_extra=True, timeout_ns=20_000_000)]
    failed = [r for r in results if not r["passed"]]
    assert not failed, failed
