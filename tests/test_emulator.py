"""The CPU emulator's primitives against numpy/torch, and the MmaSyncTile GEMM engine on gathered
tiles: the CPU proof that fragment layouts, swizzle, pipeline and epilogue indexing are right.

The test kernels live in tests/emulation/kernels.cu; every build is cached (flashmoe.host.emulator),
so only the first run on a machine pays for g++.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from flashmoe.host import abi, emulator
from flashmoe.host.spec import BAND_TILES, KernelSpec
from flashmoe.reference import _tf32

pytestmark = pytest.mark.skipif(emulator.emulator_available() is not None,
                                reason=f"emulator unavailable: {emulator.emulator_available()}")

KERNELS = Path(__file__).parent / "emulation" / "kernels.cu"
DTYPES = {"bfloat16": (0, torch.bfloat16), "float16": (1, torch.float16), "float32": (2, torch.float32)}
# Small tiles and 128 threads keep every launch to a few hundred fibers; 3 stages make K = 200
# (4 stage loads) wrap the pipeline ring.
DEFINES = {"FLASHMOE_GATED": 1, "FLASHMOE_BLOCK_M": 64, "FLASHMOE_BLOCK_N": 64, "FLASHMOE_STAGES": 3,
           "FLASHMOE_THREADS": 128, "FLASHMOE_BAND_TILES": BAND_TILES}
P = ctypes.c_void_p


def _build(dtype: str):
    return emulator.build_library(KERNELS.read_text(), {**DEFINES, "FLASHMOE_DTYPE": DTYPES[dtype][0]}, name="test")


@functools.cache
def lib(dtype: str = "bfloat16") -> ctypes.CDLL:
    return emulator.load_library(_build(dtype))


@pytest.fixture(scope="module", autouse=True)
def _prebuilt():
    """The three dtype builds at once (g++ runs in parallel); cached across sessions."""
    emulator.build_library_parallel([lambda d=d: _build(d) for d in DTYPES])


def call(name: str, *args, dtype: str = "bfloat16") -> None:
    fn = getattr(lib(dtype), name)
    fn.restype = ctypes.c_int
    err = emulator.error_buffer()
    emulator.raise_on_error(fn(*args, err, ctypes.c_ulonglong(len(err))), err, name)


def ptr(t: torch.Tensor) -> P:
    return P(t.data_ptr())


# ---------------------------------------------------------------- fragments: ldmatrix + mma

@pytest.mark.parametrize("op,dtype", [(0, torch.bfloat16), (1, torch.float16), (2, torch.float32)])
@pytest.mark.parametrize("values", ["integers", "normal"])
def test_mma_fragments_from_swizzled_ldmatrix(op, dtype, values):
    k = 128 // dtype.itemsize
    if values == "integers":   # every product and sum exact in fp32: the result must be bit-exact
        a = torch.randint(-8, 9, (16, k)).to(dtype)
        b = torch.randint(-8, 9, (16, k)).to(dtype)
    else:
        a, b = torch.randn(16, k).to(dtype), torch.randn(16, k).to(dtype)
    d = torch.full((16, 16), float("nan"))
    call("emu_test_mma", ctypes.c_int(op), ptr(a), ptr(b), ptr(d))
    a64, b64 = (_tf32(a).double(), _tf32(b).double()) if op == 2 else (a.double(), b.double())
    expected = a64 @ b64.t()
    if values == "integers":
        assert torch.equal(d.double(), expected)
    else:
        # fp32 summation of exact products; a truncated (not rounded) tf32 operand would be off
        # by ~1e-3 relative and fail this.
        scale = (a64.abs() @ b64.abs().t())
        assert ((d.double() - expected).abs() <= 2e-6 * scale + 1e-30).all()


# ---------------------------------------------------------------- the GEMM engine

SHAPES = {0: (64, 64, 1), 1: (64, 64, 2), 2: (128, 64, 1), 3: (64, 128, 2)}


def _gather(full: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(rows), full.shape[1], dtype=torch.float64)
    keep = rows >= 0
    out[keep] = full[rows[keep].long()].double()
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("K", [200, 8])
def test_mma_sync_tile_gathered_gemm(dtype, shape, K):
    code, tdtype = DTYPES[dtype]
    bm, bn, nb = SHAPES[shape]
    bnop = bn // nb
    vec = 16 // tdtype.itemsize
    K = K if K % vec == 0 else K + vec - K % vec
    g = torch.Generator().manual_seed(shape * 7 + K + code)
    a_full = torch.randn(3 * bm, K, generator=g).to(tdtype)
    b_full = torch.randn(2 * bn, K, generator=g).to(tdtype)
    a_rows = torch.randperm(3 * bm, generator=g)[:bm].int()
    a_rows[torch.rand(bm, generator=g) < 0.2] = -1          # null rows read as zeros
    b_rows = torch.randperm(2 * bn, generator=g)[:bn].int()
    b_rows[torch.rand(bn, generator=g) < 0.1] = -1
    rows_valid = (torch.rand(bm, generator=g) < 0.8).to(torch.uint8)
    valid_cols = bnop - vec                                # the last 16-byte chunk is not stored
    act = 0 if shape != 3 else 1                           # silu, gelu
    sentinel = 7.0
    out = torch.full((bm, bnop), sentinel, dtype=tdtype)
    call("emu_test_tile", ctypes.c_int(shape), ptr(a_full), ptr(a_rows), ptr(b_full), ptr(b_rows),
         ctypes.c_int(K), ptr(rows_valid), ctypes.c_int(valid_cols), ctypes.c_int(act), ptr(out),
         ctypes.c_ulonglong(0), dtype=dtype)

    a, b = _gather(a_full, a_rows), _gather(b_full, b_rows)
    if dtype == "float32":
        a, b = _tf32(a.float()).double(), _tf32(b.float()).double()
    acc = a @ b.t()
    if nb == 2:
        gate, up = acc[:, :bnop], acc[:, bnop:]
        y = (torch.nn.functional.silu(gate) if act == 0 else torch.nn.functional.gelu(gate)) * up
    else:
        y = acc
    valid = rows_valid.bool()
    got = out.double()
    rtol = {"bfloat16": 2 ** -8, "float16": 2 ** -11, "float32": 1e-5}[dtype]
    err = (got[valid, :valid_cols] - y[valid, :valid_cols]).abs()
    tol = rtol * y[valid, :valid_cols].abs() + 1e-4 * (1 + y.abs().max())
    assert (err <= tol).all(), f"max error {err.max():.3g}"
    assert (got[~valid] == sentinel).all(), "a row marked invalid was stored"
    assert (got[:, valid_cols:] == sentinel).all(), "columns past valid_cols were stored"


def test_mma_sync_tile_random_schedule_matches_round_robin():
    """The engine's result does not depend on how the fibers interleave."""
    a = torch.randn(64, 136).to(torch.bfloat16)
    b = torch.randn(64, 136).to(torch.bfloat16)
    rows = torch.arange(64, dtype=torch.int32)
    valid = torch.ones(64, dtype=torch.uint8)      # held: ptr() does not keep a tensor alive
    outs = []
    for seed in (0, 99):
        out = torch.zeros(64, 32, dtype=torch.bfloat16)
        call("emu_test_tile", ctypes.c_int(1), ptr(a), ptr(rows), ptr(b), ptr(rows), ctypes.c_int(136),
             ptr(valid), ctypes.c_int(32), ctypes.c_int(0), ptr(out),
             ctypes.c_ulonglong(seed))
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------- the order tiles are claimed in

