"""Plan: config + world + token bound + device -> placement, tiles, heap layout, grid.

All layout arithmetic of the project lives here. The device reads every offset and stride from
``Params`` (``abi.py`` fills it from a Plan) and never re-derives a layout.

Notation: W ranks in the world, L of them hosted by this launch (L = W for virtual ranks on one
GPU, L = 1 for one process per GPU), E experts, E_l = E / W per rank, k experts per token,
T = max tokens per rank, H hidden, I intermediate, I_s the fused shared-expert width (0 if none),
S = k + (1 if shared experts) result slots per token, b = element bytes (2, or 4 for fp32),
C = ceil(T / 64) token chunks, R = W * T * min(k, E_l) expert rows a rank can receive, BM x BN the
GEMM tile, Z identity experts (chosen by the router beside the E, never placed on a rank).

Placement: rank r owns the contiguous experts [r * E_l, (r + 1) * E_l).

Heap (one slice per rank, identical layout on every rank, so a peer's address is its base plus
the same offset). Regions written by peers are *banked* when ranks run in separate launches (one
process per GPU): two copies, launch n uses bank n % 2. A rank can be at most one launch ahead of
a peer it writes to (it cannot finish launch n without every rank's "done" signal of launch n), so
the bank it writes is never one the peer still reads. When one launch hosts every rank (virtual
ranks) launches are stream-ordered and one copy suffices: both banks alias (stride 0). The small
counters are always banked: launch n zeroes launch n+1's.

    region          banked  bytes (one bank)           written by      holds  (banked: "peer" = when L < W)
    recv_rows       peer    W * T * H * b              source ranks    token rows, one per (token, destination rank)
    entries         peer    E_l * W * T * 16           source ranks    Entry per (local expert, source, position)
    counts          peer    W * (E_l + 2) * 4          source ranks    per source: rows per local expert, rows sent, tokens
    ret_rows        peer    T * S * H * b              expert ranks    expert outputs per (token, slot); shared slot last
    drop_marks      peer    T * k * 4                  expert ranks    epoch value when (token, slot) was dropped
    sync_counters   yes     5 * 4                      this rank       barrier, claim, dispatched, finished, exited
    select_done     yes     E_l * 4                    this rank       capacity selection finished, per local expert
    tile_done       yes     M * 4                      this rank       GEMM0 column tiles finished, per row tile
    epoch           no      4                          this rank       launch counter (the kernel bumps it)
    count_flags     no      W * 4                      source ranks    "my counts are written" (epoch value)
    data_flags      no      W * 4                      source ranks    "my rows and entries are written"
    done_flags      no      W * 4                      expert ranks    "your results are written"
    logits          no      T * (E + Z) * 4            this rank       router logits (fp32), Z identity experts
    topk_ids        no      T * k * 4                  this rank       chosen experts (int32)
    topk_weights    no      T * k * 4                  this rank       combine weights (fp32)
    shared_gate     no      T * 4                      this rank       sigmoid gate of the shared expert
    chunk_counts    no      C * (E + W) * 4            this rank       per 64-token chunk: tokens per expert, per destination
    chunk_base      no      C * (E + W) * 4            this rank       exclusive prefix of chunk_counts over chunks
    inter_rows      no      R * I * b                  this rank       GEMM0 output of routed experts
    shared_inter    no      T * I_s * b                this rank       GEMM0 output of the shared experts
    kept_list       no      R * 4 (capacity mode only) this rank       kept entries per expert, compacted
    x_stage         no      T * H * b (nvshmem)        this rank       x, copied here when a peer takes NVSHMEM puts
    put_stage       no      P * BM * BN * b (nvshmem)  this rank       GEMM1 result tiles bound for NVSHMEM peers

The last two exist for the NVSHMEM transport only (0 bytes otherwise): a NIC reads a put's source,
so it must be symmetric memory; P = PUT_STAGE_TILES, one staging tile per block of the rank
(device/common/transport_nvshmem.cuh says why and what it costs).

with M = ceil(R / BM) + E_l GEMM0 row tiles (each expert adds at most one partial tile), plus
ceil(T / BM) when there are shared experts. Every region starts on a 256-byte boundary.

Flags hold the launch epoch, so they need neither banks nor resets between launches; a wait
accepts any epoch at or past the one it expects. The epoch itself lives in the heap and the kernel
advances it (the rank's last block to exit), so a captured CUDA graph replays correctly. The
banked counters of launch n+1 are zeroed by launch n, when nothing else can touch them.

Dropless with bounded memory: a token travels once per destination rank (not once per expert), so
a rank receives at most W * T rows whatever the routing, and holds at most R expert rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

from ..config import MoEConfig
from .spec import BLOCK_N, DECODE_BLOCK_M, PREFILL_BLOCK_M, WIDE_BLOCK_N, KernelSpec, select_spec, select_specs

REGION_ALIGN = 256           # bytes; >= 128 so every region starts a cache line and a TMA box
CHUNK_TOKENS = 64            # tokens per route task / dispatch chunk (one 64-bit mask per expert)
MAX_EXPERTS = 1024           # experts the kernel selects from, identity ones too (32 per lane of a warp)
ENTRY_BYTES = 16             # struct Entry { u32 recv_row, token, slot; f32 weight; }
NUM_BANKS = 2
NUM_SYNC_COUNTERS = 5        # barrier, claim, dispatched, finished, exited
TRACE_RECORD_BYTES = 32
PUT_STAGE_TILES = 256        # P: GEMM1 staging tiles per rank (NVSHMEM transport), one per block
SCRATCH_BYTES = 64           # a block's scratch words (device/common/heap.cuh kScratchBytes)
CTX_BYTES = 64               # a Ctx in shared memory: the block's own, then its task loop's (kCtxBytes)
WIDE_MIN_ROUNDS = 4          # choose_tile: wide tiles once each block gets this many of them
MIN_PLAN_TOKENS = 64         # plan_tokens: the fewest tokens per rank a backend plans for


def experts_per_rank(num_experts: int, world: int) -> int:
    if world < 1 or num_experts % world:
        raise ValueError(f"num_experts={num_experts} must be divisible by the world size {world}")
    return num_experts // world


def expert_owner(expert: int, num_experts: int, world: int) -> int:
    return expert // experts_per_rank(num_experts, world)


def rank_experts(rank: int, num_experts: int, world: int) -> range:
    per = experts_per_rank(num_experts, world)
    return range(rank * per, (rank + 1) * per)


def gemm0_cols_per_tile(block_n: int, gated: bool) -> int:
    """Intermediate columns one GEMM0 tile produces (BN split between gate and up when gated)."""
    return block_n // (2 if gated else 1)


def _align(n: int, a: int = REGION_ALIGN) -> int:
    return (n + a - 1) // a * a


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclass(frozen=True)
class Region:
    name: str
    offset: int       # bytes from the rank's heap slice base (bank 0)
    size: int         # bytes of one bank
    banked: bool

    @property
    def bank_stride(self) -> int:
        return _align(self.size) if self.banked else 0

    @property
    def total(self) -> int:
        return self.bank_stride * NUM_BANKS if self.banked else self.size

    def bank_offset(self, bank: int) -> int:
        return self.offset + bank * self.bank_stride


@dataclass(frozen=True)
class DeviceInfo:
    """What the plan needs to know about the GPU (read off the device, or stated for CPU checks)."""

    sm_count: int = 132
    max_smem_per_block: int = 227 * 1024    # opt-in dynamic shared memory limit (H100: 227 KiB)
    arch: str = "sm_90a"

    @staticmethod
    def for_arch(arch: str) -> "DeviceInfo":
        """Nominal limits for CPU-side checks: H100 for sm_90a, A100 for sm_80."""
        if arch == "sm_80":
            return DeviceInfo(sm_count=108, max_smem_per_block=163 * 1024, arch="sm_80")
        return DeviceInfo()


@dataclass(frozen=True)
class Plan:
    config: MoEConfig
    spec: KernelSpec
    world: int                       # W
    num_local_ranks: int             # L: ranks this launch hosts
    first_local_rank: int            # global rank of the first hosted rank
    max_tokens: int                  # T per rank
    device: DeviceInfo
    regions: dict[str, Region] = field(repr=False)
    rank_heap_bytes: int = 0         # one rank's slice, all regions, both banks
    blocks_per_rank: int = 0
    smem_bytes: int = 0              # dynamic shared memory per block
    smem_sched_offset: int = 0       # where the task map starts in it
    smem_scratch_offset: int = 0     # where the block-wide scratch words start
    row_tile: int = 0                # BM the row-tile counters are sized for (<= spec.block_m)

    # -- derived sizes (closed forms of the module docstring) --

    @property
    def experts_per_rank(self) -> int:
        return experts_per_rank(self.config.num_experts, self.world)

    @property
    def slots(self) -> int:
        """S: result slots per token (k routed, then one for the shared experts)."""
        return self.config.top_k + (1 if self.config.num_shared_experts else 0)

    @property
    def num_chunks(self) -> int:
        return ceil_div(self.max_tokens, CHUNK_TOKENS)

    @property
    def max_expert_rows(self) -> int:
        """R: expert rows a rank can hold (every source sends each token once per rank)."""
        return self.world * self.max_tokens * min(self.config.top_k, self.experts_per_rank)

    @property
    def max_row_tiles(self) -> int:
        """M: GEMM0 row tiles of one rank, routed and shared."""
        bm = self.row_tile
        shared = ceil_div(self.max_tokens, bm) if self.config.num_shared_experts else 0
        return ceil_div(self.max_expert_rows, bm) + self.experts_per_rank + shared

    @property
    def grid(self) -> int:
        return self.blocks_per_rank * self.num_local_ranks

    @property
    def gemm0_cols_per_tile(self) -> int:
        return gemm0_cols_per_tile(self.spec.block_n, self.spec.gated)

    def gemm0_col_tiles(self, intermediate: int) -> int:
        return ceil_div(intermediate, self.gemm0_cols_per_tile)

    def gemm1_col_tiles(self) -> int:
        return ceil_div(self.config.hidden_size, self.spec.block_n)

    def heap_bytes(self) -> int:
        """All L hosted slices (the allocation a launch needs)."""
        return self.rank_heap_bytes * self.num_local_ranks

    def describe(self) -> str:
        lines = [f"Plan W={self.world} L={self.num_local_ranks} T={self.max_tokens} "
                 f"grid={self.grid} ({self.blocks_per_rank}/rank) smem={self.smem_bytes} B "
                 f"heap/rank={self.rank_heap_bytes / 2**20:.1f} MiB"]
        for r in self.regions.values():
            lines.append(f"  {r.name:<13} @{r.offset:>12}  {r.size:>12} B{'  x2 banks' if r.banked else ''}")
        return "\n".join(lines)


def region_sizes(config: MoEConfig, spec: KernelSpec, world: int, max_tokens: int,
                 peer_banked: bool = True, row_tile: int | None = None) -> list[tuple[str, int, bool]]:
    """(name, bytes of one bank, banked) in heap order; the table of the module docstring.
    ``peer_banked``: whether the regions peers write get two banks (ranks in separate launches).
    ``row_tile``: the BM the row-tile counters are sized for (default the spec's; a heap shared by
    several specs is sized for the smallest)."""
    W, T, H = world, max_tokens, config.hidden_size
    E, k, I = config.num_experts, config.top_k, config.intermediate_size
    El = experts_per_rank(E, W)
    b = spec.element_bytes
    S = k + (1 if config.num_shared_experts else 0)
    C = ceil_div(T, CHUNK_TOKENS)
    R = W * T * min(k, El)
    bm = row_tile or spec.block_m
    M = ceil_div(R, bm) + El + (ceil_div(T, bm) if config.num_shared_experts else 0)
    nvshmem = spec.transport == "nvshmem"
    return [
        ("recv_rows", W * T * H * b, peer_banked),
        ("entries", El * W * T * ENTRY_BYTES, peer_banked),
        ("counts", W * (El + 2) * 4, peer_banked),
        ("ret_rows", T * S * H * b, peer_banked),
        ("drop_marks", T * k * 4, peer_banked),
        ("sync_counters", NUM_SYNC_COUNTERS * 4, True),
        ("select_done", El * 4, True),
        ("tile_done", M * 4, True),
        ("epoch", 4, False),
        ("count_flags", W * 4, False),
        ("data_flags", W * 4, False),
        ("done_flags", W * 4, False),
        ("logits", T * config.router_experts * 4, False),
        ("topk_ids", T * k * 4, False),
        ("topk_weights", T * k * 4, False),
        ("shared_gate", T * 4, False),
        ("chunk_counts", C * (E + W) * 4, False),
        ("chunk_base", C * (E + W) * 4, False),
        ("inter_rows", R * I * b, False),
        ("shared_inter", T * config.shared_intermediate_total * b, False),
        ("kept_list", R * 4 if config.capacity_factor is not None else 0, False),
        ("x_stage", T * H * b if nvshmem else 0, False),
        ("put_stage", PUT_STAGE_TILES * bm * spec.block_n * b if nvshmem else 0, False),
    ]


def kernel_support(config: MoEConfig, spec: KernelSpec, world: int) -> str | None:
    """Why the kernel cannot run this layer (None when it can)."""
    if spec.dtype != config.dtype:
        return f"spec dtype {spec.dtype} differs from config dtype {config.dtype}"
    if spec.gated != config.gated:
        return f"spec gated={spec.gated} differs from config gated={config.gated}"
    if spec.scale_input != config.scale_expert_input:
        return f"spec scale_input={spec.scale_input} differs from config scale_expert_input={config.scale_expert_input}"
    if config.num_experts % world:
        return f"num_experts={config.num_experts} is not divisible by the world size {world}"
    if world > 64:
        return f"world size {world} is above the kernel's limit of 64 ranks"
    row_multiple = 16 // spec.element_bytes     # rows move as 16-byte vectors
    for name in ("hidden_size", "intermediate_size"):
        if getattr(config, name) % row_multiple:
            return f"{name}={getattr(config, name)} must be a multiple of {row_multiple} for {config.dtype}"
    if config.shared_intermediate_total % row_multiple:
        return f"shared width {config.shared_intermediate_total} must be a multiple of {row_multiple}"
    if config.router_experts > MAX_EXPERTS:
        return (f"num_experts + identity_experts = {config.router_experts} is above the kernel's limit of "
                f"{MAX_EXPERTS} experts to choose from")
    if config.top_k > 32:
        return f"top_k={config.top_k} is above the kernel's limit of 32"
    if config.n_group > 32:
        return f"n_group={config.n_group} is above the kernel's limit of 32"
    return None


def scheduler_smem_bytes(config: MoEConfig, world: int) -> int:
    """Shared memory the task map keeps for the whole task loop (device/roles/scheduler.cuh
    TaskMap): 16 header words, then per local expert its kept rows, row and tile prefixes
    (E_l + 1 each), its per-source segment starts (E_l x (W + 1)) and the token prefix (W + 1)."""
    El = experts_per_rank(config.num_experts, world)
    return _align((16 + El + 2 * (El + 1) + El * (world + 1) + world + 1) * 4, 16)


GEMM_WEIGHT_TILE_BYTES = 24   # TileTables::wt: tensor map pointer, first row, expert (TMA B tile), bias
GEMM_JOB_BYTES = 28           # TileTables::job: GEMM, K, valid columns, row tile, two trace words, first stage


def gemm_tables_bytes(spec: KernelSpec) -> int:
    """Row tables after the GEMM pipeline (device/roles/expert_gemm.cuh TileTables), per slot: the
    job's rank context, A and B row pointers, the B tile as a tensor-map box and its bias, the job,
    output offsets (u64), output ranks (i32), row-valid flags and the rows' scales (fp32; one word
    unless spec.scale_input). The wgmma engine keeps two slots (one being prepared while the
    other's tile runs, device/roles/tasks.cuh), mma_sync one."""
    scales = spec.block_m if spec.scale_input else 1
    slot = _align(CTX_BYTES + (spec.block_m + spec.block_n) * 8 + GEMM_WEIGHT_TILE_BYTES + GEMM_JOB_BYTES
                  + spec.block_m * (8 + 4 + 1) + 4 * scales, 16)
    return slot * (2 if spec.gemm == "wgmma" else 1)


def phase_smem_bytes(config: MoEConfig, spec: KernelSpec, world: int) -> int:
    """Shared memory of the route and dispatch phases (they reuse the GEMM area): one 64-wide
    K segment of x (64 tokens) and of W_router (128 rows) in fp32, k-major (device/roles/logits.cuh
    RouterSmem), plus per-chunk counters (E + 1 + W); or the dispatch masks (one u64 per expert and
    per destination rank). Decode routing stages as many segments as the whole area holds; its
    largest one-segment need, (tokens + rows) x 65 + tokens x rows floats with tokens x rows <= the
    block's threads and rows <= 128, stays below the prefill tile's. Selection then holds E floats a
    warp in the segments' place (logits.cuh asserts that the block's warps x MAX_EXPERTS fit)."""
    E = config.num_experts
    router = (64 * (CHUNK_TOKENS + 128) + E + 1 + world) * 4
    dispatch = (E + world) * 8
    return _align(max(router, dispatch), 16)


def smem_layout(config: MoEConfig, spec: KernelSpec, world: int) -> tuple[int, int, int]:
    """(task map offset, scratch offset, total bytes) of a block's dynamic shared memory:
    [GEMM pipeline + row tables | route/dispatch scratch] [task map] [scratch words] [2 Ctx].
    The pipeline starts at the dynamic shared memory base, which the kernel declares 1024-byte
    aligned, and its stages are (BM + BN) x 128 bytes: every A and B tile starts on a 1024-byte
    boundary, the start of the 128-byte swizzle pattern (wgmma descriptors, TMA)."""
    union = _align(max(spec.gemm_smem_bytes() + gemm_tables_bytes(spec),
                       phase_smem_bytes(config, spec, world)), 128)
    sched = union
    scratch = sched + scheduler_smem_bytes(config, world)
    return sched, scratch, scratch + SCRATCH_BYTES + 2 * CTX_BYTES


def make_plan(config: MoEConfig, spec: KernelSpec, world: int = 1, max_tokens: int = 1024,
              num_local_ranks: int | None = None, first_local_rank: int = 0,
              device: DeviceInfo | None = None, row_tile: int | None = None) -> Plan:
    """Lay out one launch. ``num_local_ranks`` defaults to ``world`` (all ranks virtual).
    ``row_tile``: size the row-tile counters for this BM (<= spec.block_m), so that plans of specs
    with different tiles (``choose_tile``) share one heap layout."""
    row_tile = row_tile or spec.block_m
    if not 16 <= row_tile <= spec.block_m:
        raise ValueError(f"row_tile={row_tile}: must be in [16, block_m={spec.block_m}]")
    reason = kernel_support(config, spec, world)
    if reason:
        raise ValueError(f"the kernel cannot run this layer: {reason}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    L = world if num_local_ranks is None else num_local_ranks
    if not 1 <= L <= min(world, 8):
        raise ValueError(f"num_local_ranks={L}: must be in [1, min(world, 8)] (world={world})")
    if not 0 <= first_local_rank <= world - L:
        raise ValueError(f"first_local_rank={first_local_rank} out of range for world={world}, L={L}")
    device = device or DeviceInfo.for_arch(spec.arch)

    regions = {}
    offset = 0
    for name, size, banked in region_sizes(config, spec, world, max_tokens, peer_banked=L < world,
                                           row_tile=row_tile):
        region = Region(name, offset, size, banked)
        regions[name] = region
        offset = _align(offset + region.total)

    sched_offset, scratch_offset, smem = smem_layout(config, spec, world)
    if smem > device.max_smem_per_block:
        raise ValueError(f"the kernel needs {smem} B of shared memory per block, above the device's "
                         f"{device.max_smem_per_block} B; use fewer stages or a smaller tile")
    blocks_per_rank = device.sm_count // L
    if blocks_per_rank < 1:
        raise ValueError(f"{L} local ranks need at least {L} SMs; the device has {device.sm_count}")
    if spec.transport == "nvshmem" and blocks_per_rank > PUT_STAGE_TILES:
        raise ValueError(f"{blocks_per_rank} blocks per rank: the NVSHMEM transport stages GEMM1 "
                         f"tiles for at most {PUT_STAGE_TILES}; use fewer blocks per rank")
    return Plan(config=config, spec=spec, world=world, num_local_ranks=L,
                first_local_rank=first_local_rank, max_tokens=max_tokens, device=device,
                regions=regions, rank_heap_bytes=offset, blocks_per_rank=blocks_per_rank,
                smem_bytes=smem, smem_sched_offset=sched_offset, smem_scratch_offset=scratch_offset,
                row_tile=row_tile)


def plan_tokens(tokens_per_rank: int) -> int:
    """The tokens per rank a backend plans for: the next power of two, at least MIN_PLAN_TOKENS
    (growing token counts re-plan, and reallocate the heap, a logarithmic number of times)."""
    return max(MIN_PLAN_TOKENS, 1 << (max(tokens_per_rank, 1) - 1).bit_length())


def layer_specs(config: MoEConfig, world: int, device: DeviceInfo, gemm: str | None = None) -> list[KernelSpec]:
    """The prefill and the decode spec of a layer on a device (``spec.select_specs``), each with the
    deepest pipeline that fits the device's shared memory beside this layer's task map and tables
    (``smem_layout``): from about 640 experts a rank the task map outgrows the room select_spec
    leaves by default. ValueError when no pipeline fits (fp32 on a 99 KiB part)."""
    def of_layer(spec: KernelSpec) -> KernelSpec:
        return replace(spec, scale_input=config.scale_expert_input)
    specs = select_specs(config.dtype, config.gated, device.arch, device.max_smem_per_block, gemm,
                         needs=lambda spec: smem_layout(config, of_layer(spec), world)[2])
    return [of_layer(s) for s in specs]


def kernel_specs(config: MoEConfig, world: int, device: DeviceInfo, gemm: str | None = None,
                 transport: str = "peer") -> list[KernelSpec]:
    """What a backend builds for a layer unless given its specs: the prefill and the decode spec
    (``layer_specs``; under NVSHMEM cooperative, since that transport stages GEMM1 puts in one tile
    per block) and the wide 128 x 256 prefill tile where it runs: wgmma only, pointer transport
    only (the NVSHMEM build of it spills), 2-byte dtypes (fp32's epilogue tile does not fit) and a
    task map small enough for the ~7 KB it leaves (E / W up to 367 at W = 1, 152 at 8). Every one
    scales the expert's input as the layer does. ValueError when no pipeline fits."""
    specs = layer_specs(config, world, device, gemm)
    if transport == "nvshmem":
        specs = [replace(s, schedule="cooperative") for s in specs]
    if specs[0].gemm == "wgmma" and transport == "peer":
        with contextlib.suppress(ValueError):
            wide = replace(select_spec(config.dtype, config.gated, device.arch, device.max_smem_per_block,
                                       PREFILL_BLOCK_M, gemm="wgmma", block_n=WIDE_BLOCK_N),
                           scale_input=config.scale_expert_input)
            if smem_layout(config, wide, world)[2] <= device.max_smem_per_block:
                specs.append(wide)
    return specs


def variant_plans(config: MoEConfig, specs: list[KernelSpec], world: int, max_tokens: int, info: DeviceInfo,
                  **placement) -> list[Plan]:
    """A plan per spec, all with one heap layout: row tiles sized for the smallest tile."""
    row_tile = min(s.block_m for s in specs)
    plans = [make_plan(config, s, world=world, max_tokens=max_tokens, device=info, row_tile=row_tile, **placement)
             for s in specs]
    assert all(p.regions == plans[0].regions for p in plans)
    return plans


def routed_tiles(config: MoEConfig, total_tokens: int, world: int, block_m: int, block_n: int) -> int:
    """GEMM0 + GEMM1 tiles of a rank's routed experts when every expert gets the average number of
    rows (``total_tokens`` over all ranks): row tiles times column tiles, as the task map counts them."""
    rows = ceil_div(total_tokens * config.top_k, config.num_experts)
    cols = ceil_div(config.intermediate_size, gemm0_cols_per_tile(block_n, config.gated)) + \
        ceil_div(config.hidden_size, block_n)
    return experts_per_rank(config.num_experts, world) * ceil_div(rows, block_m) * cols


def choose_tile(config: MoEConfig, total_tokens: int, world: int = 1,
                blocks_per_rank: int = 132) -> tuple[int, int]:
    """(block_m, block_n) of the GEMM tile for a forward of ``total_tokens`` (all ranks):
    - 64 x 128 (decode) when an expert gets at most 64 rows on average: its weights dominate the
      time and a 128-row tile would be mostly padding;
    - 128 x 256 (wide) when the rank has at least WIDE_MIN_ROUNDS wide tiles per block: a wide
      tile asks L2 for 3/4 of the bytes per FLOP and has half the per-tile costs, while the blocks'
      uneven last round (at most one tile a block) costs at most 1/4 of the time, 1/8 more than
      with narrow tiles; an estimate for the GPU benchmarks to settle (bench_layer's `tile`);
    - else 128 x 128, which keeps more blocks busy when tiles are few.
    The backend runs the nearest tile it has (wide tiles are wgmma-only; KernelBackend.variant_for)."""
    rows_per_expert = total_tokens * config.top_k / config.num_experts
    if rows_per_expert <= DECODE_BLOCK_M:
        return DECODE_BLOCK_M, BLOCK_N
    wide = routed_tiles(config, total_tokens, world, PREFILL_BLOCK_M, WIDE_BLOCK_N)
    return (PREFILL_BLOCK_M, WIDE_BLOCK_N if wide >= WIDE_MIN_ROUNDS * blocks_per_rank else BLOCK_N)


def trace_layout(num_blocks: int, capacity: int) -> tuple[int, int, int]:
    """Trace buffer: u32 record count per block, then ``capacity`` 32-byte records per block.
    Returns (counts offset, records offset, total bytes)."""
    counts = 0
    records = _align(num_blocks * 4)
    return counts, records, records + num_blocks * capacity * TRACE_RECORD_BYTES
