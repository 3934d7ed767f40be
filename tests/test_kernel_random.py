"""The whole kernel on the CPU emulator over drawn layers: widths, expert counts, k, scoring and
group routing, shared experts and their gate, capacity, W = 1..8 virtual ranks, token counts from
0 to a few hundred, uniform / skewed / single-expert routing, fiber order and weak memory, each
against the reference (flashmoe.checks.run_case: outputs poisoned, inputs random).

The hand-picked cases of the other kernel tests keep to the shapes their tiles were planned
around; draws reach combinations nobody picked (they found the emulator taking the router's
values, left in the wgmma tiles' barrier area, for live mbarriers: random-16 here). The draws are
fixed by their index, so a failure reproduces by its test id. Each spec below is one the other
kernel tests build as well: the emulator's cached builds serve both.
"""

from __future__ import annotations

import random

import pytest
import torch

from flashmoe.checks import ROUTINGS, Case, run_case
from flashmoe.config import ACTIVATIONS, GATED_ONLY_ACTIVATIONS, MoEConfig
from flashmoe.host import emulator
from flashmoe.host.backend import KernelBackend
from flashmoe.host.spec import KernelSpec

pytestmark = pytest.mark.skipif(emulator.emulator_available() is not None,
                                reason=f"emulator unavailable: {emulator.emulator_available()}")

TIMEOUT_S = 0.05   # virtual time; a correct forward of these shapes takes well under 10 ms of it

SM80 = dict(arch="sm_80", block_m=128, block_n=128, threads=256, stages=3)
SM80_SMALL = dict(arch="sm_80", block_m=64, block_n=64, threads=128, stages=3)
PREFILL = dict(arch="sm_90a", gemm="wgmma", block_m=128, threads=384, stages=2)
DECODE = dict(arch="sm_90a", gemm="wgmma", block_m=64, threads=256, stages=2)
WIDE = dict(arch="sm_90a", gemm="wgmma", block_m=128, block_n=256, threads=384, stages=2)
PINGPONG = dict(arch="sm_90a", gemm="wgmma", block_m=128, threads=384, stages=2, schedule="pingpong")
PINGPONG_DECODE = dict(arch="sm_90a", gemm="wgmma", block_m=64, threads=384, stages=2, schedule="pingpong")
# (tile, dtype, gated)
SPECS = [(SM80, "bfloat16", True), (SM80, "float32", False), (SM80_SMALL, "bfloat16", True),
         (PREFILL, "bfloat16", True), (PREFILL, "float32", False), (DECODE, "bfloat16", True),
         (DECODE, "float16", True), (WIDE, "bfloat16", True), (WIDE, "float16", False),
         (PINGPONG, "bfloat16", True), (PINGPONG, "bfloat16", False), (PINGPONG_DECODE, "bfloat16", True)]
DRAWS = 36


def draw(index: int) -> tuple[Case, KernelSpec, int, int]:
    """Case ``index``: the case, its spec, the fiber-order seed and the weak-memory seed (0: the
    default order, sequentially consistent memory)."""
    r = random.Random(index)
    tile, dtype, gated = SPECS[index % len(SPECS)]
    world = r.choice([1, 1, 2, 2, 4, 8])
    E = world * r.choice([1, 2, 4]) if world > 1 else r.choice([2, 4, 8, 16])
    kw = dict(hidden_size=r.choice([64, 128, 192, 256, 320]), intermediate_size=r.choice([32, 96, 160, 288]),
              num_experts=E, dtype=dtype, gated=gated,
              activation=r.choice([a for a in ACTIVATIONS if a not in GATED_ONLY_ACTIVATIONS]))
    if E >= 4 and r.random() < 0.3:        # DeepSeek's routing: sigmoid, bias, groups
        n_group = r.choice([g for g in (1, 2, 4) if E % g == 0 and E // g >= 2])   # top2_sum: 2 a group
        topk_group = r.randint(1, n_group)
        kw.update(scoring="sigmoid", selection_bias=True, n_group=n_group, topk_group=topk_group,
                  top_k=r.randint(1, min(8, topk_group * (E // n_group))), norm_topk_prob=True,
                  routed_scaling_factor=2.5)
    else:
        kw.update(scoring=r.choice(["softmax", "sigmoid"]), top_k=r.randint(1, min(8, E)),
                  norm_topk_prob=r.random() < 0.5)
    if r.random() < 0.3:
        kw.update(num_shared_experts=r.randint(1, 2), shared_expert_gate=r.random() < 0.5)
    if r.random() < 0.3:
        kw["capacity_factor"] = r.choice([0.5, 1.0, 1.5])
    elif kw.get("n_group", 1) == 1 and r.random() < 0.5:     # LongCat-Flash's identity experts
        kw["identity_experts"] = r.choice([1, 4, 2 * E])
    tokens = r.choice([0, 1, 7, 64, 65, 129, 200, 300])
    case = Case(f"random-{index}", MoEConfig(**kw), world=world, tokens=tokens, routing=r.choice(ROUTINGS),
                seed=index)
    fiber, weak = r.choice([(0, 0), (0, 0), (r.randint(1, 10**6), 0), (0, r.randint(1, 10**6))])
    return case, KernelSpec(dtype=dtype, gated=gated, **tile), fiber, weak


@pytest.mark.parametrize("index", range(DRAWS))
def test_drawn_layer_matches_reference(index, monkeypatch):
    case, spec, fiber, weak = draw(index)
    monkeypatch.setenv(emulator.SEED_ENV, str(fiber))
    monkeypatch.setenv(emulator.WEAK_ENV, str(weak))
    backend = KernelBackend(case.config, None, virtual_world=case.world, emulate=True, timeout_s=TIMEOUT_S,
                            error_check="sync", spec=spec)
    result = run_case(backend, case, torch.device("cpu"))
    assert result.passed, f"{case.describe()}: {result.detail}"