@pytest.mark.parametrize("rows,cols", [
    ([1], 1), ([64], 7), ([300], 3), ([768], 112), ([1, 64, 65, 0, 130], 2),
    ([896, 0, 1600, 100], 16), ([37 * 64], 2), ([5000, 3], 3)])
def test_routed_tiles_are_claimed_column_by_column_in_bands_of_twelve_row_tiles(rows, cols):
    """scheduler.cuh routed_tile: every (row tile, column tile) of every expert is one task, an
    expert's tasks follow the last expert's, and within a band of up to 12 of its row tiles (the
    shipped BAND_TILES) a column's tiles are consecutive tasks, so the blocks running at once read
    each B panel together (one HBM read) and keep the band's A in L2. A tile's row tile is rank-wide (the GEMM0 tile
    signals it and the GEMM1 tile waits for it), its rows the expert's."""
    bm = DEFINES["FLASHMOE_BLOCK_M"]
    tiles = [-(-r // bm) for r in rows]
    n = sum(tiles) * cols
    counts, out = torch.tensor(rows, dtype=torch.int32), torch.full((n * 5,), -1, dtype=torch.int32)
    call("emu_test_routed_tiles", ctypes.c_int(len(rows)), ptr(counts), ctypes.c_int(cols), ptr(out))
    expected, first = [], 0
    for e, (r, t) in enumerate(zip(rows, tiles)):
        for row, col in band_order(t, cols, BAND_TILES):
            expected.append((first + row, col, e, row * bm, min(bm, r - row * bm)))
        first += t
    assert [tuple(x) for x in out.view(n, 5).tolist()] == expected


def band_order(rows: int, cols: int, band: int) -> list[tuple[int, int]]:
    """(row tile, column tile) of a grid's tasks: bands of ``band`` row tiles, each column by column."""
    order = []
    for r0 in range(0, rows, band):
        h = min(band, rows - r0)
        order += [(r0 + i % h, i // h) for i in range(h * cols)]
    return order


@pytest.mark.parametrize("band", [1, 5, BAND_TILES, 64])
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 9), (7, 3), (12, 112), (30, 4), (64, 2), (65, 5)])
def test_a_band_of_any_size_walks_its_grid_once_column_by_column(rows, cols, band):
    """band_tile with the sizes KernelSpec.band_tiles allows: 1 is the plain row-major order (the
    variant a benchmark runs beside the shipped bands), a band as tall as the grid column-major."""
    out = torch.full((rows * cols * 2,), -1, dtype=torch.int32)
    call("emu_test_band_tile", ctypes.c_int(rows), ctypes.c_int(cols), ctypes.c_int(band), ptr(out))
    got = [tuple(x) for x in out.view(-1, 2).tolist()]
    assert got == band_order(rows, cols, band)
    assert sorted(got) == [(r, c) for r in range(rows) for c in range(cols)]
    if band == 1:
        assert got == sorted(got)
    if band >= rows:
        assert got == sorted(got, key=lambda rc: (rc[1], rc[0]))


# ---------------------------------------------------------------- warp, block and atomics

def test_shuffles_ballot_and_butterfly_sum():
    v = torch.randint(0, 2 ** 31, (128,), dtype=torch.int64).to(torch.int32)
    out = torch.zeros(128 * 8, dtype=torch.int32)
    call("emu_test_warp", ptr(v), ptr(out))
    vals = v.numpy().view(np.uint32).reshape(4, 32)            # 4 warps
    got = out.numpy().view(np.uint32).reshape(4, 32, 8)
    lane = np.arange(32)
    for j in range(5):
        np.testing.assert_array_equal(got[:, :, j], vals[:, lane ^ (1 << j)])
    np.testing.assert_array_equal(got[:, :, 5], vals[:, (lane * 7 + 3) % 32])
    ballot = ((vals & 1).astype(np.uint64) << lane.astype(np.uint64)).sum(axis=1).astype(np.uint32)
    np.testing.assert_array_equal(got[:, :, 6], np.repeat(ballot[:, None], 32, axis=1))
    np.testing.assert_array_equal(got[:, :, 7], np.repeat((vals & 0xFF).sum(axis=1)[:, None], 32, axis=1))


@pytest.mark.parametrize("seed", [0, 12345])
def test_block_barrier_with_divergent_work(seed):
    rounds = 4
    out = torch.zeros(3 * rounds * 128, dtype=torch.int32)
    call("emu_test_barrier", ctypes.c_int(rounds), ctypes.c_ulonglong(seed), ptr(out))
    t, r = np.arange(128), np.arange(rounds)[:, None]
    expected = ((t + 1 + r) % 128) * 1000 + r
    np.testing.assert_array_equal(out.numpy().reshape(3, rounds, 128), np.broadcast_to(expected, (3, rounds, 128)))


def test_atomics():
    counters = torch.zeros(4, dtype=torch.int32)
    fsum = torch.zeros(1)
    tickets = torch.zeros(512, dtype=torch.int32)
    masks = torch.zeros(4, dtype=torch.int64)
    exch = torch.zeros(512, dtype=torch.int32)
    call("emu_test_atomics", ptr(counters), ptr(fsum), ptr(tickets), ptr(masks), ptr(exch))
    assert sorted(tickets.tolist()) == list(range(512))
    assert counters[0] == 512 and counters[1] == 1024 and counters[3] == 512
    assert fsum.item() == 256.0
    assert sorted(exch.tolist() + [counters[2].item()]) == list(range(513))
    assert (masks == -1).all()


def _special_floats() -> np.ndarray:
    bits = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x00000001, 0x007FFFFF,
            0x3F808000, 0x3F818000, 0x3F80C000, 0x3F801000, 0x3F803000,       # bf16 / tf32 ties
            0x3F801001, 0xBF803000, 0x477FE000, 0x477FF000, 0x477FEFFF, 0x47800000,  # fp16 max region
            0x33000000, 0x33000001, 0x33400000, 0x387FC000, 0x38800000, 0x387FE000,  # fp16 subnormals
            0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000]
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 2 ** 32, 2000, dtype=np.uint64).astype(np.uint32)
    near_one = (rng.standard_normal(2000) * 100).astype(np.float32).view(np.uint32)
    small = (rng.standard_normal(500) * 1e-5).astype(np.float32).view(np.uint32)
    return np.concatenate([np.array(bits, dtype=np.uint32), rand, near_one, small])


