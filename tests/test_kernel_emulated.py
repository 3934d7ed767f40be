"""The whole kernel, run on the CPU emulator (flashmoe.host.emulator) through KernelBackend, against
the reference: routing, dispatch positions, the task map, GEMM tiles, capacity selection, combine,
expert parallel over virtual ranks, bounded waits. The same checks as the GPU selftest
(flashmoe.checks); tiny shapes keep each forward well under a second.

Memory here is sequentially consistent (the default); tests/test_weak_memory.py runs the kernel
with weak memory, and tests/test_ep_emulated.py runs ranks as separate launches. Real parallel
speed stays out of the emulator's reach.
"""

from __future__ import annotations

import pytest
import torch

from flashmoe.checks import Case, check_determinism, check_fault, check_fault_unchecked, make_inputs, run_case
from flashmoe.config import MoEConfig
from flashmoe.host import emulator
from flashmoe.host.backend import KernelBackend
from flashmoe.host.spec import KernelSpec
from flashmoe.trace_ranks import rank_split
from flashmoe.trace_routing import routing_split

pytestmark = pytest.mark.skipif(emulator.emulator_available() is not None,
                                reason=f"emulator unavailable: {emulator.emulator_available()}")

# Virtual time a correct forward of these shapes takes is ~1e5..1e6 ns; a 50 ms bound leaves a
# wide margin and makes a broken protocol fail in about a second instead of spinning for 10 s.
TIMEOUT_S = 0.05


def cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2, dtype="bfloat16")
    base.update(kw)
    return MoEConfig(**base)


# The shipped sm_80 tile (128 x 128, 256 threads, 3 stages), and a small one (64 x 64, 128 threads)
# that cuts these shapes into many tiles, so blocks claim, wait for and signal many tasks.
SHIPPED = dict(block_m=128, block_n=128, threads=256, stages=3)
SMALL = dict(block_m=64, block_n=64, threads=128, stages=3)

