"""bench/model_ep.py: the expert-parallel scale model's arithmetic and its command line (CPU, fast).

The model predicts; nothing here measures. These tests hold it to what it claims: no traffic at
W = 1, the dispatch bytes it predicts against a count over routings drawn with the reference
router, monotone in link bandwidth, the compute-bound limit FLOPs / rate, the router and the
combine against the committed kernel traces, its W = 1 rows against the committed measurements,
and a CLI that prints its assumptions and the published numbers, writes JSON and takes tile times
from a trace.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:          # bench/ is a directory of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import layers, metrics, model_ep  # noqa: E402
from flashmoe import reference  # noqa: E402
from flashmoe.host.plan import ENTRY_BYTES  # noqa: E402

PAPER = layers.LAYERS["flashmoe-paper"][0]
H100 = model_ep.GPUS["h100"]
KNOBS = model_ep.Knobs((0.3, 0.3), 0.2)


def test_one_rank_has_no_communication():
    for config in (PAPER, model_ep.DSV3):
        for virtual in (False, True):
            p = model_ep.predict(config, 4096, 1, H100, model_ep.Links(), KNOBS, virtual)
            assert p["phases_ms"]["dispatch"] == 0
            assert p["traffic"]["dispatch_bytes"] == 0 and p["traffic"]["return_bytes"] == 0
            assert p["traffic"]["return_link_ms"] == 0
    # ... while eight ranks do communicate.
    p = model_ep.predict(PAPER, 4096, 8, H100, model_ep.Links(), KNOBS)
    assert p["phases_ms"]["dispatch"] > 0 and p["traffic"]["return_bytes"] > 0


def _counted_dispatch_bytes(config, world: int, tokens: int) -> float:
    """Bytes one rank's tokens send, counted over a routing drawn by the reference router with
    iid N(0, 1) logits (router = identity on E-wide inputs), each token's home rank uniform."""
    E = config.num_experts
    gen = torch.Generator().manual_seed(1)
    routed = config.replace(hidden_size=E, intermediate_size=16)
    weights = reference.MoEWeights(router_weight=torch.eye(E), gate_up_proj=torch.empty(0),
                                   down_proj=torch.empty(0),
                                   selection_bias=torch.zeros(E) if config.selection_bias else None)
    ids = reference.route(torch.randn(tokens * world, E, generator=gen), weights, routed).ids
    owner = ids // (E // world)
    home = torch.arange(tokens * world)[:, None] % world
    hit = torch.zeros(tokens * world, world, dtype=torch.bool).scatter_(1, owner, True)
    hit.scatter_(1, home, False)
    rows = hit.sum().item() / world                       # per rank
    entries = (owner != home).sum().item() / world
    return rows * config.hidden_size * 2 + entries * ENTRY_BYTES


@pytest.mark.parametrize("config, world", [
    (PAPER, 8),                                                   # E 32, k 2
    (PAPER.replace(num_experts=128), 4),
    (layers.LAYERS["qwen3-30b-a3b"][0], 8),                       # E 128, k 8
    (model_ep.DSV3, 8),                                           # group-limited: 4 of 8 groups
    (model_ep.DSV3.replace(n_group=16, topk_group=3), 8),         # two groups per rank
    (model_ep.DSV3.replace(n_group=4, topk_group=2), 16),         # a group spans four ranks
])
def test_dispatch_bytes_match_a_count_over_uniform_routing(config, world):
    tokens = 1024
    p = model_ep.predict(config, tokens, world, H100, model_ep.Links(), KNOBS)
    counted = _counted_dispatch_bytes(config, world, tokens)
    assert p["traffic"]["dispatch_bytes"] == pytest.approx(counted, rel=0.03)


def test_group_limit_cuts_traffic_and_one_rank_is_always_hit():
    assert model_ep.ranks_hit(PAPER, 1) == pytest.approx(1.0)
    assert model_ep.ranks_hit(model_ep.DSV3.replace(n_group=8, topk_group=8), 1) == pytest.approx(1.0)
    plain = model_ep.ranks_hit(model_ep.DSV3.replace(n_group=1, topk_group=1), 8)
    grouped = model_ep.ranks_hit(model_ep.DSV3, 8)
    assert grouped < plain <= 8
    assert 3.5 < grouped <= 4            # a group is one rank's experts; 4 groups eligible