def test_conversions_round_to_nearest_even():
    x = _special_floats()
    n = len(x)
    bf, hf = torch.zeros(n, dtype=torch.int16), torch.zeros(n, dtype=torch.int16)
    bf_back, hf_back = torch.zeros(n), torch.zeros(n)
    tf = torch.zeros(n, dtype=torch.int32)
    xt = torch.from_numpy(x.view(np.int32).copy())
    call("emu_test_convert", ptr(xt), ctypes.c_int(n), ptr(bf), ptr(hf), ptr(bf_back), ptr(hf_back), ptr(tf))
    f = torch.from_numpy(x.view(np.float32).copy())
    nan = torch.isnan(f)
    want_bf = f.to(torch.bfloat16)
    assert torch.equal(bf[~nan], want_bf.view(torch.int16)[~nan])
    assert torch.isnan(bf.view(torch.bfloat16)[nan]).all()
    with np.errstate(over="ignore"):   # numpy warns on the values that round to inf
        want_hf = torch.from_numpy(x.view(np.float32).astype(np.float16).view(np.int16).copy())
    assert torch.equal(hf[~nan], want_hf[~nan])
    assert torch.isnan(hf.view(torch.float16)[nan]).all()
    assert torch.equal(bf_back[~nan], want_bf.float()[~nan])
    assert torch.equal(hf_back[~nan], hf.view(torch.float16).float()[~nan])
    assert torch.equal(tf.view(torch.float32)[~nan].view(torch.int32), _tf32(f)[~nan].view(torch.int32))


