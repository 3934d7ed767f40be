"""The wgmma engine's persistent task loop (device/roles/tasks.cuh) on the CPU emulator: the
producer warpgroup claims and prepares the next tile and fills its stages while the consumers
finish the current one; the stage ring and the two table slots run on across tiles, and
capacity selections run on the producer while the consumers compute. Shapes are chosen so each
block runs many tiles and the ring wraps inside tiles and across their boundaries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flashmoe.checks import Case, check_fault, make_inputs, run_case
from flashmoe.config import MoEConfig
from flashmoe.errors import FlashMoEError
from flashmoe.host import emulator
from flashmoe.host.abi import TaskKind
from flashmoe.host.backend import KernelBackend
from flashmoe.host.spec import KernelSpec
from planted import planted_tree

pytestmark = pytest.mark.skipif(emulator.emulator_available() is not None,
                                reason=f"emulator unavailable: {emulator.emulator_available()}")

TIMEOUT_S = 0.05

# The prefill tile (two consumer warpgroups) and the decode tile (one), both with a 2-stage ring,
# so a 3-k-tile GEMM (H or I = 160..192) wraps it inside a tile and at every tile boundary.
PREFILL = dict(block_m=128, threads=384, stages=2)
DECODE = dict(block_m=64, threads=256, stages=2)
# The wide prefill tile: 128 x 256, a gated GEMM0 tile 128 intermediate columns, 128 accumulators
# a consumer thread (m64n256 wgmma).
WIDE = dict(block_m=128, block_n=256, threads=384, stages=2)
# The prefill tile in ping-pong: each consumer warpgroup takes whole tiles (two m64 slabs, 128
# accumulators a thread) in turn, the other's epilogue running beside its mainloop.
PINGPONG = dict(block_m=128, threads=384, stages=2, schedule="pingpong")
PINGPONG_DECODE = dict(block_m=64, threads=384, stages=2, schedule="pingpong")   # one slab each
TILES = {"prefill": PREFILL, "wide": WIDE, "pingpong": PINGPONG}


def cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=192, intermediate_size=160, num_experts=4, top_k=2, dtype="bfloat16")
    return MoEConfig(**{**base, **kw})


def backend_for(config: MoEConfig, world: int, tile: dict, timeout_s: float = TIMEOUT_S, **kw) -> KernelBackend:
    spec = KernelSpec(arch="sm_90a", dtype=config.dtype, gated=config.gated, gemm="wgmma", **tile)
    return KernelBackend(config, None, virtual_world=world, emulate=True, timeout_s=timeout_s,
                         error_check="sync", spec=spec, **kw)


CASES = [
    (Case("prefill-many-tiles", cfg(), tokens=300), PREFILL),
    (Case("decode-one-consumer-W2", cfg(), world=2, tokens=130), DECODE),
    (Case("prefill-capacity-shared-W2", cfg(capacity_factor=0.75, num_shared_experts=1), world=2, tokens=170,
          routing="skewed"), PREFILL),
    (Case("decode-capacity-W2", cfg(num_experts=8, capacity_factor=0.5), world=2, tokens=90, routing="skewed"),
     DECODE),
    (Case("fp32-plain-relu-W2", cfg(dtype="float32", gated=False, activation="relu"), world=2, tokens=150), PREFILL),
    (Case("fp16-gelu-shared-gate", cfg(dtype="float16", activation="gelu", num_shared_experts=1,
                                       shared_expert_gate=True), tokens=140), DECODE),
    (Case("one-token-W2", cfg(), world=2, tokens=1), PREFILL),
    (Case("no-tokens", cfg(), tokens=0), DECODE),
    (Case("W4-single-expert", cfg(num_experts=8), world=4, tokens=200, routing="single"), PREFILL),
    # Wide tiles: partial column tiles in both GEMMs (I = 160: 128 + 32 columns; H = 192 of 256),
    # several of each (H = 320, I = 288), every activation path, capacity, shared experts, W = 1..4,
    # 0, 1 and uneven token counts.
    (Case("wide-gelu-W2", cfg(activation="gelu"), world=2, tokens=301), WIDE),
    (Case("wide-H320-I288-W2", cfg(hidden_size=320, intermediate_size=288), world=2, tokens=260), WIDE),
    (Case("wide-fp16-plain-relu-shared", cfg(dtype="float16", gated=False, activation="relu",
                                             num_shared_experts=1), tokens=200), WIDE),
    (Case("wide-gelu-tanh-capacity-W2", cfg(activation="gelu_tanh", capacity_factor=0.75), world=2, tokens=170,
          routing="skewed"), WIDE),
    (Case("wide-shared-gate-W4-single", cfg(num_experts=8, num_shared_experts=1, shared_expert_gate=True),
          world=4, tokens=203, routing="single"), WIDE),
    (Case("wide-one-token-W2", cfg(), world=2, tokens=1), WIDE),
    (Case("wide-no-tokens", cfg(), tokens=0), WIDE),
    # Ping-pong: both teams' turns across tiles of both GEMMs, selections and rank-done jobs;
    # odd and even job counts (the end reaches either team first); every epilogue path.
    (Case("pingpong-many-tiles", cfg(), tokens=300), PINGPONG),
    (Case("pingpong-gelu-plain-H320-I288-W2", cfg(hidden_size=320, intermediate_size=288, gated=False,
                                                  activation="gelu"), world=2, tokens=260), PINGPONG),
    (Case("pingpong-capacity-shared-W2", cfg(capacity_factor=0.75, num_shared_experts=1), world=2, tokens=170,
          routing="skewed"), PINGPONG),
    (Case("pingpong-fp32-plain-relu-W2", cfg(dtype="float32", gated=False, activation="relu"), world=2,
          tokens=150), PINGPONG),
    (Case("pingpong-fp16-gelu-tanh-shared-gate", cfg(dtype="float16", activation="gelu_tanh", num_shared_experts=1,
                                                     shared_expert_gate=True), tokens=140), PINGPONG),
    (Case("pingpong-W4-single-expert", cfg(num_experts=8), world=4, tokens=200, routing="single"), PINGPONG),
    (Case("pingpong-one-token-W2", cfg(), world=2, tokens=1), PINGPONG),
    (Case("pingpong-no-tokens", cfg(), tokens=0), PINGPONG),
    (Case("pingpong-decode-tile-capacity-W2", cfg(num_experts=8, capacity_factor=0.5), world=2, tokens=90,
          routing="skewed"), PINGPONG_DECODE),
]


@pytest.mark.parametrize("case,tile", CASES, ids=[c.name for c, _ in CASES])
def test_persistent_loop_matches_reference(case, tile):
    result = run_case(backend_for(case.config, case.world, tile), case, torch.device("cpu"))
    assert result.passed, f"{case.name}: {result.detail}"


@pytest.mark.parametrize("weak_seed", [1, 2])
@pytest.mark.parametrize("tile", TILES.values(), ids=TILES.keys())
def test_persistent_loop_under_weak_memory(monkeypatch, weak_seed, tile):
    """Table slots, tile counters and selections published by one warpgroup and read by another or
    by other blocks, with stores that reach them late and out of order."""
    monkeypatch.setenv(emulator.WEAK_ENV, str(weak_seed))
    case = Case("weak", cfg(capacity_factor=0.75, num_shared_experts=1), world=2, tokens=170, routing="skewed")
    result = run_case(backend_for(case.config, case.world, tile), case, torch.device("cpu"))
    assert result.passed, result.detail


@pytest.mark.parametrize("tile", TILES.values(), ids=TILES.keys())
def test_blocks_of_an_idle_rank_take_a_busy_ranks_tiles(tile):
    """Work sharing: every token picks the same k experts (rank 0's), so rank 1 has no routed tile
    of its own; its blocks claim rank 0's, whose results are still right and complete."""
    config = cfg(num_experts=4, top_k=2)
    case = Case("share", config, world=2, tokens=300, routing="single")
    backend = backend_for(config, 2, tile, trace_capacity=256)
    result = run_case(backend, case, torch.device("cpu"))
    assert result.passed, result.detail
    records = backend.last_trace().records
    kinds = [TaskKind(k).name for k in records["kind"]]
    gemm = [i for i, kind in enumerate(kinds) if kind in ("GEMM0", "GEMM1")]
    own = backend.plan.blocks_per_rank
    helped = [i for i in gemm if records["rank"][i] != records["block"][i] // own]
    assert helped and all(records["rank"][i] == 0 for i in helped), "rank 1's blocks took none of rank 0's tiles"


def test_tiles_by_shape_share_one_heap():
    """The decode, prefill (ping-pong, as shipped) and wide kernels over one heap: each forward
    runs the tile plan.choose_tile picks for its size (2 blocks a rank: wide from 8 wide tiles a
    rank), launches alternate between all three, and every result matches the reference."""
    config = cfg()
    specs = [KernelSpec(arch="sm_90a", dtype=config.dtype, gated=config.gated, gemm="wgmma", **t)
             for t in (DECODE, PINGPONG, WIDE)]
    backend = KernelBackend(config, None, virtual_world=2, emulate=True, timeout_s=TIMEOUT_S,
                            error_check="sync", spec=specs)
    assert list(backend.variants) == [(128, 256), (128, 128), (64, 128)] and backend.plan.row_tile == 64
    # E = 4, k = 2, two experts a rank: 100 tokens give 50 rows an expert (decode); 140 tokens one
    # row tile an expert, 2 x (2 + 1) = 6 wide tiles a rank (prefill); 300 tokens two (wide).
    for i, (tokens, tile) in enumerate([(300, (128, 256)), (100, (64, 128)), (140, (128, 128)), (301, (128, 256)),
                                        (1, (64, 128))]):
        assert backend.variant_for(tokens).tile == tile, tokens
        result = run_case(backend, Case(f"tiles{i}", config, world=2, tokens=tokens, seed=i), torch.device("cpu"))
        assert result.passed, f"{tokens} tokens: {result.detail}"
        assert backend._last.tile == tile and result.extra["tile"] == "{}x{}".format(*tile)


@pytest.mark.parametrize("tile", [PREFILL, PINGPONG], ids=["prefill", "pingpong"])
def test_fiber_order_changes_no_bit(monkeypatch, tile):
    """Producer and consumers interleaved differently (which block claims which tile, how far the
    producer runs ahead, which team takes which tile) must not change a single bit of the output."""
    case = Case("order", cfg(capacity_factor=0.75), world=2, tokens=170, routing="skewed")
    x, weights = make_inputs(case, torch.device("cpu"))
    first = backend_for(case.config, 2, tile).forward(x, weights).clone()
    monkeypatch.setenv(emulator.SEED_ENV, "5")
    assert torch.equal(backend_for(case.config, 2, tile).forward(x, weights), first)


@pytest.mark.parametrize("tile", [PREFILL, PINGPONG], ids=["prefill", "pingpong"])
def test_stalled_rank_is_named_and_the_next_forward_is_right(tile):
    """The producer waits for the stalled rank's rows while the consumers wait for its next job:
    the error names the rank, every block leaves, and the next launch is correct."""
    def make_backend(config, world, timeout_s):
        return backend_for(config, world, tile, timeout_s=timeout_s)

    ok, detail = check_fault(make_backend, Case("fault", cfg(num_experts=8), world=2, tokens=90),
                             torch.device("cpu"), stalled_rank=1)
    assert ok, detail


@pytest.mark.parametrize("tile", [PREFILL, PINGPONG], ids=["prefill", "pingpong"])
def test_trace_has_one_record_per_tile_and_selection(tile):
    """GEMM records come from the consumers (ping-pong: both teams at once), selection records
    from the producer: every tile and selection is recorded once."""
    config = cfg(capacity_factor=0.75, num_shared_experts=1)
    backend = backend_for(config, 2, tile, trace_capacity=256)
    x, weights = make_inputs(Case("trace", config, world=2, tokens=170, routing="skewed"), torch.device("cpu"))
    backend.forward(x, weights)
    records = backend.last_trace().records
    kinds = [TaskKind(k).name for k in records["kind"]]
    assert {"GEMM0", "GEMM1", "SELECT"} <= set(kinds)
    # (rank, kind, task, extra): shared-expert tiles have extra = 0xffffffff, routed ones the expert.
    keys = [(int(r), kind, int(t), int(e)) for r, kind, t, e in
            zip(records["rank"], kinds, records["task"], records["extra"]) if kind in ("GEMM0", "GEMM1", "SELECT")]
    assert len(keys) == len(set(keys)), "a task recorded twice (or a record overwritten)"
    assert sum(kind == "SELECT" for kind in kinds) == config.num_experts, "one per local expert of each rank"
    # Each team times its own tiles: a record starts before it ends, and a block's GEMM records
    # overlap no more at once than it has teams (a start left from a team's last tile would).
    assert (records["start_ns"] <= records["end_ns"]).all()
    teams = 2 if tile.get("schedule") == "pingpong" else 1
    gemm = np.isin(records["kind"], [TaskKind.GEMM0, TaskKind.GEMM1])
    for block in np.unique(records["block"][gemm]):
        mine = records[gemm & (records["block"] == block)]
        # At equal times an end sorts before a start: a tile that ends as the next begins.
        events = sorted([(int(t), 1) for t in mine["start_ns"]] + [(int(t), -1) for t in mine["end_ns"]])
        assert max(itertools.accumulate(step for _, step in events)) <= teams, f"block {block}"


def test_a_ping_pong_team_that_skips_its_turn_is_caught(tmp_path, monkeypatch):
    """Without its turn a ping-pong team may wait on a stage whose last fill (the other team's
    tile's, its TMA load in flight) has not landed: the parity would pass it for its own. Tiles as
    long as the ring (2 k-tiles, 2 stages) open that window and the weak world lands TMA loads
    late; the emulator's phase check stops the launch. Whether the window opens depends on the
    schedule (about one in ten of these opens it), so schedules are tried until one does. With the
    turns the same run is right."""
    monkeypatch.setenv(emulator.WEAK_ENV, "1")
    config = cfg(hidden_size=128, intermediate_size=128)
    case = Case("turns", config, world=2, tokens=512)   # two full row tiles an expert
    result = run_case(backend_for(config, 2, PINGPONG), case, torch.device("cpu"))
    assert result.passed, result.detail
    root = planted_tree(tmp_path, "pingpong-turn")
    backend = backend_for(config, 2, PINGPONG)
    kernels = [emulator.EmulatedKernel(v.spec, include_root=root) for v in backend.variants.values()]
    for v, kernel in zip(backend.variants.values(), kernels):
        v.kernel = kernel
    x, weights = make_inputs(case, torch.device("cpu"))
    schedules = [(seed, weak) for weak in range(1, 33) for seed in range(4)]
    for seed, weak in schedules:
        for kernel in kernels:
            kernel.seed, kernel.weak_seed = seed, weak
        try:
            backend.forward(x, weights)
        except emulator.EmulationError as e:
            assert "mbarrier wait for phase 1 while phase 0 is still in progress" in str(e), e
            return
    pytest.fail(f"a ping-pong team without its turn ran {len(schedules)} schedules uncaught")


def test_a_stage_never_released_is_an_error_not_a_hang(tmp_path):
    """Without the consumers' release of a tile's last stage the producer can never refill it:
    the launch must stop with a record that says so, in bounded time."""
    root = planted_tree(tmp_path, "stage-release")
    config = cfg()
    backend = backend_for(config, 1, PREFILL)
    for v in backend.variants.values():
        v.kernel = emulator.EmulatedKernel(v.spec, include_root=root)
    x, weights = make_inputs(Case("planted", config, tokens=300), torch.device("cpu"))
    with pytest.raises(FlashMoEError, match="release stage"):
        backend.forward(x, weights)
