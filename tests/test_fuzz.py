"""Property tests of the plan and the reference over drawn configs, worlds, token counts and routings.

Everything here runs on a CPU in a few seconds: small shapes, a modest number of examples. The
plan's heap sizes are checked against the closed forms of the ``flashmoe.host.plan`` docstring
(parsed from it, so code, docstring and test must agree), and its row / tile bounds against rows
that real routings of the reference produce.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, HealthCheck, given, settings, strategies as st

from flashmoe import reference as ref
from flashmoe.config import ACTIVATIONS, DTYPES, GATED_ONLY_ACTIVATIONS, GROUP_SCORES, SCORINGS, MoEConfig
from flashmoe.host import abi, plan as plan_mod
from flashmoe.host.spec import ARCHS, KernelSpec

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: torch's intra-op threads only add synchronisation, which on a
    busy machine costs up to 100x (measured 5 ms vs 380 ms of CPU per forward on 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def layers(draw, dropless: bool | None = None):
    """(config, world): E divisible by W, k within the eligible experts of the group rule (over the
    E + Z experts the router chooses from; identity experts only when dropless)."""
    world = draw(st.sampled_from([1, 2, 4, 8]))
    E = world * draw(st.integers(1, 16 // world))
    cf = None if dropless else draw(st.floats(0.1, 2.0))
    if dropless is None:
        cf = draw(st.sampled_from([None, cf]))
    Z = draw(st.sampled_from([0, 0, 1, 4])) if cf is None else 0
    n_group = draw(st.sampled_from([g for g in range(1, E + Z + 1) if (E + Z) % g == 0]))
    topk_group = draw(st.integers(1, n_group))
    group_score = draw(st.sampled_from(GROUP_SCORES)) if (E + Z) // n_group >= 2 else "max"
    shared = draw(st.integers(0, 2))
    config = MoEConfig(
        hidden_size=8 * draw(st.integers(1, 8)),
        intermediate_size=8 * draw(st.integers(1, 8)),
        num_experts=E, identity_experts=Z,
        top_k=draw(st.integers(1, topk_group * ((E + Z) // n_group))),
        # the activations of both expert kinds (the oracle and the kernel know these)
        activation=draw(st.sampled_from([a for a in ACTIVATIONS if a not in GATED_ONLY_ACTIVATIONS])),
        gated=draw(st.booleans()),
        scoring=draw(st.sampled_from(SCORINGS)),
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.3])),
        n_group=n_group, topk_group=topk_group, group_score=group_score,
        selection_bias=draw(st.booleans()),
        num_shared_experts=shared,
        shared_intermediate_size=draw(st.sampled_from([None, 8, 24])) if shared else None,
        shared_expert_gate=draw(st.booleans()) if shared else False,
        capacity_factor=cf,
        dtype=draw(st.sampled_from(list(DTYPES))),
    )
    return config, world


@st.composite
def specs(draw, config: MoEConfig):
    """A valid spec: shapes whose epilogue tile does not fit the pipeline are rejected by KernelSpec,
    so the draw is filtered to the ones it accepts."""
    arch = draw(st.sampled_from(ARCHS))
    block_m = draw(st.sampled_from([16, 32, 64, 128]))
    block_n = draw(st.sampled_from([32, 64, 128]))
    stages = draw(st.integers(2, 4))
    try:
        return KernelSpec(arch=arch, dtype=config.dtype, gated=config.gated, block_m=block_m,
                          block_n=block_n, stages=stages)
    except ValueError:
        assume(False)


def make_weights(config: MoEConfig, seed: int) -> ref.MoEWeights:
    g = torch.Generator().manual_seed(seed)
    E, H, I, Is = (config.num_experts, config.hidden_size, config.intermediate_size,
                   config.shared_intermediate_total)
    dt = config.torch_dtype

    def randn(*shape, fan_in):
        return torch.randn(*shape, generator=g) / math.sqrt(fan_in)
    w = ref.MoEWeights(router_weight=randn(config.router_experts, H, fan_in=H),
                       gate_up_proj=randn(E, config.up_rows, H, fan_in=H).to(dt),
                       down_proj=randn(E, H, I, fan_in=I).to(dt))
    if config.selection_bias:
        w.selection_bias = 0.1 * torch.randn(config.router_experts, generator=g)
    if Is:
        w.shared_gate_up_proj = randn((2 if config.gated else 1) * Is, H, fan_in=H).to(dt)
        w.shared_down_proj = randn(H, Is, fan_in=Is).to(dt)
    if config.shared_expert_gate:
        w.shared_gate_weight = randn(1, H, fan_in=H)
    return w


def make_tokens(config: MoEConfig, n: int, mode: str, seed: int) -> torch.Tensor:
    """'random' rows, or 'same': one row repeated, the most skewed routing there is (every token
    picks the same experts, with tied weights that exercise the token-order tie rule)."""
    g = torch.Generator().manual_seed(seed)
    rows = 1 if mode == "same" else n
    x = torch.randn(rows, config.hidden_size, generator=g) * (4.0 if mode == "same" else 1.0)
    return x.expand(n, -1).contiguous().to(config.torch_dtype)


# ---------------------------------------------------------------- plan: heap layout

def docstring_table() -> dict[str, tuple[str, str, str]]:
    """name -> (banked: yes / no / peer, bytes formula, written by), from the plan module
    docstring's table."""
    lines = plan_mod.__doc__.splitlines()
    head = next(i for i, l in enumerate(lines) if l.split()[:2] == ["region", "banked"])
    cols = [lines[head].index(c) for c in ("region", "banked", "bytes", "written by", "holds")]
    table = {}
    for line in lines[head + 1:]:
        if not line.strip():
            break
        name, banked, size, writer = (line[a:b].strip() for a, b in zip(cols, cols[1:]))
        table[name] = (banked, size, writer)
    return table