def test_cp_async_lands_at_the_wait():
    src = torch.tensor([11, 12, 13, 14, 21, 22, 23, 24], dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int32)
    call("emu_test_cp_async", ptr(src), ptr(out))
    poison = int(np.uint32(0xCDCDCDCD).view(np.int32))
    assert out.tolist() == [poison, 11, poison, 21]


# ---------------------------------------------------------------- bounded waits on the virtual clock

@functools.cache
def _probes():
    from flashmoe.bringup.probes import ProbeRunner
    return ProbeRunner(KernelSpec(arch="sm_80", dtype="bfloat16", stages=3), torch.device("cpu"))


def _wait(mode: int, timeout: int):
    """The wait probe (device/probes.cu): mode 0 a flag nobody sets, mode 1 one set in time."""
    runner = _probes()
    flags = torch.zeros(4, dtype=torch.int32)
    result = torch.full((2,), -1, dtype=torch.int32)
    params = runner.params(runner.wait_params(timeout))
    args = abi.ProbeArgs()
    args.params, args.flags, args.result, args.mode = params.data_ptr(), ptr(flags), ptr(result), mode
    runner.launch("flashmoe_probe_wait", args, 2, 64)
    return abi.Control.from_buffer_copy(runner.control.numpy().tobytes()), result