@pytest.mark.parametrize("name, config, tokens, world", [
    ("paper fp32", PAPER.replace(dtype="float32"), 8192, 8),
    ("dsv3 prefill", model_ep.DSV3, 4096, 8),
    ("dsv3 decode", model_ep.DSV3, 128, 8),
    ("two nodes", PAPER, 8192, 16),
])
def test_more_link_bandwidth_is_never_slower(name, config, tokens, world):
    totals = []
    for gbps in (25, 50, 100, 200, 450, 900, 1800):
        links = model_ep.Links(nvlink_gbps=gbps, ib_gbps=gbps / 9)
        totals.append(model_ep.predict(config, tokens, world, H100, links, KNOBS)["total_ms"])
    assert all(b <= a + 1e-12 for a, b in zip(totals, totals[1:])), (name, totals)
    assert totals[-1] < totals[0], (name, totals)          # the links matter at all


@pytest.mark.parametrize("dtype, world", [("bfloat16", 1), ("bfloat16", 8), ("float32", 8)])
def test_compute_bound_rows_approach_flops_over_rate(dtype, world):
    """With links fast enough, the signals and the dispatch (which do not overlap the GEMMs) vanish
    beside the GEMMs; the router and the combine keep their own costs (held to the traces below)."""
    config, tokens, eff = PAPER.replace(dtype=dtype), 65536, 0.5
    knobs = model_ep.Knobs((eff, eff), 0.0)
    links = model_ep.Links(nvlink_gbps=1e6, sm_store_gbps=1e6)
    p = model_ep.predict(config, tokens, world, H100, links, knobs)
    rate = H100.matmul_tflops * 1e12 * eff / (2 if dtype == "float32" else 1)
    expert_flops = metrics.flops(config, tokens) - 2 * tokens * config.hidden_size * config.num_experts
    ideal_ms = expert_flops / rate * 1e3
    assert p["phases_ms"]["experts"] == pytest.approx(ideal_ms, rel=0.03)
    assert ideal_ms <= p["total_ms"] - p["phases_ms"]["route"] - p["phases_ms"]["combine"] <= 1.03 * ideal_ms


def test_calibration_reproduces_the_fitted_rows():
    knobs = model_ep.calibrate(model_ep.Links())
    assert 0.05 < knobs.eff[0] < 1 and knobs.fixed_ms >= 0
    for tokens, measured in model_ep.FIT_ROWS:
        p = model_ep.predict(PAPER, tokens, 1, model_ep.GPUS["h200"], model_ep.Links(), knobs, virtual=True)
        assert p["total_ms"] == pytest.approx(measured, rel=0.01)


def test_cli_prints_assumptions_and_the_published_rows(capsys):
    assert model_ep.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("assumptions:")
    for needed in ("UNVALIDATED", "NVLink 450 GB/s", "InfiniBand 50 GB/s", "TF32 at half",
                   "fixed cost", "uniform routing", "DeepEP", "issue #21"):
        assert needed in out, needed
    row = next(line for line in out.splitlines() if line.startswith("paper E32 fp32") and " 8192 " in line)
    assert row.split()[-4:] == ["3.7", "-", "-", "-"]
    bf16 = next(line for line in out.splitlines() if line.startswith("paper E32 bf16") and " 8192 " in line)
    assert bf16.split()[-4:] == ["3.93*", "18.9", "18.9", "21.3"]
    # By default the check prints the committed measurements: W = 1 and W virtual ranks.
    assert "W virtual ranks over W = 1" in out and "waits for a trace" not in out


def test_check_without_a_w_above_one_says_what_it_waits_for(capsys):
    assert model_ep.main(["--measured", str(model_ep.RESULTS / model_ep.MEASURED_DEFAULT[0])]) == 0
    out = capsys.readouterr().out
    assert "waits for a trace or a bench/sweep_ep.py result" in out and "W virtual ranks over" not in out


TRACES = sorted(model_ep.RESULTS.glob("layer_nvidia-h200_20261130-164405_*.trace.json.gz"))


def _span_us(events, name):
    rec = [e for e in events if e.get("ph") == "X" and e.get("name") == name]
    return max(e["ts"] + e["dur"] for e in rec) - min(e["ts"] for e in rec)


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name.split("164405_")[1].split(".")[0])
def test_router_and_combine_against_the_kernel_traces(path):
    """The router's split and fitted rates give each committed H200 trace's routing span within
    11% (as the assumptions say), and the combine's bandwidth share its combine span within 10%
    in prefill (a decode combine is a few microseconds)."""
    layer, tokens = path.name.split("164405_")[1].split(".")[0].rsplit("_", 1)
    config, tokens = layers.LAYERS[layer][0], int(tokens)
    events = model_ep.trace_events(path)
    p = model_ep.predict(config, tokens, 1, model_ep.GPUS["h200"], model_ep.Links(), KNOBS, virtual=True)
    assert p["phases_ms"]["route"] * 1e3 == pytest.approx(_span_us(events, "ROUTE"), rel=0.11)
    if tokens >= 4096:
        assert p["phases_ms"]["combine"] * 1e3 == pytest.approx(_span_us(events, "COMBINE"), rel=0.10)


