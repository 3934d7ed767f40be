"""KernelSpec: everything the code generation depends on, and nothing else.

A spec is the compile-cache key (together with the device sources' hash, the NVRTC version and
the options; see ``compile.py``). Only what changes the generated code belongs here: the dtype,
gated or plain experts (one or two B operands per GEMM0 tile), the tile shape and pipeline depth,
the block size, the GEMM engine and its consumers' schedule, the transport, tracing, whether the
kernel routes or reads the caller's routing (``flashmoe.experts_forward``: that kernel has no
router at all), whether the routing weight scales the expert's input (Llama4) or its output, and
the order a routed expert's tiles are claimed in.
Shapes (H, I, E, k, tokens), the activation, routing options and capacity are run-time values in
``Params``, so a new batch size or model width never recompiles.

The activation is a run-time switch in the GEMM0 epilogue: it runs once per output element of a
tile that took a full K loop, so it is not measurable, and it divides the number of specs by four.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

ARCHS = ("sm_80", "sm_90a")   # the shipped cubin targets; any sm_XX >= 80 compiles on demand
DTYPE_CODES = {"bfloat16": 0, "float16": 1, "float32": 2}
GEMM_ENGINES = ("mma_sync", "wgmma")
TRANSPORTS = ("peer", "nvshmem")
# How the wgmma consumer warpgroups share the tiles (device/gemm/wgmma.cuh): cooperative, each
# takes a slab of every tile's rows; pingpong, each takes whole tiles in turn, so one's epilogue
# runs while the other's mainloop keeps the tensor cores busy. A ping-pong warpgroup holds the
# whole tile's accumulators: at most 128 a thread, a 128 x 128 tile.
SCHEDULES = ("cooperative", "pingpong")
PINGPONG_MAX_TILE = 128 * 128
ROUTINGS = ("router", "given")

# Bytes of K one pipeline stage holds per row: 64 bf16/fp16 or 32 fp32 elements. One 128-byte
# row is one swizzle atom (8 chunks of 16 bytes), for ldmatrix and for the wgmma 128B swizzle.
STAGE_K_BYTES = 128
# The wgmma engine keeps its pipeline's mbarriers (a full and an empty one per stage, at most 8
# stages, and a ready and a free one per task-table slot, 8 bytes each) after the stages:
# device/gemm/wgmma.cuh kBarrierBytes. Its epilogue's staging tile follows them.
WGMMA_BARRIER_BYTES = 256
# Threads of a wgmma block: one producer warpgroup (cp.async + TMA) and two consumer warpgroups
# (wgmma), each consumer taking half of the 128 tile rows (one m64 slab).
# GEMM tile heights: prefill tiles fill the tensor cores; decode tiles (an expert gets few rows,
# the time goes into reading its weights) halve the padding rows a 128-row tile would multiply.
PREFILL_BLOCK_M = 128
DECODE_BLOCK_M = 64
# B rows per tile: 128, or 256 for the wide prefill tile (wgmma): a 128 x 256 tile loads each
# gathered A row once for twice the columns, so it reads (128 + 256) / (128 x 256) bytes per
# multiply-add where a 128 x 128 tile reads 256 / (128 x 128): 3/4 of the L2 traffic.
# plan.choose_tile says when it runs.
BLOCK_N = 128
WIDE_BLOCK_N = 256
# Row tiles per band of a routed expert's tile order (device/roles/scheduler.cuh band_tile says
# why twelve): the tiles of a band are claimed column by column, so the blocks running at once
# read each weight panel together. 1 is the plain order, row tile by row tile (bench/providers.py
# runs it beside the shipped order, so a trace shows what the bands gain).
BAND_TILES = 12
_ARCH_RE = re.compile(r"sm_(\d+)a?")


@dataclass(frozen=True)
class KernelSpec:
    arch: str = "sm_90a"          # cubin target: sm_90a (Hopper) or sm_80 (portable to sm_8x)
    dtype: str = "bfloat16"       # operand dtype of the expert GEMMs and of x / out
    gated: bool = True            # GEMM0 computes gate and up tiles from one A tile (2 B operands)
    block_m: int = 128            # rows (tokens) per GEMM tile
    block_n: int = 128            # B rows per GEMM tile (gate + up together when gated)
    stages: int = 4               # cp.async / TMA pipeline depth
    threads: int = 256            # threads per block
    gemm: str = "mma_sync"        # mma_sync (sm_80+) or wgmma (sm_90a)
    schedule: str = "cooperative" # wgmma consumers: cooperative or pingpong (SCHEDULES)
    transport: str = "peer"       # peer pointers (NVLink, same GPU) or the NVSHMEM device API
    trace: bool = False           # record per-task timestamps into the trace buffer
    routing: str = "router"       # router: the kernel routes; given: LocalRank::topk_ids / topk_weights
    scale_input: bool = False     # MoEConfig.scale_expert_input: the weight scales GEMM0's rows, not the combine
    band_tiles: int = BAND_TILES  # row tiles per band of a routed expert's tile order (1: row tile by row tile)

    def __post_init__(self):
        if not _ARCH_RE.fullmatch(self.arch) or int(_ARCH_RE.fullmatch(self.arch).group(1)) < 80:
            raise ValueError(f"arch={self.arch!r}: expected sm_XX (XX >= 80, e.g. {', '.join(ARCHS)})")
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype={self.dtype!r}: allowed are {', '.join(DTYPE_CODES)}")
        if self.gemm not in GEMM_ENGINES:
            raise ValueError(f"gemm={self.gemm!r}: allowed are {', '.join(GEMM_ENGINES)}")
        if self.gemm == "wgmma" and self.arch != "sm_90a":
            raise ValueError("gemm='wgmma' needs arch='sm_90a'")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport={self.transport!r}: allowed are {', '.join(TRANSPORTS)}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r}: allowed are {', '.join(ROUTINGS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: allowed are {', '.join(SCHEDULES)}")
        if self.block_m % 16 or not 16 <= self.block_m <= 256:
            raise ValueError(f"block_m={self.block_m}: must be a multiple of 16 in [16, 256]")
        if self.block_n % 32 or not 32 <= self.block_n <= 256:
            raise ValueError(f"block_n={self.block_n}: must be a multiple of 32 in [32, 256]")
        if not 1 <= self.band_tiles <= 64:
            raise ValueError(f"band_tiles={self.band_tiles}: must be in [1, 64]")
        if not 2 <= self.stages <= 8:
            raise ValueError(f"stages={self.stages}: must be in [2, 8]")
        if self.threads % 128 or not 128 <= self.threads <= 512:
            raise ValueError(f"threads={self.threads}: must be a multiple of 128 in [128, 512]")
        if self.gemm == "mma_sync" and self.threads not in (128, 256):
            raise ValueError(f"threads={self.threads}: the mma_sync engine tiles 4 or 8 warps (128 or 256)")
        # The mma_sync epilogue stages its output tile in the pipeline's shared memory (the wgmma
        # engine's has its own area, since the next tile's stages fill while it runs).
        if self.gemm == "mma_sync" and self.staging_bytes() > self.gemm_smem_bytes():
            raise ValueError(f"stages={self.stages}: the {self.block_m} x {self.block_n} {self.dtype} epilogue "
                             f"tile ({self.staging_bytes()} B) needs more shared memory than the pipeline "
                             f"({self.gemm_smem_bytes()} B); use more stages")
        if self.schedule == "pingpong":
            if self.gemm != "wgmma" or self.threads != 384:
                raise ValueError("schedule='pingpong' takes turns between two wgmma consumer warpgroups: "
                                 f"gemm='wgmma' and threads=384 (not {self.gemm!r}, {self.threads})")
            if self.block_m * self.block_n > PINGPONG_MAX_TILE:
                raise ValueError(f"schedule='pingpong': a warpgroup holds a whole tile's accumulators, at most "
                                 f"128 x 128; the {self.block_m} x {self.block_n} tile runs 'cooperative'")
            if self.transport == "nvshmem":
                raise ValueError("schedule='pingpong' needs transport='peer': the NVSHMEM transport stages "
                                 "GEMM1 puts in one tile per block; use schedule='cooperative'")
        if self.gemm == "wgmma":
            consumers = self.threads // 128 - 1    # warpgroup 0 produces, the others run wgmma
            slabs = 1 if self.schedule == "pingpong" else consumers   # warpgroups sharing a tile
            if consumers < 1 or self.block_m % (64 * slabs):
                raise ValueError(f"gemm='wgmma' with threads={self.threads}: {slabs} consumer warpgroups "
                                 f"must split block_m={self.block_m} into whole 64-row slabs")

    @property
    def element_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def block_k(self) -> int:
        """K elements per pipeline stage."""
        return STAGE_K_BYTES // self.element_bytes

    @property
    def num_b_operands(self) -> int:
        return 2 if self.gated else 1

    @property
    def pipe_align(self) -> int:
        """The boundary the GEMM pipeline (the dynamic shared memory base) must start on: the wgmma
        engine's swizzled tiles count from 1024-byte boundaries, mma_sync needs 16-byte rows.
        Device side: kPipeAlign of the engine; the kernel checks it at launch."""
        return 1024 if self.gemm == "wgmma" else 16

    def staging_bytes(self) -> int:
        """The epilogue's output tile, rows of the widest output (GEMM1's BN columns) padded by 16
        bytes against bank conflicts: mma_sync stages all BM rows; wgmma one 64-row slab per
        consumer warpgroup at a time (a ping-pong warpgroup's 128 rows in two passes)."""
        rows = 64 * (self.threads // 128 - 1) if self.gemm == "wgmma" else self.block_m
        return rows * (self.block_n * self.element_bytes + 16)

    def gemm_smem_bytes(self) -> int:
        """Shared memory of the GEMM pipeline: every stage holds a BM x BK A tile and a BN x BK B tile
        (the wgmma engine adds its barriers and its own epilogue staging tile). Device side:
        kPipeBytes of the engine."""
        stages = self.stages * (self.block_m + self.block_n) * STAGE_K_BYTES
        return stages + (WGMMA_BARRIER_BYTES + self.staging_bytes() if self.gemm == "wgmma" else 0)

    def defines(self) -> dict[str, int]:
        """The -D macros the device code is compiled with (the only channel from spec to code)."""
        return {
            "FLASHMOE_DTYPE": DTYPE_CODES[self.dtype],
            "FLASHMOE_GATED": int(self.gated),
            "FLASHMOE_BLOCK_M": self.block_m,
            "FLASHMOE_BLOCK_N": self.block_n,
            "FLASHMOE_STAGES": self.stages,
            "FLASHMOE_THREADS": self.threads,
            "FLASHMOE_GEMM_WGMMA": int(self.gemm == "wgmma"),
            "FLASHMOE_PINGPONG": int(self.schedule == "pingpong"),
            "FLASHMOE_TRANSPORT_NVSHMEM": int(self.transport == "nvshmem"),
            "FLASHMOE_TRACE": int(self.trace),
            "FLASHMOE_ROUTING_GIVEN": int(self.routing == "given"),
            "FLASHMOE_SCALE_INPUT": int(self.scale_input),
            "FLASHMOE_BAND_TILES": self.band_tiles,
        }

    def key(self) -> str:
        """A stable, readable name: also the cache file stem."""
        return "-".join(f"{k}={v}" for k, v in asdict(self).items())


def shipped_specs() -> list[KernelSpec]:
    """The specs every CPU CI run compiles and checks (resources, spills, SASS): what
    ``select_spec`` picks on an A100-class GPU (mma_sync) and on Hopper (wgmma). Other archs
    compile on demand."""
    return device_specs("sm_80", 163 * 1024) + device_specs("sm_90a", 227 * 1024)


def device_specs(arch: str, max_smem_per_block: int) -> list[KernelSpec]:
    """What the layer selects on one device (``backend._set_specs``, whose ``plan.layer_specs``
    fits each pipeline to the layer: the same specs on an H100/H200 or A100 up to about 640 experts
    a rank, where the task map starts to take a decode stage's room): every dtype, gated and
    plain, at the prefill and the decode tile, on Hopper the wide prefill tile, and of the
    commonest layout (bf16, gated) the routing-given kernels (flashmoe.experts_forward), the
    input-scaling ones (Llama4) and both (experts_forward with scale_expert_input). A layout or a
    wide tile whose shared memory the device lacks (fp32's wide epilogue tile, fp32 on a 99 KiB
    part) is left out, as the layer leaves it out."""
    specs = []
    for dtype in DTYPE_CODES:
        for gated in (True, False):
            with contextlib.suppress(ValueError):
                specs += select_specs(dtype, gated, arch, max_smem_per_block)
            if arch == "sm_90a":
                with contextlib.suppress(ValueError):
                    specs.append(select_spec(dtype, gated, arch, max_smem_per_block, PREFILL_BLOCK_M,
                                             block_n=WIDE_BLOCK_N))
    common = [s for s in specs if s.dtype == "bfloat16" and s.gated]
    return specs + [replace(s, routing=routing, scale_input=scale) for s in common
                    for routing, scale in (("given", False), ("router", True), ("given", True))]


def wgmma_spec(dtype: str, gated: bool, stages: int = 4, block_m: int = 128, block_n: int = BLOCK_N,
               schedule: str | None = None) -> KernelSpec:
    """The Hopper spec: a producer warpgroup and one consumer warpgroup per 64 rows of the tile;
    by default (``schedule=None``) the two of the 128 x 128 prefill tile in ping-pong, else
    cooperative (the wide tile's accumulators do not fit one warpgroup; the decode tile has one)."""
    if schedule is None:
        schedule = "pingpong" if (block_m, block_n) == (PREFILL_BLOCK_M, BLOCK_N) else "cooperative"
    return KernelSpec(arch="sm_90a", dtype=dtype, gated=gated, stages=stages, block_m=block_m, block_n=block_n,
                      threads=128 * (1 + block_m // 64), gemm="wgmma", schedule=schedule)


def arch_for_capability(major: int, minor: int) -> str:
    """The cubin target for a GPU: sm_90a on Hopper (wgmma needs the 'a' target), else exact."""
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def select_spec(dtype: str, gated: bool, arch: str, max_smem_per_block: int,
                block_m: int = 128, gemm: str | None = None, block_n: int = BLOCK_N,
                needs: Callable[[KernelSpec], int] | None = None) -> KernelSpec:
    """The spec for a device and a tile (``plan.choose_tile``): the wgmma engine on sm_90a,
    mma_sync elsewhere (``gemm`` forces one: mma_sync runs on Hopper too, without its Hopper-only
    instructions), with the deepest pipeline whose block fits the device's shared memory: up
    to 8 stages with wgmma (its pipeline runs across tiles, so every stage keeps loads in flight);
    with mma_sync up to 6 for the decode tile, whose loads are the whole cost, else 4. The wide
    tile (``block_n=WIDE_BLOCK_N``) is a wgmma tile: 3 stages for bf16/fp16, none for fp32.
    ``needs(spec)``: a block's shared memory in all; by default the pipeline and 16 KiB for the row
    tables and task map (a layer's exact figure: ``plan.layer_specs``)."""
    if gemm is not None and gemm not in GEMM_ENGINES:
        raise ValueError(f"gemm={gemm!r}: allowed are {', '.join(GEMM_ENGINES)}")
    gemm = gemm or ("wgmma" if arch == "sm_90a" else "mma_sync")
    if gemm == "wgmma" and arch != "sm_90a":
        raise ValueError(f"gemm='wgmma' needs a Hopper GPU (arch sm_90a); this one is {arch}")
    if block_n != BLOCK_N and gemm != "wgmma":
        raise ValueError(f"block_n={block_n}: tiles other than {BLOCK_N} B rows are wgmma tiles (Hopper)")
    deepest = 8 if gemm == "wgmma" else 6 if block_m <= DECODE_BLOCK_M else 4
    for stages in range(deepest, 1, -1):
        try:
            if gemm == "wgmma":
                spec = wgmma_spec(dtype, gated, stages, block_m, block_n)
            else:
                spec = KernelSpec(arch=arch, dtype=dtype, gated=gated, stages=stages, block_m=block_m)
        except ValueError:      # e.g. the epilogue tile does not fit this shallow a pipeline
            continue
        if (needs(spec) if needs else spec.gemm_smem_bytes() + 16 * 1024) <= max_smem_per_block:
            return spec
    raise ValueError(f"no {dtype} spec with a {block_m} x {block_n} tile fits {max_smem_per_block} B of "
                     f"shared memory per block on {arch}")


def select_specs(dtype: str, gated: bool, arch: str, max_smem_per_block: int,
                 gemm: str | None = None, needs: Callable[[KernelSpec], int] | None = None) -> list[KernelSpec]:
    """The prefill and the decode spec of a device (``select_spec`` at both tile heights)."""
    return [select_spec(dtype, gated, arch, max_smem_per_block, bm, gemm=gemm, needs=needs)
            for bm in (PREFILL_BLOCK_M, DECODE_BLOCK_M)]