def test_wait_times_out_and_records_then_others_abort():
    timeout = 1_000_000
    control, result = _wait(0, timeout)
    assert result.tolist() == [0, 0]
    assert control.abort == 0x80000001          # the tag of launch (epoch) 1: wait.cuh abort_tag()
    e = control.errors[0]
    assert e.code == abi.ErrorCode.TIMEOUT
    assert (e.rank, e.block, e.role, e.what, e.index) == (0, 0, abi.TaskKind.WAIT, abi.WaitKind.DATA_FLAG, 0)
    assert (e.expected, e.observed) == (1, 0)
    assert timeout < e.waited_ns <= timeout + 4096
    e1 = control.errors[1]
    # Block 1 waited longer (from the start, block 0 from half a timeout later) but for a signal
    # downstream of others, with more patience: the wait on the missing peer expires first.
    assert e1.code == abi.ErrorCode.ABORTED and (e1.rank, e1.what, e1.index) == (1, abi.WaitKind.DONE_FLAG, 1)
    assert e1.waited_ns > e.waited_ns


def test_wait_succeeds_when_the_flag_arrives():
    control, result = _wait(1, 1_000_000)
    assert result[0] == 1 and control.abort == 0 and control.errors[0].code == 0


def test_the_wait_probe_check_passes():
    from flashmoe.bringup.probes import check_wait
    result = check_wait(_probes(), timeout_ns=100_000)
    assert result["passed"], result


def test_rank_barrier_orders_the_blocks_of_a_rank():
    control = abi.Control()
    flags = torch.zeros(16, dtype=torch.int32)
    result = torch.full((3,), -1, dtype=torch.int32)
    call("emu_test_rank_barrier", ctypes.c_ulonglong(1_000_000), ctypes.byref(control), ptr(flags), ptr(result))
    assert result.tolist() == [906, 906, 906] and flags[0] == 6 and control.abort == 0


# ---------------------------------------------------------------- misuse is reported, never a hang

@pytest.mark.parametrize("mode,message", [
    (0, "deadlock"), (1, "warp collective mismatch"), (2, "not inside this block's 256 bytes"),
    (3, "past its 256 bytes"), (4, "not 16-byte aligned"), (5, "whole-warp collectives only"),
    (6, "a wait without a bound"), (7, "cp.async copies never waited for")])
def test_misuse_is_reported(mode, message, monkeypatch):
    monkeypatch.setenv("FLASHMOE_EMU_WALL_LIMIT_S", "1")
    buf = torch.zeros(64, dtype=torch.int64)                  # 16-byte aligned global memory
    with pytest.raises(emulator.EmulationError, match=message) as info:
        call("emu_test_misuse", ctypes.c_int(mode), ptr(buf))
    if mode == 0:
        assert "block 1: threads 0-4,6-63 wait at __syncthreads; threads 5 have exited" in str(info.value)


def test_mbarrier_lifecycle_over_reused_shared_memory():
    """Data in the words of a barrier-to-be is not an mbarrier, whatever its bits: init over it,
    and data over an invalidated one, are legal."""
    call("emu_test_mbarrier", ctypes.c_int(0))


@pytest.mark.parametrize("mode,message", [
    (1, "bytes changed since its last mbarrier operation"), (2, "init of a valid mbarrier"),
    (3, "holds no valid mbarrier")])
def test_mbarrier_misuse_is_reported(mode, message):
    with pytest.raises(emulator.EmulationError, match=message):
        call("emu_test_mbarrier", ctypes.c_int(mode))


def test_kernel_launch_checks_the_block_size():
    spec = KernelSpec(dtype="bfloat16", gated=True, block_m=64, block_n=64, stages=3, threads=128)
    kernel = emulator.EmulatedKernel(spec)
    with pytest.raises(ValueError, match="128 threads"):
        kernel.launch(abi.Params(), grid=1, block=256, smem_bytes=1024)
