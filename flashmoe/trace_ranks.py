"""Each rank's course through one launch of several ranks, read from a kernel trace.

A launch hosting W ranks (``FlashMoELayer(virtual_world=W)``: each rank a slice of the blocks)
writes records whose ``rank`` is the rank whose work the record did: a block that takes another
rank's tile (work sharing, device/roles/scheduler.cuh) records that rank. Every block adds up its
own rank's counts once (device/flashmoe.cu ``prefix_counts``), so its PREFIX record names the rank
the block belongs to.

Where a forward of W ranks loses time against one rank shows here: a rank that routes or
dispatches later than the others holds up every rank that waits for its rows, a rank whose last
tile ends last sets the span, and the share of tiles other ranks' blocks ran is how much work
sharing moved.
"""

from __future__ import annotations

import numpy as np

from .host.abi import TaskKind
from .trace import COMPUTE_KINDS, Trace, spans

# (field, kinds, reduction): when each rank's phase ended, or its tiles began.
MILESTONES = (("routed", (TaskKind.ROUTE,), "end"), ("dispatched", (TaskKind.DISPATCH,), "end"),
              ("first_tile", tuple(COMPUTE_KINDS), "start"), ("last_tile", tuple(COMPUTE_KINDS), "end"),
              ("combined", (TaskKind.COMBINE,), "end"))


def rank_split(trace: Trace) -> list[dict] | None:
    """Per rank of the launch (None: one rank, or no records), times in microseconds from the
    launch's first record, None where the rank has no such record:

    - ``rank``, ``blocks``: the blocks that belong to it (those whose PREFIX record names it);
    - ``routed``, ``dispatched``, ``combined``: when its last ROUTE, DISPATCH, COMBINE record ended;
    - ``first_tile``, ``last_tile``: when its first GEMM0 or GEMM1 tile started, its last ended;
    - ``tiles``: its GEMM0 and GEMM1 records; ``shared``: those run by another rank's blocks.
    """
    rec = trace.records
    if rec.size == 0 or np.unique(rec["rank"]).size < 2:
        return None
    start, end = spans(rec)
    kind, rank = rec["kind"], rec["rank"].astype(np.int64)
    prefix = kind == TaskKind.PREFIX
    home = dict(zip(rec["block"][prefix].tolist(), rank[prefix].tolist()))
    block_rank = np.array([home.get(b, -1) for b in rec["block"].tolist()], np.int64)
    tiles = np.isin(kind, [int(k) for k in COMPUTE_KINDS])
    out = []
    for r in np.unique(rank).tolist():
        mine = rank == r
        row = {"rank": r, "blocks": sum(1 for v in home.values() if v == r)}
        for field, kinds, at in MILESTONES:
            sel = mine & np.isin(kind, [int(k) for k in kinds])
            row[field] = (start[sel].min() if at == "start" else end[sel].max()) / 1e3 if sel.any() else None
        row["tiles"] = int((mine & tiles).sum())
        row["shared"] = int((mine & tiles & (block_rank != r)).sum())
        out.append(row)
    return out


def format_ranks(split: list[dict] | None) -> str:
    """The rank split on one line: each milestone's earliest and latest rank, the rank that ended
    its tiles last, and the share of tiles run by other ranks' blocks."""
    if split is None:
        return "one rank"
    blocks = sorted({r["blocks"] for r in split})
    cells = []
    for field, _, _ in MILESTONES:
        times = [r[field] for r in split if r[field] is not None]
        if times:
            cells.append(f"{field.replace('_', ' ')} {min(times):.1f}-{max(times):.1f}")
    last = max((r for r in split if r["last_tile"] is not None), key=lambda r: r["last_tile"], default=None)
    tiles = sum(r["tiles"] for r in split)
    line = (f"{len(split)} ranks of {blocks[0]}" + (f"-{blocks[-1]}" if len(blocks) > 1 else "")
            + f" block{'s' if blocks[-1] > 1 else ''}, us over ranks: " + ", ".join(cells))
    if last is not None:
        line += f"; last tile: rank {last['rank']}"
    if tiles:
        line += f"; {sum(r['shared'] for r in split) / tiles:.1%} of {tiles} tiles run by another rank's blocks"
    return line
