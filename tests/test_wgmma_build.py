"""The Hopper wgmma engine (device/gemm/wgmma.cuh) checked without a GPU.

- Layout models: the engine's shared-memory placement of 16-byte chunks equals the PTX ISA's
  canonical K-major 128-byte-swizzle layout (Swizzle<3,4,3> on byte addresses over
  ((8,m),(T,2k)):((8T,SBO),(1,T))) and the TMA 128B swizzle table, and a k-step's descriptor start
  address (+32 bytes) addresses exactly the chunks that step needs.
- The matrix descriptor the device builds equals a model of the PTX ISA "Matrix Descriptor
  Format" table, and the device's sizes equal the plan's (NVRTC static_asserts, seconds).
- Tensor-map arguments and the Params ABI of the maps.
- Every wgmma spec of shipped_specs() compiles for sm_90a with no spills, no stack, shared memory
  within the limit, and SASS with HGMMA of the expected shape, TMA (UTMALDG), mbarriers (SYNCS),
  cp.async arriving on an mbarrier (LDGSTSBAR) and the async-proxy fence; no HMMA (slow).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re

import pytest

from flashmoe.build import compile_many, plan_smem_bytes
from flashmoe.config import MoEConfig
from flashmoe.host import abi, tensormap
from flashmoe.host import compile as C
from flashmoe.host import cubin
from flashmoe.host.plan import DeviceInfo, gemm_tables_bytes, make_plan
from flashmoe.host.resources import performance_losses
from flashmoe.host.spec import (STAGE_K_BYTES, WGMMA_BARRIER_BYTES, KernelSpec, select_spec, shipped_specs,
                                wgmma_spec)

WGMMA_SPECS = [s for s in shipped_specs() if s.gemm == "wgmma"]
by_spec = pytest.mark.parametrize("spec", WGMMA_SPECS, ids=[s.key() for s in WGMMA_SPECS])
SWIZZLE_ATOM = 1024          # bytes: 8 rows of 128 bytes, the 128B swizzle pattern's period


# ---------------------------------------------------------------- specs


def test_shipped_and_selected():
    assert {(s.dtype, s.gated) for s in WGMMA_SPECS} == {(d, g) for d in ("bfloat16", "float16", "float32")
                                                         for g in (True, False)}
    # The prefill tiles: a producer and two consumer warpgroups; the decode tile: one consumer.
    for s in WGMMA_SPECS:
        assert s.arch == "sm_90a"
        assert (s.block_m, s.block_n, s.threads) in ((128, 128, 384), (128, 256, 384), (64, 128, 256))
    assert {(s.block_m, s.block_n) for s in WGMMA_SPECS} == {(64, 128), (128, 128), (128, 256)}
    # The wide tile for the 2-byte dtypes only: fp32's 128 x 256 epilogue tile leaves no stage room.
    assert {(s.dtype, s.gated) for s in WGMMA_SPECS if s.block_n == 256 and s.routing == "router"} == \
        {(d, g) for d in ("bfloat16", "float16") for g in (True, False)}
    assert all(s.stages == 3 for s in WGMMA_SPECS if s.block_n == 256)
    # Every sm_90a spec shipped is wgmma; mma_sync stays for sm_80 (and compiles on demand on sm_90a).
    assert all(s.gemm == "wgmma" for s in shipped_specs() if s.arch == "sm_90a")
    assert all(s.gemm == "mma_sync" for s in shipped_specs() if s.arch == "sm_80")
    assert select_spec("bfloat16", True, "sm_90a", 227 * 1024).gemm == "wgmma"
    assert select_spec("float32", False, "sm_80", 163 * 1024).gemm == "mma_sync"


@pytest.mark.parametrize("arch,dtype,transport,experts,tiles", [
    ("sm_90a", "bfloat16", "peer", 128, {(128, 256), (128, 128), (64, 128)}),
    ("sm_90a", "float16", "peer", 128, {(128, 256), (128, 128), (64, 128)}),
    ("sm_90a", "float32", "peer", 128, {(128, 128), (64, 128)}),        # no stage room next to its epilogue
    ("sm_90a", "bfloat16", "nvshmem", 128, {(128, 128), (64, 128)}),    # its wide build spills
    ("sm_90a", "bfloat16", "peer", 512, {(128, 128), (64, 128)}),       # the task map leaves it no room
    ("sm_90a", "bfloat16", "peer", 1024, {(128, 128), (64, 128)}),      # nor a decode pipeline of 8 stages
    ("sm_80", "bfloat16", "peer", 1024, {(128, 128), (64, 128)}),       # nor mma_sync's of 6
    ("sm_80", "bfloat16", "peer", 128, {(128, 128), (64, 128)}),        # mma_sync
])
def test_default_tiles_of_a_backend(arch, dtype, transport, experts, tiles):
    """The kernels a backend builds by default for a device: the wide tile where it is built and
    fits, and every one of them fits the device's shared memory with its plan."""
    from flashmoe.host.backend import KernelBackend
    from flashmoe.host.plan import variant_plans
    config = MoEConfig(hidden_size=2048, intermediate_size=768, num_experts=experts, top_k=8, dtype=dtype)
    backend = KernelBackend.__new__(KernelBackend)      # the spec choice only: no device, no launch
    backend.config, backend.world, backend.trace_capacity = config, 1, 0
    backend.device_info = DeviceInfo.for_arch(arch)
    backend._set_specs(None, transport=transport)
    assert set(backend.variants) == tiles
    assert next(iter(backend.variants)) == max(tiles)
    plans = variant_plans(config, [v.spec for v in backend.variants.values()], 1, 4096, backend.device_info)
    assert {p.row_tile for p in plans} == {64}      # one heap layout: row tiles of the smallest tile
    for v in backend.variants.values():
        assert make_plan(config, v.spec, max_tokens=4096).smem_bytes <= backend.device_info.max_smem_per_block
    # Ping-pong consumers for the 128 x 128 wgmma tile, except under NVSHMEM (one put tile a block).
    pingpong = {t for t, v in backend.variants.items() if v.spec.schedule == "pingpong"}
    assert pingpong == ({(128, 128)} if arch == "sm_90a" and transport == "peer" else set())


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_a_layer_scaling_its_experts_input_gets_every_tile_built_so(arch):
    """Llama4 (scale_expert_input): each default tile, the wide one too, scales GEMM0's rows, so
    every one plans for the layer (a tile that weighed the combine instead would be refused)."""
    from flashmoe.host.backend import KernelBackend
    from flashmoe.host.plan import variant_plans
    config = MoEConfig(hidden_size=2048, intermediate_size=768, num_experts=16, top_k=1, scoring="sigmoid",
                       scale_expert_input=True)
    backend = KernelBackend.__new__(KernelBackend)
    backend.config, backend.world, backend.trace_capacity = config, 1, 0
    backend.device_info = DeviceInfo.for_arch(arch)
    backend._set_specs(None)
    assert len(backend.variants) == (3 if arch == "sm_90a" else 2)
    assert all(v.spec.scale_input for v in backend.variants.values())
    variant_plans(config, [v.spec for v in backend.variants.values()], 1, 4096, backend.device_info)


