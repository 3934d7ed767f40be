"""A PNG of a kernel trace (``flashmoe.trace``): one row per SM, time across, a bar per record
coloured by its kind. Needs matplotlib."""

from __future__ import annotations

import numpy as np

from .host import abi
from .trace import Trace, kind_name, spans

# Fixed colours per kind, so plots of different runs read the same (matplotlib tab10 values).
KIND_COLOURS = {
    abi.TaskKind.ROUTE: "#1f77b4", abi.TaskKind.PREFIX: "#17becf", abi.TaskKind.DISPATCH: "#ff7f0e",
    abi.TaskKind.SELECT: "#bcbd22", abi.TaskKind.GEMM0: "#2ca02c", abi.TaskKind.GEMM1: "#98df8a",
    abi.TaskKind.COMBINE: "#d62728", abi.TaskKind.BARRIER: "#7f7f7f", abi.TaskKind.WAIT: "#c7c7c7",
}
_UNKNOWN_COLOUR = "#000000"


def plot_timeline(trace: Trace, path) -> None:
    """A PNG of the trace: one row per SM, time (us from the earliest start) across, one bar per
    record coloured by kind, longest drawn first so nested records stay visible."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.collections import PolyCollection
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError("plot_timeline needs matplotlib: pip install matplotlib "
                          "(or pip install 'flashmoe[bench]')") from e
    rec = trace.records
    start, end = spans(rec)
    sms = np.unique(rec["sm"])
    fig, ax = plt.subplots(figsize=(12, min(2 + 0.15 * len(sms), 30)))
    try:
        # One collection of rectangles: a bar artist per record takes minutes at 30k records.
        order = np.argsort(-(end - start), kind="stable")
        x0, x1 = start[order] / 1e3, end[order] / 1e3
        y = rec["sm"][order].astype(float)
        verts = np.stack([np.stack(p, axis=-1) for p in
                          ((x0, y - 0.4), (x0, y + 0.4), (x1, y + 0.4), (x1, y - 0.4))], axis=1)
        colours = [KIND_COLOURS.get(int(k), _UNKNOWN_COLOUR) for k in rec["kind"][order]]
        ax.add_collection(PolyCollection(verts, facecolors=colours, edgecolors="white",
                                         linewidths=0.2))
        present = sorted(set(rec["kind"].tolist()))
        ax.legend(handles=[Patch(color=KIND_COLOURS.get(k, _UNKNOWN_COLOUR), label=kind_name(k))
                           for k in present], loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  fontsize="small")
        if rec.size:
            ax.set_xlim(0, max(end.max() / 1e3 * 1.01, 1e-3))
            ax.set_ylim(sms.max() + 0.6, sms.min() - 0.6)    # SM 0 on top
        ax.set_xlabel("time (us)")
        ax.set_ylabel("SM")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        title = f"flashmoe kernel trace: {rec.size} records on {len(sms)} SMs"
        if trace.truncated.size:
            title += f" ({trace.truncated.size} truncated block(s))"
        ax.set_title(title if rec.size else "flashmoe kernel trace: no records")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
