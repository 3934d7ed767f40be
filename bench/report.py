"""Where a benchmark's results go: run metadata, CSV + JSON + PNG files, the stdout table."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import re
import tempfile
from pathlib import Path

import torch

from flashmoe import environment

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def run_metadata(device: torch.device, dry_run: bool) -> dict:
    """What a result needs next to it to be read later: code, software, hardware, date."""
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = environment.commit()      # FLASHMOE_GIT_COMMIT first: a copied tree's .git may be stale
    meta = {
        "date_utc": now.isoformat(timespec="seconds"),
        "stamp": now.strftime("%Y%m%d-%H%M%S"),
        "dry_run": dry_run,
        # Uncommitted changes ('+dirty') mean the commit alone does not say what ran.
        "git_commit": commit.removesuffix("+dirty"),
        "git_dirty": commit.endswith("+dirty"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device_name=torch.cuda.get_device_name(device), sm_count=props.multi_processor_count,
                    l2_bytes=int(props.L2_cache_size), memory_bytes=int(props.total_memory),
                    capability=f"{props.major}.{props.minor}")
        meta["driver"] = environment.smi_query(("driver_version",), device.index or 0).get("driver_version")
    else:
        meta.update(device_name=f"cpu ({platform.processor() or platform.machine()})", driver=None)
    return meta


def print_header(meta: dict, ceilings: dict) -> None:
    print(f"device: {meta['device_name']}  driver {meta.get('driver')}  torch {meta['torch']}  "
          f"cuda {meta['cuda']}  transformers {meta['transformers']}  commit {meta['git_commit']}"
          f"{' (uncommitted changes)' if meta['git_dirty'] else ''}  {meta['date_utc']}")
    if meta["dry_run"]:
        print("DRY RUN: CPU, scaled-down shapes, reference backend; the numbers below measure nothing")
    print(f"ceilings: dense bf16 matmul {ceilings['matmul_tflops']:.4g} TFLOP/s, "
          f"copy {ceilings['copy_gbps']:.4g} GB/s (read + write)")


def output_stem(kind: str, meta: dict, out_dir: str | None) -> Path:
    """``<dir>/<kind>_<device>_<date>``: a dry run defaults to a temporary dir, since it
    measures nothing that belongs in bench/results."""
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="flashmoe-bench-") if meta["dry_run"] else str(RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    device = re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-")[:40]
    tag = "dryrun_" if meta["dry_run"] else ""
    return Path(out_dir) / f"{kind}_{tag}{device}_{meta['stamp']}"


def write_results(stem: Path, columns: list[str], rows: list[dict], meta: dict, ceilings: dict) -> None:
    """Rewrite the CSV and JSON with every row so far (called after each row, so a run cut
    short still leaves its results)."""
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: _cell(row.get(c)) for c in columns})
    with open(f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "ceilings": ceilings, "columns": columns,
                   "rows": [{c: row.get(c) for c in columns} for row in rows]}, f, indent=1,
                  default=str)


def _cell(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def plot(path: str, rows: list[dict], *, y: str, ylabel: str, series: str, panel: str = "config",
         x: str = "tokens", title: str = "", hline: float | None = None, hline_label: str = "",
         logy: bool = False) -> str | None:
    """One panel per ``panel`` value, ``y`` against ``x``, one line per ``series`` value.
    Returns the path, or None (with the reason printed) when there is nothing to draw."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        print(f"no PNG: matplotlib is not installed ({exc}); pip install matplotlib")
        return None
    good = [r for r in rows if isinstance(r.get(y), (int, float)) and math.isfinite(r[y])]
    panels = list(dict.fromkeys(r[panel] for r in good))
    if not panels:
        print(f"no PNG: no row has a value for {y}")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        mine = [r for r in good if r[panel] == name]
        for label in dict.fromkeys(r[series] for r in mine):
            pts = sorted((r[x], r[y]) for r in mine if r[series] == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(label))
        if hline:
            ax.axhline(hline, color="gray", linestyle="--", linewidth=1, label=hline_label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r[x] for r in mine}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(v, spec: str = ".3g") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (key, header, format spec) triples; a fixed-width table on stdout."""
    cells = [[h for _, h, _ in columns]] + [[fmt(r.get(k), s) for k, _, s in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for line in cells:
        print(_line(line, widths))


def _line(cells: list[str], widths: list[int]) -> str:
    # Right-aligned, except the last column (a status sentence) which runs on.
    return "  ".join(c.rjust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]


class RowPrinter:
    """Prints rows as they are measured: the header once, fixed widths so rows line up."""

    def __init__(self, columns: list[tuple[str, str, str]], widths: dict[str, int] | None = None):
        self.columns = columns
        self.widths = [max(len(h), (widths or {}).get(k, 9)) for k, h, _ in columns]
        self.started = False

    def __call__(self, row: dict) -> None:
        if not self.started:
            print(_line([h for _, h, _ in self.columns], self.widths))
            self.started = True
        print(_line([fmt(row.get(k), s) for k, _, s in self.columns], self.widths), flush=True)


def attach_trace(layer, stem: str) -> dict:
    """The last forward's kernel timeline (``layer`` a FlashMoELayer on the kernel backend, its
    trace recorded): Perfetto JSON and PNG at ``stem``.trace.{json,png}, and the row's figures
    from flashmoe.trace: SM busy, comm/compute overlap, the phase table, the routing split and,
    for a launch of several ranks, the rank split."""
    from flashmoe import trace
    from flashmoe.trace_plot import plot_timeline
    from flashmoe.trace_ranks import format_ranks, rank_split
    from flashmoe.trace_routing import format_routing, routing_split
    t = layer._kernel.last_trace()
    trace.to_chrome_json(t, f"{stem}.trace.json")
    try:
        plot_timeline(t, f"{stem}.trace.png")
    except ImportError:
        pass
    u = trace.utilisation(t)
    ranks = rank_split(t)
    return {"sm_busy": u["mean_busy"], "comm_overlap": u["comm_compute_overlap"],
            "phases": trace.format_phase_table(trace.phase_table(t)), "route_split": format_routing(routing_split(t)),
            **({"rank_split": format_ranks(ranks)} if ranks else {})}


def print_trace(row: dict) -> None:
    """A traced row's figures (attach_trace), under its line of the table."""
    for key, label in (("phases", "phases: "), ("route_split", ""), ("rank_split", "")):
        if row.get(key):
            print(f"    {label}{row[key]}")