def test_traces_are_committed():
    assert len(TRACES) == 4     # Qwen3 and Mixtral at 128 and 4096 tokens: what the router was fitted to


def test_tile_follows_the_kernels_choice():
    for tokens, width in ((2048, 128), (16384, 256)):    # the paper layer's measured tiles (bench_grid log)
        p = model_ep.predict(PAPER, tokens, 1, model_ep.GPUS["h200"], model_ep.Links(), KNOBS, virtual=True)
        assert (p["tiles"]["block_m"], p["tiles"]["block_n"]) == (128, width)


def test_one_gpu_rows_against_the_committed_measurements():
    """The default fit against every committed W = 1 row of its commit: within 0.7x to 1.2x (the
    single tile efficiency is the paper layer's; Mixtral's longer tiles run slower than it)."""
    knobs = model_ep.calibrate(model_ep.Links())
    measured = model_ep.load_measured([model_ep.RESULTS / f for f in model_ep.MEASURED_DEFAULT])
    ones = {key: m for key, m in measured.items() if key[2] == 1}
    assert len(ones) >= 10
    for (name, tokens, _, _), m in ones.items():
        p = model_ep.predict(layers.LAYERS[name][0], tokens, 1, model_ep.GPUS["h200"], model_ep.Links(), knobs, True)
        assert 0.7 <= p["total_ms"] / m <= 1.2, (name, tokens, p["total_ms"], m)


def test_json_output_parses(tmp_path):
    path = tmp_path / "pred.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "model_ep.py"), "--json", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    data = json.loads(path.read_text())
    assert data["mode"] == "gpus" and any("UNVALIDATED" in a for a in data["assumptions"])
    rows = {(r["name"], r["tokens_per_gpu"]): r for r in data["rows"]}
    assert len(rows) == len(model_ep.table_rows())
    assert rows[("paper E32 fp32", 8192)]["published"] == {"FlashMoE": 3.7}
    assert all(r["total_ms"] > 0 for r in data["rows"])
    assert data["check"] and all(r["measured_ms"] for r in data["check"])


def test_trace_sets_the_tile_times(tmp_path, capsys):
    events = ([{"ph": "X", "name": "GEMM0", "dur": d, "ts": 0, "pid": 0, "tid": 1} for d in (70, 80, 95)]
              + [{"ph": "X", "name": "GEMM1", "dur": d, "ts": 0, "pid": 0, "tid": 2} for d in (40, 41)]
              + [{"ph": "X", "name": "ROUTE", "dur": 5, "ts": 0, "pid": 0, "tid": 3},
                 {"ph": "M", "name": "thread_name", "pid": 0, "tid": 1}])
    trace = tmp_path / "layer_h200_flashmoe-paper_16384.trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    plain, traced = tmp_path / "plain.json", tmp_path / "traced.json"
    assert model_ep.main(["--json", str(plain)]) == 0
    assert model_ep.main(["--trace", str(trace), "--json", str(traced)]) == 0
    assert "median GEMM0 80.0 us, GEMM1 40.5 us" in capsys.readouterr().out

    def tiles(path):     # the traced layer and tile (bf16, E 32, 128 rows) at 16K tokens per GPU
        row = next(r for r in json.loads(path.read_text())["rows"]
                   if r["name"] == "paper E32 bf16" and r["tokens_per_gpu"] == 16384)
        return row["tiles"]["gemm0_us"], row["tiles"]["gemm1_us"]
    assert tiles(traced) == pytest.approx((80.0, 40.5))
    assert tiles(plain) != pytest.approx((80.0, 40.5), rel=0.05)


def test_virtual_mode_prints_measured_beside_predicted(tmp_path, capsys):
    sweep = {"meta": {"dry_run": False}, "rows": [
        {"config": "flashmoe-paper", "tokens": 4096, "world": 4, "provider": "flashmoe",
         "status": "ok", "median_ms": 1.234},
        {"config": "flashmoe-paper", "tokens": 4096, "world": 4, "provider": "bulk_sync",
         "status": "ok", "median_ms": 9.0}]}
    path = tmp_path / "ep_h200.json"
    path.write_text(json.dumps(sweep))
    assert model_ep.main(["--virtual", "--measured", str(path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines()
               if line.startswith("flashmoe-paper") and line.split()[1:5] == ["virt", "4", "4096", "1024"])
    assert "1.234" in row and "9.000" not in out
    assert "waits for a trace" not in out
