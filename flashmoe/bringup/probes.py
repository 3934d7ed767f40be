"""The component probes (``flashmoe/device/probes.cu``) from the host: inputs, launch, checks.

A ``ProbeRunner`` launches the probes of one spec on a GPU (NVRTC cubin of the probes unit) or on
the CPU emulator, with its tensors on the matching device. Each ``check_*`` makes fresh random
inputs (seeded, never zeros), poisons the outputs, runs one probe and returns a dict with
``passed`` and what was seen: errors against torch with the tolerance, where the wrong elements
are (``flashmoe.diagnose``), and the kernel's error records. A probe never raises for a wrong
result; it raises only when it cannot run at all.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import replace

import torch

from .. import accuracy, checks, reference
from ..config import DTYPES, MoEConfig
from ..diagnose import mismatch, ranges
from ..host import abi, tensormap
from ..host.launch import describe_record
from ..host.plan import DeviceInfo, make_plan, trace_layout
from ..host.spec import STAGE_K_BYTES, KernelSpec



def probe_spec(spec: KernelSpec) -> KernelSpec:
    """Probes build with trace records on (only the trace probe writes any)."""
    return replace(spec, trace=True)


class ProbeRunner:
    """The probes of one spec, launched one at a time, synchronously, on ``device`` (a CUDA
    device, or the CPU: the emulator)."""

    def __init__(self, spec: KernelSpec, device: torch.device):
        self.spec, self.device = probe_spec(spec), torch.device(device)
        self.emulate = self.device.type != "cuda"
        if self.emulate:
            from ..host.emulator import EmulatedProbes
            self.module = EmulatedProbes(self.spec)
        else:
            from ..host.compile import compile_spec
            from ..host.launch import CudaModule
            self.device = torch.device("cuda", self.device.index if self.device.index is not None
                                       else torch.cuda.current_device())
            self.module = CudaModule(compile_spec(self.spec, unit="probes").cubin, self.device.index)
        self.control = torch.zeros(ctypes.sizeof(abi.Control), dtype=torch.uint8, device=self.device)
        self.schedule_seed = 0      # the emulator's fiber order (0: round robin)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device).contiguous()

    def params(self, p: abi.Params) -> torch.Tensor:
        """``p`` copied to the device (probes read Params through a pointer)."""
        raw = torch.frombuffer(bytearray(bytes(p)), dtype=torch.uint8).clone()   # owns its (aligned) memory
        return self.tensor(raw)

    def wait_params(self, timeout_ns: int) -> abi.Params:
        """Params for the probes' bounded waits: this runner's error buffer, ``timeout_ns``."""
        p = abi.Params()
        p.control, p.timeout_ns = self.control.data_ptr(), timeout_ns
        return p

    def encode(self, args: tensormap.TensorMapArgs) -> bytes:
        return tensormap.emulated_map(args) if self.emulate else tensormap.encode(args)

    def launch(self, name: str, args: abi.ProbeArgs, grid: int, smem_bytes: int) -> float:
        """Run probe ``name`` to completion; returns the wall seconds it took."""
        self.control.zero_()
        t0 = time.perf_counter()
        if self.emulate:
            self.module.launch(name, args, grid, smem_bytes, seed=self.schedule_seed)
        else:
            function = self.module.function(name, smem_bytes)
            stream = torch.cuda.current_stream(self.device)
            self.module.launch(function, args, grid, self.spec.threads, smem_bytes, stream.cuda_stream)
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def records(self) -> list[abi.ErrorRecord]:
        control = abi.Control.from_buffer_copy(self.control.cpu().numpy().tobytes())
        return [r for r in control.errors if r.code]


def _records(runner: ProbeRunner) -> list[str]:
    return [describe_record(r) for r in runner.records()]


# ---------------------------------------------------------------- GEMM tile

def tile_smem_bytes(spec: KernelSpec) -> int:
    """The tile probe's shared memory: the pipeline, then the A and B row pointers and the
    row-valid flags (device/probes.cu probe_tile)."""
    return spec.gemm_smem_bytes() + (spec.block_m + spec.block_n) * 8 + spec.block_m


def run_tile(runner: ProbeRunner, nb: int, k: int, use_tma: bool, act: int = 0, seed: int = 0,
             inter: int | None = None, col0: int = 0, box_rows: int | None = None, timeout_ns: int = 10**9):
    """One tile: A rows gathered from a [3 BM, K] tensor (a fifth of them null: zeros), B operand op
    from rows col0.. of w[expert][op] of w [3, nb, inter, K] (rows past ``inter`` read zeros),
    epilogue silu/gelu(gate) * up (nb = 2) or the plain sum. ``box_rows``: the tensor map's box
    height (default the operand's BN / nb rows; another value makes the stages expect other byte
    counts than TMA delivers). Returns (out, expected float64, rows_valid, valid_cols, seconds)."""
    spec = runner.spec
    dt = DTYPES[spec.dtype]
    bm, bn = spec.block_m, spec.block_n
    cols, vec = bn // nb, 16 // dt.itemsize
    inter = inter if inter is not None else cols + 40           # the tile's last rows fall past it
    g = torch.Generator().manual_seed(seed * 7919 + k * 31 + nb * 7 + int(use_tma))
    experts, expert = 3, 1
    a_full = torch.randn(3 * bm, k, generator=g).to(dt)
    w = torch.randn(experts, nb, inter, k, generator=g).to(dt)
    a_rows = torch.randperm(3 * bm, generator=g)[:bm].int()
    a_rows[torch.rand(bm, generator=g) < 0.2] = -1
    rows_valid = (torch.rand(bm, generator=g) < 0.8).to(torch.uint8)
    valid_cols = cols - vec                                     # the last 16-byte chunk is not stored
    out = torch.full((bm, cols), float("nan"), dtype=dt)        # poison
    dev = [runner.tensor(t) for t in (a_full, w, a_rows, rows_valid, out)]
    params = runner.params(runner.wait_params(timeout_ns))
    args = abi.ProbeArgs()
    args.params, args.a, args.b, args.a_rows, args.rows_valid, args.out = (
        params.data_ptr(), dev[0].data_ptr(), dev[1].data_ptr(), dev[2].data_ptr(), dev[3].data_ptr(),
        dev[4].data_ptr())
    args.k, args.inter, args.experts, args.expert, args.col0, args.nb = k, inter, experts, expert, col0, nb
    args.use_tma, args.valid_cols, args.act = int(use_tma), valid_cols, act
    if use_tma:
        args.b_map.opaque[:] = _map_words(runner.encode(tensormap.expert_rows_map(
            "probe_b", spec.dtype, dev[1].data_ptr(), k, inter, nb, experts, box_rows or cols)))
    seconds = runner.launch("flashmoe_probe_tile", args, 1, tile_smem_bytes(spec))
    got = dev[4].cpu()

    a = torch.zeros(bm, k, dtype=torch.float64)
    keep = a_rows >= 0
    a[keep] = a_full[a_rows[keep].long()].double()
    ops = []
    for op in range(nb):
        b = torch.zeros(cols, k, dtype=torch.float64)
        n = max(0, min(cols, inter - col0))
        b[:n] = w[expert, op, col0:col0 + n].double()
        ops.append(b)
    if spec.dtype == "float32":                                 # the engines round to TF32 (cvt.rna)
        a = reference._tf32(a.float()).double()
        ops = [reference._tf32(b.float()).double() for b in ops]
    accs = [a @ b.t() for b in ops]
    if nb == 2:
        fn = torch.nn.functional.silu if act == 0 else torch.nn.functional.gelu
        expected = fn(accs[0]) * accs[1]
    else:
        expected = accs[0]
    return got, expected, rows_valid.bool(), valid_cols, seconds


def check_tile(runner: ProbeRunner, nb: int, k: int, use_tma: bool, seed: int = 0, **tile) -> dict:
    """The tile (``run_tile``; ``tile``: its act, inter, col0) against float64 torch under
    ``accuracy.tile_tolerance``; rows not marked valid and columns past ``valid_cols`` must keep
    their poison."""
    tile.setdefault("act", 0 if nb == 2 else 1)
    got, expected, valid, valid_cols, seconds = run_tile(runner, nb, k, use_tma, seed=seed, **tile)
    records = _records(runner)
    stored, want = got[valid, :valid_cols], expected[valid, :valid_cols]
    tol = accuracy.tile_tolerance(want, runner.spec.dtype)
    report = mismatch(stored, want, tol, vector_elems=16 // got.element_size())
    untouched = bool(torch.isnan(got[~valid]).all()) and bool(torch.isnan(got[:, valid_cols:]).all())
    passed = not records and report["wrong_elements"] == 0 and untouched
    return {"probe": "tile", "gemm": runner.spec.gemm, "dtype": runner.spec.dtype, "nb": nb, "k": k,
            "b_by": "tma" if use_tma else "cp.async", "passed": passed, "seconds": round(seconds, 4),
            "stored_only_valid": untouched, "records": records, **report}


# ---------------------------------------------------------------- TMA box and a bounded mbarrier wait

def check_tma_box(runner: ProbeRunner, seed: int = 0, expect_extra: bool = False,
                  timeout_ns: int = 10**9) -> dict:
    """One 4-D TMA box, half of it past the tensor's edge (zero fill), against torch slicing.
    ``expect_extra``: the stage's mbarrier expects twice the box's bytes, so it never completes;
    the probe passes when the bounded wait times out, says so, and the launch returns."""
    spec = runner.spec
    dt = DTYPES[spec.dtype]
    eb = dt.itemsize
    bk, rows = STAGE_K_BYTES // eb, spec.block_n // 2
    k, inter, nb, experts = 3 * bk + bk // 2, rows + rows // 2, 2, 3
    g = torch.Generator().manual_seed(seed + 101)
    w = torch.randn(experts, nb, inter, k, generator=g).to(dt)
    coord = (2 * bk + bk // 2, rows, 1, 2)          # K runs past the end by half a box, rows by half
    out = torch.full((rows, bk), float("nan"), dtype=dt)
    w_dev, out_dev = runner.tensor(w), runner.tensor(out)
    params = runner.params(runner.wait_params(timeout_ns))
    args = abi.ProbeArgs()
    args.params, args.out = params.data_ptr(), out_dev.data_ptr()
    box_bytes = rows * STAGE_K_BYTES
    args.k, args.inter = box_bytes * (2 if expect_extra else 1), rows
    args.coord[:] = coord
    args.b_map.opaque[:] = _map_words(runner.encode(tensormap.expert_rows_map(
        "probe_box", spec.dtype, w_dev.data_ptr(), k, inter, nb, experts, rows)))
    seconds = runner.launch("flashmoe_probe_tma_box", args, 1, box_bytes + 64)
    records = runner.records()
    described = [describe_record(r) for r in records]
    result = {"probe": "tma_box_wait" if expect_extra else "tma_box", "dtype": spec.dtype, "box": [bk, rows, 1, 1],
              "coord": list(coord), "seconds": round(seconds, 4), "records": described}
    if expect_extra:
        timed_out = [r for r in records if r.code == abi.ErrorCode.TIMEOUT and r.what == abi.WaitKind.PIPE_FULL]
        result["passed"] = bool(timed_out) and timed_out[0].waited_ns >= timeout_ns
        result["detail"] = ("the unfinished stage timed out and was reported" if result["passed"] else
                            "no timeout record for the stage that never completes")
        return result
    expected = torch.zeros(rows, bk, dtype=dt)
    c0, c1, c2, c3 = coord
    part = w[c3, c2, c1:c1 + rows, c0:c0 + bk]
    expected[:part.shape[0], :part.shape[1]] = part
    report = mismatch(out_dev.cpu(), expected, 0.0, vector_elems=16 // eb)
    result.update(report, passed=not records and report["wrong_elements"] == 0)
    return result


def _map_words(blob: bytes) -> list[int]:
    return [int.from_bytes(blob[i:i + 8], "little") for i in range(0, len(blob), 8)]


# ---------------------------------------------------------------- router

def near_tie_router(config: MoEConfig, tokens: int, seed: int = 0):
    """x and router weights where the router rows of experts E/2 .. 3E/4 are twins of rows
    0 .. E/4, plus a perturbation of ~1e-6: a token whose k-th and (k+1)-th choices are a twin
    pair faces scores within fp32 rounding of each other (a near tie); every other token must
    route exactly as the reference."""
    g = torch.Generator().manual_seed(seed + 7)
    E, H = config.num_experts, config.hidden_size
    x = torch.randn(tokens, H, generator=g)
    w = torch.randn(E, H, generator=g) * H ** -0.5
    w[E // 2:3 * E // 4] = w[:E // 4] + 1e-6 * torch.randn(E // 4, H, generator=g)
    return x.to(config.torch_dtype), w


def check_router(runner: ProbeRunner, config: MoEConfig, tokens: int, seed: int = 0, grid: int = 4,
                 timeout_ns: int = 10**9) -> dict:
    """The route phase alone against ``reference.route``: no token may route differently unless
    its decision is a near tie (``checks.NEAR_TIE``), and the weights of the tokens routed alike
    must agree within ``checks.weight_tolerance``."""
    spec = runner.spec
    config = config.replace(dtype=spec.dtype, gated=spec.gated, scale_expert_input=spec.scale_input)
    x, router = near_tie_router(config, tokens, seed)
    weights = reference.MoEWeights(router_weight=router, gate_up_proj=torch.empty(0), down_proj=torch.empty(0))
    if config.selection_bias:
        weights.selection_bias = torch.randn(config.num_experts, generator=torch.Generator().manual_seed(seed)) * 0.05
    info = DeviceInfo(sm_count=grid, max_smem_per_block=1 << 30, arch=spec.arch)
    plan = make_plan(config, spec, world=1, max_tokens=max(tokens, 1), device=info)
    heap = torch.zeros(plan.rank_heap_bytes, dtype=torch.uint8, device=runner.device)
    peers = torch.tensor([heap.data_ptr()], dtype=torch.int64, device=runner.device)
    x_dev, router_dev = runner.tensor(x), runner.tensor(router.float())
    bias_dev = runner.tensor(weights.selection_bias.float()) if config.selection_bias else None
    p = abi.fill_params(plan, heap=heap.data_ptr(), peer_bases=peers.data_ptr(), control=runner.control.data_ptr(),
                        router_weight=router_dev.data_ptr(), gate_up=0, down=0,
                        selection_bias=bias_dev.data_ptr() if bias_dev is not None else 0,
                        local=[(x_dev.data_ptr(), 0, tokens)], timeout_ns=timeout_ns)
    params = runner.params(p)
    args = abi.ProbeArgs()
    args.params = params.data_ptr()
    seconds = runner.launch("flashmoe_probe_router", args, plan.grid, plan.smem_bytes)

    def region(name, dtype, width):
        off = plan.regions[name].offset
        return heap[off:off + tokens * width * 4].view(dtype).view(tokens, width).cpu()

    got = reference.Routing(ids=region("topk_ids", torch.int32, config.top_k).long(),
                            weights=region("topk_weights", torch.float32, config.top_k),
                            kept=torch.ones(tokens, config.top_k, dtype=torch.bool))
    mismatches, near_differing, weight_err = checks.compare_routing(x, weights, config, got)
    weight_tol = checks.weight_tolerance(x, weights, config)
    near_ties = int((checks.selection_gaps(x, weights, config) < checks.NEAR_TIE).sum())
    records = _records(runner)
    return {"probe": "router", "tokens": tokens, "E": config.num_experts, "k": config.top_k,
            "scoring": config.scoring, "n_group": config.n_group, "routing_mismatches": mismatches,
            "near_ties": near_ties, "near_ties_routed_differently": near_differing, "weight_err": weight_err,
            "weight_tol": weight_tol, "records": records, "seconds": round(seconds, 4),
            "passed": not records and mismatches == 0 and weight_err <= weight_tol and near_ties > 0}


# ---------------------------------------------------------------- bounded flag waits

def check_wait(runner: ProbeRunner, timeout_ns: int = 50_000_000) -> dict:
    """mode 0: block 0 waits for a peer's flag nobody sets and must time out after ``timeout_ns``
    with a record naming what it waited for; block 1, waiting as a combine does since before
    block 0 began, must leave through the abort (its wait has more patience).
    mode 1: a flag another block sets in time is seen. Both launches must return."""
    flags = runner.tensor(torch.zeros(4, dtype=torch.int32))
    result = runner.tensor(torch.full((2,), 9, dtype=torch.int32))
    params = runner.params(runner.wait_params(timeout_ns))
    args = abi.ProbeArgs()
    args.params, args.flags, args.result, args.mode = params.data_ptr(), flags.data_ptr(), result.data_ptr(), 0
    seconds = runner.launch("flashmoe_probe_wait", args, 2, 64)
    records = runner.records()
    by_rank = {r.rank: r for r in records}
    timeout_ok = (0 in by_rank and by_rank[0].code == abi.ErrorCode.TIMEOUT and by_rank[0].waited_ns >= timeout_ns
                  and by_rank[0].what == abi.WaitKind.DATA_FLAG and by_rank[0].expected == 1
                  and by_rank[0].observed == 0)
    abort_ok = (1 in by_rank and by_rank[1].code == abi.ErrorCode.ABORTED
                and by_rank[1].what == abi.WaitKind.DONE_FLAG)
    failed_waits = result.cpu().tolist() == [0, 0]
    described = [describe_record(r) for r in records]

    flags.zero_()
    result.fill_(9)
    args.mode = 1
    runner.launch("flashmoe_probe_wait", args, 2, 64)
    seen_ok = result.cpu().tolist()[0] == 1 and not runner.records()
    return {"probe": "bounded_wait", "timeout_s": timeout_ns / 1e9, "seconds": round(seconds, 4),
            "timed_out_and_recorded": timeout_ok, "other_block_aborted": abort_ok, "flag_in_time_seen": seen_ok,
            "records": described, "passed": timeout_ok and abort_ok and failed_waits and seen_ok}


# ---------------------------------------------------------------- trace records

def check_trace(runner: ProbeRunner, blocks: int = 3, per_block: int = 5, capacity: int = 4) -> dict:
    """Each block writes ``per_block`` records into ``capacity`` slots: the decoded trace must hold
    the first ``capacity`` of each block with their fields, count the rest as lost, and have
    end >= start on every record."""
    from ..trace import decode
    _, records_offset, total = trace_layout(blocks, capacity)
    buffer = runner.tensor(torch.full((total,), 0xAB, dtype=torch.uint8))
    p = runner.wait_params(10**9)
    p.trace, p.trace_capacity, p.trace_records_offset = buffer.data_ptr(), capacity, records_offset
    params = runner.params(p)
    args = abi.ProbeArgs()
    args.params, args.k = params.data_ptr(), per_block
    seconds = runner.launch("flashmoe_probe_trace", args, blocks, 64)
    trace = decode(buffer.cpu().numpy(), blocks, capacity)
    recs = trace.records
    want = {(b, i, i % len(abi.TaskKind), 1000 * b + i) for b in range(blocks) for i in range(capacity)}
    got = {(int(r["block"]), int(r["task"]), int(r["kind"]), int(r["extra"])) for r in recs}
    ordered = bool((recs["end_ns"] >= recs["start_ns"]).all())
    ranks = bool((recs["rank"] == recs["block"]).all())
    lost_ok = trace.lost_records == blocks * (per_block - capacity)
    return {"probe": "trace", "records": len(recs), "lost": trace.lost_records, "seconds": round(seconds, 4),
            "fields_match": got == want, "end_after_start": ordered, "sm_ids": ranges(set(recs["sm"].tolist())),
            "passed": got == want and ordered and ranks and lost_ok}
