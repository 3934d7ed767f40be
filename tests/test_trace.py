"""flashmoe.trace on synthetic buffers.

Buffers are packed here with ``struct`` from the C declaration of ``TraceRecord``
(device/common/params.cuh), not with the module's own numpy dtype, so a drift between the
decoder and the device layout fails these tests.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from flashmoe import trace as tr, trace_ranks as tr_ranks, trace_routing as tr_routing
from flashmoe.host.abi import TaskKind as K
from flashmoe.host.plan import trace_layout

# struct TraceRecord { u64 start_ns, end_ns; u32 task; u16 block; u8 kind, rank; u16 sm, pad;
#                      u32 extra; }
RECORD = struct.Struct("<QQIHBBHHI")
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
BASE = 7_000_000_000    # a %globaltimer-like origin: times are relative to the earliest start


def rec(start, end, kind, sm, rank=0, task=0, extra=0):
    return dict(start=BASE + start, end=BASE + end, kind=int(kind), sm=sm, rank=rank, task=task,
                extra=extra)


def pack(blocks: list[list[dict]], capacity: int, counts: dict[int, int] | None = None,
         slack: int = 0) -> bytes:
    """Raw trace buffer: ``blocks[b]`` are block b's records; ``counts`` overrides a block's
    counter (a truncated block counted more than it wrote). Unused slots hold garbage."""
    counts_off, records_off, total = trace_layout(len(blocks), capacity)
    buf = bytearray(b"\xab" * (total + slack))
    for b, records in enumerate(blocks):
        assert len(records) <= capacity
        struct.pack_into("<I", buf, counts_off + 4 * b, (counts or {}).get(b, len(records)))
        for i, r in enumerate(records):
            RECORD.pack_into(buf, records_off + (b * capacity + i) * RECORD.size, r["start"],
                             r["end"], r["task"], b, r["kind"], r["rank"], r["sm"], 0, r["extra"])
    return bytes(buf)


def decode(blocks, capacity=None, **kw):
    capacity = capacity if capacity is not None else max([len(b) for b in blocks] + [1])
    return tr.decode(pack(blocks, capacity, **kw), len(blocks), capacity)


def test_record_dtype_matches_the_c_layout():
    assert tr.RECORD_DTYPE.itemsize == RECORD.size == 32
    offsets = {name: tr.RECORD_DTYPE.fields[name][1] for name in tr.RECORD_DTYPE.names}
    assert offsets == {"start_ns": 0, "end_ns": 8, "task": 16, "block": 20, "kind": 22, "rank": 23,
                       "sm": 24, "pad": 26, "extra": 28}


@pytest.mark.parametrize("num_blocks,capacity", [(0, 0), (1, 0), (3, 4), (132, 256), (65, 1)])
def test_trace_layout(num_blocks, capacity):
    counts, records, total = trace_layout(num_blocks, capacity)
    assert counts == 0 and records >= 4 * num_blocks
    assert records % RECORD.size == 0     # u64 fields stay 8-byte aligned on the device
    assert total == records + num_blocks * capacity * RECORD.size


def test_decode_truncated_and_empty_blocks():
    blocks = [
        [rec(300, 400, K.GEMM0, sm=0, task=7, extra=3), rec(0, 100, K.ROUTE, sm=0)],
        [rec(50 + 10 * i, 55 + 10 * i, K.DISPATCH, sm=5, rank=1, extra=i) for i in range(4)],
        [],
    ]
    t = decode(blocks, capacity=4, counts={1: 9})
    assert t.num_blocks == 3 and t.capacity == 4
    assert t.counts.tolist() == [2, 9, 0]
    assert t.truncated.tolist() == [1] and t.lost_records == 5
    assert len(t.records) == 6            # 2 + the 4 that block 1 wrote + none of the garbage
    assert np.all(np.diff(t.records["start_ns"].astype(np.int64)) >= 0)
    first, last = t.records[0], t.records[-1]
    assert (first["kind"], first["block"], first["start_ns"] - BASE) == (K.ROUTE, 0, 0)
    assert (last["task"], last["extra"], last["end_ns"] - BASE) == (7, 3, 400)
    assert sorted(t.records[t.records["block"] == 1]["extra"].tolist()) == [0, 1, 2, 3]
    assert set(t.records[t.records["block"] == 1]["rank"].tolist()) == {1}


def test_decode_accepts_bytes_numpy_torch_and_a_larger_allocation():
    blocks = [[rec(0, 10, K.GEMM1, sm=1)], [rec(5, 20, K.COMBINE, sm=2)]]
    raw = pack(blocks, 2, slack=100)
    views = [raw, bytearray(raw), np.frombuffer(raw, np.uint8),
             torch.frombuffer(bytearray(raw), dtype=torch.uint8)]
    decoded = [tr.decode(v, 2, 2).records for v in views]
    for d in decoded[1:]:
        assert np.array_equal(d, decoded[0])


def test_decode_errors_say_what_is_wrong():
    raw = pack([[rec(0, 10, K.GEMM0, sm=0)] * 2, [rec(0, 10, K.GEMM0, sm=1)] * 2], 2)
    with pytest.raises(ValueError, match="need"):
        tr.decode(raw[:-1], 2, 2)
    with pytest.raises(ValueError, match="not written by a launch"):
        tr.decode(raw, 2, 1)        # block 1's first slot would be block 0's second record
    with pytest.raises(TypeError, match="uint8"):
        tr.decode(np.frombuffer(raw, np.uint32), 2, 2)
    with pytest.raises(TypeError, match="expected bytes"):
        tr.decode([0] * len(raw), 2, 2)


def test_chrome_json_events():
    blocks = [[rec(1_000, 2_500, K.GEMM0, sm=3, rank=0, task=11, extra=4)],
              [rec(1_234, 1_235, K.WAIT, sm=9, rank=2, task=5, extra=1),
               rec(3_000, 3_000, K.BARRIER, sm=9, rank=2)]]
    t = decode(blocks)
    doc = tr.to_chrome_json(t)
    json.loads(json.dumps(doc))          # plain JSON types only
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(events) == 3
    assert [(e["name"], e["ts"], e["dur"], e["pid"], e["tid"]) for e in events] == [
        ("GEMM0", 0.0, 1.5, 0, 3), ("WAIT", 0.234, 0.001, 2, 9), ("BARRIER", 2.0, 0.0, 2, 9)]
    assert events[0]["args"] == {"task": 11, "extra": 4, "block": 0}
    assert events[0]["cat"] == "compute" and events[1]["cat"] == "comm"
    meta = {(e["name"], e["pid"], e.get("tid")): e["args"] for e in doc["traceEvents"] if e["ph"] == "M"}
    assert meta[("process_name", 2, 0)] == {"name": "rank 2"}
    assert meta[("thread_name", 0, 3)] == {"name": "SM 3"}
    assert meta[("thread_name", 2, 9)] == {"name": "SM 9"}
    assert doc["displayTimeUnit"] == "ns"


def test_chrome_json_written_to_path(tmp_path):
    t = decode([[rec(0, 10, K.GEMM0, sm=0)]])
    doc = tr.to_chrome_json(t, tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text()) == doc


def test_chrome_json_overlap_moves_to_a_second_track():
    # Two blocks on SM 4: the second overlaps the first without nesting; a WAIT nests inside.
    blocks = [[rec(0, 100, K.GEMM0, sm=4), rec(10, 20, K.WAIT, sm=4)],
              [rec(50, 150, K.GEMM1, sm=4)]]
    events = [e for e in tr.to_chrome_json(decode(blocks))["traceEvents"] if e["ph"] == "X"]
    tids = {e["name"]: e["tid"] for e in events}
    assert tids == {"GEMM0": 4, "WAIT": 4, "GEMM1": 4 + 65536}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 200), st.integers(0, 60),
                          st.integers(0, 1)), min_size=0, max_size=30))
def test_chrome_json_every_track_nests(items):
    """Events of one (pid, tid) nest or are disjoint, as the Trace Event Format requires of "X"
    events (Perfetto drops the others), and every record is exported exactly once."""
    blocks = [[rec(s, s + d, K.GEMM0, sm=sm, rank=rank) for sm, s, d, rank in items]]
    events = [e for e in tr.to_chrome_json(decode(blocks))["traceEvents"] if e["ph"] == "X"]
    assert len(events) == len(items)
    assert {(e["pid"], e["tid"] % 65536) for e in events} == {(r, sm) for sm, _, _, r in items}
    tracks = {}
    for e in events:
        ns = round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)
        tracks.setdefault((e["pid"], e["tid"]), []).append(ns)
    for spans in tracks.values():
        for i, (a0, a1) in enumerate(spans):
            for b0, b1 in spans[i + 1:]:
                disjoint = a1 <= b0 or b1 <= a0
                nested = (a0 <= b0 and b1 <= a1) or (b0 <= a0 and a1 <= b1)
                assert disjoint or nested, (spans, (a0, a1), (b0, b1))


def test_phase_table_counts_block_time_by_phase():
    """Two blocks over a 200 ns launch (400 block-ns): block 0 routes then runs a GEMM0 tile;
    block 1 routes, runs a GEMM1 tile and, at the same time, a selection (the wgmma producer's).
    Shares are of the 400; what no record covers is 80 ns on each block; the overlapping
    selection adds to its phase but not to the covered time."""
    t = decode([[rec(0, 20, K.ROUTE, sm=0), rec(20, 120, K.GEMM0, sm=0)],
                [rec(0, 20, K.ROUTE, sm=1), rec(100, 200, K.GEMM1, sm=1), rec(150, 180, K.SELECT, sm=1)]])
    table = tr.phase_table(t)
    assert (table["span_ns"], table["blocks"], table["truncated_blocks"]) == (200, 2, 0)
    assert list(table["phases"]) == ["ROUTE", "SELECT", "GEMM0", "GEMM1"]       # the order they run in
    shares = {name: p["share"] for name, p in table["phases"].items()}
    assert shares == pytest.approx({"ROUTE": 0.1, "SELECT": 0.075, "GEMM0": 0.25, "GEMM1": 0.25})
    assert table["unrecorded_share"] == pytest.approx(0.4)
    assert (table["phases"]["GEMM1"]["first_ns"], table["phases"]["GEMM1"]["last_ns"]) == (100, 200)
    assert table["phases"]["ROUTE"]["count"] == 2
    line = tr.format_phase_table(table)
    assert line.startswith("span 0.2 us x 2 blocks: route 10.0%") and line.endswith("unrecorded 40.0%")
    empty = tr.phase_table(decode([[]]))
    assert (empty["span_ns"], empty["blocks"], empty["phases"], empty["unrecorded_share"]) == (0, 0, {}, 0.0)


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib")
    from flashmoe.trace_plot import plot_timeline
    t = decode([[rec(0, 100, K.GEMM0, sm=0), rec(100, 150, K.DISPATCH, sm=0)],
                [rec(20, 90, K.WAIT, sm=1)]])
    plot_timeline(t, tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    plot_timeline(decode([[]]), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_utilisation_two_sms():
    t = decode([[rec(0, 100, K.GEMM0, sm=0), rec(100, 200, K.DISPATCH, sm=0)],
                [rec(0, 50, K.GEMM1, sm=1)]])
    u = tr.utilisation(t)
    assert u["span_ns"] == 200 and u["records"] == 3
    assert u["sm_busy"] == {0: 1.0, 1: 0.25} and u["mean_busy"] == 0.625
    assert u["kind_ns"] == {"DISPATCH": 100, "GEMM0": 100, "GEMM1": 50}
    assert u["kind_count"] == {"DISPATCH": 1, "GEMM0": 1, "GEMM1": 1}
    # The DISPATCH runs after SM 1's GEMM1 ended and beside SM 0's own GEMM0: no overlap.
    assert u["comm_ns"] == 100 and u["comm_compute_overlap"] == 0.0


def test_utilisation_overlapping_records_on_one_sm_count_once():
    t = decode([[rec(0, 100, K.GEMM0, sm=0)], [rec(50, 150, K.WAIT, sm=0)],
                [rec(0, 200, K.GEMM1, sm=1)]])
    u = tr.utilisation(t)
    assert u["sm_busy"] == {0: 0.75, 1: 1.0}
    assert u["sm_work"] == {0: 0.5, 1: 1.0}      # the WAIT holds SM 0 but does no work
    # The WAIT [50, 150) is covered by SM 1's GEMM1 throughout (SM 0's own GEMM0 does not count).
    assert u["comm_compute_overlap"] == 1.0


def test_utilisation_comm_half_overlapped():
    t = decode([[rec(0, 100, K.DISPATCH, sm=0), rec(0, 100, K.GEMM1, sm=0, task=1)],
                [rec(50, 150, K.GEMM0, sm=1)]])
    u = tr.utilisation(t)
    assert u["comm_ns"] == 100 and u["comm_overlapped_ns"] == 50
    assert u["comm_compute_overlap"] == 0.5


def test_utilisation_compute_on_two_sms_covers_once():
    t = decode([[rec(0, 100, K.COMBINE, sm=0)], [rec(20, 60, K.GEMM0, sm=1)],
                [rec(40, 80, K.GEMM1, sm=2)]])
    assert tr.utilisation(t)["comm_compute_overlap"] == pytest.approx(0.6)


def test_utilisation_degenerate():
    u = tr.utilisation(decode([[], []]))
    assert u["span_ns"] == 0 and u["sm_busy"] == {} and u["mean_busy"] == 0.0
    assert u["comm_compute_overlap"] is None
    # A record ending before it starts (corrupt) counts as zero-length.
    u = tr.utilisation(decode([[rec(0, 100, K.GEMM0, sm=0), rec(50, 10, K.GEMM1, sm=1)]]))
    assert u["kind_ns"]["GEMM1"] == 0 and u["sm_busy"][1] == 0.0


KINDS = st.sampled_from([K.GEMM0, K.GEMM1, K.DISPATCH, K.COMBINE, K.WAIT, K.BARRIER, K.ROUTE])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60), st.integers(0, 30), KINDS),
                min_size=1, max_size=25))
def test_utilisation_matches_a_nanosecond_count(items):
    """Against a brute-force tally of every nanosecond: union, span and overlap definitions."""
    t = decode([[rec(s, s + d, k, sm=sm) for sm, s, d, k in items]])
    u = tr.utilisation(t)
    t0 = min(s for _, s, _, _ in items)
    t1 = max(s + d for _, s, d, _ in items)
    assert u["span_ns"] == t1 - t0

    def ticks(sm=None, kinds=None, not_sm=None):
        return {x for s_m, s, d, k in items for x in range(s, s + d)
                if (sm is None or s_m == sm) and (not_sm is None or s_m != not_sm)
                and (kinds is None or k in kinds)}
    for sm in u["sm_busy"]:
        assert u["sm_busy"][sm] == pytest.approx(len(ticks(sm)) / (t1 - t0) if t1 > t0 else 0.0)
    comm = [(sm, s, d) for sm, s, d, k in items if k in tr.COMM_KINDS]
    covered = sum(len(set(range(s, s + d)) & ticks(kinds=tr.COMPUTE_KINDS, not_sm=sm))
                  for sm, s, d in comm)
    assert u["comm_ns"] == sum(d for _, _, d in comm)
    assert u["comm_overlapped_ns"] == covered


def tr_has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_cli(tmp_path, capsys):
    dispatches = [rec(25 * i, 25 * i + 25, K.DISPATCH, sm=1) for i in range(4)]
    raw = pack([[rec(0, 100, K.GEMM0, sm=0)], dispatches], 4, counts={1: 5})
    (tmp_path / "t.bin").write_bytes(raw)
    args = [str(tmp_path / "t.bin"), "--blocks", "2", "--capacity", "4",
            "--json", str(tmp_path / "t.json")]
    if tr_has_matplotlib():
        args += ["--png", str(tmp_path / "t.png")]
    assert tr.main(args) == 0
    out = capsys.readouterr().out
    assert "mean SM busy 100.0%" in out and "comm/compute overlap 100.0%" in out
    assert "1 truncated block(s), 1 record(s) lost" in out
    assert len(json.loads((tmp_path / "t.json").read_text())["traceEvents"]) > 2
    if tr_has_matplotlib():
        assert (tmp_path / "t.png").stat().st_size > 0
    # The JSON it wrote measures the same again, and a raw buffer without its layout is an error.
    assert tr.main([str(tmp_path / "t.json")]) == 0
    again = capsys.readouterr().out
    assert "mean SM busy 100.0%" in again and "no ROUTE records" in again
    with pytest.raises(SystemExit):
        tr.main([str(tmp_path / "t.bin")])
    assert "needs --blocks and --capacity" in capsys.readouterr().err


def _fields(records: np.ndarray) -> list[tuple]:
    names = [n for n in tr.RECORD_DTYPE.names if n != "pad"]
    start0 = records["start_ns"].min()
    return sorted(tuple(int(r[n]) - (start0 if n.endswith("_ns") else 0) for n in names) for r in records)


def test_a_kept_json_reads_back_as_the_same_records(tmp_path):
    """load() gives back the records to_chrome_json wrote, plain or gzipped as the results keep
    them: times to the nanosecond, a record moved to a second track back on its SM, a kind the
    decoder does not know, a truncated block still truncated."""
    blocks = [[rec(0, 100, K.GEMM0, sm=4, task=3, extra=9), rec(10, 20, K.WAIT, sm=4)],
              [rec(50, 1_234_567, K.GEMM1, sm=4, extra=7), rec(1_234_567, 1_234_568, K.COMBINE, sm=4)], [],
              [rec(5, 5, 12, sm=2, rank=1, task=70000, extra=2**31)]]
    t = decode(blocks, capacity=2, counts={1: 5})
    tr.to_chrome_json(t, tmp_path / "t.json")
    (tmp_path / "t.json.gz").write_bytes(gzip.compress((tmp_path / "t.json").read_bytes()))
    for path in (tmp_path / "t.json", tmp_path / "t.json.gz"):
        back = tr.load(path)
        assert _fields(back.records) == _fields(t.records)
        assert back.num_blocks == 4 and back.capacity == 2 and back.truncated.tolist() == [1]
        assert back.counts.tolist() == [2, 3, 0, 1]
    (tmp_path / "other.json").write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(ValueError, match="not a trace to_chrome_json wrote"):
        tr.load(tmp_path / "other.json")


# ---------------------------------------------------------------- the router's records

def route(start, end, block, task, extra, rank=0):
    return rec(start, end, K.ROUTE, sm=block, rank=rank, task=task, extra=extra)


def test_routing_split_of_spread_logits():
    """Two chunks of one rank on 3 blocks, 4-row shares (extra: a share's first row, 0 for each
    chunk's first), then each chunk's selection (extra: its tokens) after the barrier. A block's
    selection can start before another block's last share has ended nowhere: the barrier."""
    blocks = [[route(0, 40, 0, 0, 0), route(40, 80, 0, 1, 0), route(90, 100, 0, 0, 64)],
              [route(2, 44, 1, 0, 4), route(44, 84, 1, 1, 4), route(91, 106, 1, 1, 20)],
              [route(1, 45, 2, 0, 8), route(45, 86, 2, 1, 8), rec(120, 130, K.PREFIX, sm=2)]]
    split = tr_routing.routing_split(decode(blocks))
    assert split == pytest.approx({"route_us": 0.106, "spread": True, "logits_us": 0.086, "shares": 6,
                                   "share_blocks": 3, "share_rows": 4, "selection_us": 0.015, "chunks": 2})
    assert tr_routing.format_routing(split) == (
        "routing 0.1 us: logits 0.1 us (6 shares of 4 rows on 3 blocks), then selection 0.0 us "
        "(the longest of 2 chunks)")


def test_routing_split_keeps_the_ranks_chunks_apart():
    """W = 2, one chunk each (both chunk 0), one share of all the chunk's rows each: two chunks,
    not one with two selections; share_rows unknown (a chunk's rows)."""
    blocks = [[route(0, 50, 0, 0, 0, rank=0), route(60, 70, 0, 0, 40, rank=0)],
              [route(0, 55, 1, 0, 0, rank=1), route(62, 80, 1, 0, 40, rank=1)]]
    split = tr_routing.routing_split(decode(blocks))
    assert (split["chunks"], split["shares"], split["share_rows"]) == (2, 2, None)
    assert split["selection_us"] == pytest.approx(0.018) and split["logits_us"] == pytest.approx(0.055)
    assert "2 shares of a chunk's rows on 2 blocks" in tr_routing.format_routing(split)


def test_routing_split_of_whole_chunks():
    """As many chunks as blocks or more: each record a whole chunk (extra: its tokens, never 0)."""
    blocks = [[route(0, 30, 0, 0, 64), route(30, 70, 0, 2, 10)], [route(3, 33, 1, 1, 64)], []]
    split = tr_routing.routing_split(decode(blocks))
    assert split == pytest.approx({"route_us": 0.07, "spread": False, "chunks": 3, "chunk_blocks": 2,
                                   "chunk_us": 0.04})
    assert "3 chunks on 2 blocks, logits and selection in one record, the longest 0.0 us" in \
        tr_routing.format_routing(split)
    assert tr_routing.routing_split(decode([[rec(0, 5, K.GEMM0, sm=0)]])) is None
    assert tr_routing.format_routing(None) == "no ROUTE records"


# docs/performance.md's routing table, read from the committed traces of 446305b.
H200_ROUTING = {"qwen3-30b-a3b_4096": (374.3, 290.9, 64, None, 82.0), "qwen3-30b-a3b_128": (151.1, 45.0, 128, 2, 104.8),
                "mixtral-8x7b_4096": (122.1, 104.2, 128, 4, 16.7), "mixtral-8x7b_128": (102.2, 80.3, 16, 1, 20.7)}


@pytest.mark.parametrize("name", H200_ROUTING)
def test_routing_split_of_the_committed_h200_traces(name):
    path = RESULTS / f"layer_nvidia-h200_20261130-164405_{name}.trace.json.gz"
    split = tr_routing.routing_split(tr.load(path))
    got = (split["route_us"], split["logits_us"], split["shares"], split["share_rows"], split["selection_us"])
    assert got == pytest.approx(H200_ROUTING[name], abs=0.05)


# ---------------------------------------------------------------- a launch of several ranks

def test_rank_split_follows_each_rank_and_the_tiles_other_ranks_ran():
    """W = 2 of 2 blocks each (blocks 0-1 rank 0, 2-3 rank 1, as their PREFIX records say). Rank 1
    has no routed row of its own: its block 3 runs one of rank 0's tiles (a record naming rank 0),
    block 2 idles; rank 1's last tile is its shared expert's (block 2)."""
    def prefix(block, rank):
        return rec(100, 110, K.PREFIX, sm=block, rank=rank, task=block % 2)
    blocks = [[rec(0, 90, K.ROUTE, sm=0, extra=64), prefix(0, 0), rec(115, 130, K.DISPATCH, sm=0),
               rec(140, 300, K.GEMM0, sm=0), rec(300, 500, K.GEMM1, sm=0), rec(520, 560, K.COMBINE, sm=0)],
              [prefix(1, 0), rec(140, 320, K.GEMM0, sm=1), rec(320, 510, K.GEMM1, sm=1)],
              [rec(0, 95, K.ROUTE, sm=2, rank=1, extra=30), prefix(2, 1), rec(150, 260, K.GEMM0, sm=2, rank=1),
               rec(260, 400, K.GEMM1, sm=2, rank=1), rec(515, 550, K.COMBINE, sm=2, rank=1)],
              [prefix(3, 1), rec(145, 330, K.GEMM0, sm=3, rank=0)]]
    split = tr_ranks.rank_split(decode(blocks))
    assert split == [
        {"rank": 0, "blocks": 2, "routed": 0.09, "dispatched": 0.13, "first_tile": 0.14, "last_tile": 0.51,
         "combined": 0.56, "tiles": 5, "shared": 1},
        {"rank": 1, "blocks": 2, "routed": 0.095, "dispatched": None, "first_tile": 0.15, "last_tile": 0.4,
         "combined": 0.55, "tiles": 2, "shared": 0}]
    assert tr_ranks.format_ranks(split) == (
        "2 ranks of 2 blocks, us over ranks: routed 0.1-0.1, dispatched 0.1-0.1, first tile 0.1-0.1, "
        "last tile 0.4-0.5, combined 0.6-0.6; last tile: rank 0; 14.3% of 7 tiles run by another rank's blocks")
    # One rank (every bench_layer.py trace): nothing to split.
    assert tr_ranks.rank_split(decode([[prefix(0, 0), rec(140, 300, K.GEMM0, sm=0)]])) is None
    assert tr_ranks.format_ranks(None) == "one rank"


def test_rank_split_of_a_trace_read_back_and_the_cli(tmp_path, capsys):
    """The JSON keeps rank and block, so a kept trace splits the same; the CLI prints the split
    for a launch of several ranks only."""
    blocks = [[rec(100, 110, K.PREFIX, sm=0, rank=0), rec(140, 300, K.GEMM0, sm=0)],
              [rec(100, 112, K.PREFIX, sm=1, rank=1, task=0), rec(150, 290, K.GEMM0, sm=1, rank=0)]]
    t = decode(blocks)
    tr.to_chrome_json(t, tmp_path / "t.json")
    assert tr_ranks.rank_split(tr.load(tmp_path / "t.json")) == tr_ranks.rank_split(t)
    assert tr_ranks.rank_split(t)[0]["shared"] == 1
    assert tr.main([str(tmp_path / "t.json")]) == 0
    assert "2 ranks of 1 block, " in capsys.readouterr().out
