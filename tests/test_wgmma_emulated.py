"""The wgmma engine on the CPU emulator: one gathered tile through producer and consumer
warpgroups, mbarriers, TMA boxes (or cp.async B rows), deferred wgmma and the epilogue, against a
float64 reference. With no GPU this is the check that the descriptors address what the producer
wrote, the fragments land where the epilogue reads them, and the stage hand-off never refills a
stage early (the emulated wgmma reads shared memory when its group is waited for).

The tile is the bring-up kit's component probe (device/probes.cu, flashmoe/bringup/probes.py), so
the GPU runs exactly what is checked here; the Hopper instructions: device/emulation/wgmma_emu.h.
"""

from __future__ import annotations

import functools

import pytest
import torch

from flashmoe.bringup import probes as P
from flashmoe.host import abi, emulator
from flashmoe.host.spec import KernelSpec

pytestmark = pytest.mark.skipif(emulator.emulator_available() is not None,
                                reason=f"emulator unavailable: {emulator.emulator_available()}")

# The shipped tile (128 x 128) with 3 stages, so K = 200 wraps the stage ring; 384 threads = a
# producer and two consumer warpgroups; 256 threads = one consumer with two m64 slabs; the wide
# tile (128 x 256: one m64n256 wgmma a k-step, 128 accumulators a consumer thread).
BUILDS = [("bfloat16", 384, 128), ("float16", 384, 128), ("float32", 384, 128), ("bfloat16", 256, 128),
          ("bfloat16", 384, 256), ("float16", 384, 256)]


def spec(dtype: str, threads: int, block_n: int = 128) -> KernelSpec:
    return KernelSpec(arch="sm_90a", dtype=dtype, gated=True, block_m=128, block_n=block_n, stages=3,
                      threads=threads, gemm="wgmma")


@functools.cache
def runner(dtype: str, threads: int, block_n: int = 128) -> P.ProbeRunner:
    return P.ProbeRunner(spec(dtype, threads, block_n), torch.device("cpu"))


@pytest.fixture(scope="module", autouse=True)
def _prebuilt():
    emulator.build_library_parallel([
        lambda b=b: emulator.build_library(emulator.PROBES_TU, P.probe_spec(spec(*b)).defines(), name="probes")
        for b in BUILDS])


@pytest.mark.parametrize("dtype,threads,block_n", BUILDS, ids=[f"{d}-{t}-bn{n}" for d, t, n in BUILDS])
@pytest.mark.parametrize("nb", [2, 1])
@pytest.mark.parametrize("tma", [1, 0], ids=["tma", "cp_async_b"])
@pytest.mark.parametrize("K", [200, 8])
def test_wgmma_tile_gathered_gemm(dtype, threads, block_n, nb, tma, K):
    result = P.check_tile(runner(dtype, threads, block_n), nb, K, bool(tma), act=0 if nb == 1 else 1)
    assert result["passed"], result


def test_wgmma_tile_box_past_the_tensor_and_offset_columns():
    """col0 > 0 and a box running past `inter` (zero-filled by TMA), as the last GEMM0 column tile."""
    result = P.check_tile(runner("bfloat16", 384), 2, 136, True, inter=100, col0=64)
    assert result["passed"], result


@pytest.mark.parametrize("seed", [1, 2])
def test_wgmma_tile_random_schedule(seed):
    """Other interleavings of producer and consumers give the same tile, bit for bit."""
    r = runner("bfloat16", 384)
    a = P.run_tile(r, 2, 200, True)[0]
    r.schedule_seed = seed
    try:
        b = P.run_tile(r, 2, 200, True)[0]
    finally:
        r.schedule_seed = 0
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)   # NaN: the poison of unstored cells


@pytest.mark.parametrize("box_rows", [16, 32])
def test_a_stage_that_never_fills_is_a_bounded_wait_with_a_record(box_rows, monkeypatch):
    """TMA boxes smaller than the bytes the stage expects (a wrong expect_tx): the stage never
    completes. The tile's waits end within the timeout with a record naming the pipeline wait, and
    the launch returns (an unbounded mbarrier wait would spin forever: a hung grid)."""
    monkeypatch.setenv("FLASHMOE_EMU_WALL_LIMIT_S", "30")     # an unbounded wait: fail, don't spin
    r = runner("bfloat16", 384)
    P.run_tile(r, 2, 200, True, box_rows=box_rows, timeout_ns=200_000)
    records = r.records()
    assert records, "no error record"
    first = min(records, key=lambda rec: rec.code != abi.ErrorCode.TIMEOUT)
    assert first.code == abi.ErrorCode.TIMEOUT and first.what in (abi.WaitKind.PIPE_FULL, abi.WaitKind.PIPE_EMPTY)
    assert first.waited_ns >= 200_000
    text = P.describe_record(first)
    assert "GEMM pipeline" in text or "GEMM consumers" in text, text


