"""In-kernel timeline traces: decode the trace buffer, export it, and measure utilisation.

A kernel compiled with ``KernelSpec(trace=True)`` writes one ``TraceRecord`` (device/common/
params.cuh, mirrored by ``abi.TraceRecord``) per task per block into the buffer that
``plan.trace_layout(num_blocks, capacity)`` lays out: a u32 record count per block, then
``capacity`` 32-byte records per block. A block that runs more tasks than ``capacity`` keeps
counting but stops writing, so ``count > capacity`` marks a truncated block.

Times are ``%globaltimer`` nanoseconds: one clock for the whole GPU, so records of different SMs
compare directly. A record whose end precedes its start (only a corrupt record can) counts as
zero-length everywhere below.

    python -m flashmoe.trace trace.bin --blocks 132 --capacity 256 --json t.json --png t.png
    python -m flashmoe.trace bench/results/<stem>_<layer>_<tokens>.trace.json.gz   # a kept trace, again
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .host import abi
from .host.plan import TRACE_RECORD_BYTES, trace_layout

# One definition of the record layout: numpy reads the ctypes mirror of the device struct.
RECORD_DTYPE = np.dtype(abi.TraceRecord)
assert RECORD_DTYPE.itemsize == TRACE_RECORD_BYTES

COMPUTE_KINDS = frozenset({abi.TaskKind.GEMM0, abi.TaskKind.GEMM1})
COMM_KINDS = frozenset({abi.TaskKind.DISPATCH, abi.TaskKind.COMBINE, abi.TaskKind.WAIT})
# Records that hold an SM without doing work (spinning on a flag or a barrier).
IDLE_KINDS = frozenset({abi.TaskKind.WAIT, abi.TaskKind.BARRIER})

# Perfetto drops "X" events that overlap on one thread without nesting; records that would do so
# (two blocks resident on one SM) go to extra tracks with tid = sm + lane * _LANE_TID.
_LANE_TID = 1 << 16     # above every u16 SM id
_SOURCE = "flashmoe kernel trace"   # the JSON's otherData.source: what load() reads back


def kind_name(kind: int) -> str:
    try:
        return abi.TaskKind(int(kind)).name
    except ValueError:
        return f"KIND_{int(kind)}"


@dataclass(frozen=True)
class Trace:
    """Decoded records of one launch."""

    records: np.ndarray     # RECORD_DTYPE, sorted by start_ns (ties keep block order)
    counts: np.ndarray      # u32 [num_blocks]: records each block counted (written or not)
    capacity: int           # records per block the buffer holds

    @property
    def num_blocks(self) -> int:
        return len(self.counts)

    @property
    def truncated(self) -> np.ndarray:
        """Blocks that ran out of record slots (their later tasks are missing)."""
        return np.flatnonzero(self.counts > self.capacity)

    @property
    def lost_records(self) -> int:
        return int(np.maximum(self.counts.astype(np.int64) - self.capacity, 0).sum())


def _as_uint8(buffer) -> np.ndarray:
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        return np.frombuffer(buffer, dtype=np.uint8)
    if isinstance(buffer, np.ndarray):
        if buffer.dtype != np.uint8:
            raise TypeError(f"trace buffer has dtype {buffer.dtype}; pass the raw bytes as uint8")
        return np.ascontiguousarray(buffer).reshape(-1)
    if type(buffer).__module__.startswith("torch"):
        import torch
        if buffer.dtype != torch.uint8:
            raise TypeError(f"trace buffer has dtype {buffer.dtype}; pass the raw bytes as torch.uint8")
        return buffer.detach().cpu().contiguous().reshape(-1).numpy()
    raise TypeError(f"trace buffer of type {type(buffer).__name__}: expected bytes, a numpy uint8 "
                    "array or a torch uint8 tensor")


def decode(buffer, num_blocks: int, capacity: int) -> Trace:
    """Records of a trace buffer laid out by ``plan.trace_layout(num_blocks, capacity)``.

    ``num_blocks`` is the launch's grid (``plan.grid``) and ``capacity`` the
    ``Params.trace_capacity`` it ran with. Raises ``ValueError`` when the buffer is too small for
    that layout, or when a record's block field disagrees with the slot it sits in (the layout
    arguments do not match the launch that wrote the buffer).
    """
    if num_blocks < 0 or capacity < 0:
        raise ValueError(f"num_blocks={num_blocks}, capacity={capacity}: must be >= 0")
    raw = _as_uint8(buffer)
    counts_off, records_off, total = trace_layout(num_blocks, capacity)
    if raw.size < total:
        raise ValueError(f"trace buffer holds {raw.size} B; {num_blocks} blocks x {capacity} records "
                         f"need {total} B (check --blocks / --capacity against the launch)")
    counts = raw[counts_off:counts_off + 4 * num_blocks].view(np.uint32).copy()
    slots = raw[records_off:total].view(RECORD_DTYPE).reshape(num_blocks, capacity)
    written = np.minimum(counts, capacity)
    mask = np.arange(capacity)[None, :] < written[:, None]
    records = slots[mask]       # block-major, slot order
    slot_block = np.repeat(np.arange(num_blocks), written)
    bad = np.flatnonzero(records["block"] != slot_block)
    if bad.size:
        i = bad[0]
        raise ValueError(f"record in block {slot_block[i]}'s slots says block {records['block'][i]}: "
                         f"the buffer was not written by a launch of {num_blocks} blocks x "
                         f"{capacity} records per block")
    order = np.argsort(records["start_ns"], kind="stable")
    return Trace(records=records[order].copy(), counts=counts, capacity=capacity)


def spans(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) as int64 ns relative to the earliest start; end clamped to >= start."""
    if records.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    t0 = records["start_ns"].min()
    start = (records["start_ns"] - t0).astype(np.int64)
    end = np.maximum((records["end_ns"].astype(np.int64) - t0.astype(np.int64)), start)
    return start, end


