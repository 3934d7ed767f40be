"""The multi-process expert-parallel sweep (``bench/sweep_ep.py --multiprocess`` under torchrun).

One process per GPU, W = the world size. For each layer config and tokens per rank: flashmoe
(``FlashMoELayer(process_group=...)``, one kernel launch per rank per forward, NVSHMEM heap)
against the bulk-synchronous baseline on the same GPUs: route, ``torch.distributed``
all_to_all_single of the rows, a grouped GEMM per rank over its local experts, all_to_all back,
combine. Both are checked once against ``ep_forward`` (fp32 math) with the project's tolerance.
Times are the max over ranks of the median of CUDA-event timed forwards (a forward ends when its
slowest rank ends). Rank 0 writes ``bench/results/ep_mp_<device>_<date>.{csv,json,png}``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bench import layers, report
from bench.baselines import _mlp_tail, grouped_mm, torch_router
from flashmoe import FlashMoELayer
from flashmoe.accuracy import max_abs_error, tolerance
from flashmoe.distributed import ep_forward

COLUMNS = ["config", "hidden", "intermediate", "experts", "top_k", "tokens_per_rank", "world",
           "provider", "status", "median_ms", "max_abs_err", "tol", "speedup_vs_bulk_sync", "note"]
TABLE = [("config", "config", ""), ("tokens_per_rank", "T/rank", ""), ("world", "W", ""),
         ("provider", "provider", ""), ("median_ms", "ms", ".4g"), ("speedup_vs_bulk_sync", "x bulk", ".3g"),
         ("max_abs_err", "err", ".2e"), ("tol", "tol", ".2e"), ("status", "status", "")]


def bulk_sync_rank(x2d, w, config, group):
    """This rank's out for its x2d: all_to_all rows to the experts' ranks, grouped GEMM, back."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    per = config.num_experts // world
    routing = torch_router(x2d, w, config)
    k, (T, H) = config.top_k, x2d.shape
    expert = routing.ids.reshape(-1)
    order = torch.argsort(expert, stable=True)                  # by destination, then expert
    send = x2d.index_select(0, order // k)
    send_counts = torch.bincount(expert, minlength=config.num_experts)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)   # [src][local expert]
    send_sizes = send_counts.view(world, per).sum(1).tolist()
    per_src = recv_counts.view(world, per)
    recv = x2d.new_empty(int(per_src.sum()), H)
    dist.all_to_all_single(recv, send, per_src.sum(1).tolist(), send_sizes, group=group)
    # Rows arrive grouped by source, then expert: regroup by expert for the grouped GEMM.
    src_expert = torch.repeat_interleave(torch.arange(per, device=x2d.device).repeat(world), per_src.reshape(-1))
    by_expert = torch.argsort(src_expert, stable=True)
    offs = torch.cumsum(per_src.sum(0), 0).to(torch.int32)
    mine = slice(rank * per, (rank + 1) * per) if w.gate_up_proj.shape[0] == config.num_experts else slice(None)
    h = _mlp_tail(grouped_mm(recv[by_expert], w.gate_up_proj[mine], offs), config)
    y = torch.empty_like(recv).index_copy_(0, by_expert, grouped_mm(h, w.down_proj[mine], offs))
    back = torch.empty_like(send)
    dist.all_to_all_single(back, y, send_sizes, per_src.sum(1).tolist(), group=group)
    pairs = torch.empty_like(back).index_copy_(0, order, back)
    return (pairs.view(T, k, H).float() * routing.weights.float().unsqueeze(-1)).sum(1).to(x2d.dtype)


def _time(fn, x, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    median = sorted(times)[len(times) // 2]
    slowest = torch.tensor([median], device=x.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def run(args, device: torch.device) -> int:
    """Called on every rank, after init_process_group('nccl')."""
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = report.run_metadata(device, False)
    meta.update(world=world, mode="multiprocess")
    stem = report.output_stem("ep_mp", meta, args.out_dir) if rank == 0 else None
    rows = []
    show = report.RowPrinter(TABLE, {"config": 16, "provider": 9})
    for name in args.configs:
        config, _ = layers.layer(name, False)
        if config.num_experts % world:
            continue
        shape = dict(config=name, hidden=config.hidden_size, intermediate=config.intermediate_size,
                     experts=config.num_experts, top_k=config.top_k, world=world)
        per_rank = [max(1, t // world) for t in args.tokens]
        torch.manual_seed(args.seed)
        layer = FlashMoELayer(config, backend="kernel", process_group=dist.group.WORLD, device=device,
                              max_tokens=max(per_rank), kernel_options={"error_check": "none"})
        w = layer.weights()
        for T in per_rank:
            x = torch.randn(T, config.hidden_size, device=device,
                            generator=torch.Generator(device).manual_seed(args.seed + rank)).to(config.torch_dtype)
            with torch.inference_mode():
                ideal = ep_forward(x, w, config, dist.group.WORLD, math="fp32")
                native = ep_forward(x, w, config, dist.group.WORLD, math="native")
                tol = tolerance(max_abs_error(native, ideal))
                made = {"flashmoe": lambda v: layer(v), "bulk_sync": lambda v: bulk_sync_rank(v, w, config, dist.group.WORLD)}
                mine = {}
                for provider, fn in made.items():
                    row = {**shape, "tokens_per_rank": T, "provider": provider, "tol": tol}
                    try:
                        out = fn(x)
                        layer.synchronize()
                        err = torch.tensor([max_abs_error(out, ideal)], device=device)
                        dist.all_reduce(err, op=dist.ReduceOp.MAX)
                        row.update(max_abs_err=float(err), status="ok" if float(err) <= tol else "WRONG (over tolerance)",
                                   median_ms=_time(fn, x, args.warmup, args.repeats))
                    except Exception as e:      # noqa: BLE001 - one provider's failure is a row
                        row.update(status=f"error: {type(e).__name__}: {str(e)[:160]}")
                    mine[provider] = row
                bulk = mine["bulk_sync"].get("median_ms")
                for row in mine.values():
                    ok = row.get("status") == "ok" and mine["bulk_sync"].get("status") == "ok"
                    row["speedup_vs_bulk_sync"] = bulk / row["median_ms"] if ok else None
                    row["series"] = f"{row['provider']} W={world}"
                    rows.append(row)
                    if rank == 0:
                        show(row)
        if rank == 0:
            report.write_results(stem, COLUMNS, rows, meta, {})
    if rank == 0:
        print("\nsummary")
        report.print_table(rows, TABLE)
        png = report.plot(f"{stem}.png", rows, x="tokens_per_rank", y="median_ms", ylabel="ms per forward",
                          series="series", logy=True,
                          title=f"flashmoe vs bulk-synchronous EP, W={world} x {meta['device_name']}, {meta['date_utc']}")
        print(f"wrote {stem}.csv, {stem}.json" + (f", {png}" if png else ""))
    return 0 if all(r.get("status") == "ok" for r in rows) else 1
