"""How a benchmark times a forward, and the two ceilings each result is a fraction of.

On a GPU: CUDA events around each call, after warm-up, with the input rotating among enough
sets that together exceed the L2 cache (so no call finds its input cached by the previous one);
the median of the calls is the result and the interquartile range its spread. Optionally the
calls are captured into one CUDA graph and its replays timed (removes host launch gaps).

On a CPU (``--dry-run`` only) the same code runs with the host clock so every path is
exercised; those numbers are labelled ``host`` and are not measurements of anything.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    repeats: int
    clock: str          # 'cuda_events', 'cuda_graph' or 'host'
    note: str = ""      # e.g. why a requested graph capture fell back to events

    @property
    def spread_ms(self) -> float:
        return self.q3_ms - self.q1_ms


def _summary(samples_ms: Sequence[float], clock: str, note: str = "") -> Timing:
    s = sorted(samples_ms)
    if len(s) >= 4:
        q1, _, q3 = statistics.quantiles(s, n=4)
    else:
        q1, q3 = s[0], s[-1]
    return Timing(median_ms=statistics.median(s), q1_ms=q1, q3_ms=q3, min_ms=s[0], repeats=len(s),
                  clock=clock, note=note)


def pick_device(dry_run: bool) -> torch.device:
    """The CPU for a dry run, else the current CUDA device (exit with the reason if none)."""
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible (torch.cuda.is_available() is False): this benchmark "
                         "times GPU code; use --dry-run to exercise it on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size; on a CPU a nominal 4 MiB so the rotation logic still runs."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return 4 << 20


def rotation_count(set_bytes: int, device: torch.device, max_sets: int = 256) -> int:
    """How many input sets to rotate so that together they exceed twice the L2 (at least 2)."""
    return max(2, min(max_sets, math.ceil(2 * l2_bytes(device) / max(set_bytes, 1)) + 1))


def rotating_inputs(shape, dtype, device: torch.device, seed: int = 0,
                    max_sets: int = 256) -> list[torch.Tensor]:
    """Fresh standard-normal input sets (never zeros: they hide unwritten outputs and can run
    faster than real data), as many as ``rotation_count`` asks for."""
    n = rotation_count(math.prod(shape) * torch.empty((), dtype=dtype).element_size(), device, max_sets)
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(n)]


def time_fn(fn: Callable[[torch.Tensor], object], inputs: Sequence[torch.Tensor], *,
            warmup: int = 5, repeats: int = 20, graph: bool = False) -> Timing:
    """Time ``fn(x)`` with x rotating through ``inputs``. See the module docstring."""
    device = inputs[0].device
    if device.type != "cuda":
        return _time_host(fn, inputs, warmup, repeats)
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize(device)
    note = ""
    if graph:
        try:
            return _time_graph(fn, inputs, repeats)
        except Exception as exc:            # capture is optional: say why and time eagerly
            note = f"graph capture failed ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
            torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        x = inputs[(warmup + i) % len(inputs)]
        starts[i].record()
        fn(x)
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda_events", note)


def _time_graph(fn, inputs, repeats: int, max_calls: int = 64) -> Timing:
    """One graph holding a call per input set (up to ``max_calls``), so replays still rotate;
    each replay's time divided by its calls is one sample."""
    calls = inputs[:max_calls]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for x in calls:
            fn(x)
    g.replay()                      # the first replay uploads the graph: keep it out of the samples
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        starts[i].record()
        g.replay()
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) / len(calls) for s, e in zip(starts, ends)]
    del g
    return _summary(samples, "cuda_graph")


def _time_host(fn, inputs, warmup: int, repeats: int) -> Timing:
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    samples = []
    for i in range(repeats):
        x = inputs[(warmup + i) % len(inputs)]
        start = time.perf_counter()
        fn(x)
        samples.append((time.perf_counter() - start) * 1e3)
    return _summary(samples, "host")


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads (None: unchanged). A dry run's matrices are
    tiny: extra threads only add synchronisation, which on a busy machine costs 30x."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the two ceilings, measured in the same run as the results they scale --

def measure_matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16,
                          repeats: int = 20) -> tuple[float, Timing]:
    """Dense rate of an n x n x n ``torch.matmul`` on random data, in TFLOP/s (2 n^3 / time)."""
    gen = torch.Generator(device=device).manual_seed(1)
    inputs = [torch.randn(n, n, device=device, generator=gen).to(dtype) for _ in range(2)]
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_fn(lambda a: torch.matmul(a, b, out=out), inputs, warmup=3, repeats=repeats)
    return 2 * n ** 3 / (timing.median_ms * 1e-3) / 1e12, timing


def measure_copy_gbps(device: torch.device, nbytes: int = 2 << 30, repeats: int = 20) -> tuple[float, Timing]:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    numel = nbytes // 2
    src = torch.randn(numel, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    timing = time_fn(lambda s: dst.copy_(s), [src], warmup=3, repeats=repeats)
    return 2 * numel * 2 / (timing.median_ms * 1e-3) / 1e9, timing


def measure_ceilings(device: torch.device, dry_run: bool) -> dict:
    """Both ceilings for this device; tiny sizes in a dry run (the code path, not a number)."""
    if dry_run:
        tflops, t_mm = measure_matmul_tflops(device, n=256, repeats=3)
        gbps, t_cp = measure_copy_gbps(device, nbytes=8 << 20, repeats=3)
    else:
        tflops, t_mm = measure_matmul_tflops(device)
        gbps, t_cp = measure_copy_gbps(device)
    return {"matmul_tflops": tflops, "matmul_clock": t_mm.clock, "matmul_spread_ms": t_mm.spread_ms,
            "copy_gbps": gbps, "copy_clock": t_cp.clock, "copy_spread_ms": t_cp.spread_ms}
