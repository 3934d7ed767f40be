"""Scale model of one flashmoe forward with expert parallelism over W GPUs (unvalidated beyond one GPU).

    python bench/model_ep.py                     # 8 x H100: the FlashMoE paper's layers, DeepSeek-V3-like
    python bench/model_ep.py --world 16 --skew 1.3 --nvlink-gbps 160 --json pred.json
    python bench/model_ep.py --trace <stem>_qwen3-30b-a3b_4096.trace.json.gz   # tile times of a trace
    python bench/model_ep.py --virtual --measured bench/results/ep_<device>_<date>.json

Every rank runs the kernel's phases in order (flashmoe/device/flashmoe.cu): route, barrier,
prefix, barrier, count signal, dispatch, expert tiles (GEMM1 writes each result row to the
token's home rank as its tile ends), done signal, combine. Only the result rows overlap compute.
Dispatch does not: a GEMM0 tile waits for the data signal of every source whose rows it holds,
and every rank dispatches at the same time. So the forward is the sum of the slowest rank's
phases. ``--virtual`` predicts W virtual ranks on one GPU (what ``bench/sweep_ep.py`` measures),
where the "links" are the GPU's own memory. ``--json`` holds the assumptions, the fitted knobs,
``rows`` (the W-GPU table) and ``check`` (predictions beside measured rows; all of them with
``--virtual``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):       # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import layers, metrics
from bench.model_router import ROUTER_SELECT_US, ROUTER_SMEM_READS_PER_NS, ROUTER_X_GBPS, route_s
from bench.published import COLUMNS, DEEPEP_LL_US, DEEPEP_NORMAL_GBPS, INDEPENDENT_BF16, published
from flashmoe.config import MoEConfig
from flashmoe.host.plan import CHUNK_TOKENS, ENTRY_BYTES, choose_tile, experts_per_rank
from flashmoe.host.spec import wgmma_spec
from flashmoe.trace import read_chrome_json

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_BF16 = 989.4                   # TFLOP/s, H100 / H200 SXM dense bf16 (TF32: half)
# One H200, 2026-11-30, commit 446305b (results/bench_grid-h200-20261130-163053.log): its measured
# ceilings, and the FlashMoE paper layer's flashmoe times (bf16, W = 1; a 128 x 128 tile at 2048
# tokens, 128 x 256 at 16384) the tile efficiency and fixed cost fit.
H200_MATMUL, H200_COPY = 798.6, 4251.0      # TFLOP/s (8192^3 bf16 matmul), GB/s (read + write)
FIT_ROWS = ((2048, 0.4891), (16384, 1.831))   # (tokens, median_ms)
# The same commit's measured rows the check prints by default: the kit's bench rows (W = 1) and
# bench/sweep_ep.py (W = 1, 2, 4, 8 virtual ranks on one GPU), last: where both have a row, the
# sweep's wins, so that its W > 1 rows are set beside a W = 1 row of the same run.
MEASURED_DEFAULT = ("layer_nvidia-h200_20261130-163024.json", "ep_nvidia-h200_20261130-163434.json")


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    matmul_tflops: float    # achieved dense bf16 rate; TF32 tiles run at half of it
    copy_gbps: float        # achieved HBM copy bandwidth, read + write


# H100 and H200 SXM share the GH100 die and clocks, so the H200's measured matmul rate stands for
# both; H100's HBM3 (3350 GB/s nominal) gets the share of nominal the H200 measured (of 4800).
GPUS = {"h100": Gpu("H100 SXM", 132, H200_MATMUL, 3350 * H200_COPY / 4800),
        "h200": Gpu("H200 SXM", 132, H200_MATMUL, H200_COPY)}

# The combine (k result rows read, one output row written per token) moves its bytes at this share
# of the copy bandwidth: 1160 GB/s (Qwen3) and 1378 GB/s (Mixtral) over the span of its records in
# the router's traces (model_router.py) at 4096 tokens, against 4251 GB/s of copy: a slot at a time, so low for the
# batched loads after 446305b (roles/combine.cuh) until their traces refit it.
COMBINE_COPY_SHARE = 0.30


@dataclass(frozen=True)
class Links:
    nvlink_gbps: float = 450.0   # NVLink4 per GPU per direction (900 GB/s bidirectional)
    nvlink_us: float = 3.0       # one signal round: a remote release store seen by a poller
    ib_gbps: float = 50.0        # 400 Gb/s InfiniBand per GPU, for ranks on other nodes
    ib_us: float = 10.0
    gpus_per_node: int = 8
    link_eff: float = 0.8        # share of a link's bandwidth the copies reach
    local_us: float = 1.0        # a flag between blocks of one GPU (barriers, virtual ranks)
    sm_store_gbps: float = 25.0  # remote stores one SM issues per second


@dataclass(frozen=True)
class Knobs:
    eff: tuple[float, float]     # GEMM0, GEMM1 tile efficiency against the matmul rate
    fixed_ms: float = 0.0        # per-forward cost the phases do not explain
    skew: float = 1.0            # slowest rank's load / mean load


def ranks_hit(config: MoEConfig, W: int) -> float:
    """Expected ranks (W of them, owning contiguous blocks of E/W experts) one token's k experts
    land on when every expert is equally likely. Without groups the k experts are a uniform
    k-subset: 1 - C(E - E/W, k) / C(E, k) per rank. A group limit is not uniform within the chosen
    groups (a group chosen for its best two scores holds the token's best experts), so its
    expectation is counted over tokens routed by flashmoe.reference.route with iid logits."""
    E, k = config.num_experts, config.top_k
    if config.n_group <= 1:
        return W * (1 - math.comb(E - experts_per_rank(E, W), k) / math.comb(E, k))
    return _ranks_hit_routed(config, W)


@functools.lru_cache(maxsize=None)
def _ranks_hit_routed(config: MoEConfig, W: int, tokens: int = 8192) -> float:
    import torch     # only here: the closed form above needs no torch

    from flashmoe import reference
    E = config.num_experts
    gen = torch.Generator().manual_seed(0)
    weights = reference.MoEWeights(router_weight=torch.eye(E), gate_up_proj=torch.empty(0),
                                   down_proj=torch.empty(0), selection_bias=torch.zeros(E))
    routed = config.replace(hidden_size=E, num_shared_experts=0, router_bias=False)
    ids = reference.route(torch.randn(tokens, E, generator=gen), weights, routed).ids
    owner = ids // experts_per_rank(E, W)
    return torch.zeros(tokens, W, dtype=torch.bool).scatter_(1, owner, True).sum().item() / tokens


def expected_tiles(n: int, p: float, bm: int) -> tuple[float, float]:
    """(E[ceil(X / bm)], P(X > 0)) for X ~ Binomial(n, p): one expert's row tiles when each of n
    tokens picks it with probability p, and the chance it gets a row at all."""
    if p >= 1:
        return math.ceil(n / bm), 1.0
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    tiles = 0.0
    for x in range(max(0, int(mean - 12 * sd) - 1), min(n, int(mean + 12 * sd) + 2) + 1):
        tiles += math.ceil(x / bm) * math.exp(math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1)
                                              + x * math.log(p) + (n - x) * math.log1p(-p))
    return tiles, 1 - (1 - p) ** n


def predict(config: MoEConfig, tokens: int, world: int, gpu: Gpu, links: Links, knobs: Knobs,
            virtual: bool = False) -> dict:
    """The slowest rank's phases (ms) for ``tokens`` per rank on ``world`` ranks."""
    H, I, E, k = config.hidden_size, config.intermediate_size, config.num_experts, config.top_k
    b = 4 if config.dtype == "float32" else 2
    El, s = experts_per_rank(E, world), knobs.skew
    blocks = gpu.sms // (world if virtual else 1)   # plan: sm_count // ranks the launch hosts
    remote = (world - 1) / world                    # share of a token's experts not at home
    ib_share = 0.0 if virtual else max(0, world - links.gpus_per_node) / max(world - 1, 1)
    flag_us = links.local_us if virtual or world == 1 else links.ib_us if ib_share else links.nvlink_us
    bw = gpu.copy_gbps * 1e9

    def link_s(nbytes: float) -> float:
        """Seconds to move nbytes out of, and (routing being symmetric) into, one rank."""
        if virtual:     # every rank's copy reads and writes the one HBM
            return 2 * nbytes * world / bw
        return max(nbytes * (1 - ib_share) / (links.nvlink_gbps * 1e9 * links.link_eff),
                   nbytes * ib_share / (links.ib_gbps * 1e9 * links.link_eff))

    # The GEMM tile the kernel picks, and the threads of its Hopper build (the router's split uses them).
    bm, bn = choose_tile(config, tokens * world, world, blocks)
    threads = wgmma_spec(config.dtype, config.gated, block_m=bm, block_n=bn).threads
    route = sum(route_s(config, tokens, blocks, threads))
    chunks = math.ceil(tokens / CHUNK_TOKENS)
    # Sync: two rank barriers, then one signal round each for counts, data and done.
    sync = (2 * links.local_us + 3 * flag_us) * 1e-6

    # Dispatch: a row per (token, distinct remote rank) and an entry per remote (token, expert),
    # sent by the blocks that own chunks (decode: few of them).
    rows_out = tokens * remote * ranks_hit(config, world) * s
    dispatch_bytes = rows_out * H * b + tokens * k * remote * ENTRY_BYTES * s
    issue = dispatch_bytes / (min(blocks, chunks) * links.sm_store_gbps * 1e9)
    dispatch = max(link_s(dispatch_bytes), issue) if world > 1 else 0.0

    # Experts: a local expert gets Binomial(W T, k / E) rows in tiles of bm; the rank's blocks
    # claim GEMM0 tiles (2 bm bn H FLOPs), then GEMM1 tiles (2 bm bn I).
    tiles_e, active = expected_tiles(world * tokens, k / E, bm)
    per_b = max(tiles_e / active, 1.0) if active else 1.0   # row tiles sharing one B tile
    cols0 = bn // (2 if config.gated else 1)               # intermediate columns of a GEMM0 tile
    c0, c1 = math.ceil(I / cols0), math.ceil(H / bn)
    rate_sm = gpu.matmul_tflops * 1e12 / gpu.sms / (2 if config.dtype == "float32" else 1)

    def tile_s(K: int, col_tiles: int, out_cols: int, eff: float) -> float:
        """max(FLOPs / rate, HBM bytes / the SM's share of the bandwidth). HBM bytes: the B tile
        once per expert (its row tiles are claimed in a row, L2 keeps it), the A tile once per
        row tile, the output."""
        nbytes = bn * K * b / per_b + bm * K * b / col_tiles + bm * out_cols * b
        return max(2 * bm * bn * K / (rate_sm * eff), nbytes / (bw / gpu.sms))

    t0, t1 = tile_s(H, c0, cols0, knobs.eff[0]), tile_s(I, c1, bn, knobs.eff[1])
    n0, n1 = El * tiles_e * c0 * s, El * tiles_e * c1 * s
    work = n0 * t0 + n1 * t1
    mean_tile = work / (n0 + n1) if work else 0.0
    # Whole waves of the mean tile; at least one GEMM0 and then its GEMM1 (which waits for it).
    makespan = max(math.ceil(work / (blocks * mean_tile) - 1e-9) * mean_tile, t0 + t1) if work else 0.0
    weights = metrics.expert_weight_bytes(config, world * tokens) / world / bw
    return_bytes = tokens * k * remote * H * b * s          # result rows for other ranks
    returns = 0.0 if virtual else link_s(return_bytes)      # on one GPU: tile output, counted above
    experts = max(makespan, weights, returns)
    # Combine: read k result rows, write one output row, per token.
    combine = tokens * (k + 1) * H * b * (world if virtual else 1) / (bw * COMBINE_COPY_SHARE)

    ms = {"route": route * 1e3, "sync": sync * 1e3, "dispatch": dispatch * 1e3,
          "experts": experts * 1e3, "combine": combine * 1e3, "fixed": knobs.fixed_ms}
    total = sum(ms.values())
    return {"phases_ms": ms, "total_ms": total, "tflops": metrics.flops(config, tokens) / total / 1e9,
            "traffic": {"dispatch_bytes": dispatch_bytes, "return_bytes": return_bytes,
                        "remote_rows_per_token": rows_out / tokens,
                        "dispatch_gbps": dispatch_bytes / dispatch / 1e9 if dispatch else None,
                        "return_link_ms": returns * 1e3},
            "tiles": {"block_m": bm, "block_n": bn, "gemm0": n0, "gemm1": n1, "gemm0_us": t0 * 1e6,
                      "gemm1_us": t1 * 1e6, "makespan_ms": makespan * 1e3, "weights_floor_ms": weights * 1e3}}


def calibrate(links: Links, eff: tuple[float, float] | None = None) -> Knobs:
    """The tile efficiency (one for both GEMMs) and the fixed cost with which the W = 1 model
    gives the two measured H200 rows; with the efficiencies given, the fixed cost only (the mean
    residual of the two rows)."""
    paper = layers.LAYERS["flashmoe-paper"][0]

    def model(tokens, e):
        return predict(paper, tokens, 1, GPUS["h200"], links, Knobs(e, 0.0), True)["total_ms"]
    if eff is not None:
        return Knobs(eff, max(statistics.mean(m - model(t, eff) for t, m in FIT_ROWS), 0.0))
    (t_lo, m_lo), (t_hi, m_hi) = FIT_ROWS
    lo, hi = 0.01, 1.0      # the gap between the two rows shrinks as the efficiency grows
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model(t_hi, (mid, mid)) - model(t_lo, (mid, mid)) > m_hi - m_lo else (lo, mid)
    e = ((lo + hi) / 2,) * 2
    return Knobs(e, max(m_lo - model(t_lo, e), 0.0))


def trace_events(path) -> list:
    """The events of a Perfetto JSON of flashmoe.trace, as bench_layer.py --trace writes it
    (<stem>_<layer>_<tokens>.trace.json) or gzipped as the results keep it (.trace.json.gz)."""
    return read_chrome_json(path)["traceEvents"]


def trace_efficiency(path: str, layer: str | None, tokens: int | None) -> tuple[dict, tuple]:
    """Median GEMM0 / GEMM1 record lengths of a Perfetto JSON of flashmoe.trace (one H200, W = 1,
    a bench layer; bench_layer.py --trace names it <stem>_<layer>_<tokens>.trace.json), and the
    tile efficiencies that make the model's compute time of those tiles equal to them."""
    events = trace_events(path)
    med = {}
    for kind in ("GEMM0", "GEMM1"):
        durs = [e["dur"] for e in events if e.get("ph") == "X" and e.get("name") == kind]
        if not durs:
            raise SystemExit(f"{path}: no {kind} records in the trace")
        med[kind] = statistics.median(durs)
    named = re.search(r"_([a-z0-9.-]+)_(\d+)\.trace\.json(\.gz)?$", Path(path).name)
    layer = layer or (named.group(1) if named and named.group(1) in layers.LAYERS else "flashmoe-paper")
    tokens = tokens or (int(named.group(2)) if named else 16384)
    config = layers.LAYERS[layer][0]
    bm, bn = choose_tile(config, tokens)
    rate_us = GPUS["h200"].matmul_tflops * 1e6 / GPUS["h200"].sms     # FLOPs per us per SM
    eff = tuple(2 * bm * bn * K / rate_us / med[kind]
                for K, kind in ((config.hidden_size, "GEMM0"), (config.intermediate_size, "GEMM1")))
    return {"path": str(path), "layer": layer, "tokens": tokens, "gemm0_us": med["GEMM0"],
            "gemm1_us": med["GEMM1"]}, eff


# DeepSeek-V3's routed experts (its shared expert left out), routed as it is: sigmoid scores and
# 8 groups of 32 experts of which the best 4 are eligible; at EP8 a group is one rank's experts.
DSV3 = MoEConfig(hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=8, activation="silu",
                 scoring="sigmoid", n_group=8, topk_group=4, norm_topk_prob=True,
                 routed_scaling_factor=2.5, selection_bias=True)


def table_rows() -> list[tuple[str, MoEConfig, int]]:
    rows = [(f"paper E{E} {tag}", layers.LAYERS["flashmoe-paper"][0].replace(num_experts=E, dtype=dtype), T)
            for dtype, tag in (("float32", "fp32"), ("bfloat16", "bf16"))
            for E in (8, 16, 32, 64, 128) for T in (4096, 8192, 16384)]
    for T in (4096, 128):
        rows += [("dsv3 groups 4/8", DSV3, T),
                 ("dsv3 no groups", DSV3.replace(n_group=1, topk_group=1, selection_bias=False), T)]
    return rows


def load_measured(paths) -> dict:
    """{(bench layer, tokens per rank, W, virtual): median_ms} of flashmoe rows that ran correctly:
    bench_layer.py (W = 1), sweep_ep.py (``tokens`` split over W virtual ranks), the multi-process
    sweep (``tokens_per_rank`` on W GPUs). Dry runs measure nothing and are skipped."""
    out = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and data.get("meta", {}).get("dry_run"):
            continue
        for r in data.get("rows", []) if isinstance(data, dict) else data:
            if r.get("provider", "flashmoe") != "flashmoe" or r.get("status", "ok") != "ok" \
                    or r.get("median_ms") is None or r.get("config") not in layers.LAYERS:
                continue
            world = r.get("world", 1)
            if "tokens_per_rank" in r:
                out[(r["config"], r["tokens_per_rank"], world, False)] = r["median_ms"]
            else:
                out[(r["config"], math.ceil(r["tokens"] / world), world, True)] = r["median_ms"]
    return out


def assumptions(gpu: Gpu, links: Links, knobs: Knobs, trace: dict | None, virtual: bool) -> list[str]:
    tiles = (f"efficiency {knobs.eff[0]:.3f} / {knobs.eff[1]:.3f} from the trace {trace['path']} "
             f"({trace['layer']}, {trace['tokens']} tokens; median GEMM0 {trace['gemm0_us']:.1f} us, "
             f"GEMM1 {trace['gemm1_us']:.1f} us)" if trace else
             f"efficiency {knobs.eff[0]:.3f}, fitted so that the W = 1 model gives the H200's measured "
             f"times of the paper layer (bf16) at {FIT_ROWS[0][0]} and {FIT_ROWS[1][0]} tokens")
    link = ("links: the GPU's own HBM (virtual ranks); a copy reads and writes it, every rank at once"
            if virtual else
            f"links: NVLink {links.nvlink_gbps:.0f} GB/s per GPU per direction (H100 NVLink4: 900 both ways), "
            f"{links.nvlink_us} us per signal round; InfiniBand {links.ib_gbps:.0f} GB/s per GPU (400 Gb/s), "
            f"{links.ib_us} us, to ranks beyond {links.gpus_per_node} GPUs per node; copies reach "
            f"{links.link_eff:.0%} of a link (DeepEP reports 726 of 900 GB/s NVLink on SM100, 153 of "
            f"~160 on H800); one SM issues <= {links.sm_store_gbps:.0f} GB/s of remote stores (DeepEP "
            "V2: 643 GB/s from 24 SMs)")
    return [
        "UNVALIDATED: no multi-GPU run or trace of this kernel exists; W > 1 numbers are the model's "
        "alone, checked only against one GPU: W = 1, and W virtual ranks sharing it (the check below).",
        f"GPU {gpu.name}: {gpu.sms} SMs, one block each; tiles run against the matmul rate measured on "
        f"an H200 ({gpu.matmul_tflops:.0f} TFLOP/s bf16, {gpu.matmul_tflops / PEAK_BF16:.0%} of the "
        f"{PEAK_BF16} peak; same die and clocks as H100), TF32 at half ({gpu.matmul_tflops / 2:.0f}; "
        f"peak {PEAK_BF16 / 2:.0f}); HBM copy {gpu.copy_gbps:.0f} GB/s.",
        "GEMM tiles: the kernel's (plan.choose_tile: 64 x 128 when an expert averages <= 64 rows, "
        "128 x 256 when every block gets 4 of them, else 128 x 128), "
        "K = H (GEMM0) or I (GEMM1); time = max(FLOPs / (per-SM matmul rate x efficiency), HBM bytes / "
        f"per-SM share of the bandwidth); {tiles}.",
        f"fixed cost {knobs.fixed_ms:.3f} ms per forward, fitted with the tiles: what the one-GPU times "
        "hold beyond the modelled phases (the traces span all but about 20 us of a forward's time, so it is "
        "inside the kernel: waits at the rank barriers and for rows); in every row.",
        "fp32 rows: TF32 tiles at the bf16 tile efficiency (no fp32 measurement exists), 4-byte rows.",
        "router: 446305b's split of the logits over blocks, the busiest block's "
        f"shared-memory reads at {ROUTER_SMEM_READS_PER_NS} per ns or its x at {ROUTER_X_GBPS} GB/s, then "
        f"selection at {ROUTER_SELECT_US[0]} + {ROUTER_SELECT_US[1]} E us per chunk (fitted to the H200 "
        "traces of Qwen3 and Mixtral at 128 and 4096 tokens, within 11% of each).",
        f"{link}; flags within a GPU {links.local_us} us.",
        "traffic: the expectation under uniform routing (a token's k experts a uniform k-subset; under a "
        "group limit, counted over 8192 tokens of the reference router with iid logits); a row travels "
        "once per distinct remote rank, 16 B per "
        f"remote (token, expert); one result row returns per remote (token, slot); skew {knobs.skew} "
        "(slowest rank's load / mean, --skew).",
        "overlap: none between dispatch and GEMMs (a GEMM0 tile waits for its sources' data signals and "
        "all ranks dispatch at once); the expert phase is the longest of the tile makespan (whole waves; "
        "at least a GEMM0 then a GEMM1), the weights' HBM floor (metrics.expert_weight_bytes) and the "
        "result rows' link time; combine follows every done signal, its bytes at "
        f"{COMBINE_COPY_SHARE:.0%} of the copy bandwidth (the traces).",
    ]


PHASES = ("route", "sync", "dispatch", "experts", "combine", "fixed")
HEAD = "".join(f"{h:>8}" for h in ("route", "sync", "disp", "experts", "combine", "fixed", "total"))


def fmt(v, width: int, spec: str = ".3f") -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}" if not isinstance(v, str) else f"{v:>{width}}"


