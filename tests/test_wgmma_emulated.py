"""The wgmma engine on the CPU emulator: one gathered tile through producer and consumer
warpgroups, mbarriers, TMA boxes (or cp.async B rows), deferred wgmma and the epilogue, against a
float64 reference. With no GPU this is the check that the descriptors address what the producer
wrote, the fragments land where the epilogue reads them, and the stage hand-off never refills a
stage early (the emulated wgmma reads shared memory when its group is waited for).

Kernels: tests/emulation/wgmma_kernels.cu; the Hopper instructions: device/emulation/wgmma_emu.h.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import pytest
import torch

from flashmoe.host import emulator
from flashmoe.reference import _tf32

pytestmark = pytest.mark.skipif(emulator.emulator_available() is not None,
                                reason=f"emulator unavailable: {emulator.emulator_available()}")

KERNELS = Path(__file__).parent / "emulation" / "wgmma_kernels.cu"
DTYPES = {"bfloat16": (0, torch.bfloat16), "float16": (1, torch.float16), "float32": (2, torch.float32)}
# The shipped tile (128 x 128) with 3 stages, so K = 200 wraps the stage ring; 384 threads = a
# producer and two consumer warpgroups; 256 threads = one consumer with two m64 slabs.
BUILDS = [("bfloat16", 384), ("float16", 384), ("float32", 384), ("bfloat16", 256)]
P = ctypes.c_void_p


def _build(dtype: str, threads: int):
    defines = {"FLASHMOE_DTYPE": DTYPES[dtype][0], "FLASHMOE_GATED": 1, "FLASHMOE_BLOCK_M": 128,
               "FLASHMOE_BLOCK_N": 128, "FLASHMOE_STAGES": 3, "FLASHMOE_THREADS": threads,
               "FLASHMOE_GEMM_WGMMA": 1}
    return emulator.build_library(KERNELS.read_text(), defines, name="wgmma")


@functools.cache
def lib(dtype: str, threads: int) -> ctypes.CDLL:
    return emulator.load_library(_build(dtype, threads))


@pytest.fixture(scope="module", autouse=True)
def _prebuilt():
    emulator.build_library_parallel([lambda b=b: _build(*b) for b in BUILDS])


def run_tile(dtype, threads, nb, K, tma, act=0, seed=0, inter=None, col0=0):
    code, tdtype = DTYPES[dtype]
    bm, bn = 128, 128
    cols = bn // nb
    vec = 16 // tdtype.itemsize
    inter = inter if inter is not None else cols + 40          # the tile's last rows fall past it
    g = torch.Generator().manual_seed(K * 31 + nb * 7 + code + tma)   # data; `seed` picks the schedule
    experts, expert = 3, 1
    a_full = torch.randn(3 * bm, K, generator=g).to(tdtype)
    w = torch.randn(experts, nb, inter, K, generator=g).to(tdtype)
    a_rows = torch.randperm(3 * bm, generator=g)[:bm].int()
    a_rows[torch.rand(bm, generator=g) < 0.2] = -1             # null rows read as zeros
    rows_valid = (torch.rand(bm, generator=g) < 0.8).to(torch.uint8)
    valid_cols = cols - vec                                      # the last 16-byte chunk is not stored
    sentinel = 7.0
    out = torch.full((bm, cols), sentinel, dtype=tdtype)
    fn = getattr(lib(dtype, threads), "emu_wgmma_tile")
    fn.restype = ctypes.c_int
    err = emulator.error_buffer()
    rc = fn(ctypes.c_int(nb), P(a_full.data_ptr()), P(a_rows.data_ptr()), P(w.data_ptr()), ctypes.c_int(experts),
            ctypes.c_int(inter), ctypes.c_int(expert), ctypes.c_int(col0), ctypes.c_int(K), ctypes.c_int(tma),
            P(rows_valid.data_ptr()), ctypes.c_int(valid_cols), ctypes.c_int(act), P(out.data_ptr()),
            ctypes.c_ulonglong(seed), err, ctypes.c_ulonglong(len(err)))
    emulator.raise_on_error(rc, err, "emu_wgmma_tile")

    a = torch.zeros(bm, K, dtype=torch.float64)
    keep = a_rows >= 0
    a[keep] = a_full[a_rows[keep].long()].double()
    ops = []
    for op in range(nb):
        b = torch.zeros(cols, K, dtype=torch.float64)
        n = max(0, min(cols, inter - col0))
        b[:n] = w[expert, op, col0:col0 + n].double()
        ops.append(b)
    if dtype == "float32":                                      # the engine rounds to TF32 (cvt.rna)
        a = _tf32(a.float()).double()
        ops = [_tf32(b.float()).double() for b in ops]
    accs = [a @ b.t() for b in ops]
    if nb == 2:
        gate, up = accs
        y = (torch.nn.functional.silu(gate) if act == 0 else torch.nn.functional.gelu(gate)) * up
    else:
        y = accs[0]
    valid = rows_valid.bool()
    got = out.double()
    rtol = {"bfloat16": 2 ** -8, "float16": 2 ** -11, "float32": 1e-5}[dtype]
    e = (got[valid, :valid_cols] - y[valid, :valid_cols]).abs()
    tol = rtol * y[valid, :valid_cols].abs() + 1e-4 * (1 + y.abs().max())
    assert (e <= tol).all(), f"max error {e.max():.3g} at {divmod(int(e.argmax()), valid_cols)}"
    assert (got[~valid] == sentinel).all(), "a row marked invalid was stored"
    assert (got[:, valid_cols:] == sentinel).all(), "columns past valid_cols were stored"
    return out


@pytest.mark.parametrize("dtype,threads", BUILDS, ids=[f"{d}-{t}" for d, t in BUILDS])
@pytest.mark.parametrize("nb", [2, 1])
@pytest.mark.parametrize("tma", [1, 0], ids=["tma", "cp_async_b"])
@pytest.mark.parametrize("K", [200, 8])
def test_wgmma_tile_gathered_gemm(dtype, threads, nb, tma, K):
    vec = 16 // DTYPES[dtype][1].itemsize
    run_tile(dtype, threads, nb, K if K % vec == 0 else K + vec - K % vec, tma, act=0 if nb == 1 else 1)


def test_wgmma_tile_box_past_the_tensor_and_offset_columns():
    """col0 > 0 and a box running past `inter` (zero-filled by TMA), as the last GEMM0 column tile."""
    run_tile("bfloat16", 384, 2, 136, 1, inter=100, col0=64)


@pytest.mark.parametrize("seed", [1, 2])
def test_wgmma_tile_random_schedule(seed):
    """Other interleavings of producer and consumers give the same tile, bit for bit."""
    a = run_tile("bfloat16", 384, 2, 200, 1, seed=0)
    b = run_tile("bfloat16", 384, 2, 200, 1, seed=seed)
    assert torch.equal(a, b)


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
]


@pytest.mark.parametrize("name,kw,world,tokens,routing", FULL_CASES, ids=[c[0] for c in FULL_CASES])
def test_whole_kernel_with_the_wgmma_engine(name, kw, world, tokens, routing, monkeypatch):
    """The whole kernel with the shipped Hopper spec (384 threads: producer + two consumer
    warpgroups, B by emulated TMA maps) through KernelBackend, against the reference."""
    from flashmoe.checks import Case, run_case
    from flashmoe.host.backend import KernelBackend
    from flashmoe.host.spec import KernelSpec

    case = Case(name, _cfg(**kw), world=world, tokens=tokens, routing=routing)
    spec = KernelSpec(arch="sm_90a", dtype=case.config.dtype, gated=case.config.gated, stages=3, threads=384,
                      gemm="wgmma")
    try:
        emulator._check_spec(spec)
    except ValueError:                       # an emulator that predates wgmma_emu.h refuses the spec
        monkeypatch.setattr(emulator, "_check_spec", lambda s: None)
    backend = KernelBackend(case.config, None, virtual_world=world, emulate=True, timeout_s=0.05,
                            error_check="sync", spec=spec)
    result = run_case(backend, case, torch.device("cpu"))
    assert result.passed, result.detail