CASES = [
    (Case("bf16-swiglu-E4-k2", cfg(), tokens=37), SHIPPED),
    (Case("fp32-gelu-plain-E4-k1", cfg(dtype="float32", activation="gelu", gated=False, top_k=1), tokens=21),
     SHIPPED),
    (Case("bf16-gelu-plain-E8-k1-W2", cfg(activation="gelu", gated=False, num_experts=8, top_k=1), world=2,
          tokens=45), SHIPPED),
    (Case("bf16-E8-k2-W2-odd", cfg(num_experts=8), world=2, tokens=45), SHIPPED),
    (Case("bf16-W2-empty-rank", cfg(), world=2, tokens=1), SHIPPED),
    (Case("bf16-no-tokens", cfg(), tokens=0), SHIPPED),
    (Case("fp32-swiglu-E8-k2-W2-shared-gate", cfg(dtype="float32", num_experts=8, num_shared_experts=1,
                                                   shared_expert_gate=True), world=2, tokens=33), SHIPPED),
    (Case("bf16-shared-E4-k1", cfg(top_k=1, num_shared_experts=2, shared_intermediate_size=16), tokens=29),
     SHIPPED),
    (Case("bf16-capacity-W2-skewed", cfg(capacity_factor=0.5), world=2, tokens=40, routing="skewed"), SHIPPED),
    (Case("fp32-capacity-relu-plain", cfg(dtype="float32", gated=False, activation="relu", capacity_factor=0.75),
          tokens=50, routing="skewed"), SHIPPED),
    (Case("bf16-deepseek-routing", cfg(num_experts=8, scoring="sigmoid", selection_bias=True, n_group=4,
                                       topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.5), tokens=33),
     SHIPPED),
    # LFM2's guard is 1e-6; 0.01 moves every weight by ~1%, far above the weight tolerance.
    (Case("bf16-sigmoid-norm-epsilon", cfg(num_experts=8, scoring="sigmoid", norm_topk_prob=True,
                                           norm_topk_epsilon=0.01), tokens=20), SHIPPED),
    # Eight slots a token (7 routed, the shared row): the combine's batches of loads
    # (roles/combine.cuh kCombineBatch) straddle tokens, capacity dropping some of the rows.
    (Case("bf16-k7-shared-capacity-W2", cfg(num_experts=8, top_k=7, num_shared_experts=1, capacity_factor=1.0),
          world=2, tokens=35, routing="skewed"), SHIPPED),
    (Case("bf16-single-expert-130-tokens", cfg(), tokens=130, routing="single"), SHIPPED),   # 2 row tiles
    # GPT-OSS: router bias, expert biases, the clamped SwiGLU (a limit of 1.5 clamps many elements)
    (Case("bf16-gpt-oss-W2", cfg(activation="swiglu_clamped", swiglu_limit=1.5, expert_bias=True,
                                 router_bias=True, norm_topk_prob=True), world=2, tokens=45), SHIPPED),
    # DeepSeek-V4: sqrt(softplus) scores with a selection bias, the SiLU clamped SwiGLU in the routed and
    # shared experts (a limit of 1 clamps many elements)
    (Case("bf16-deepseek-v4-W2", cfg(num_experts=8, scoring="sqrtsoftplus", selection_bias=True, norm_topk_prob=True,
                                     routed_scaling_factor=1.5, activation="silu_clamped", swiglu_limit=1.0,
                                     num_shared_experts=1), world=2, tokens=45), SHIPPED),
    # LongCat-Flash: 4 identity experts beside the 8 routed ones (about a third of the choices at
    # this size), the shared row after the identity slots, on both ranks.
    (Case("bf16-longcat-identity-W2", cfg(num_experts=8, identity_experts=4, top_k=4, selection_bias=True,
                                          routed_scaling_factor=2.0, num_shared_experts=1), world=2, tokens=45),
     SHIPPED),
    (Case("small-tile-bf16-W2-shared", cfg(hidden_size=192, intermediate_size=96, num_experts=8,
                                           num_shared_experts=1), world=2, tokens=150, routing="skewed"), SMALL),
    # Biased experts over several column tiles, the last of each GEMM part-filled (I = 80: 32 + 32 +
    # 16 gate columns; H = 160: 64 + 64 + 32 output columns): each tile adds its own columns' biases.
    (Case("small-tile-fp16-gelu-biases-W2", cfg(dtype="float16", hidden_size=160, intermediate_size=80,
                                                activation="gelu", expert_bias=True, router_bias=True),
          world=2, tokens=70), SMALL),
    # Llama4: the routing weight scales each routed row's GEMM0 result (about 100 rows an expert:
    # two row tiles), not the shared expert's; with k = 2, capacity and expert biases (the scale
    # comes before the bias; a dropped row adds nothing).
    (Case("small-tile-bf16-llama4-shared", cfg(hidden_size=128, num_experts=2, top_k=1, scoring="sigmoid",
                                               scale_expert_input=True, num_shared_experts=1), tokens=200),
     SMALL),
    (Case("small-tile-bf16-scaled-k2-biases-capacity-W2", cfg(hidden_size=128, num_experts=8, scoring="sigmoid",
                                                              scale_expert_input=True, expert_bias=True,
                                                              capacity_factor=1.0), world=2, tokens=90,
          routing="skewed"), SMALL),
    (Case("small-tile-fp32-plain-capacity-W2", cfg(dtype="float32", hidden_size=96, intermediate_size=64,
                                                   gated=False, capacity_factor=1.0), world=2, tokens=101,
          routing="skewed"), SMALL),
    # 14 row tiles for each of the two routed experts: a band of 12 walked column by column
    # (3 GEMM0, 2 GEMM1 columns), then a band of 2 (scheduler.cuh band_tile); the shared expert's
    # 14 row tiles go row by row.
    (BANDED := Case("small-tile-bf16-single-shared-850-tokens", cfg(hidden_size=128, intermediate_size=96,
                                                                    num_shared_experts=1), tokens=850,
                    routing="single"), SMALL),
    # The same, row tile by row tile (bench/providers.py flashmoe_rowtiles).
    (BANDED, ROW_BY_ROW := dict(SMALL, band_tiles=1)),
]

_BACKENDS: dict = {}


def spec_for(config: MoEConfig, tile: dict = SHIPPED) -> KernelSpec:
    return KernelSpec(arch="sm_80", dtype=config.dtype, gated=config.gated, scale_input=config.scale_expert_input,
                      **tile)