def cells(p: dict) -> str:
    return "".join(fmt(p["phases_ms"][n], 8) for n in PHASES) + fmt(p["total_ms"], 8)


def check_section(keys, measured: dict, gpu: Gpu, links: Links, knobs: Knobs) -> list:
    """Predicted beside measured: virtual ranks on one H200, or one rank per GPU."""
    rows = []
    print(f"{'layer':<17}{'mode':>5}{'W':>3}{'tokens':>7}{'T/rank':>7}{HEAD}{'measured':>9}{'pred/meas':>10}")
    for name, T, world, virtual in sorted(keys, key=lambda key: (key[0], not key[3], key[1] * key[2], key[2])):
        config = layers.LAYERS[name][0]
        if config.num_experts % world:
            continue
        p = predict(config, T, world, GPUS["h200"] if virtual else gpu, links, knobs, virtual)
        m = measured.get((name, T, world, virtual))
        fit = " (fit)" if (name, world, virtual) == ("flashmoe-paper", 1, True) and T in dict(FIT_ROWS) else ""
        print(f"{name:<17}{'virt' if virtual else 'gpus':>5}{world:>3}{T * world:>7}{T:>7}{cells(p)}{fmt(m, 9)}"
              f"{fmt(p['total_ms'] / m if m else None, 10, '.2f')}{fit}")
        rows.append({"layer": name, "tokens_per_rank": T, "world": world, "virtual": virtual, **p, "measured_ms": m})
    scaling(rows)
    return rows