def test_nvshmem_runs_narrow_tiles_only():
    from flashmoe.host.backend import KernelBackend
    config = MoEConfig(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8)
    backend = KernelBackend.__new__(KernelBackend)
    backend.config, backend.world, backend.trace_capacity = config, 1, 0
    with pytest.raises(ValueError, match="NVSHMEM transport runs tiles of at most 128 columns"):
        backend._set_specs([wgmma_spec("bfloat16", True, 3, 128, 256)], transport="nvshmem")


def test_spec_validation():
    with pytest.raises(ValueError, match="sm_90a"):
        KernelSpec(arch="sm_80", gemm="wgmma")
    with pytest.raises(ValueError, match="64-row slabs"):
        KernelSpec(gemm="wgmma", threads=512)          # 3 consumers cannot split 128 rows
    with pytest.raises(ValueError, match="64-row slabs"):
        KernelSpec(gemm="wgmma", threads=128)          # no consumer
    KernelSpec(gemm="wgmma", threads=256)              # one consumer, two m64 slabs
    with pytest.raises(ValueError, match="schedule='nope'"):
        KernelSpec(gemm="wgmma", threads=384, schedule="nope")
    with pytest.raises(ValueError, match="two wgmma consumer warpgroups"):
        KernelSpec(schedule="pingpong")                # mma_sync
    with pytest.raises(ValueError, match="two wgmma consumer warpgroups"):
        KernelSpec(gemm="wgmma", threads=256, schedule="pingpong")
    with pytest.raises(ValueError, match="runs 'cooperative'"):
        KernelSpec(gemm="wgmma", threads=384, block_n=256, schedule="pingpong")
    with pytest.raises(ValueError, match="needs transport='peer'"):
        KernelSpec(gemm="wgmma", threads=384, schedule="pingpong", transport="nvshmem")
    for band in (0, 65):
        with pytest.raises(ValueError, match=rf"band_tiles={band}: must be in \[1, 64\]"):
            KernelSpec(band_tiles=band)
    assert KernelSpec(band_tiles=1).defines()["FLASHMOE_BAND_TILES"] == 1
    # A ping-pong warpgroup takes whole tiles: a 64-row one, too (each its own m64 slab).
    KernelSpec(gemm="wgmma", threads=384, block_m=64, schedule="pingpong")
    # Same staging either way: one 64-row slab a consumer warpgroup at a time.
    coop, pingpong = wgmma_spec("bfloat16", True, 5, schedule="cooperative"), wgmma_spec("bfloat16", True, 5)
    assert pingpong.schedule == "pingpong" and pingpong.gemm_smem_bytes() == coop.gemm_smem_bytes()
    assert wgmma_spec("bfloat16", True, 3, 128, 256).schedule == wgmma_spec("bfloat16", True, 3, 64).schedule == \
        "cooperative"


