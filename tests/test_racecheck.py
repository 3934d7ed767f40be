"""The emulator's shared-memory race check (device/emulation/racecheck.cpp): the kernel, with
each engine and wgmma schedule, makes no race its happens-before order does not cover; a kernel
with one ordering step moved or weakened fails with both places named, also where its results
still come out right."""

from __future__ import annotations

import re
from dataclasses import replace

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

# K = 512 runs GEMM0 8 times round a 3-stage ring: every stage is refilled while others are read.
CONFIG = MoEConfig(hidden_size=512, intermediate_size=128, num_experts=8, top_k=2, dtype="bfloat16")
WGMMA = dict(arch="sm_90a", stages=3, threads=384, gemm="wgmma")
SPECS = {
    "mma_sync": KernelSpec(arch="sm_80", dtype="bfloat16", gated=True, block_m=64, block_n=64, threads=128, stages=3),
    "wgmma-pingpong": KernelSpec(dtype="bfloat16", gated=True, schedule="pingpong", **WGMMA),
    "wgmma-cooperative": KernelSpec(dtype="bfloat16", gated=True, schedule="cooperative", **WGMMA),
    "wgmma-fp32": KernelSpec(dtype="float32", gated=True, schedule="pingpong", **WGMMA),
}


def forward(spec: KernelSpec, config: MoEConfig = CONFIG, root=None, world: int = 2, tokens: int = 150,
            routing: str = "uniform"):
    backend = KernelBackend(config, None, virtual_world=world, emulate=True, timeout_s=0.05, error_check="sync",
                            spec=spec)
    for v in backend.variants.values():
        v.kernel = emulator.EmulatedKernel(v.spec, include_root=root, racecheck=True)
    return run_case(backend, Case("racecheck", config, world=world, tokens=tokens, routing=routing),
                    torch.device("cpu"))


@pytest.mark.parametrize("name", list(SPECS))
def test_the_kernel_makes_no_shared_memory_race(name):
    result = forward(SPECS[name], replace(CONFIG, dtype=SPECS[name].dtype))
    assert result.passed, result.detail


def test_no_race_with_capacity_a_shared_expert_and_deepseek_routing():
    config = MoEConfig(hidden_size=128, intermediate_size=64, num_experts=8, top_k=2, dtype="bfloat16",
                       scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, norm_topk_prob=True,
                       num_shared_experts=1, shared_intermediate_size=64, capacity_factor=0.5)
    for spec in (SPECS["mma_sync"], SPECS["wgmma-pingpong"]):
        result = forward(spec, config, world=4, tokens=200, routing="skewed")
        assert result.passed, result.detail


def test_a_slot_written_after_its_arrive_is_a_race_though_the_results_are_right(tmp_path):
    """The producer's first thread arrives on "ready", then writes the job: in the emulator's
    schedule the consumers still read the new job (the forward is right without the check), but
    nothing orders their reads after the write."""
    root = planted_tree(tmp_path, "slot-after-arrive")
    config = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2, dtype="bfloat16")
    backend = KernelBackend(config, None, virtual_world=2, emulate=True, timeout_s=0.05, error_check="sync",
                            spec=SPECS["wgmma-cooperative"])
    for v in backend.variants.values():
        v.kernel = emulator.EmulatedKernel(v.spec, include_root=root, racecheck=False)
    case = Case("planted", config, world=2, tokens=150)
    assert run_case(backend, case, torch.device("cpu")).passed
    result = forward(SPECS["wgmma-cooperative"], config, root=root)
    assert not result.passed and re.search(r"(?s)EmulationError.*shared-memory races.*read after write.*"
                                           r"write by thread 0 at .*tasks\.cuh:\d+.*"
                                           r"read by thread \d+ at .*consume_tasks", result.detail), result.detail


def test_a_stage_released_before_its_wgmmas_complete_is_a_race(tmp_path):
    """Released one group early, a stage is refilled (TMA for B, cp.async for the gathered A rows)
    while the tensor cores may still read it."""
    root = planted_tree(tmp_path, "stage-early-release")
    result = forward(SPECS["wgmma-pingpong"], root=root)
    assert not result.passed and re.search(r"(?s)EmulationError.*shared-memory races.*write after read.*"
                                           r"read by thread \d+ at .*wgmma_wait.*"
                                           r"write by thread \d+ at .*tma_load_4d", result.detail), result.detail


def test_racecheck_is_what_the_environment_asks_for(monkeypatch):
    spec = SPECS["mma_sync"]
    monkeypatch.setenv(emulator.RACECHECK_ENV, "1")
    assert emulator.EmulatedKernel(spec).racecheck
    monkeypatch.setenv(emulator.RACECHECK_ENV, "0")
    assert not emulator.EmulatedKernel(spec).racecheck
