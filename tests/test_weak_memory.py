"""The kernel on the emulator with weak memory (device/emulation/memory.cpp): one
launch hosting W virtual ranks, each block's global stores held in a store buffer that drains late
and out of order except where the PTX memory model orders them, plain loads served by a stale L1
copy until an acquire. Random schedules with it; the results must still match the reference, and
a kernel with a fence removed must not. (Ranks in separate launches under weak memory:
test_ep_emulated.py.)
"""

from __future__ import annotations

import pytest
import torch

from flashmoe.checks import Case, run_case
from flashmoe.config import MoEConfig
from flashmoe.host import emulator
from flashmoe.host.backend import KernelBackend
from flashmoe.host.spec import KernelSpec
from planted import planted_tree

pytestmark = pytest.mark.skipif(emulator.emulator_available() is not None,
                                reason=f"emulator unavailable: {emulator.emulator_available()}")

TIMEOUT_S = 0.05
SMALL = dict(block_m=64, block_n=64, threads=128, stages=3)


def cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2, dtype="bfloat16")
    base.update(kw)
    return MoEConfig(**base)


# Paths between blocks: dispatch and the task map (W2, W4), row tiles shared out among blocks,
# the shared expert, capacity selection (kept lists, drop marks, select flags), the wgmma engine.
CASES = [
    Case("bf16-W2-shared", cfg(hidden_size=192, intermediate_size=96, num_shared_experts=1), world=2, tokens=150,
         routing="skewed"),
    Case("bf16-W4", cfg(), world=4, tokens=200),
    Case("fp32-plain-capacity-W2", cfg(dtype="float32", hidden_size=96, intermediate_size=64, gated=False,
                                       capacity_factor=1.0), world=2, tokens=101, routing="skewed"),
]


def backend_for(config: MoEConfig, world: int, weak_seed: int, spec: KernelSpec | None = None,
                include_root=None) -> KernelBackend:
    """A fresh backend (a zeroed heap: a stale read shows as zeros, not as last run's right
    answer) whose launches run with this weak seed and the same schedule seed."""
    spec = spec or KernelSpec(arch="sm_80", dtype=config.dtype, gated=config.gated, **SMALL)
    backend = KernelBackend(config, None, virtual_world=world, emulate=True, timeout_s=TIMEOUT_S,
                            error_check="sync", spec=spec)
    for v in backend.variants.values():
        if include_root is not None:
            v.kernel = emulator.EmulatedKernel(v.spec, include_root=include_root)
        v.kernel.seed = v.kernel.weak_seed = weak_seed
    return backend


@pytest.mark.parametrize("weak_seed", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_matches_reference_under_weak_memory(case, weak_seed):
    result = run_case(backend_for(case.config, case.world, weak_seed), case, torch.device("cpu"))
    assert result.passed, f"{case.name}: {result.detail}"


@pytest.mark.parametrize("weak_seed", [1, 2])
def test_wgmma_engine_under_weak_memory(weak_seed):
    config = cfg()
    spec = KernelSpec(arch="sm_90a", dtype="bfloat16", gated=True, stages=3, threads=384, gemm="wgmma")
    case = Case("wgmma-W2", config, world=2, tokens=150)
    result = run_case(backend_for(config, 2, weak_seed, spec), case, torch.device("cpu"))
    assert result.passed, result.detail


def test_weak_memory_catches_a_missing_fence(tmp_path):
    root = planted_tree(tmp_path, "gemm0-fence")
    case = Case("planted", cfg(), world=2, tokens=90)

    def passes(weak_seed: int) -> bool:
        return run_case(backend_for(case.config, 2, weak_seed, include_root=root), case, torch.device("cpu")).passed

    assert passes(0), "with sequentially consistent memory the missing fence is invisible"
    assert not all(passes(s) for s in (1, 2, 3, 4, 5)), "the GEMM0 fence removed, yet every weak run passed"


def test_weak_mode_is_what_the_environment_asks_for(monkeypatch):
    monkeypatch.setenv(emulator.WEAK_ENV, "7")
    spec = KernelSpec(arch="sm_80", dtype="bfloat16", gated=True, **SMALL)
    assert emulator.EmulatedKernel(spec).weak_seed == 7
