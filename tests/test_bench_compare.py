"""bench/compare.py: rows of two runs matched and divided, regressions found, traces set side by side.

Checked on synthetic rows and traces built here, and on two kits' result files committed from an
H200, whose ratios are recomputed from the files themselves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:          # bench/ is a directory of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import compare  # noqa: E402
from flashmoe import trace as tr  # noqa: E402
from flashmoe.host.abi import TaskKind as K  # noqa: E402

RESULTS = REPO / "bench" / "results"


def row(provider="flashmoe", ms=1.0, **kw):
    return {"config": "mixtral-8x7b", "tokens": 4096, "provider": provider, "status": "ok", "median_ms": ms,
            "correct": True, "pct_matmul": 50.0} | kw


def kit(path: Path, cases: dict[str, list[dict]]) -> Path:
    """A bringup.jsonl whose stages carried these rows, between a start and a summary line."""
    lines = [{"type": "start", "commit": "abc"}]
    lines += [{"type": "case", "stage": stage, "case": "python bench/...", "passed": True, "rows": rows}
              for stage, rows in cases.items()]
    lines.append({"type": "summary", "commit": "abc"})
    path.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    return path


def test_rows_are_keyed_by_stage_and_what_was_measured_and_a_later_file_wins(tmp_path):
    first = kit(tmp_path / "a.jsonl", {"bench_grid": [row(ms=2.0), row("torch_loop", 3.0)],
                                       "trace": [row(ms=9.0)]})
    second = kit(tmp_path / "b.jsonl", {"bench_grid": [row(ms=1.5)]})
    rows = compare.read_rows([first, second])
    assert rows[("bench_grid", "mixtral-8x7b", 4096, None, None, "flashmoe")]["median_ms"] == 1.5
    assert rows[("trace", "mixtral-8x7b", 4096, None, None, "flashmoe")]["median_ms"] == 9.0
    assert rows[("bench_grid", "mixtral-8x7b", 4096, None, None, "torch_loop")]["median_ms"] == 3.0
    ep = tmp_path / "ep_nvidia-h200_1.json"
    ep.write_text(json.dumps({"rows": [row(world=8, routing="skewed"), row(world=8, routing="uniform", ms=2.0)]}))
    rows = compare.read_rows([ep])
    assert rows[("ep", "mixtral-8x7b", 4096, 8, "uniform", "flashmoe")]["median_ms"] == 2.0
    assert len(rows) == 2


def test_ratios_regressions_and_the_control():
    key = ("bench_grid", "mixtral-8x7b", 4096, None, None)
    old = {key + ("flashmoe",): row(ms=4.0, tile="128x128"), key + ("torch_loop",): row("torch_loop", 2.0),
           key + ("hf_grouped_mm",): row("hf_grouped_mm", 2.0),
           ("bench_grid", "qwen3", 128, None, None, "flashmoe"): row(ms=1.0),
           ("bench_grid", "qwen3", 128, None, None, "torch_loop"): row("torch_loop", ms=1.0, status="error: OOM")}
    new = {key + ("flashmoe",): row(ms=3.0, tile="128x256"), key + ("torch_loop",): row("torch_loop", 2.2),
           key + ("hf_grouped_mm",): row("hf_grouped_mm", 1.8),
           ("bench_grid", "qwen3", 128, None, None, "flashmoe"): row(ms=0.5, correct=False),
           ("bench_grid", "qwen3", 128, None, None, "torch_loop"): row("torch_loop", ms=1.0)}
    lines, regressions = compare.compare_rows(old, new)
    by = {(ln["config"], ln["provider"]): ln for ln in lines}
    assert by[("mixtral-8x7b", "flashmoe")]["ratio"] == pytest.approx(0.75)
    assert by[("mixtral-8x7b", "flashmoe")]["note"] == "tile 128x128 -> 128x256"
    # A wrong result is no time: no ratio, and a regression named by its row.
    assert by[("qwen3", "flashmoe")]["ratio"] is None
    assert regressions == ["bench_grid qwen3 128 flashmoe: WRONG"]
    # A row that failed before and passes now is no regression, nor is it timed against the failure.
    assert by[("qwen3", "torch_loop")]["ratio"] is None and by[("qwen3", "torch_loop")]["note"] == ""
    (line,) = compare.summary(lines)
    assert line == ("bench_grid: new/old time, geometric mean: flashmoe 0.750x (0.750 to 0.750) over 1 rows; "
                    "baselines (control) 0.995x (0.900 to 1.100) over 2 rows")


def test_two_committed_h200_kits_compare_row_by_row(capsys):
    """The kit at 6354d32 against the kit at 446305b: the bench stage's rows, each the ratio of
    the two files' medians."""
    old, new = RESULTS / "bringup-h200-20261130-005247.jsonl", RESULTS / "bringup-h200-20261130-162846.jsonl"
    assert compare.main(["--old", str(old), "--new", str(new)]) == 0
    out = capsys.readouterr().out
    rows = {name: compare.read_rows([name]) for name in (old, new)}
    key = ("bench", "mixtral-8x7b", 4096, None, None, "flashmoe")
    ratio = rows[new][key]["median_ms"] / rows[old][key]["median_ms"]
    assert 0.5 < ratio < 0.8            # the 128 x 256 tile and the pipeline came between them
    line = next(ln for ln in out.splitlines() if ln.split()[:4] == ["bench", "mixtral-8x7b", "4096", "-"]
                and "flashmoe" in ln.split())
    assert f"{ratio:.3f}" in line.split() and "64x128" not in line
    assert "bench: new/old time, geometric mean: flashmoe" in out and "over 4 rows" in out