def test_tma_box_probe_and_its_bounded_wait(monkeypatch):
    monkeypatch.setenv("FLASHMOE_EMU_WALL_LIMIT_S", "30")
    r = runner("bfloat16", 384)
    assert P.check_tma_box(r)["passed"]
    result = P.check_tma_box(r, expect_extra=True, timeout_ns=100_000)
    assert result["passed"], result
    assert "stage 0 of its GEMM pipeline" in result["records"][0]


# ---------------------------------------------------------------- the whole kernel

def _cfg(**kw):
    from flashmoe.config import MoEConfig
    base = dict(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2, dtype="bfloat16")
    return MoEConfig(**{**base, **kw})


# (name, config, world, tokens, routing): shipped-tile shapes small enough for the emulator; H = 64
# is one K stage, so also a case with H = 192 (three stages, wrapping the 3-stage ring twice).
FULL_CASES = [
    ("bf16-swiglu", dict(), 1, 37, "uniform"),
    ("fp32-swiglu-W2-shared-gate", dict(dtype="float32", num_experts=8, num_shared_experts=1,
                                        shared_expert_gate=True), 2, 33, "uniform"),
    ("bf16-capacity-W2-skewed", dict(capacity_factor=0.5), 2, 40, "skewed"),
    ("fp16-gelu-plain-W2", dict(dtype="float16", activation="gelu", gated=False, num_experts=8, top_k=1), 2, 45,
     "uniform"),
    ("bf16-H192-I160-130-tokens", dict(hidden_size=192, intermediate_size=160), 1, 130, "single"),
    # GPT-OSS: router bias, expert biases, the clamped SwiGLU; I = 160 fills one and a half B tiles
    ("bf16-gpt-oss-W2-I160", dict(intermediate_size=160, activation="swiglu_clamped", swiglu_limit=1.5,
                                  expert_bias=True, router_bias=True, norm_topk_prob=True), 2, 45, "uniform"),
]


def _run_whole_kernel(name, kw, world, tokens, routing, **tile):
    from flashmoe.checks import Case, run_case
    from flashmoe.host.backend import KernelBackend
    from flashmoe.host.spec import KernelSpec

    case = Case(name, _cfg(**kw), world=world, tokens=tokens, routing=routing)
    spec = KernelSpec(arch="sm_90a", dtype=case.config.dtype, gated=case.config.gated, stages=3, gemm="wgmma",
                      scale_input=case.config.scale_expert_input, **{"threads": 384, **tile})
    backend = KernelBackend(case.config, None, virtual_world=world, emulate=True, timeout_s=0.05,
                            error_check="sync", spec=spec)
    result = run_case(backend, case, torch.device("cpu"))
    assert result.passed, result.detail


@pytest.mark.parametrize("name,kw,world,tokens,routing", FULL_CASES, ids=[c[0] for c in FULL_CASES])
def test_whole_kernel_with_the_wgmma_engine(name, kw, world, tokens, routing):
    """The whole kernel with the shipped Hopper spec (384 threads: producer + two consumer
    warpgroups, B by emulated TMA maps) through KernelBackend, against the reference."""
    _run_whole_kernel(name, kw, world, tokens, routing)


@pytest.mark.parametrize("tile", [dict(schedule="cooperative"), dict(schedule="pingpong"), dict(threads=256)],
                         ids=["two-warpgroups", "pingpong", "one-warpgroup"])
def test_llama4_scales_each_row_by_its_own_weight(tile):
    """Llama4's input scaling (each routed row's GEMM0 result times its routing weight): two
    experts with about 100 rows each fill a tile's every slab (a warpgroup each; a ping-pong
    warpgroup's, or the one consumer's, two in turn), so a row given another row's weight shows;
    the shared expert's rows are not scaled, and k = 2 with expert biases pins the scale before
    the bias."""
    llama4 = dict(scoring="sigmoid", scale_expert_input=True, num_shared_experts=1)
    _run_whole_kernel("llama4-E2-k1-200-tokens", dict(llama4, num_experts=2, top_k=1), 1, 200, "uniform", **tile)
    _run_whole_kernel("scaled-k2-biases-W2", dict(llama4, expert_bias=True), 2, 45, "uniform", **tile)