def _lanes(start: np.ndarray, end: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Lane per record (``order``: one track's records by start asc, end desc) such that the
    records of one lane nest or are disjoint, as the Trace Event Format requires of one thread."""
    lane = np.zeros(len(start), np.int64)
    stacks: list[list[int]] = []        # per lane: ends of the open (enclosing) records
    for i in order:
        s, e = start[i], end[i]
        for j, stack in enumerate(stacks):
            while stack and stack[-1] <= s:
                stack.pop()
            if not stack or e <= stack[-1]:
                break
        else:
            j = len(stacks)
            stacks.append([])
        stacks[j].append(e)
        lane[i] = j
    return lane


def to_chrome_json(trace: Trace, path=None) -> dict:
    """The trace as Trace Event Format JSON (loads in ui.perfetto.dev and chrome://tracing).

    One complete ("X") event per record: ``ts`` and ``dur`` in microseconds from the earliest
    start (exact to the nanosecond: three decimals), ``pid`` = rank, ``tid`` = SM, ``name`` = the
    task kind, ``cat`` = compute / comm / sync / control, ``args`` = task, extra, block. Metadata
    events name the processes "rank r" and the threads "SM n". Should records on one SM overlap
    without nesting (two resident blocks), the later ones move to an extra track per SM
    (tid = sm + lane * 65536, named "SM n #lane"), since viewers drop such overlaps.
    Written to ``path`` when given; returned either way.
    """
    rec = trace.records
    start, end = spans(rec)
    pid = rec["rank"].astype(np.int64)
    sm = rec["sm"].astype(np.int64)
    lane = np.zeros(len(rec), np.int64)
    for key in np.unique(pid * _LANE_TID + sm):
        idx = np.flatnonzero(pid * _LANE_TID + sm == key)
        lane[idx] = _lanes(start[idx], end[idx], np.lexsort((-end[idx], start[idx])))
    tid = sm + lane * _LANE_TID

    events = []
    for r in np.unique(pid).tolist():
        events.append({"name": "process_name", "ph": "M", "pid": r, "tid": 0,
                       "args": {"name": f"rank {r}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0,
                       "args": {"sort_index": r}})
    for r, t in sorted(set(zip(pid.tolist(), tid.tolist()))):
        s, ln = t % _LANE_TID, t // _LANE_TID
        events.append({"name": "thread_name", "ph": "M", "pid": r, "tid": t,
                       "args": {"name": f"SM {s}" + (f" #{ln}" if ln else "")}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": r, "tid": t,
                       "args": {"sort_index": t}})
    # Parents before children at equal ts, as an importer processing in order expects.
    for i in np.lexsort((-(end - start), start)).tolist():
        kind = int(rec["kind"][i])
        events.append({
            "name": kind_name(kind), "cat": _category(kind), "ph": "X",
            "ts": int(start[i]) / 1000, "dur": int(end[i] - start[i]) / 1000,
            "pid": int(pid[i]), "tid": int(tid[i]),
            "args": {"task": int(rec["task"][i]), "extra": int(rec["extra"][i]),
                     "block": int(rec["block"][i])},
        })
    doc = {"traceEvents": events, "displayTimeUnit": "ns",
           "otherData": {"source": _SOURCE, "blocks": trace.num_blocks,
                         "capacity": trace.capacity,
                         "truncated_blocks": trace.truncated.tolist()}}
    if path is not None:
        with open(path, "w") as f:
            json.dump(doc, f)
    return doc


def read_chrome_json(path) -> dict:
    """The document ``to_chrome_json`` wrote to ``path``, or gzipped as the results keep it."""
    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw)


def load(path) -> Trace:
    """The trace ``to_chrome_json`` wrote to ``path`` (``.json`` or ``.json.gz``), read back into
    records (exact: the JSON holds nanoseconds), so that a trace kept with the results can be
    measured again. A truncated block's count reads ``capacity + 1``: how many records it lost is
    not in the JSON."""
    doc = read_chrome_json(path)
    other = doc.get("otherData", {}) if isinstance(doc, dict) else {}
    if other.get("source") != _SOURCE:
        raise ValueError(f"{path}: not a trace to_chrome_json wrote (its otherData.source is not {_SOURCE!r})")
    events = [e for e in doc.get("traceEvents", []) if e.get("ph") == "X"]
    names = {kind_name(k): int(k) for k in abi.TaskKind}
    records = np.zeros(len(events), RECORD_DTYPE)
    for i, e in enumerate(events):
        start = round(e["ts"] * 1000)
        kind = names[e["name"]] if e["name"] in names else int(e["name"].removeprefix("KIND_"))
        records[i] = (start, start + round(e["dur"] * 1000), e["args"]["task"], e["args"]["block"], kind,
                      e["pid"], e["tid"] % _LANE_TID, 0, e["args"]["extra"])
    capacity = int(other.get("capacity", 0))
    counts = np.bincount(records["block"], minlength=int(other.get("blocks", 0))).astype(np.uint32)
    counts[other.get("truncated_blocks", [])] = capacity + 1
    order = np.argsort(records["start_ns"], kind="stable")
    return Trace(records=records[order], counts=counts, capacity=capacity)


def _category(kind: int) -> str:
    if kind in COMPUTE_KINDS:
        return "compute"
    if kind in COMM_KINDS:
        return "comm"
    if kind == abi.TaskKind.BARRIER:
        return "sync"
    return "control"


def _merge(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of half-open intervals [start, end) as disjoint intervals sorted by start."""
    keep = end > start
    start, end = start[keep], end[keep]
    if start.size == 0:
        return start, end
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)
    # A new run begins where an interval starts past the end of everything before it.
    first = np.flatnonzero(np.r_[True, start[1:] > reach[:-1]])
    return start[first], np.maximum.reduceat(end, first)


def _covered(ms: np.ndarray, me: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of each [a, b) covered by the disjoint sorted intervals [ms, me)."""
    full = np.r_[0, np.cumsum(me - ms)]     # full[i]: total length of intervals 0..i-1

    def upto(x):    # covered length of (-inf, x): intervals starting at or before x, less the
        i = np.searchsorted(ms, x, side="right")        # part of the last one that runs past x
        last_end = np.where(i > 0, me[np.maximum(i - 1, 0)] if me.size else x, x)
        return full[i] - np.maximum(last_end - x, 0)
    return upto(b) - upto(a)


def utilisation(trace: Trace) -> dict:
    """Utilisation figures of one launch. All times are ns; intervals are half-open [start, end).

    - ``span_ns``: the kernel's span, latest end minus earliest start over all records.
    - ``sm_busy[sm]``: length of the union of the intervals of every record on that SM, divided by
      ``span_ns``. Overlapping records on one SM (a WAIT inside a task, two resident blocks)
      count once. Only SMs that appear in the trace are listed.
    - ``mean_busy``: the mean of ``sm_busy`` over those SMs.
    - ``sm_work[sm]``, ``mean_work``: the same without WAIT and BARRIER records (an SM spinning
      on a flag is resident but does no work).
    - ``comm_ns``: summed length of the communication records (DISPATCH, COMBINE, WAIT).
    - ``comm_overlapped_ns``: summed, over those records, the part of each record's interval
      during which at least one compute record (GEMM0, GEMM1) runs on a *different* SM.
    - ``comm_compute_overlap``: ``comm_overlapped_ns / comm_ns`` (None when ``comm_ns`` is 0).
    - ``kind_ns[name]``, ``kind_count[name]``: summed record length and record count per kind.
    - ``records``, ``truncated_blocks``, ``lost_records``: what the figures are computed from;
      truncated blocks are missing their later records, so their SMs read less busy than they were.
    """
    rec = trace.records
    start, end = spans(rec)
    span = int(end.max() - start.min()) if rec.size else 0
    kinds = rec["kind"]
    sms = rec["sm"]
    idle = np.isin(kinds, [int(k) for k in IDLE_KINDS])
    busy, work = {}, {}
    for s in np.unique(sms).tolist():
        on = sms == s
        for table, sel in ((busy, on), (work, on & ~idle)):
            ms, me = _merge(start[sel], end[sel])
            table[s] = float((me - ms).sum() / span) if span else 0.0

    comm = np.isin(kinds, [int(k) for k in COMM_KINDS])
    compute = np.isin(kinds, [int(k) for k in COMPUTE_KINDS])
    comm_ns = int((end[comm] - start[comm]).sum())
    overlapped = 0
    for s in np.unique(sms[comm]).tolist():
        mine = comm & (sms == s)
        ms, me = _merge(start[compute & (sms != s)], end[compute & (sms != s)])
        overlapped += int(_covered(ms, me, start[mine], end[mine]).sum())

    kind_ns, kind_count = {}, {}
    for k in np.unique(kinds).tolist():
        sel = kinds == k
        kind_ns[kind_name(k)] = int((end[sel] - start[sel]).sum())
        kind_count[kind_name(k)] = int(sel.sum())
    return {
        "span_ns": span,
        "records": int(rec.size),
        "truncated_blocks": trace.truncated.tolist(),
        "lost_records": trace.lost_records,
        "sm_busy": busy,
        "mean_busy": float(np.mean(list(busy.values()))) if busy else 0.0,
        "sm_work": work,
        "mean_work": float(np.mean(list(work.values()))) if work else 0.0,
        "comm_ns": comm_ns,
        "comm_overlapped_ns": overlapped,
        "comm_compute_overlap": overlapped / comm_ns if comm_ns else None,
        "kind_ns": kind_ns,
        "kind_count": kind_count,
    }


# The phases of a forward in the order they run (device/flashmoe.cu); TaskKind names.
PHASES = ("ROUTE", "PREFIX", "DISPATCH", "SELECT", "GEMM0", "GEMM1", "COMBINE")


def phase_table(trace: Trace) -> dict:
    """Where one forward's block time went, phase by phase. Time is counted in block-ns: the
    launch's ``blocks`` (those with records) times its span are the whole.

    - ``phases[name]``: ``block_ns`` (summed record length), ``share`` (of the whole), ``count``,
      and ``first_ns`` / ``last_ns``: when its first record started and its last ended, from the
      launch's first record (how far the phase reaches into the others).
    - ``unrecorded_share``: the time each block spent in no record (waiting for a flag, a tile
      counter or the next job, or finished while others work), summed over blocks, of the whole.
      Records of one block that overlap (the wgmma producer's selections run while its consumers
      multiply; a ping-pong team's epilogue while the other team's mainloop runs) count once
      here, so phase shares may add up to more than ``1 - unrecorded_share``.
    - ``span_ns``, ``blocks``; ``truncated_blocks`` > 0 means records are missing (raise the
      trace capacity) and the figures undercount.
    """
    rec = trace.records
    start, end = spans(rec)
    span = int(end.max()) if rec.size else 0
    blocks = np.unique(rec["block"]).tolist() if rec.size else []
    whole = span * len(blocks)
    phases = {}
    for k in np.unique(rec["kind"]).tolist():
        sel = rec["kind"] == k
        ns = int((end[sel] - start[sel]).sum())
        phases[kind_name(k)] = {"block_ns": ns, "share": ns / whole if whole else 0.0, "count": int(sel.sum()),
                                "first_ns": int(start[sel].min()), "last_ns": int(end[sel].max())}
    recorded = 0
    for b in blocks:
        on = rec["block"] == b
        ms, me = _merge(start[on], end[on])
        recorded += int((me - ms).sum())
    order = {name: i for i, name in enumerate(PHASES)}
    return {"span_ns": span, "blocks": len(blocks),
            "phases": dict(sorted(phases.items(), key=lambda kv: order.get(kv[0], len(order)))),
            "unrecorded_share": (whole - recorded) / whole if whole else 0.0,
            "truncated_blocks": len(trace.truncated)}


def format_phase_table(table: dict) -> str:
    """The phase table on one line: each phase's share of the launch's block time, then what no
    record covers."""
    cells = [f"{name.lower()} {p['share']:.1%}" for name, p in table["phases"].items()]
    cells.append(f"unrecorded {table['unrecorded_share']:.1%}")
    line = f"span {table['span_ns'] / 1e3:.1f} us x {table['blocks']} blocks: " + ", ".join(cells)
    if table["truncated_blocks"]:
        line += f" (WARNING: {table['truncated_blocks']} truncated blocks)"
    return line


def format_utilisation(u: dict) -> str:
    """The utilisation dict as a text table."""
    overlap = u["comm_compute_overlap"]
    lines = [f"span {u['span_ns'] / 1e3:.3f} us, {u['records']} records",
             f"mean SM busy {u['mean_busy']:.1%}, mean SM work {u['mean_work']:.1%} "
             f"({len(u['sm_busy'])} SMs)",
             "comm/compute overlap " + ("n/a (no comm records)" if overlap is None else
                                        f"{overlap:.1%} of {u['comm_ns'] / 1e3:.3f} us")]
    if u["truncated_blocks"]:
        lines.append(f"WARNING: {len(u['truncated_blocks'])} truncated block(s), {u['lost_records']} "
                     "record(s) lost; raise the trace capacity")
    lines.append(f"{'kind':<10}{'count':>8}{'total us':>12}{'mean us':>10}{'share':>8}")
    total = sum(u["kind_ns"].values()) or 1
    for name, ns in u["kind_ns"].items():
        count = u["kind_count"][name]
        lines.append(f"{name:<10}{count:>8}{ns / 1e3:>12.3f}{ns / count / 1e3:>10.2f}{ns / total:>8.1%}")
    lines.append("SM busy / work:")
    cells = [f"{s:>4}: {b:5.1%} {u['sm_work'][s]:5.1%}" for s, b in u["sm_busy"].items()]
    lines += ["  " + "   ".join(cells[i:i + 4]) for i in range(0, len(cells), 4)]
    return "\n".join(lines)


def main(argv=None) -> int:
    from .trace_plot import plot_timeline                        # they build on this module
    from .trace_ranks import format_ranks, rank_split
    from .trace_routing import format_routing, routing_split

    p = argparse.ArgumentParser(prog="python -m flashmoe.trace", description=__doc__.split("\n")[0])
    p.add_argument("buffer", help="raw trace buffer (the bytes of the launch's trace allocation), or the "
                                  "JSON of one (.json or .json.gz, as bench_layer.py --trace keeps them)")
    p.add_argument("--blocks", type=int, help="grid size of the launch (plan.grid); raw buffers only")
    p.add_argument("--capacity", type=int, help="records per block (trace_capacity); raw buffers only")
    p.add_argument("--json", help="write Trace Event Format JSON here (open in ui.perfetto.dev)")
    p.add_argument("--png", help="write a timeline plot here (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        if args.buffer.endswith((".json", ".json.gz")):
            trace = load(args.buffer)
        elif args.blocks is None or args.capacity is None:
            p.error("a raw trace buffer needs --blocks and --capacity (the launch's grid and trace_capacity)")
        else:
            with open(args.buffer, "rb") as f:
                trace = decode(f.read(), args.blocks, args.capacity)
    except ValueError as e:
        p.error(str(e))     # a wrong --blocks / --capacity, or not a trace: a message, not a traceback
    if args.json:
        to_chrome_json(trace, args.json)
    if args.png:
        plot_timeline(trace, args.png)
    print(format_utilisation(utilisation(trace)))
    print(format_phase_table(phase_table(trace)))
    print(format_routing(routing_split(trace)))
    if (ranks := rank_split(trace)) is not None:
        print(format_ranks(ranks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