def write_trace(path: Path, gemm0_ns: int, ranks: int = 1) -> Path:
    """Two blocks: a route record each, then four GEMM0 tiles of ``gemm0_ns`` and a combine; with
    ``ranks`` = 2 each block is a rank's (its PREFIX record says so)."""
    recs = []
    for block in range(2):
        rank = block % ranks
        recs.append((0, 1000, 0, block, K.ROUTE, rank, block, 0, 64))
        if ranks > 1:
            recs.append((1000, 1000, 0, block, K.PREFIX, rank, block, 0, 0))
        t = 1000
        for i in range(4):
            recs.append((t, t + gemm0_ns, i, block, K.GEMM0, rank, block, 0, 0))
            t += gemm0_ns
        recs.append((t, t + 500, 0, block, K.COMBINE, rank, block, 0, 0))
    records = np.array(recs, dtype=tr.RECORD_DTYPE)
    counts = np.bincount(records["block"], minlength=2).astype(np.uint32)
    tr.to_chrome_json(tr.Trace(records=records, counts=counts, capacity=8), path)
    return path


def test_traces_pair_by_layer_and_tokens_and_show_each_kind_old_beside_new(tmp_path, capsys):
    old = write_trace(tmp_path / "layer_h200_1_mixtral-8x7b_4096.trace.json", 10_000)
    new = write_trace(tmp_path / "layer_h200_2_mixtral-8x7b_4096.trace.json", 5_000)
    other = write_trace(tmp_path / "layer_h200_2_qwen3-30b-a3b_4096.trace.json", 5_000)
    assert compare.main(["--old", str(old), "--new", str(new), str(other)]) == 0
    out = capsys.readouterr().out
    assert "mixtral-8x7b 4096 tokens: span 41.5 -> 21.5 us (0.518x)" in out
    assert "traces in one run only: 1\n  new only: qwen3-30b-a3b 4096 tokens\n" in out
    assert "qwen3-30b-a3b 4096 tokens: span" not in out
    gemm0 = next(ln for ln in out.splitlines() if ln.split()[:1] == ["GEMM0"])
    assert gemm0.split() == ["GEMM0", "8", "->", "8", "10.00", "->", "5.00", "0.500x"]
    route = next(ln for ln in out.splitlines() if ln.split()[:1] == ["ROUTE"])
    assert route.split()[-1] == "1.000x"
    assert "old: span 41.5 us x 2 blocks" in out and "new: span 21.5 us x 2 blocks" in out
    assert "old: routing 1.0 us: 2 chunks on 2 blocks" in out