def make_backend(config: MoEConfig, world: int, timeout_s: float = TIMEOUT_S, tile: dict = SHIPPED,
                 error_check: str = "sync") -> KernelBackend:
    key = (config, world, timeout_s, tuple(tile.items()), error_check)
    if key not in _BACKENDS:
        _BACKENDS[key] = KernelBackend(config, None, virtual_world=world, emulate=True, timeout_s=timeout_s,
                                       error_check=error_check, spec=spec_for(config, tile))
    return _BACKENDS[key]


@pytest.fixture(scope="module", autouse=True)
def _prebuilt():
    """Build every spec these tests use at once: g++ runs in parallel on all cores."""
    emulator.prebuild(spec_for(case.config, tile) for case, tile in CASES)
    yield
    _BACKENDS.clear()


@pytest.mark.parametrize("case,tile", CASES, ids=[c.name + ("-row-by-row" if t is ROW_BY_ROW else "")
                                                   for c, t in CASES])
def test_kernel_matches_reference(case, tile):
    result = run_case(make_backend(case.config, case.world, tile=tile), case, torch.device("cpu"))
    assert result.passed, f"{case.name}: {result.detail} (err {result.err:.3g}, tol {result.tol:.3g})"


def test_repeated_launches_reuse_the_heap():
    """Launch n uses bank n % 2 and zeroes the other, and the rank's last block advances the epoch
    in the heap: five forwards on one backend (each bank used, zeroed and reused), with different
    inputs and token counts, each match the reference."""
    config = cfg(num_experts=8)
    backend = make_backend(config, 2)
    for i, tokens in enumerate((40, 7, 64, 1, 33)):
        result = run_case(backend, Case(f"repeat{i}", config, world=2, tokens=tokens, seed=i), torch.device("cpu"))
        assert result.passed, f"launch {i}: {result.detail}"


def test_close_gives_the_heap_back_and_a_later_forward_allocates_it_again():
    config = cfg(num_experts=8)
    backend = KernelBackend(config, None, virtual_world=2, emulate=True, timeout_s=TIMEOUT_S,
                            error_check="sync", spec=spec_for(config))
    for i in range(2):
        result = run_case(backend, Case(f"open{i}", config, world=2, tokens=45, seed=i), torch.device("cpu"))
        assert result.passed, f"forward {i}: {result.detail}"
        backend.close()
        assert backend.heap is None and backend.plan is None


def test_bitwise_deterministic_across_runs_and_world_sizes():
    case = Case("determinism", cfg(num_experts=8), tokens=77, routing="skewed")
    ok, detail = check_determinism(make_backend, case, torch.device("cpu"), worlds=(1, 2))
    assert ok, detail


@pytest.mark.parametrize("seed", [1, 2])
def test_random_schedules_give_the_same_bits(seed, monkeypatch):
    """Fibers interleaved pseudo-randomly (other orders of blocks claiming tasks, waiting and
    signalling) must not change a single bit of the output."""
    case = Case("schedule", cfg(num_experts=8, capacity_factor=0.75), world=2, tokens=50, routing="skewed")
    x, weights = make_inputs(case, torch.device("cpu"))
    round_robin = make_backend(case.config, case.world).forward(x, weights).clone()
    monkeypatch.setenv(emulator.SEED_ENV, str(seed))
    backend = KernelBackend(case.config, None, virtual_world=case.world, emulate=True, timeout_s=TIMEOUT_S,
                            error_check="sync", spec=spec_for(case.config))
    assert all(v.kernel.seed == seed for v in backend.variants.values())
    assert torch.equal(backend.forward(x, weights), round_robin)


def test_the_order_tiles_are_claimed_in_changes_no_bit():
    """Each output element is one tile's sum in a fixed K order, whatever order the tiles are
    claimed in: row tile by row tile gives the bits of the shipped bands."""
    x, weights = make_inputs(BANDED, torch.device("cpu"))
    banded, row_by_row = (make_backend(BANDED.config, 1, tile=t) for t in (SMALL, ROW_BY_ROW))
    assert banded.spec.band_tiles > 1 and row_by_row.spec.band_tiles == 1
    assert torch.equal(banded.forward(x, weights), row_by_row.forward(x, weights))


def test_stalled_rank_times_out_with_a_record_and_recovers():
    case = Case("fault", cfg(num_experts=8), world=2, tokens=40)
    ok, detail = check_fault(make_backend, case, torch.device("cpu"), stalled_rank=1)
    assert ok, detail


