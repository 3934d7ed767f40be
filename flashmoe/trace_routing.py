"""The router's time in a kernel trace, read from its ROUTE records.

A ROUTE record's ``task`` is a chunk of the rank (64 tokens) and its ``extra`` says what the record
covered (device/roles/logits.cuh, router.cuh):

- with fewer chunks than blocks the rank shares its logits out first (``spread_logits``): a record
  per share, ``extra`` its first router row, so each chunk's first share says 0; then a rank
  barrier, then one record per chunk for its selection (top-k and counts), ``extra`` its tokens;
- otherwise each block routes whole chunks (``route_chunk``), logits and selection in one record,
  ``extra`` the chunk's tokens (at least 1), as does the kernel that is given its routing.

So a trace with a ROUTE record whose ``extra`` is 0 spread its logits, and a chunk's selection is
its record that started last (after the barrier); the records before it are its shares.
"""

from __future__ import annotations

import numpy as np

from .host.abi import TaskKind
from .trace import Trace, spans


def routing_split(trace: Trace) -> dict | None:
    """Where one launch's routing went (None: no ROUTE records). Times in microseconds.

    - ``route_us``: first ROUTE record's start to the last one's end, over every rank.
    - ``spread``: whether the logits were shared out before selection. Then ``logits_us`` (first
      share's start to the last one's end: what the rank barrier waits for), ``shares``,
      ``share_blocks`` (blocks that took one), ``share_rows`` (router rows a share covers, from
      the step between a chunk's shares; None when each chunk is one share), ``selection_us`` (the
      longest chunk's) and ``chunks``.
    - otherwise ``chunks``, ``chunk_blocks`` and ``chunk_us`` (the longest record: a chunk's
      logits and selection together).
    """
    rec = trace.records
    start, end = spans(rec)
    idx = np.flatnonzero(rec["kind"] == TaskKind.ROUTE)
    if idx.size == 0:
        return None
    out = {"route_us": (end[idx].max() - start[idx].min()) / 1e3,
           "spread": bool((rec["extra"][idx] == 0).any())}
    if not out["spread"]:
        return out | {"chunks": idx.size, "chunk_blocks": _blocks(rec[idx]),
                      "chunk_us": (end[idx] - start[idx]).max() / 1e3}
    chunk = _chunk(rec[idx])
    order = np.lexsort((start[idx], chunk))             # by chunk, then by start
    last = np.r_[chunk[order][1:] != chunk[order][:-1], True]
    select, share = idx[order[last]], idx[order[~last]]
    share_chunk, first_row = _chunk(rec[share]), rec["extra"][share].astype(np.int64)
    order = np.lexsort((first_row, share_chunk))
    steps = np.diff(first_row[order])[np.diff(share_chunk[order]) == 0]
    return out | {"logits_us": (end[share].max() - start[share].min()) / 1e3, "shares": share.size,
                  "share_blocks": _blocks(rec[share]), "share_rows": int(steps.min()) if steps.size else None,
                  "selection_us": (end[select] - start[select]).max() / 1e3, "chunks": select.size}


def _chunk(rec: np.ndarray) -> np.ndarray:
    """A chunk's key: its rank and its index there (chunks count per rank)."""
    return rec["rank"].astype(np.int64) << 32 | rec["task"]


def _blocks(rec: np.ndarray) -> int:
    return len(set(zip(rec["rank"].tolist(), rec["block"].tolist())))


def format_routing(split: dict | None) -> str:
    """The routing split on one line."""
    if split is None:
        return "no ROUTE records"
    head = f"routing {split['route_us']:.1f} us: "
    if not split["spread"]:
        return head + (f"{split['chunks']} chunks on {split['chunk_blocks']} blocks, logits and selection "
                       f"in one record, the longest {split['chunk_us']:.1f} us")
    n = split["share_rows"]
    rows = "a chunk's rows" if n is None else f"{n} row{'s' if n > 1 else ''}"
    return head + (f"logits {split['logits_us']:.1f} us ({split['shares']} shares of {rows} on "
                   f"{split['share_blocks']} blocks), then selection {split['selection_us']:.1f} us "
                   f"(the longest of {split['chunks']} chunks)")