# ---------------------------------------------------------------- layout models


def engine_offset(row: int, chunk: int) -> int:
    """Where the engine puts 16-byte chunk `chunk` of K-row `row` of a tile (cp.async writers)."""
    return row * STAGE_K_BYTES + ((chunk ^ (row % 8)) << 4)


def cute_swizzle_343(addr: int) -> int:
    """CuTe Swizzle<3,4,3> on a byte address: bits [4,7) ^= bits [7,10)."""
    return addr ^ ((addr & 0x380) >> 3)


def canonical_k_sw128(row: int, kbyte: int, sbo: int = SWIZZLE_ATOM) -> int:
    """PTX ISA canonical K-major 128B layout ((8,m),(T,2k)):((8T,SBO),(1,T)) before the swizzle,
    in bytes: row r of an 8-row group at r * 128, groups SBO apart, K contiguous."""
    return (row % 8) * 128 + (row // 8) * sbo + kbyte


def tma_sw128(row: int, chunk: int) -> int:
    """The TMA 128-byte swizzle table (PTX ISA "Swizzling Modes"): chunk c of the r-th 128-byte
    row of a 1024-byte aligned region lands at position c ^ (r % 8)."""
    return row * 128 + ((chunk ^ (row % 8)) << 4)


@pytest.mark.parametrize("base", [0, 32 * 1024, 131 * 1024])
def test_engine_layout_is_canonical_k_major_sw128(base):
    assert base % SWIZZLE_ATOM == 0
    rows = 256                                       # BM + BN of the shipped tile
    for r in range(rows):
        for c in range(8):
            mine = base + engine_offset(r, c)
            assert mine == cute_swizzle_343(base + canonical_k_sw128(r, 16 * c))
            assert mine == base + tma_sw128(r, c)


def test_k_steps_address_their_chunks():
    """A k-step ks starts its descriptor 32 bytes further (2 encoded units) and the hardware swizzles
    the absolute address: the 32 bytes it reads of row r are chunks 2ks, 2ks+1 as the engine
    placed them, for every row (both dtypes: 32 bytes = k16 bf16/fp16 = k8 tf32)."""
    base = 64 * 1024
    for ks in range(4):
        for r in range(128):
            for byte in range(32):
                hw = cute_swizzle_343(base + ks * 32 + canonical_k_sw128(r, byte))
                chunk, within = divmod(ks * 32 + byte, 16)
                assert hw == base + engine_offset(r, chunk) + within


def test_shared_memory_layout_alignment():
    cfg = MoEConfig(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8)
    for spec in WGMMA_SPECS:
        stage = (spec.block_m + spec.block_n) * STAGE_K_BYTES
        staging = spec.block_m * (spec.block_n * spec.element_bytes + 16)   # GEMM1's output tile, padded
        assert spec.gemm_smem_bytes() == spec.stages * stage + WGMMA_BARRIER_BYTES + staging
        assert (2 * spec.stages + 4) * 8 <= WGMMA_BARRIER_BYTES   # full/empty per stage, ready/free per slot
        # Every A tile, consumer slab and B tile starts on a swizzle atom (pipeline at offset 0).
        consumers = spec.threads // 128 - 1
        for s in range(spec.stages):
            for start in [s * stage + w * (spec.block_m // consumers) * 128 for w in range(consumers)] + \
                         [s * stage + spec.block_m * 128 + op * (spec.block_n // spec.num_b_operands) * 128
                          for op in range(spec.num_b_operands)]:
                assert start % SWIZZLE_ATOM == 0
        assert (spec.stages * stage) % 8 == 0 and spec.gemm_smem_bytes() % 16 == 0   # barriers, staging, tables
        plan = make_plan(dataclasses.replace(cfg, dtype=spec.dtype, gated=spec.gated,
                                             scale_expert_input=spec.scale_input), spec, world=8,
                         num_local_ranks=1)
        assert plan.smem_sched_offset >= spec.gemm_smem_bytes() + gemm_tables_bytes(spec)
        assert plan.smem_bytes <= DeviceInfo.for_arch("sm_90a").max_smem_per_block


# ---------------------------------------------------------------- descriptor and device constants


def ptx_matrix_descriptor(start: int, lbo: int, sbo: int, base_offset: int, swizzle: int) -> int:
    """The PTX ISA "Matrix Descriptor Format" table: encode(x) = (x & 0x3FFFF) >> 4 in bits 0-13
    (start), 16-29 (leading byte offset), 32-45 (stride byte offset); base offset in 49-51;
    swizzle mode in 62-63 (1 = 128-byte)."""
    enc = lambda x: (x & 0x3FFFF) >> 4          # noqa: E731
    return enc(start) | enc(lbo) << 16 | enc(sbo) << 32 | (base_offset & 7) << 49 | (swizzle & 3) << 62


def _device_checks(spec: KernelSpec) -> str:
    """static_asserts that the device's descriptor and sizes are the ones modelled here."""
    lines = ['#include "flashmoe/device/common/spec.cuh"', '#include "flashmoe/device/gemm/wgmma.cuh"',
             "using namespace flashmoe;"]
    # K-major SW128: LBO unused ("assumed 1": 16 bytes), SBO = 1024 bytes between 8-row groups,
    # base offset 0 (tiles start on the pattern's 1024-byte boundary).
    for addr in (0, 1024, 1024 + 32, 1024 + 96, 8192, 16384 + 64, 131 * 1024, 227 * 1024 - 1024 + 96):
        want = ptx_matrix_descriptor(addr, 16, SWIZZLE_ATOM, 0, 1)
        lines.append(f"static_assert(wgmma_desc_sw128({addr}u) == {want}ull, \"descriptor of {addr}\");")
    maps = tensormap.weight_map_args(spec, MoEConfig(hidden_size=256, intermediate_size=192, num_experts=4,
                                                     top_k=2, dtype=spec.dtype, gated=spec.gated),
                                     gate_up=1 << 20, down=1 << 24, num_experts=4)
    nb = spec.num_b_operands
    lines += [
        "using G = WgmmaTile<kBlockM, kBlockN, kNumB>;",
        f"static_assert(G::kPipeBytes == {spec.gemm_smem_bytes()}, \"spec.gemm_smem_bytes()\");",
        "static_assert(WgmmaTile<kBlockM, kBlockN, 1>::kPipeBytes == G::kPipeBytes, \"one pipeline\");",
        f"static_assert(G::kBarrierBytes == {WGMMA_BARRIER_BYTES}, \"WGMMA_BARRIER_BYTES\");",
        f"static_assert(G::kStagingBytes == {spec.staging_bytes()}, \"spec.staging_bytes()\");",
        f"static_assert(G::kBlockK == {maps['gate_up'].box[0]} && G::kBlockK == {maps['down'].box[0]}, \"box K\");",
        f"static_assert(G::kBBytes == {maps['gate_up'].box_bytes * nb}u, \"GEMM0 boxes per stage\");",
        f"static_assert(G::kBBytes == {maps['down'].box_bytes}u, \"GEMM1 box per stage\");",
        f"static_assert(G::kConsumerWGs == {spec.threads // 128 - 1}, \"warp roles\");",
    ]
    return "\n".join(lines) + "\n"


@by_spec
def test_device_descriptor_and_sizes_match_models(spec):
    # An absolute name inside the include root: NVRTC resolves quoted includes from the
    # program's own directory first (see compile.py).
    C.nvrtc_compile(_device_checks(spec), options=C.compile_options(spec),
                    name=str(C.INCLUDE_ROOT / "wgmma_checks.cu"), spec_key=spec.key())


# ---------------------------------------------------------------- tensor maps and ABI


def test_tensor_map_args():
    cfg = MoEConfig(hidden_size=512, intermediate_size=320, num_experts=8, top_k=2, num_shared_experts=1,
                    shared_intermediate_size=192)
    spec = wgmma_spec("bfloat16", True)
    maps = tensormap.weight_map_args(spec, cfg, gate_up=0x10000, down=0x20000, num_experts=8,
                                     shared_gate_up=0x30000, shared_down=0x40000)
    assert set(maps) == set(abi.WEIGHT_MAPS)
    H, I, Is, b = 512, 320, cfg.shared_intermediate_total, 2
    assert maps["gate_up"].dims == (H, I, 2, 8)
    assert maps["gate_up"].strides == (H * b, I * H * b, 2 * I * H * b)
    assert maps["gate_up"].box == (64, 64, 1, 1)
    assert maps["down"].dims == (I, H, 1, 8) and maps["down"].strides == (I * b, H * I * b, H * I * b)
    assert maps["down"].box == (64, 128, 1, 1)
    assert maps["shared_gate_up"].dims == (H, Is, 2, 1) and maps["shared_down"].dims == (Is, H, 1, 1)
    fp32 = tensormap.weight_map_args(wgmma_spec("float32", False), MoEConfig(
        hidden_size=512, intermediate_size=320, num_experts=8, top_k=2, dtype="float32", gated=False),
        gate_up=0x10000, down=0x20000, num_experts=8)
    assert fp32["gate_up"].box == (32, 128, 1, 1) and fp32["gate_up"].box_bytes == 128 * 128
    with pytest.raises(ValueError, match="16-byte aligned"):
        tensormap.weight_map_args(spec, cfg, gate_up=0x10008, down=0x20000, num_experts=8)
    with pytest.raises(ValueError, match="wgmma"):
        tensormap.weight_map_args(KernelSpec(), cfg, gate_up=0x10000, down=0x20000, num_experts=8)


def test_tensor_map_driver_arguments_build_without_a_driver():
    spec = wgmma_spec("float16", True)
    cfg = MoEConfig(hidden_size=256, intermediate_size=128, num_experts=4, top_k=2, dtype="float16")
    args = tensormap.weight_map_args(spec, cfg, gate_up=0x10000, down=0x20000, num_experts=4)["gate_up"]
    function, call_args = tensormap.driver_call(args)      # every argument converts to its binding type
    assert function.__name__ == "cuTensorMapEncodeTiled" and call_args[1] == 4
    try:
        err, _ = function(*call_args)                      # a GPU machine encodes it
    except RuntimeError:                                   # no libcuda here: the driver is missing
        return
    from cuda.bindings import driver as cu
    assert err in (cu.CUresult.CUDA_SUCCESS, cu.CUresult.CUDA_ERROR_NOT_INITIALIZED)


def test_params_abi_of_weight_maps():
    assert ctypes.sizeof(abi.Params) % abi.TENSOR_MAP_ALIGN == 0
    assert abi.Params.weight_maps.offset == 0 and ctypes.sizeof(abi.TensorMap) == abi.TENSOR_MAP_BYTES
    cfg = MoEConfig(hidden_size=256, intermediate_size=128, num_experts=4, top_k=2)
    plan = make_plan(cfg, wgmma_spec("bfloat16", True), world=1, max_tokens=64)
    blobs = {"gate_up": bytes(range(128)), "down": bytes(range(128, 256))}
    p = abi.fill_params(plan, heap=0, peer_bases=0, control=0, router_weight=0, gate_up=0, down=0,
                        local=[(0, 0, 1)], weight_maps=blobs)
    raw = bytes(p)
    assert raw[:128] == blobs["gate_up"] and raw[128:256] == blobs["down"] and raw[256:512] == bytes(256)
    assert p.weight_maps_valid == 1
    q = abi.fill_params(plan, heap=0, peer_bases=0, control=0, router_weight=0, gate_up=0, down=0,
                        local=[(0, 0, 1)])
    assert q.weight_maps_valid == 0 and bytes(q)[:512] == bytes(512)
    header = abi.abi_header()
    assert "static_assert((int)alignof(Params) == 64" in header and "kMapSharedDown == 3" in header


# ---------------------------------------------------------------- the full kernel (slow)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    directory = tmp_path_factory.getbasetemp() / "kernel-cache"     # shared with test_kernel_build
    with pytest.MonkeyPatch.context() as m:
        m.setenv(C.CACHE_DIR_ENV, str(directory))
        m.delenv(C.ASSERT_NO_COMPILE_ENV, raising=False)
        compile_many(WGMMA_SPECS, jobs=os.cpu_count() or 1)
    return directory


@pytest.fixture
def kernel(spec, cache_dir, monkeypatch):
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(cache_dir))
    return C.compile_spec(spec)


HGMMA_SHAPE = {"bfloat16": "HGMMA.64x{n}x16.F32.BF16", "float16": "HGMMA.64x{n}x16.F32",
               "float32": "HGMMA.64x{n}x8.F32.TF32"}


@pytest.mark.slow
@by_spec
def test_wgmma_kernel_resources(kernel):
    res = kernel.resources
    assert res.spill_bytes == 0 and res.stack_bytes == 0, res
    assert res.registers * kernel.spec.threads <= 64 * 1024
    dynamic = plan_smem_bytes(kernel.spec)
    assert res.static_smem_bytes + dynamic <= DeviceInfo.for_arch("sm_90a").max_smem_per_block
    # ptxas says when it serialises wgmma or ignores setmaxnreg; neither may happen, nor a warning.
    assert not performance_losses(kernel.log) and "warning" not in kernel.log.lower(), kernel.log


@pytest.mark.slow
@by_spec
def test_wgmma_kernel_sass(kernel):
    text = cubin.sass(kernel.cubin)
    counts = cubin.opcode_counts(text)
    shapes = set(re.findall(r"HGMMA\.[0-9x]+\.F32(?:\.[A-Z0-9]+)?", text))
    assert shapes == {HGMMA_SHAPE[kernel.spec.dtype].format(n=kernel.spec.block_n)}, shapes
    # One inlined main loop serves both GEMMs: 4 k-steps of one m64nBN instruction per stage and
    # m64 slab (a ping-pong warpgroup holds both slabs of the 128-row tile).
    slabs = 2 if kernel.spec.schedule == "pingpong" else 1
    assert counts["HGMMA"] == 4 * slabs
    assert counts["HMMA"] == 0 and counts["STL"] == counts["LDL"] == 0
    assert "UTMALDG.4D" in text                      # B tiles by TMA
    assert "LDGSTSBAR" in text                       # cp.async.mbarrier.arrive (A rows)
    assert "SYNCS.PHASECHK" in text                  # mbarrier try_wait
    assert "FENCE.VIEW.ASYNC.S" in text              # fence.proxy.async.shared::cta
    assert "WARPGROUP.ARRIVE" in text and "WARPGROUP.DEPBAR" in text
