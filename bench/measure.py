"""One benchmark row: check a provider once against the reference, then time it, then derive
the rates. A provider that cannot run (unavailable, out of memory, raised) gives a row whose
status says why instead of stopping the run."""

from __future__ import annotations

import traceback

import torch

from flashmoe.config import MoEConfig
from flashmoe.reference import MoEWeights, Routing

from . import metrics, timing
from .providers import Provider, Unavailable, check, one_line


def measure(provider: Provider, inputs: list[torch.Tensor], weights: MoEWeights, config: MoEConfig,
            reference_routing: Routing, ceilings: dict, *, warmup: int, repeats: int,
            graph: bool) -> dict:
    tokens = inputs[0].shape[0]
    row = {"provider": provider.name, "tokens": tokens}
    try:
        with torch.inference_mode():
            out, routing = provider.checked(inputs[0])
            row.update(check(out, inputs[0], weights, config, routing, reference_routing))
            del out
            t = timing.time_fn(provider.forward, inputs, warmup=warmup, repeats=repeats, graph=graph)
            provider.finish(inputs[0])
    except Unavailable as exc:
        return {**row, "status": f"skipped: {one_line(exc)}"}
    except torch.OutOfMemoryError as exc:
        return {**row, "status": f"skipped: out of memory ({one_line(exc, 100)})"}
    except Exception as exc:   # a crash of one provider must not hide the others' results
        traceback.print_exc(limit=3)
        return {**row, "status": f"error: {type(exc).__name__}: {one_line(exc, 160)}"}
    finally:
        if inputs[0].device.type == "cuda":
            torch.cuda.empty_cache()     # the next provider gets the memory this one cached
    seconds = t.median_ms * 1e-3
    flop = metrics.flops(config, tokens)
    wbytes = metrics.expert_weight_bytes(config, tokens, reference_routing)
    row.update(status="ok" if row["correct"] else "WRONG (over tolerance)",
               median_ms=t.median_ms, q1_ms=t.q1_ms, q3_ms=t.q3_ms, min_ms=t.min_ms,
               repeats=t.repeats, clock=t.clock, note=t.note,
               tflops=flop / seconds / 1e12,
               pct_matmul=100 * flop / seconds / 1e12 / ceilings["matmul_tflops"],
               weight_gb=wbytes / 1e9, weight_gbps=wbytes / seconds / 1e9,
               pct_copy=100 * wbytes / seconds / 1e9 / ceilings["copy_gbps"])
    roof = metrics.roofline(config, tokens, ceilings, reference_routing)
    row.update(roofline_ms=roof["roofline_ms"], bound=roof["bound"],
               pct_roofline=100 * roof["roofline_ms"] / t.median_ms)
    return row


def speedups(rows: list[dict], baselines: list[str], key: str = "provider") -> None:
    """Add ``speedup_vs_<b>`` = time of baseline b / time of the row, for rows and baselines
    that both ran and passed the accuracy check (a wrong result gets no speed-up)."""
    times = {r[key]: r["median_ms"] for r in rows if r.get("status") == "ok"}
    for r in rows:
        for b in baselines:
            ok = r.get("status") == "ok" and b in times
            r[f"speedup_vs_{b}"] = times[b] / r["median_ms"] if ok else None