def test_a_variants_trace_pairs_with_its_own_or_one_a_side_with_the_shipped_kernels(tmp_path, capsys):
    """bench_layer.py names a variant's trace after it: across runs it pairs with the same
    variant's, never the shipped kernel's; a variant and the shipped kernel of one run, one a
    side, pair whatever their names (what the variant's choice costs)."""
    run = tmp_path / "layer_h200_1_mixtral-8x7b_4096"
    shipped = write_trace(Path(f"{run}.trace.json"), 10_000)
    rows = write_trace(Path(f"{run}_flashmoe_rowtiles.trace.json"), 12_000)
    later = write_trace(tmp_path / "layer_h200_2_mixtral-8x7b_4096_flashmoe_rowtiles.trace.json.gz", 6_000)
    pairs, alone = compare.trace_pairs([shipped, rows], [later])
    assert [name for name, *_ in pairs] == ["mixtral-8x7b 4096 tokens flashmoe_rowtiles"]
    assert pairs[0][1:] == (rows, later) and alone == ["old only: mixtral-8x7b 4096 tokens"]
    assert compare.main(["--old", str(shipped), "--new", str(rows)]) == 0
    out = capsys.readouterr().out
    assert "mixtral-8x7b 4096 tokens -> mixtral-8x7b 4096 tokens flashmoe_rowtiles: span 41.5 -> 49.5 us" in out
    gemm0 = next(ln for ln in out.splitlines() if ln.split()[:1] == ["GEMM0"])
    assert gemm0.split() == ["GEMM0", "8", "->", "8", "10.00", "->", "12.00", "1.200x"]


def test_traces_of_w_ranks_pair_by_w_and_show_each_ranks_course(tmp_path, capsys):
    """sweep_ep.py names a trace after its ranks: across runs W = 2 pairs with W = 2, and W = 2
    against W = 1 of one run, one a side, prints the rank split of the side that has ranks."""
    run = tmp_path / "ep_h200_1_qwen3-30b-a3b_4096"
    one = write_trace(Path(f"{run}_w1.trace.json"), 10_000)
    two = write_trace(Path(f"{run}_w2.trace.json"), 11_000, ranks=2)
    later = write_trace(tmp_path / "ep_h200_2_qwen3-30b-a3b_4096_w2.trace.json.gz", 9_000, ranks=2)
    pairs, alone = compare.trace_pairs([one, two], [later])
    assert [name for name, *_ in pairs] == ["qwen3-30b-a3b 4096 tokens W=2"]
    assert pairs[0][1:] == (two, later) and alone == ["old only: qwen3-30b-a3b 4096 tokens W=1"]
    assert compare.main(["--old", str(one), "--new", str(two)]) == 0
    out = capsys.readouterr().out
    assert "qwen3-30b-a3b 4096 tokens W=1 -> qwen3-30b-a3b 4096 tokens W=2: span 41.5 -> 45.5 us" in out
    assert "old: 2 ranks" not in out
    assert ("new: 2 ranks of 1 block, us over ranks: routed 1.0-1.0, first tile 1.0-1.0, last tile 45.0-45.0, "
            "combined 45.5-45.5; last tile: rank 0; 0.0% of 8 tiles run by another rank's blocks") in out


def test_exit_codes_say_a_regression_and_an_empty_comparison(tmp_path, capsys):
    old = kit(tmp_path / "old.jsonl", {"bench": [row()]})
    new = kit(tmp_path / "new.jsonl", {"bench": [row(status="error: KernelUnavailable")]})
    assert compare.main(["--old", str(old), "--new", str(new)]) == 1
    out = capsys.readouterr().out
    assert ("rows that passed before and fail now: 1\n  bench mixtral-8x7b 4096 flashmoe: "
            "status error: KernelUnavailable") in out
    layer = tmp_path / "layer_nvidia-h200_1.json"
    layer.write_text(json.dumps({"rows": [row()]}))
    assert compare.main(["--old", str(old), "--new", str(layer)]) == 2
    out = capsys.readouterr().out
    assert "nothing to compare" in out and "old only: bench mixtral-8x7b 4096 flashmoe" in out