@pytest.mark.parametrize("kw", [dict(), dict(scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2,
                                            num_shared_experts=1, shared_expert_gate=True),
                                 dict(hidden_size=1024), dict(num_experts=128), dict(num_experts=256),
                                 dict(dtype="float32")],
                         ids=["softmax", "deepseek-shared-gate", "wide", "many-experts", "two-passes", "fp32"])
def test_decode_routing_gives_the_bits_of_prefill_routing(kw):
    """The router shares the logits out three ways (logits.cuh): with as many chunks as blocks
    (two here) or more, each block routes whole chunks; with fewer, every block takes row slices of
    the real tokens, or tiles when slices would cost more. The same tokens routed alone (the last
    40, the last 3) and behind 100 others get the same ids, weights and outputs, bit for bit: a
    token's result does not depend on the batch it came in. 140 tokens go by 128-row tiles with 128
    or 256 experts, by 64-row ones with 8; 3 tokens by slices; 40 (test below) by slices with 8
    experts, by 64-row halves with 128, by 128-row tiles with 256. H = 96
    ends in a half segment; H = 1024 is 16 segments, more than the slices stage at once (the 40
    tokens' x alone outgrow the phase area)."""
    config = cfg(**{"num_experts": 8, "hidden_size": 96, **kw})
    backend = make_backend(config, 1)
    x, weights = make_inputs(Case("decode", config, tokens=140), torch.device("cpu"))
    if config.hidden_size == 1024:
        assert 40 * config.hidden_size * 4 > max(v.plan.smem_sched_offset for v in backend.variants.values())
    out, routing = backend.forward(x, weights, return_routing=True)
    together, ids, routing_weights = out.clone(), routing.ids.clone(), routing.weights.clone()
    for start in (100, 137):
        alone, alone_routing = backend.forward(x[start:].clone(), weights, return_routing=True)
        assert torch.equal(alone_routing.ids, ids[start:]), start
        assert torch.equal(alone_routing.weights, routing_weights[start:]), start
        assert torch.equal(alone, together[start:]), start


@pytest.mark.parametrize("experts, starts", [(8, [0, 4]), (128, [0, 64]), (256, [0, 128])])
def test_logits_split_follows_its_cost(experts, starts):
    """40 tokens (one chunk) on 2 blocks of 8 warps: the logits go to the way that costs the
    busiest block least per k (logits.cuh spread_logits), each share a ROUTE record naming its
    first router row, and the chunk's selection one naming its 40 tokens. 8 experts: 4-row slices
    (40 x 4 x 2 reads, against 64 rows of FMAs); 128: two 64-row halves, one a block (a slice per
    block would be 6 rows, 11 of them each); 256: two 128-row tiles (four halves take two rounds)."""
    config = cfg(num_experts=experts, hidden_size=96)
    backend = KernelBackend(config, None, virtual_world=1, emulate=True, timeout_s=TIMEOUT_S,
                            error_check="sync", spec=spec_for(config), trace_capacity=64)
    assert backend.plan.blocks_per_rank == 2
    x, weights = make_inputs(Case("split", config, tokens=40), torch.device("cpu"))
    backend.forward(x, weights)
    records = backend.last_trace().records
    from flashmoe.host.abi import TaskKind
    route = [int(e) for k, e in zip(records["kind"], records["extra"]) if TaskKind(k).name == "ROUTE"]
    assert sorted(route) == sorted(starts + [40])
    # What flashmoe.trace_routing reads from these records: the shares, then the chunk's selection.
    split = routing_split(backend.last_trace())
    assert (split["spread"], split["shares"], split["share_rows"], split["chunks"]) == (True, 2, starts[1], 1)


