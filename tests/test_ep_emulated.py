"""Expert parallelism across processes, on the CPU emulator: W ranks as W host threads, each running
GroupBackend with launches of its own on the double-banked plan of one process per rank, under one
emulated world (flashmoe.host.emulated_group). Peers reach each other by pointer or through the
NVSHMEM device calls (emulated with the ordering the specification gives them); launches start
with skew; memory is sequentially consistent or weak. Every rank's output is compared bitwise with
one launch hosting the same W ranks as virtual ranks (the kernel's results do not depend on how
the tokens are split or how the ranks run), which is itself checked against the reference.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flashmoe import accuracy
from flashmoe.checks import Case, compare_routing, make_inputs, weight_tolerance
from flashmoe.config import MoEConfig
from flashmoe.errors import FlashMoEError
from flashmoe.host import emulator
from flashmoe.host.backend import KernelBackend
from flashmoe.host.emulated_group import EmulatedGroup, GroupStuck, RankFailed
from flashmoe.host.group_backend import GroupBackend
from flashmoe.host.spec import KernelSpec
from planted import planted_tree

pytestmark = pytest.mark.skipif(emulator.emulator_available() is not None,
                                reason=f"emulator unavailable: {emulator.emulator_available()}")

CONFIG = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2, dtype="bfloat16")
# A small tile: these token counts make several row tiles per rank, and more than 64 tokens per
# rank make both blocks of a rank dispatch.
SPEC = KernelSpec(arch="sm_80", dtype="bfloat16", gated=True, block_m=64, block_n=64, threads=128, stages=3)
MAX_TOKENS = 256
# Virtual time: one forward of these shapes takes ~3e5 ns; 50 ms bounds every wait with room for
# the skew below and makes a broken protocol fail in about a second.
TIMEOUT_S = 0.05
FORWARD_NS = 300_000

# Tokens per rank in consecutive forwards: uneven, ranks with 0, two chunks (> 64) on some.
COUNTS = [[130, 0, 70, 7], [1, 100, 0, 64], [0, 0, 3, 0], [40, 41, 42, 90]]


def inputs(counts: list[list[int]], seed: int, config: MoEConfig = CONFIG):
    gen = torch.Generator().manual_seed(seed)
    xs = [[torch.randn(n, config.hidden_size, generator=gen).to(torch.bfloat16) for n in forward]
          for forward in counts]
    _, weights = make_inputs(Case("ep", config, tokens=8), torch.device("cpu"))
    return xs, weights


_EXPECTED: dict = {}


def expected(xs, weights, world: int, spec: KernelSpec = SPEC, config: MoEConfig = CONFIG) -> list[torch.Tensor]:
    """One launch of the same W ranks as virtual ranks, per forward; checked against the
    reference under the accuracy rule."""
    backend = _EXPECTED.get((world, spec, config))
    if backend is None:
        backend = _EXPECTED[world, spec, config] = KernelBackend(
            config, None, virtual_world=world, emulate=True, timeout_s=TIMEOUT_S, error_check="sync", spec=spec)
    outs = []
    for forward in xs:
        x = torch.cat(forward)
        out, routing = backend.forward(x, weights, return_routing=True)
        ok, err, tol = accuracy.check(out, x, weights, config, routing=routing)
        assert ok, f"the one-launch result is off the reference: {err} > {tol}"
        outs.append(out.clone())
    return outs


def run_group(xs, weights, world: int, *, ranks_per_node: int | None = None, seed: int = 0, weak_seed: int = 0,
              delays=None, error_check: str = "none", include_root: Path | None = None,
              spec: KernelSpec = SPEC, config: MoEConfig = CONFIG) -> list[torch.Tensor]:
    """Every forward of xs on W emulated ranks; returns each forward's output, all ranks' rows
    in rank order."""
    group = EmulatedGroup(world, seed=seed, weak_seed=weak_seed, ranks_per_node=ranks_per_node, delays=delays)

    def rank_body(rank):
        backend = GroupBackend(config, None, rank, max_tokens=MAX_TOKENS, timeout_s=TIMEOUT_S,
                               error_check=error_check, spec=spec)
        if include_root is not None:
            for v in backend.variants.values():
                v.kernel = emulator.EmulatedKernel(v.spec, include_root=include_root)
        outs = [backend.forward(forward[rank.rank], weights) for forward in xs]
        backend.close()     # synchronizes: a stopped launch raises here
        return outs

    per_rank = group.run(rank_body)
    return [torch.cat([per_rank[r][f] for r in range(world)]) for f in range(len(xs))]


def assert_bitwise(got, want):
    for f, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"forward {f}: max difference {(g.float() - w.float()).abs().max().item()}"


# ---------------------------------------------------------------- both transports, skew

@pytest.mark.parametrize("world,ranks_per_node", [(2, 2), (4, 4), (4, 2), (4, 1)],
                         ids=["W2-pointers", "W4-pointers", "W4-two-nodes", "W4-nvshmem"])
def test_ranks_in_separate_launches_match_one_launch(world, ranks_per_node):
    counts = [c[:world] for c in COUNTS]
    xs, weights = inputs(counts, seed=world * 10 + ranks_per_node)
    got = run_group(xs, weights, world, ranks_per_node=ranks_per_node)
    assert_bitwise(got, expected(xs, weights, world))


# The wgmma engine's persistent task loop, its GEMM1 rows leaving through the consumers' epilogue
# (by pointer, or staged and put through NVSHMEM), under weak memory and skew.
WGMMA = KernelSpec(arch="sm_90a", dtype="bfloat16", gated=True, block_m=64, threads=256, stages=2, gemm="wgmma")


@pytest.mark.parametrize("ranks_per_node", [2, 1], ids=["pointers", "nvshmem"])
def test_wgmma_engine_in_separate_launches(ranks_per_node):
    counts = [c[:2] for c in COUNTS]
    xs, weights = inputs(counts, seed=17)
    got = run_group(xs, weights, 2, ranks_per_node=ranks_per_node, weak_seed=2, spec=WGMMA,
                    delays=lambda r, n: FORWARD_NS * (r % 2))
    assert_bitwise(got, expected(xs, weights, 2, WGMMA))


# GPT-OSS: router and expert biases, the clamped SwiGLU (a limit of 1.5 clamps many elements).
GPT_OSS = CONFIG.replace(router_bias=True, expert_bias=True, activation="swiglu_clamped", swiglu_limit=1.5)
LLAMA4 = CONFIG.replace(scoring="sigmoid", top_k=1, scale_expert_input=True)
# LongCat-Flash: identity experts, whose slots no other rank sees.
LONGCAT = CONFIG.replace(identity_experts=4, top_k=3, selection_bias=True, routed_scaling_factor=6.0)


@pytest.mark.parametrize("ranks_per_node", [2, 1], ids=["pointers", "nvshmem"])
@pytest.mark.parametrize("config", [GPT_OSS, LLAMA4, LONGCAT], ids=["gpt-oss", "llama4", "longcat-flash"])
def test_families_in_separate_launches(config, ranks_per_node):
    """Each rank's launch adds its own experts' biases (given all E experts' weights and biases,
    it takes its slice of both), scales its rows by the weights their pairs' entries brought, or
    combines its tokens' identity choices from its own x."""
    counts = [c[:2] for c in COUNTS]
    spec = replace(SPEC, scale_input=config.scale_expert_input)
    xs, weights = inputs(counts, seed=19, config=config)
    got = run_group(xs, weights, 2, ranks_per_node=ranks_per_node, spec=spec, config=config)
    assert_bitwise(got, expected(xs, weights, 2, spec=spec, config=config))