def scaling(rows: list) -> None:
    """Each measured W > 1 row of virtual ranks over its W = 1 row (the same tokens on one GPU):
    what expert parallelism costs, measured and predicted."""
    one = {(r["layer"], r["tokens_per_rank"]): r for r in rows if r["virtual"] and r["world"] == 1 and r["measured_ms"]}
    lines = []
    for r in rows:
        base = one.get((r["layer"], r["tokens_per_rank"] * r["world"]))
        if r["virtual"] and r["world"] > 1 and r["measured_ms"] and base:
            lines.append(f"{r['layer']:<17}{r['tokens_per_rank'] * r['world']:>7}{r['world']:>3}"
                         f"{r['measured_ms'] / base['measured_ms']:>10.3f}{r['total_ms'] / base['total_ms']:>11.3f}")
    if lines:
        print(f"\nW virtual ranks over W = 1, the same tokens\n{'layer':<17}{'tokens':>7}{'W':>3}{'measured':>10}"
              f"{'predicted':>11}\n" + "\n".join(lines))


def gpu_section(world: int, gpu: Gpu, links: Links, knobs: Knobs) -> list:
    """The predicted table on W GPUs beside the published numbers, and the notes under it."""
    print(f"\npredicted forward (ms), {world} x {gpu.name}" + (", beside the FlashMoE paper's 8 x H100 (its fp32 "
          "FlashMoE on fp32 rows, its fp16 baselines on bf16 rows)" if world == 8 else ""))
    print(f"{'config':<17}{'W':>3}{'T/GPU':>6}{HEAD}{'TF/s':>6} |{'Flash':>7}{'MegTE':>7}{'MegCUT':>7}{'Faster':>7}")
    rows = []
    for name, config, T in table_rows():
        if config.num_experts % world:
            continue
        p, pub = predict(config, T, world, gpu, links, knobs), published(config, T) if world == 8 else {}
        print(f"{name:<17}{world:>3}{T:>6}{cells(p)}{p['tflops']:>6.0f} |"
              + "".join(fmt(pub.get(c), 7, ".1f") for c in COLUMNS))
        rows.append({"name": name, "dtype": config.dtype, "experts": config.num_experts,
                     "tokens_per_gpu": T, "world": world, **p, "published": pub})
    if world != 8:          # every published figure is of 8 GPUs
        return rows
    print(f"* independent bf16 run (FlashMoE issue #21), EP8, 8K tokens/GPU, E 32, a 78-SM GPU (likely "
          f"H20): FlashMoE {INDEPENDENT_BF16['FlashMoE']} ms, Megatron-TE {INDEPENDENT_BF16['Meg-TE']}, "
          f"SGLang {INDEPENDENT_BF16['SGLang']:.2f}; the Megatron and FasterMoE columns are the paper's fp16 runs.")
    dsv3 = {r["tokens_per_gpu"]: r for r in rows if r["name"] == "dsv3 groups 4/8"}
    big, small = dsv3[4096], dsv3[128]
    print(f"DeepEP V1 normal kernels, EP8 NVLink on H800 (~160 GB/s), 4096 tokens, FP8 dispatch: dispatch "
          f"{DEEPEP_NORMAL_GBPS[0]} GB/s, combine {DEEPEP_NORMAL_GBPS[1]} GB/s. Model, dsv3 groups 4/8, bf16: "
          f"dispatch {big['traffic']['dispatch_gbps']:.0f} GB/s, {big['traffic']['remote_rows_per_token']:.2f} "
          "remote rows per token.")
    print(f"DeepEP V1 low-latency kernels, EP8, H800 + CX7, 128 tokens, FP8 dispatch: dispatch {DEEPEP_LL_US[0]} "
          f"us, combine {DEEPEP_LL_US[1]} us. Model, bf16: dispatch {small['phases_ms']['dispatch'] * 1e3:.0f} us "
          f"(+ {small['phases_ms']['sync'] * 1e3:.0f} us of signals); result rows' link time "
          f"{small['traffic']['return_link_ms'] * 1e3:.0f} us, inside the expert phase.")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=8, help="ranks, one per GPU (default 8)")
    ap.add_argument("--gpu", choices=GPUS, default="h100", help="the W GPUs (--virtual: one H200)")
    ap.add_argument("--virtual", action="store_true", help="W virtual ranks on one H200 (sweep_ep.py)")
    ap.add_argument("--measured", nargs="+", help="bench JSON files to print beside the predictions")
    ap.add_argument("--trace", help="Perfetto JSON of flashmoe.trace: take the tile times from it")
    ap.add_argument("--trace-layer", choices=list(layers.LAYERS), help="layer the trace ran")
    ap.add_argument("--trace-tokens", type=int, help="tokens the trace ran (default: from its name)")
    ap.add_argument("--json", help="write the predictions here")
    for f in dataclasses.fields(Links):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--skew", type=float, default=1.0, help="slowest rank's load / mean load")
    ap.add_argument("--gemm-eff", type=float, help="tile efficiency instead of the fit")
    ap.add_argument("--fixed-ms", type=float, help="fixed cost per forward instead of the fit")
    args = ap.parse_args(argv)
    links = Links(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Links)})
    gpu = GPUS["h200" if args.virtual else args.gpu]
    trace, eff = trace_efficiency(args.trace, args.trace_layer, args.trace_tokens) if args.trace else (None, None)
    eff = (args.gemm_eff,) * 2 if args.gemm_eff else eff
    knobs = calibrate(links, eff)
    knobs = replace(knobs, skew=args.skew, fixed_ms=knobs.fixed_ms if args.fixed_ms is None else args.fixed_ms)
    measured = load_measured(args.measured or [RESULTS / f for f in MEASURED_DEFAULT if (RESULTS / f).exists()])
    lines = assumptions(gpu, links, knobs, trace, args.virtual)
    out = {"mode": "virtual" if args.virtual else "gpus", "gpu": dataclasses.asdict(gpu),
           "links": dataclasses.asdict(links), "knobs": dataclasses.asdict(knobs), "trace": trace,
           "assumptions": lines, "rows": []}
    print("assumptions:\n" + "\n".join(f"  - {line}" for line in lines))

    if args.virtual:
        keys = {(n, t // w, w, True) for n in layers.LAYERS for t in (4096, 16384) for w in (1, 2, 4, 8)}
    else:
        out["rows"], keys = gpu_section(args.world, gpu, links, knobs), set()
    keys |= set(measured)
    print("\ncheck: predicted beside measured (virt: W virtual ranks on one H200; gpus: W GPUs)")
    out["check"] = check_section(keys, measured, gpu, links, knobs)
    if not any(w > 1 for _, _, w, _ in measured):
        print("the check against a measured run with W > 1 (virtual ranks or GPUs) waits for a trace or a "
              "bench/sweep_ep.py result (--measured bench/results/ep_<device>_<date>.json); none was given.")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