def test_decode_and_prefill_tiles_share_one_heap():
    """Two kernels (128- and 64-row tiles) over one heap: each forward runs the tile
    plan.choose_tile picks for its size, alternating launches keep the shared epoch, banks and
    flags consistent, and every result matches the reference."""
    config = cfg(num_experts=4, top_k=2)
    tiles = [spec_for(config, SHIPPED), spec_for(config, dict(SHIPPED, block_m=64))]
    backend = KernelBackend(config, None, virtual_world=2, emulate=True, timeout_s=TIMEOUT_S,
                            error_check="sync", spec=tiles)
    assert sorted(backend.variants) == [(64, 128), (128, 128)] and backend.plan.row_tile == 64
    # 4 experts, k = 2: up to 128 tokens give <= 64 rows per expert (decode tile), more do not.
    for i, tokens in enumerate((100, 150, 3, 140)):
        expected = 64 if tokens * 2 / 4 <= 64 else 128
        assert backend.variant_for(tokens).spec.block_m == expected
        result = run_case(backend, Case(f"tiles{i}", config, world=2, tokens=tokens, seed=i), torch.device("cpu"))
        assert result.passed, f"{tokens} tokens: {result.detail}"
        assert backend._last.spec.block_m == expected


def test_blocks_of_an_idle_rank_take_a_busy_ranks_tiles():
    """Work sharing (mma_sync): every token picks the same k experts (rank 0's), so rank 1 has no
    routed tile of its own; its blocks claim rank 0's, whose results are still right."""
    config = cfg(num_experts=4, top_k=2)
    backend = KernelBackend(config, None, virtual_world=2, emulate=True, timeout_s=TIMEOUT_S,
                            error_check="sync", spec=spec_for(config), trace_capacity=256)
    result = run_case(backend, Case("share", config, world=2, tokens=300, routing="single"), torch.device("cpu"))
    assert result.passed, result.detail
    records = backend.last_trace().records
    from flashmoe.host.abi import TaskKind
    gemm = [i for i, k in enumerate(records["kind"]) if TaskKind(k).name in ("GEMM0", "GEMM1")]
    own = backend.plan.blocks_per_rank
    helped = [i for i in gemm if records["rank"][i] != records["block"][i] // own]
    assert helped and all(records["rank"][i] == 0 for i in helped), "rank 1's blocks took none of rank 0's tiles"
    # flashmoe.trace_ranks finds each block's rank from its PREFIX record: the same blocks, tiles.
    split = rank_split(backend.last_trace())
    assert [(r["rank"], r["blocks"], r["shared"]) for r in split] == [(0, own, len(helped)), (1, own, 0)]
    assert sum(r["tiles"] for r in split) == len(gemm)
    assert all(r["first_tile"] < r["last_tile"] <= max(s["combined"] for s in split) for r in split)


def test_trace_records_every_phase():
    from flashmoe.host.abi import TaskKind
    config = cfg(num_experts=4, num_shared_experts=1)
    backend = KernelBackend(config, None, virtual_world=2, emulate=True, timeout_s=TIMEOUT_S,
                            error_check="sync", spec=spec_for(config), trace_capacity=64)
    x, weights = make_inputs(Case("trace", config, world=2, tokens=90), torch.device("cpu"))
    backend.forward(x, weights)
    trace = backend.last_trace()
    kinds = {TaskKind(k).name for k in trace.records["kind"]}
    assert {"ROUTE", "PREFIX", "DISPATCH", "GEMM0", "GEMM1", "COMBINE"} <= kinds
    assert (trace.records["end_ns"] >= trace.records["start_ns"]).all()
    assert set(trace.records["rank"]) == {0, 1}
    # 45 tokens a rank, one chunk on more blocks: its logits spread, one selection a rank.
    split = routing_split(trace)
    assert split["spread"] and split["chunks"] == 2 and split["shares"] >= 2
    # 300 tokens, 3 chunks a rank on its 2 blocks: each block routes whole chunks.
    assert backend.plan.blocks_per_rank == 2
    backend.forward(*make_inputs(Case("trace", config, world=2, tokens=300), torch.device("cpu")))
    split = routing_split(backend.last_trace())
    assert (split["spread"], split["chunks"], split["chunk_blocks"]) == (False, 6, 4)


# ---------------------------------------------------------------- a failure is loud and recoverable

def test_stopped_launch_without_checks_spoils_nothing_and_surfaces_at_synchronize():
    """error_check='none' (CUDA-graph capture): nobody reads the error buffer between launches.
    The next forward must still be right (the abort flag belongs to the launch that stopped) and
    synchronize() must still raise that launch's error, naming the stalled rank."""
    case = Case("fault-none", cfg(num_experts=8), world=2, tokens=40)
    ok, detail = check_fault_unchecked(make_backend, case, torch.device("cpu"), stalled_rank=1)
    assert ok, detail


def test_deferred_errors_raise_at_the_next_forward():
    from flashmoe.errors import FlashMoEError
    config = cfg(num_experts=8)
    backend = make_backend(config, 2, timeout_s=0.5, error_check="deferred")
    x, weights = make_inputs(Case("deferred", config, world=2, tokens=40), torch.device("cpu"))
    backend.forward(x, weights, fault_rank=1)                  # stops; the check waits for later
    with pytest.raises(FlashMoEError, match="of rank 1"):
        backend.forward(x, weights)
    result = run_case(backend, Case("deferred-after", config, world=2, tokens=40, seed=3), torch.device("cpu"))
    assert result.passed, result.detail


def test_misaligned_shared_memory_is_reported_not_trapped(monkeypatch):
    """Dynamic shared memory that does not start on the wgmma engine's 1024-byte boundary: the
    kernel records it and every block leaves (a trap would take the CUDA context down); the host
    raises a FlashMoEError that says so, and the next launch runs normally."""
    from flashmoe.errors import FlashMoEError
    from flashmoe.host.spec import wgmma_spec
    config = cfg()
    backend = KernelBackend(config, None, emulate=True, timeout_s=TIMEOUT_S, error_check="sync",
                            spec=wgmma_spec(config.dtype, config.gated, stages=3))
    case = Case("skew", config, tokens=37)
    x, weights = make_inputs(case, torch.device("cpu"))
    monkeypatch.setenv("FLASHMOE_EMU_SMEM_SKEW", "16")
    with pytest.raises(FlashMoEError, match="not on the 1024-byte boundary"):
        backend.forward(x, weights)
    monkeypatch.delenv("FLASHMOE_EMU_SMEM_SKEW")
    result = run_case(backend, case, torch.device("cpu"))
    assert result.passed, result.detail


@pytest.mark.parametrize("gemm", ["mma_sync", "wgmma"])
def test_weights_not_on_a_16_byte_boundary_are_copied_not_faulted_on(gemm):
    """Weight views at an odd element offset (slices of a larger tensor): rows move as 16-byte
    vectors (cp.async, TMA), so the backend uses an aligned copy (once, with a warning) instead
    of handing the kernel addresses it would fault on."""
    from flashmoe.host.spec import wgmma_spec
    config = cfg(num_experts=8)
    case = Case("unaligned", config, world=2, tokens=45)
    x, weights = make_inputs(case, torch.device("cpu"))
    for name in ("gate_up_proj", "down_proj"):
        t = getattr(weights, name)
        shifted = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
        shifted.copy_(t)
        assert shifted.data_ptr() % 16
        setattr(weights, name, shifted)
    spec = spec_for(config) if gemm == "mma_sync" else wgmma_spec(config.dtype, config.gated, stages=3)
    backend = KernelBackend(config, None, virtual_world=2, emulate=True, timeout_s=TIMEOUT_S, error_check="sync",
                            spec=spec)
    with pytest.warns(UserWarning, match="16-byte boundary"):
        out, routing = backend.forward(x, weights, return_routing=True)
    from flashmoe.checks import judge
    result = judge(backend, case.describe(), x, weights, out, routing)
    assert result.passed, result.detail


def test_a_wrong_output_comes_with_where_it_is_wrong():
    """judge() on an output spoiled in one 16-byte column chunk of rank 1's tokens, plus one NaN
    left in place: failed, and the diagnosis names the chunk, the rank and the poison."""
    from flashmoe.checks import judge
    config = cfg(num_experts=8)
    case = Case("spoiled", config, world=2, tokens=40)
    backend = make_backend(config, 2)
    x, weights = make_inputs(case, torch.device("cpu"))
    out, routing = backend.forward(x, weights, return_routing=True)
    out[20:, 8:16] += 1.0
    out[25, 40] = float("nan")
    result = judge(backend, case.describe(), x, weights, out, routing)
    assert not result.passed and "1 output rows still poisoned" in result.detail
    d = result.extra["diagnosis"]
    assert d["wrong_by_rank"] == {0: "0/20", 1: "20/20"} and d["nan_elements"] == 1
    assert d["wrong_cols"] == "8-15,40 (9 of 64)" and d["wrong_col_chunks_mod8"] == "[1, 5] of 8"
    assert d["wrong_col_tiles"] == "0 (1 of 1)"