SKEWS = {
    # Odd ranks start every launch a forward late: the even ones run up to a forward ahead, into
    # the other bank of their peers' regions.
    "a-forward-apart": lambda r, n: FORWARD_NS * (r % 2),
    # One rank starts one launch far later than a phase (and well inside the wait bound).
    "one-rank-late": lambda r, n: 40 * FORWARD_NS if (r, n) == (2, 1) else 0,
    # Every launch of every rank held back by a different amount.
    "scattered": lambda r, n: (r * 7919 + n * 104729) % (2 * FORWARD_NS),
}


@pytest.mark.parametrize("skew", list(SKEWS))
def test_skewed_launches(skew):
    xs, weights = inputs(COUNTS, seed=3)
    got = run_group(xs, weights, 4, ranks_per_node=2, seed=5, delays=SKEWS[skew])
    assert_bitwise(got, expected(xs, weights, 4))


def test_many_forwards_with_different_counts_per_rank():
    gen = torch.Generator().manual_seed(11)
    counts = torch.randint(0, 140, (8, 4), generator=gen).tolist()
    counts[2] = [0, 0, 0, 0]
    xs, weights = inputs(counts, seed=12)
    got = run_group(xs, weights, 4, ranks_per_node=2, seed=13, delays=SKEWS["scattered"])
    assert_bitwise(got, expected(xs, weights, 4))


def test_settling_after_every_forward():
    """error_check='deferred': every forward waits for the previous one on every rank (a group
    all-reduce), the mode a training step runs in."""
    xs, weights = inputs(COUNTS[:2], seed=21)
    got = run_group(xs, weights, 4, ranks_per_node=1, error_check="deferred", delays=SKEWS["one-rank-late"])
    assert_bitwise(got, expected(xs, weights, 4))


def test_each_rank_reads_back_the_routing_of_its_tokens():
    xs, weights = inputs([[70, 9]], seed=60)

    def rank_body(rank):
        backend = GroupBackend(CONFIG, None, rank, max_tokens=MAX_TOKENS, timeout_s=TIMEOUT_S, spec=SPEC)
        x = xs[0][rank.rank]
        out, routing = backend.forward(x, weights, return_routing=True)
        backend.close()
        return x, routing

    for x, routing in EmulatedGroup(2, ranks_per_node=1).run(rank_body):
        mismatches, near, weight_err = compare_routing(x, weights, CONFIG, routing)
        assert routing.ids.shape == (x.shape[0], CONFIG.top_k)
        assert mismatches == 0 and weight_err <= weight_tolerance(x, weights, CONFIG)


