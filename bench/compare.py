"""Two runs side by side: what a change did to the benchmark rows and kernel traces.

    python bench/compare.py --old bench/results/bringup-h200-20261130-16*.jsonl \\
        bench/results/layer_nvidia-h200_20261130-164405_*.trace.json.gz \\
        --new KIT/bringup.jsonl KIT/*.trace.json

Rows come from a kit's ``bringup.jsonl`` (those its benchmark stages carried, keyed by stage) or
from result files (``layer_*.json``, ``ep_*.json``, keyed by file kind), so a kit compares with a
kit and a result file with one of its kind. They are matched by stage, layer, tokens, world,
routing and provider; a later file's row replaces an earlier one's. Each is printed with its new
median time over the old. The baselines (the torch loop, transformers' ``grouped_mm``,
bulk-synchronous expert parallelism) did not change between the runs: their ratio is how far the
machine, its clocks and the timing moved, the noise a flashmoe ratio has to clear. Traces pair
by layer, tokens, kernel variant and ranks (the names ``bench_layer.py --trace`` and ``sweep_ep.py
--trace`` give them), or, one a side, whatever their names (a variant against the shipped kernel of
the same run, W = 8 against W = 1): each kind's mean record, the phase shares, the routing split
and the rank split, old beside new. Exits 1 when a row that passed before fails or is wrong now,
2 when nothing is in both runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a script: the repository root holds bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import print_table  # noqa: E402
from flashmoe import trace as tr  # noqa: E402
from flashmoe.trace_ranks import format_ranks, rank_split  # noqa: E402
from flashmoe.trace_routing import format_routing, routing_split  # noqa: E402

KEY = ("stage", "config", "tokens", "world", "routing", "provider")
# <stem>_<layer>_<tokens>[_<variant>][_w<W>].trace.json[.gz]: a kernel variant's (bench/providers.py)
# named, as is the number of ranks of a sweep_ep.py trace.
TRACE_NAME = re.compile(r"_([^_]+)_(\d+)(_flashmoe_[a-z0-9]+)?(_w\d+)?\.trace\.json(\.gz)?$")


def read_rows(paths) -> dict[tuple, dict]:
    """Every benchmark row of ``paths`` by its key (``KEY``); a later file's row wins."""
    rows = {}
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            found = [(c["stage"], r) for c in lines if c.get("type") == "case" for r in c.get("rows") or []]
        else:
            found = [(path.name.split("_", 1)[0], r) for r in json.loads(path.read_text()).get("rows", [])]
        for stage, row in found:
            row = {**row, "stage": stage}
            rows[tuple(row.get(k) for k in KEY)] = row
    return rows


def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("correct") is not False


def compare_rows(old: dict[tuple, dict], new: dict[tuple, dict]) -> tuple[list[dict], list[str]]:
    """One line per key in both runs (``ratio``: new median over old), and the regressions: rows
    that passed in the old run and failed or were wrong in the new."""
    lines, regressions = [], []
    for key in sorted(old.keys() & new.keys(), key=_order):
        a, b = old[key], new[key]
        line = dict(zip(KEY, key)) | {"old_ms": a.get("median_ms"), "new_ms": b.get("median_ms"),
                                      "old_matmul": a.get("pct_matmul"), "new_matmul": b.get("pct_matmul")}
        timed = _ok(a) and _ok(b) and a.get("median_ms") and b.get("median_ms")
        line["ratio"] = b["median_ms"] / a["median_ms"] if timed else None
        tiles = (a.get("tile"), b.get("tile"))   # rows from before the tile column have none
        notes = [f"tile {tiles[0]} -> {tiles[1]}"] if None not in tiles and tiles[0] != tiles[1] else []
        if _ok(a) and not _ok(b):
            why = "WRONG" if b.get("correct") is False else f"status {b.get('status')}"
            notes.append(f"REGRESSION: {why}")
            regressions.append(f"{_name(line)}: {why}")
        line["note"] = "; ".join(notes)
        lines.append(line)
    return lines, regressions


def _order(key: tuple) -> tuple:
    """Keys in a table's order: token counts and worlds as numbers, a missing field last."""
    return tuple((1, 0.0, "") if v is None else (0, float(v), "") if isinstance(v, (int, float)) else (0, 0.0, str(v))
                 for v in key)


def _name(line: dict) -> str:
    return " ".join(str(line[k]) for k in KEY if line.get(k) is not None)


def is_flashmoe(provider: str) -> bool:
    return str(provider).startswith("flashmoe")


def summary(lines: list[dict]) -> list[str]:
    """Per stage, the geometric mean and the range of the ratios of flashmoe's rows and, as the
    control, of the baselines'."""
    out = []
    for stage in sorted({ln["stage"] for ln in lines}):
        cells = []
        for label, mine in (("flashmoe", True), ("baselines (control)", False)):
            r = [ln["ratio"] for ln in lines
                 if ln["stage"] == stage and ln["ratio"] and is_flashmoe(ln["provider"]) == mine]
            if r:
                cells.append(f"{label} {math.exp(sum(map(math.log, r)) / len(r)):.3f}x "
                             f"({min(r):.3f} to {max(r):.3f}) over {len(r)} rows")
        out.append(f"{stage}: new/old time, geometric mean: " + ("; ".join(cells) or "no timed rows in both"))
    return out