def closed_forms(config: MoEConfig, spec: KernelSpec, W: int, T: int) -> dict[str, int]:
    """Each region's bytes from the docstring formulas, with the notation computed here."""
    El = config.num_experts // W
    k, bm = config.top_k, spec.block_m
    shared = config.num_shared_experts > 0
    R = W * T * min(k, El)
    # M: the docstring's "ceil(T / BM)" term is the shared experts' own tiles, so only with them.
    M = math.ceil(R / bm) + El + (math.ceil(T / bm) if shared else 0)
    names = dict(W=W, T=T, H=config.hidden_size, E=config.num_experts, Z=config.identity_experts, k=k,
                 I=config.intermediate_size, E_l=El, I_s=config.shared_intermediate_total,
                 S=k + shared, b=4 if config.dtype == "float32" else 2, C=math.ceil(T / 64),
                 R=R, M=M, BM=bm, BN=spec.block_n, P=plan_mod.PUT_STAGE_TILES)
    sizes = {}
    for name, (_, formula, _) in docstring_table().items():
        only_capacity = "(capacity mode only)" in formula
        only_nvshmem = "(nvshmem)" in formula
        formula = formula.replace("(capacity mode only)", "").replace("(nvshmem)", "")
        value = eval(formula, {"__builtins__": {}}, names)
        sizes[name] = 0 if only_capacity and config.capacity_factor is None else value
        sizes[name] = 0 if only_nvshmem and spec.transport != "nvshmem" else sizes[name]
    return sizes


def test_docstring_table_names_every_region_and_banks_every_peer_write():
    table = docstring_table()
    assert list(table) == list(abi.REGION_NAMES)
    assert {banked for banked, _, _ in table.values()} <= {"yes", "no", "peer"}
    # Data a peer writes must be banked across launches (the one-launch-ahead argument); flags
    # carry the epoch instead.
    for name, (banked, _, writer) in table.items():
        if writer != "this rank":
            assert banked != "no" or name.endswith("_flags"), name