def test_system_scope_only_when_the_ranks_span_launches():
    """Ranks in separate launches (peers on other GPUs) publish with system-scope fences, releases
    and acquires; one launch hosting every rank needs none of them: gpu scope orders its signals."""
    xs, weights = inputs([[70, 9]], seed=62)
    kernels = []

    def rank_body(rank):
        backend = GroupBackend(CONFIG, None, rank, max_tokens=MAX_TOKENS, timeout_s=TIMEOUT_S, spec=SPEC)
        kernels.append(next(iter(backend.variants.values())).kernel)
        backend.forward(xs[0][rank.rank], weights)
        backend.close()

    EmulatedGroup(2, ranks_per_node=2).run(rank_body)
    assert kernels[0].stats["sys_scope"] > 0      # the world of both launches, freed last
    expected(xs, weights, 2)
    assert next(iter(_EXPECTED[2, SPEC, CONFIG].variants.values())).kernel.stats["sys_scope"] == 0


# ---------------------------------------------------------------- weak memory

@pytest.mark.parametrize("weak_seed", [1, 2, 3])
@pytest.mark.parametrize("ranks_per_node", [4, 1], ids=["pointers", "nvshmem"])
def test_weak_memory(ranks_per_node, weak_seed):
    xs, weights = inputs(COUNTS, seed=30 + weak_seed)
    got = run_group(xs, weights, 4, ranks_per_node=ranks_per_node, seed=weak_seed, weak_seed=weak_seed,
                    delays=SKEWS["scattered"])
    assert_bitwise(got, expected(xs, weights, 4))


def caught(xs, weights, world, **kw) -> bool:
    try:
        got = run_group(xs, weights, world, **kw)
    except RankFailed as e:
        assert all(isinstance(err, FlashMoEError) for err in e.errors if err is not None), e
        return True          # the missing step turned into waits that never ended
    return any(not torch.equal(g, w) for g, w in zip(got, expected(xs, weights, world)))


@pytest.mark.parametrize("name,ranks_per_node,weak", [("dispatch-fence", 4, True), ("world-scope", 4, True),
                                                      ("nvshmem-fence", 1, False), ("consistency-step", 1, False)])
def test_a_missing_ordering_step_is_caught(name, ranks_per_node, weak, tmp_path_factory):
    root = planted_tree(tmp_path_factory.mktemp(name), name)
    xs, weights = inputs(COUNTS[:2], seed=40)
    seeds = [1, 2, 3, 4]
    hits = [caught(xs, weights, 4, ranks_per_node=ranks_per_node, seed=s, weak_seed=s if weak else 0,
                   include_root=root) for s in seeds]
    assert any(hits), f"{name} removed, yet every schedule gave the right bits"
    if weak:
        # Sequentially consistent memory hides the missing fence: the weak mode is what sees it.
        assert not caught(xs, weights, 4, ranks_per_node=ranks_per_node, seed=1, include_root=root)


# ---------------------------------------------------------------- failures, settled on every rank

def test_a_stalled_rank_makes_every_rank_raise_and_the_next_forward_is_right():
    xs, weights = inputs(COUNTS[:2], seed=50)
    want = expected(xs, weights, 4)
    group = EmulatedGroup(4, ranks_per_node=2, seed=7)

    def rank_body(rank):
        backend = GroupBackend(CONFIG, None, rank, max_tokens=MAX_TOKENS, timeout_s=TIMEOUT_S,
                               error_check="deferred", spec=SPEC)
        backend.forward(xs[0][rank.rank], weights, fault_rank=1)
        with pytest.raises(FlashMoEError) as info:
            backend.synchronize()
        out = backend.forward(xs[1][rank.rank], weights)
        backend.close()
        return info.value, out

    results = group.run(rank_body)
    stalled = results[1][0]
    assert stalled.records and all(r["rank"] == 1 for r in stalled.records), stalled
    for r, (error, _) in enumerate(results):
        # Each rank reports its own waits (or, if its launch finished, that another rank stopped).
        assert all(rec["rank"] == r for rec in error.records), (r, error)
        assert error.records or "another rank" in str(error)
    assert "rank 1" in str(stalled)
    assert torch.equal(torch.cat([out for _, out in results]), want[1])


def test_a_group_that_cannot_go_on_raises_instead_of_hanging():
    group = EmulatedGroup(3)

    def rank_body(rank):
        if rank.rank == 2:
            return None          # never joins the collective below
        with pytest.raises(GroupStuck, match="collective"):
            rank.values(rank.rank)
        return rank.rank

    assert group.run(rank_body) == [0, 1, None]