def trace_pairs(old_paths, new_paths) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(layer, tokens, variant and ranks; old trace, new trace) for each traced in both, and the ones
    traced in one run only. One trace a side pairs whatever its names."""
    def by_name(paths):
        return {f"{m[1]} {m[2]} tokens" + (f" {m[3][1:]}" if m[3] else "") + (f" W={m[4][2:]}" if m[4] else ""): Path(p)
                for p in paths if (m := TRACE_NAME.search(str(p)))}
    old, new = by_name(old_paths), by_name(new_paths)
    if len(old) == len(new) == 1 and old.keys() != new.keys():
        (a, pa), (b, pb) = *old.items(), *new.items()
        return [(f"{a} -> {b}", pa, pb)], []
    alone = [f"{side} only: {name}" for side, a, b in (("old", old, new), ("new", new, old))
             for name in sorted(a.keys() - b.keys())]
    return [(name, old[name], new[name]) for name in sorted(old.keys() & new.keys())], alone


def compare_traces(old: tr.Trace, new: tr.Trace) -> list[str]:
    """The span, each kind's count and mean record, the phase shares, the routing split and, of a
    launch of several ranks, the rank split."""
    uo, un = tr.utilisation(old), tr.utilisation(new)
    lines = [f"span {uo['span_ns'] / 1e3:.1f} -> {un['span_ns'] / 1e3:.1f} us"
             + (f" ({un['span_ns'] / uo['span_ns']:.3f}x)" if uo["span_ns"] else ""),
             f"  {'kind':<10}{'count':>13}{'mean us':>20}{'new/old':>9}"]
    for kind in [k for k in uo["kind_ns"] if k in un["kind_ns"]] + [k for k in un["kind_ns"] if k not in uo["kind_ns"]]:
        mean = [u["kind_ns"][kind] / u["kind_count"][kind] / 1e3 if kind in u["kind_ns"] else None for u in (uo, un)]
        count = [str(u["kind_count"].get(kind, "-")) for u in (uo, un)]
        means = " -> ".join("-" if m is None else f"{m:.2f}" for m in mean)
        ratio = f"{mean[1] / mean[0]:.3f}x" if None not in mean and mean[0] else "-"
        lines.append(f"  {kind:<10}{' -> '.join(count):>13}{means:>20}{ratio:>9}")
    for label, t in (("old", old), ("new", new)):
        lines.append(f"  {label}: {tr.format_phase_table(tr.phase_table(t))}")
    for label, t in (("old", old), ("new", new)):
        lines.append(f"  {label}: {format_routing(routing_split(t))}")
    for label, t in (("old", old), ("new", new)):
        if (ranks := rank_split(t)) is not None:
            lines.append(f"  {label}: {format_ranks(ranks)}")
    return lines


COLUMNS = [("stage", "stage", ""), ("config", "layer", ""), ("tokens", "tokens", ""), ("world", "W", ""),
           ("routing", "routing", ""), ("provider", "provider", ""), ("old_ms", "old ms", ".4g"),
           ("new_ms", "new ms", ".4g"), ("ratio", "new/old", ".3f"), ("old_matmul", "%matmul old", ".1f"),
           ("new_matmul", "new", ".1f"), ("note", "note", "")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/compare.py", description=__doc__.split("\n")[0])
    ap.add_argument("--old", nargs="+", required=True, help="the earlier run's bringup.jsonl / result files / traces")
    ap.add_argument("--new", nargs="+", required=True, help="the later run's, of the same kinds")
    args = ap.parse_args(argv)
    split = [([p for p in ps if not TRACE_NAME.search(p)], [p for p in ps if TRACE_NAME.search(p)])
             for ps in (args.old, args.new)]
    (old_rows, old_traces), (new_rows, new_traces) = split
    old, new = read_rows(old_rows), read_rows(new_rows)
    lines, regressions = compare_rows(old, new)
    if lines:
        print_table(lines, COLUMNS)
        print("\n".join(summary(lines)))
    unmatched = [f"{side} only: {_name(dict(zip(KEY, k)))}" for side, a, b in (("old", old, new), ("new", new, old))
                 for k in sorted(a.keys() - b.keys(), key=_order)]
    if unmatched:
        print(f"rows in one run only: {len(unmatched)}\n  " + "\n  ".join(unmatched))
    pairs, alone = trace_pairs(old_traces, new_traces)
    if alone:
        print(f"traces in one run only: {len(alone)}\n  " + "\n  ".join(alone))
    for name, a, b in pairs:
        print(f"\n{name}: " + "\n".join(compare_traces(tr.load(a), tr.load(b))))
    if not lines and not pairs:
        print("nothing to compare: no row or trace is in both runs (a kit's bringup.jsonl pairs with "
              "another kit's, a layer_*.json with a layer_*.json, a trace with one of the same layer and tokens)")
        return 2
    if regressions:
        print(f"\nrows that passed before and fail now: {len(regressions)}\n  " + "\n  ".join(regressions))
    return 1 if regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