@FUZZ
@given(st.data(), layers(), st.integers(1, 200), st.booleans())
def test_plan_layout(data, layer, T, one_per_process):
    config, W = layer
    spec = data.draw(specs(config))
    # Virtual ranks (one launch hosts all W) or one process per GPU (each launch hosts one).
    L = 1 if one_per_process else W
    first = data.draw(st.integers(0, W - L), label="first local rank")
    plan = plan_mod.make_plan(config, spec, world=W, max_tokens=T, num_local_ranks=L,
                              first_local_rank=first)
    table, sizes = docstring_table(), closed_forms(config, spec, W, T)
    banked = {"yes": True, "no": False, "peer": L < W}
    assert list(plan.regions) == list(abi.REGION_NAMES)

    extents = []
    for name, region in plan.regions.items():
        assert region.size == sizes[name], (name, region.size, sizes[name])
        assert region.banked == banked[table[name][0]], name
        for bank in range(plan_mod.NUM_BANKS if region.banked else 1):
            start = region.bank_offset(bank)
            assert start % plan_mod.REGION_ALIGN == 0, (name, bank, start)
            assert start + region.size <= plan.rank_heap_bytes, (name, bank)
            if region.size:
                extents.append((start, start + region.size, name, bank))
    extents.sort()
    for a, b in zip(extents, extents[1:]):
        assert a[1] <= b[0], f"{a[2]} bank {a[3]} overlaps {b[2]} bank {b[3]}"
    assert plan_mod.REGION_ALIGN % 128 == 0
    # Hosted rank v's slice starts at v * rank_heap_bytes: it must keep every region aligned.
    assert plan.rank_heap_bytes % plan_mod.REGION_ALIGN == 0

    R = W * T * min(config.top_k, config.num_experts // W)
    assert plan.max_expert_rows == R
    assert plan.max_row_tiles * 4 == sizes["tile_done"]


@FUZZ
@given(st.data(), layers(), st.integers(1, 150), st.integers(1, 100))
def test_plan_grows_with_tokens(data, layer, T, more):
    """A larger token bound never shrinks a region: a heap sized for T_max serves any T <= T_max."""
    config, W = layer
    spec = data.draw(specs(config))
    small = plan_mod.make_plan(config, spec, world=W, max_tokens=T)
    big = plan_mod.make_plan(config, spec, world=W, max_tokens=T + more)
    for name in abi.REGION_NAMES:
        assert big.regions[name].size >= small.regions[name].size, name
    assert big.rank_heap_bytes >= small.rank_heap_bytes
    assert (big.max_expert_rows, big.max_row_tiles) >= (small.max_expert_rows, small.max_row_tiles)


# ---------------------------------------------------------------- plan: bounds under real routing

@FUZZ
@given(st.data(), layers(), st.integers(1, 200), st.sampled_from(["random", "same"]),
       st.integers(0, 2**31 - 1))
def test_plan_bounds_hold_for_real_routing(data, layer, T, mode, seed):
    config, W = layer
    spec = data.draw(specs(config))
    plan = plan_mod.make_plan(config, spec, world=W, max_tokens=T)
    E, El, bm = config.num_experts, plan.experts_per_rank, spec.block_m
    weights = make_weights(config, seed)
    tokens = data.draw(st.lists(st.integers(0, T), min_size=W, max_size=W), label="tokens per rank")

    rows = np.zeros((W, E), np.int64)       # [source, expert]: (token, expert) pairs
    sent = np.zeros((W, W), np.int64)       # [source, destination]: token rows, once per destination
    for src, n in enumerate(tokens):
        ids = ref.route(make_tokens(config, n, mode, seed + src), weights, config).ids
        rows[src] = torch.bincount(ids[ids < E], minlength=E).numpy()      # identity experts: no rows
        owner = ids // El
        for dst in range(W):
            sent[src, dst] = int((owner == dst).any(dim=1).sum())
    assert np.array_equal(np.arange(E) // El, [plan_mod.expert_owner(e, E, W) for e in range(E)])

    for dst in range(W):
        local = rows[:, dst * El:(dst + 1) * El]
        assert local.sum() <= plan.max_expert_rows          # inter_rows / kept_list hold them
        assert sent[:, dst].sum() <= W * T                  # recv_rows holds them
        assert sent[:, dst].max() <= T                      # one source's segment of recv_rows
        assert local.max() <= T                             # entries: (local expert, source, position)
        tiles = sum(math.ceil(r / bm) for r in local.sum(axis=0))
        tiles += math.ceil(tokens[dst] / bm) if config.num_shared_experts else 0
        assert tiles <= plan.max_row_tiles


def test_the_expert_limit_counts_identity_experts():
    """The router selects among E + Z (32 a lane of a warp): identity experts count toward its limit."""
    spec = KernelSpec(arch="sm_90a", dtype="bfloat16", gated=True)
    at_limit = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=1016, identity_experts=8, top_k=2)
    assert plan_mod.kernel_support(at_limit, spec, 1) is None
    assert plan_mod.kernel_support(at_limit.replace(identity_experts=9), spec, 1) == (
        "num_experts + identity_experts = 1025 is above the kernel's limit of 1024 experts to choose from")


def test_expert_placement_partitions_contiguously():
    for W in (1, 2, 4, 8):
        for E in range(W, 65, W):
            owners = [plan_mod.expert_owner(e, E, W) for e in range(E)]
            assert owners == sorted(owners) and set(owners) == set(range(W))
            covered = [e for r in range(W) for e in plan_mod.rank_experts(r, E, W)]
            assert covered == list(range(E))        # every expert once, in rank order
            for r in range(W):
                assert len(plan_mod.rank_experts(r, E, W)) == E // W
                assert all(owners[e] == r for e in plan_mod.rank_experts(r, E, W))
    with pytest.raises(ValueError, match="divisible"):
        plan_mod.experts_per_rank(6, 4)


# ---------------------------------------------------------------- reference

def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(logits, -1)
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.nn.functional.softplus(logits).sqrt()


def check_routing(config: MoEConfig, weights: ref.MoEWeights, x2d: torch.Tensor,
                  r: ref.Routing, token_index: torch.Tensor):
    E, k = config.router_experts, config.top_k      # the experts chosen from, identity ones too
    n = x2d.shape[0]
    # Logits: fp32 x @ W^T, within fp32 rounding of the float64 product.
    exact = x2d.double() @ weights.router_weight.double().t()
    bound = 1e-5 * (x2d.double().abs() @ weights.router_weight.double().abs().t()) + 1e-6
    assert torch.all((r.logits.double() - exact).abs() <= bound)

    ids = r.ids.numpy()
    assert ids.shape == (n, k) and ((0 <= ids) & (ids < E)).all()
    assert all(len(set(row)) == k for row in ids.tolist()), "an expert chosen twice by one token"

    # Selection on the fp32 scores the router uses (ties decide ids, so no float64 here).
    scores32 = _scores(r.logits, config.scoring)
    select = scores32 + (weights.selection_bias.float() if config.selection_bias else 0)
    select = select.numpy()
    eligible = np.ones((n, E), bool)
    if config.n_group > 1:
        groups = select.reshape(n, config.n_group, E // config.n_group)
        if config.group_score == "top2_sum":
            top2 = -np.sort(-groups, axis=2)[:, :, :2]
            gscore = top2[:, :, 0] + top2[:, :, 1]      # one fp32 add, as torch sums two values
        else:
            gscore = groups.max(axis=2)
        # Best groups first, ties to the lower group (a stable sort keeps index order).
        best = np.argsort(-gscore, axis=1, kind="stable")[:, :config.topk_group]
        chosen_groups = np.zeros((n, config.n_group), bool)
        np.put_along_axis(chosen_groups, best, True, axis=1)
        eligible = np.repeat(chosen_groups, E // config.n_group, axis=1)
    assert np.take_along_axis(eligible, ids, 1).all(), "a token routed outside its eligible groups"
    # Best first, ties to the lower expert; nothing eligible and unchosen beats the last chosen.
    s_ids = np.take_along_axis(select, ids, 1)
    ahead, behind = (s_ids[:, :-1], ids[:, :-1]), (s_ids[:, 1:], ids[:, 1:])
    assert ((ahead[0] > behind[0]) | ((ahead[0] == behind[0]) & (ahead[1] < behind[1]))).all()
    rest = eligible.copy()
    np.put_along_axis(rest, ids, False, axis=1)
    last_s, last_id = s_ids[:, -1:], ids[:, -1:]
    beaten = (last_s > select) | ((last_s == select) & (last_id < np.arange(E)))
    assert (beaten | ~rest).all(), "an unchosen eligible expert outranks a chosen one"

    # Weights: scores of the chosen experts, optionally renormalised, then scaled (float64 here).
    s64 = _scores(r.logits.double(), config.scoring)
    w = s64.gather(1, r.ids)
    if config.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    torch.testing.assert_close(r.weights.double(), w * config.routed_scaling_factor,
                               rtol=1e-5, atol=1e-7)

    # Capacity: each expert keeps exactly min(routed, C) pairs, the best by (weight desc, token asc).
    C = config.capacity(n)
    kept = r.kept.numpy()
    if C is None:
        assert kept.all()
        return
    wt, tok = r.weights.numpy(), token_index.numpy()
    for e in range(E):
        t_of, j_of = np.nonzero(ids == e)
        keep = kept[t_of, j_of]
        assert keep.sum() == min(len(t_of), C), (e, keep.sum(), len(t_of), C)
        if keep.all() or not keep.any():
            continue
        w_e, tok_e = wt[t_of, j_of], tok[t_of]
        # The worst kept pair (lowest weight, then highest token) beats the best dropped one.
        wk = w_e[keep].min()
        worst_kept = (wk, tok_e[keep][w_e[keep] == wk].max())
        wd = w_e[~keep].max()
        best_dropped = (wd, tok_e[~keep][w_e[~keep] == wd].min())
        assert (-worst_kept[0], worst_kept[1]) < (-best_dropped[0], best_dropped[1]), \
            (e, worst_kept, best_dropped)


@FUZZ
@given(layers(), st.integers(0, 200), st.sampled_from(["random", "same"]),
       st.sampled_from(ref.MATH_MODES), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_reference(layer, n, mode, math_mode, batched, shuffle, seed):
    config, _ = layer
    weights = make_weights(config, seed)
    x2d = make_tokens(config, n, mode, seed)
    x = x2d.view(1, n, config.hidden_size) if batched else x2d

    out = ref.moe_forward(x, weights, config, math=math_mode)
    assert out.shape == x.shape
    assert out.dtype == (torch.float32 if math_mode == "fp32" else x.dtype)
    assert torch.isfinite(out).all()

    # Tokens placed among others (a rank's slice of the world): ties follow token_index, not rows.
    g = torch.Generator().manual_seed(seed)
    token_index = torch.randperm(n, generator=g) + 1000 if shuffle else torch.arange(n)
    routing = ref.route(x2d, weights, config, token_index=token_index, num_tokens_total=n)
    check_routing(config, weights, x2d, routing, token_index)


# Unit roundoff of the rounding steps of the contract: the dtype, and TF32 operands for float32.
UNIT = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-11}


@FUZZ
@given(layers(dropless=True), st.integers(2, 40), st.data(), st.sampled_from(["nan", "inf"]),
       st.integers(0, 2**31 - 1))
def test_dropless_output_is_per_token(layer, n, data, poison, seed):
    """Dropless, a token's output depends on its own row only: a NaN/Inf row changes no other row."""
    config, _ = layer
    weights = make_weights(config, seed)
    x = make_tokens(config, n, "random", seed)
    bad = data.draw(st.integers(0, n - 1), label="poisoned token")
    others = torch.arange(n) != bad
    clean_routing = ref.route(x, weights, config)
    clean = ref.moe_forward(x, weights, config, routing=clean_routing)
    x[bad] = float(poison)

    # Routing is row by row: the other tokens' decisions are bitwise the same.
    dirty_routing = ref.route(x, weights, config)
    assert torch.equal(dirty_routing.ids[others], clean_routing.ids[others])
    assert torch.equal(dirty_routing.weights[others], clean_routing.weights[others])
    # Same routing, so the same GEMM shapes: the poisoned row leaves the others bitwise alone.
    assert torch.equal(ref.moe_forward(x, weights, config, routing=clean_routing)[others],
                       clean[others])
    # The poisoned token's own routing moves rows between experts, and a GEMM with other row
    # counts may round differently in the last fp32 bit; that can flip a dtype rounding of an
    # expert output, so allow a few roundings at the scale of the output, and no NaN/Inf.
    dirty = ref.moe_forward(x, weights, config)[others].float()
    assert torch.isfinite(dirty).all()
    scale = clean[others].float().abs().max().item()
    torch.testing.assert_close(dirty, clean[others].float(), rtol=0,
                               atol=8 * UNIT[config.dtype] * max(scale, 1e-3))


@pytest.mark.parametrize("config", [
    MoEConfig(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2),
    MoEConfig(hidden_size=16, intermediate_size=8, num_experts=8, top_k=3, n_group=4, topk_group=2,
              selection_bias=True, scoring="sigmoid", norm_topk_prob=True, capacity_factor=1.0,
              num_shared_experts=1, shared_expert_gate=True, dtype="float32"),
], ids=["plain", "grouped-capacity-shared"])
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_reference_without_tokens(config, lead):
    """A rank with no tokens is routine in expert parallel: empty in, empty out, no error."""
    weights = make_weights(config, 0)
    x = torch.zeros(*lead, config.hidden_size, dtype=config.torch_dtype)
    out = ref.moe_forward(x, weights, config)
    assert out.shape == x.shape and out.dtype == x.dtype
    r = ref.route(x.reshape(0, config.hidden_size), weights, config)
    assert r.ids.shape == r.weights.shape == r.kept.shape == (0, config.top_k)


def test_tile_by_shape():
    """plan.choose_tile: the decode tile up to 64 rows an expert, then the wide tile once a rank has
    WIDE_MIN_ROUNDS wide tiles a block, else the 128 x 128 tile; routed_tiles counts as the plan's
    column tiles do."""
    config = MoEConfig(hidden_size=256, intermediate_size=256, num_experts=4, top_k=1)
    # An expert averages T / 4 rows: 256 tokens are 64 (decode), 257 are 65.
    assert plan_mod.choose_tile(config, 256, blocks_per_rank=1) == (64, 128)
    # 4 experts x 1 row tile x (2 GEMM0 + 1 GEMM1 column tiles of 256) = 12 wide tiles.
    assert plan_mod.routed_tiles(config, 257, 1, 128, 256) == 12
    assert plan_mod.choose_tile(config, 257, blocks_per_rank=3) == (128, 256)      # 4 rounds of 3 blocks
    assert plan_mod.choose_tile(config, 257, blocks_per_rank=4) == (128, 128)      # 3 rounds of 4
    assert plan_mod.choose_tile(config, 513, blocks_per_rank=4) == (128, 256)      # 2 row tiles: 24
    # Ranks: each holds E / W experts, so half the tiles a rank at W = 2.
    assert plan_mod.routed_tiles(config, 257, 2, 128, 256) == 6
    assert plan_mod.choose_tile(config, 257, world=2, blocks_per_rank=3) == (128, 128)
    for bn in (128, 256):
        for gated in (True, False):
            cfg = MoEConfig(hidden_size=320, intermediate_size=288, num_experts=8, top_k=2, gated=gated)
            spec = KernelSpec(arch="sm_90a", gemm="wgmma", block_n=bn, threads=384, stages=2, gated=gated)
            plan = plan_mod.make_plan(cfg, spec, world=2, max_tokens=600)
            rows = math.ceil(600 * 2 / 8)
            assert plan_mod.routed_tiles(cfg, 600, 2, 128, bn) == \
                4 * math.ceil(rows / 128) * (plan.gemm0_col_tiles(288) + plan.gemm1_col_tiles())
