"""Expert parallelism on one GPU: flashmoe with W virtual ranks against bulk-synchronous EP.

    python bench/sweep_ep.py [--configs ...] [--tokens ...] [--worlds 1 2 4 8] [--repeats N]
                             [--routing skewed]
    python bench/sweep_ep.py --dry-run                   # CPU, tiny shapes, reference backend
    torchrun --nproc_per_node=N bench/sweep_ep.py --multiprocess    # see sweep_multiprocess

The same total tokens go through ``FlashMoELayer(..., virtual_world=W)`` for each W (one launch
hosts all W ranks: tokens split over ranks, experts in blocks of E / W) and through the
bulk-synchronous baseline of ``bench/baselines.py`` for the same W. Every output is checked once
against the same fp32 reference (``flashmoe.accuracy`` rule): all W agree within the project
tolerance exactly when every row is correct. Reported: time, time(W) / time(W=1) per provider
(flashmoe's target: W=8 within 1.15x of W=1) and the speed-up over bulk-synchronous at each W.
``--routing skewed`` favours the first E / 8 experts (``flashmoe.checks.routing_shift``), all on
the first ranks: the busiest rank's share of the expert rows over the mean (``rank_load``) is
printed beside the time, which shows what skew still costs when the hosted ranks share their
tasks (every block claims every rank's, its own first).
``--trace N`` records each flashmoe row's kernel timeline: where W ranks spend the time one rank
does not (``flashmoe.trace_ranks``: when each rank routed, dispatched, ran its first and last tile
and combined, and how many tiles other ranks' blocks took).
Writes ``bench/results/ep_<device>_<date>.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):       # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import layers, providers, report, timing
from bench.measure import measure
from flashmoe import FlashMoELayer, reference
from flashmoe.checks import routing_shift

PROVIDERS = ("flashmoe", "bulk_sync")
RATIO_TARGET = 1.15       # flashmoe's goal for time(W=8) / time(W=1); reported, never asserted
COLUMNS = ["config", "hidden", "intermediate", "experts", "top_k", "tokens", "routing", "world",
           "rank_load", "provider", "status", "median_ms", "q1_ms", "q3_ms", "min_ms", "repeats", "clock", "tflops",
           "pct_matmul", "weight_gbps", "pct_copy", "max_abs_err", "tol", "correct", "route_agree",
           "ratio_vs_w1", "speedup_vs_bulk_sync", "sm_busy", "comm_overlap", "phases", "route_split",
           "rank_split", "note"]
TABLE = [("config", "config", ""), ("tokens", "tokens", ""), ("world", "W", ""),
         ("rank_load", "load", ".3g"), ("provider", "provider", ""), ("median_ms", "ms", ".4g"), ("tflops", "TFLOP/s", ".4g"),
         ("pct_matmul", "%mm", ".3g"), ("ratio_vs_w1", "W/W1", ".3f"),
         ("speedup_vs_bulk_sync", "x bulk", ".3g"), ("max_abs_err", "err", ".2e"),
         ("tol", "tol", ".2e"), ("status", "status", "")]
WIDTHS = {"config": 16, "provider": 9, "tokens": 6, "world": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(layers.LAYERS), choices=list(layers.LAYERS))
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help="total tokens per forward (default 4096 16384; 32 with --dry-run)")
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--routing", default="uniform", choices=("uniform", "skewed"),
                   help="skewed: the first E / 8 experts (the first ranks') get most of the rows")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 30; 2 dry)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; 1 dry)")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays where capturable")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, reference backend: runs every path, measures nothing")
    p.add_argument("--multiprocess", action="store_true",
                   help="one rank per GPU under torchrun (see sweep_multiprocess)")
    p.add_argument("--out-dir", default=None, help="default bench/results (a temp dir with --dry-run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="record the kernel's timeline (N records per block) and write, per flashmoe row, a "
                        "Perfetto JSON and a PNG timeline (..._<layer>_<tokens>_w<W>.trace.json) and its "
                        "phase, routing and rank splits")
    args = p.parse_args(argv)
    args.tokens = args.tokens or ([32] if args.dry_run else [4096, 16384])
    args.repeats = args.repeats or (2 if args.dry_run else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 5)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.multiprocess:
        return sweep_multiprocess(args)
    device = timing.pick_device(args.dry_run)
    with timing.cpu_threads(1 if args.dry_run else None):
        return sweep_virtual(args, device)


def sweep_virtual(args, device: torch.device) -> int:
    """W virtual ranks in one process on one GPU (or the CPU for a dry run)."""
    torch.manual_seed(args.seed)
    meta = report.run_metadata(device, args.dry_run)
    ceilings = timing.measure_ceilings(device, args.dry_run)
    report.print_header(meta, ceilings)
    stem = report.output_stem("ep", meta, args.out_dir)
    rows: list[dict] = []
    show = report.RowPrinter(TABLE, WIDTHS)
    for name in args.configs:
        config, _ = layers.layer(name, args.dry_run)
        shape = dict(config=name, hidden=config.hidden_size, intermediate=config.intermediate_size,
                     experts=config.num_experts, top_k=config.top_k)
        traced = args.trace and not args.dry_run
        source = FlashMoELayer(config, backend="reference" if args.dry_run else "kernel",
                               device=device, max_tokens=max(args.tokens),
                               kernel_options={"trace_capacity": args.trace} if traced else None)
        shift = routing_shift(args.routing, config, torch.Generator().manual_seed(args.seed))
        if shift is not None:
            with torch.no_grad():
                source.router_weight += shift[1].to(source.router_weight)
        weights = source.weights()
        mine: list[dict] = []
        for world in args.worlds:
            made = _providers(args, source, world)
            for tokens in args.tokens:
                # Same seed per token count: every W sees the same inputs.
                inputs = timing.rotating_inputs((tokens, config.hidden_size), config.torch_dtype,
                                                device, seed=args.seed + tokens)
                if shift is not None:
                    inputs = [(x.float() + shift[0].to(device)).to(x.dtype) for x in inputs]
                with torch.inference_mode():
                    ref_routing = reference.route(inputs[0], weights, config)
                load = None if config.num_experts % world else rank_load(ref_routing, config.num_experts, world)
                for pname, p in made.items():
                    if isinstance(p, str):
                        row = {"provider": pname, "tokens": tokens, "status": f"skipped: {p}"}
                    else:
                        row = measure(p, inputs, weights, config, ref_routing, ceilings,
                                      warmup=args.warmup, repeats=args.repeats, graph=args.cuda_graph)
                        if traced and pname == "flashmoe" and row.get("status") == "ok":
                            row.update(report.attach_trace(p.forward, f"{stem}_{name}_{tokens}_w{world}"))
                    row.update(shape, routing=args.routing, world=world, rank_load=load,
                               series=f"{pname} T={tokens}")
                    mine.append(row)
                    show(row)
                    report.print_trace(row)
                report.write_results(stem, COLUMNS, rows + mine, meta, ceilings)
                del inputs
            del made
        _ratios(mine)
        rows += mine
        report.write_results(stem, COLUMNS, rows, meta, ceilings)
        del source, weights
        if not args.dry_run:       # after each config, so a run cut short still has its plot
            _plot(stem, rows, meta)
    print("\nsummary")
    report.print_table(rows, TABLE)
    if not args.dry_run:
        _print_targets(rows, args.worlds)
    png = _plot(stem, rows, meta)
    print(f"wrote {stem}.csv, {stem}.json" + (f", {png}" if png else ""))
    return 0


def rank_load(routing: reference.Routing, num_experts: int, world: int) -> float:
    """The busiest rank's expert rows (routed (token, slot) pairs) over the mean of the W ranks."""
    rows = torch.bincount((routing.ids.flatten() // (num_experts // world)).cpu(), minlength=world)
    return float(rows.max() / rows.float().mean()) if rows.sum() else 1.0


def _plot(stem, rows, meta):
    title = f"W virtual ranks on one GPU vs bulk-synchronous, {meta['device_name']}, {meta['date_utc']}"
    if meta["dry_run"]:
        title += " (DRY RUN: not a measurement)"
    return report.plot(f"{stem}.png", rows, x="world", y="median_ms", ylabel="ms per forward",
                       series="series", logy=True, title=title)


def _providers(args, source: FlashMoELayer, world: int) -> dict:
    """{name: Provider or the reason it cannot run at this W}."""
    config = source.config
    made = {}
    for name in args.providers:
        try:
            if config.num_experts % world:
                raise providers.Unavailable(f"num_experts={config.num_experts} is not divisible by W={world}")
            if name == "flashmoe":
                # The kernel sizes its buffers per rank: the most tokens one rank receives.
                made[name] = providers.flashmoe(source, virtual_world=world, dry_run=args.dry_run,
                                                max_tokens=math.ceil(max(args.tokens) / world))
            else:
                made[name] = providers.bulk_sync(config, source.weights(), world)
        except providers.Unavailable as exc:
            made[name] = str(exc)
    return made


def _ratios(rows: list[dict]) -> None:
    """ratio_vs_w1 = time(W) / time(W=1) of the same provider and tokens; speedup_vs_bulk_sync
    = bulk-synchronous time / flashmoe time at the same W and tokens. Correct rows only."""
    ok = {(r["provider"], r["tokens"], r["world"]): r["median_ms"] for r in rows if r.get("status") == "ok"}
    for r in rows:
        key = (r["provider"], r["tokens"])
        good = r.get("status") == "ok"
        r["ratio_vs_w1"] = r["median_ms"] / ok[(*key, 1)] if good and (*key, 1) in ok else None
        bulk = ok.get(("bulk_sync", r["tokens"], r["world"]))
        r["speedup_vs_bulk_sync"] = bulk / r["median_ms"] if good and bulk else None


def _print_targets(rows: list[dict], worlds: list[int]) -> None:
    top = max(worlds)
    for r in rows:
        if r["provider"] == "flashmoe" and r["world"] == top and r.get("ratio_vs_w1") is not None:
            verdict = "within" if r["ratio_vs_w1"] <= RATIO_TARGET else "NOT within"
            print(f"{r['config']} T={r['tokens']}: flashmoe W={top} / W=1 = {r['ratio_vs_w1']:.3f} "
                  f"({verdict} the {RATIO_TARGET}x target)")


def sweep_multiprocess(args) -> int:
    """The multi-process sweep: ``torchrun --nproc_per_node=N bench/sweep_ep.py --multiprocess``.

    One process per GPU (W = N): ``FlashMoELayer(process_group=...)`` against the bulk-synchronous
    baseline over ``torch.distributed`` on the same GPUs, tokens per rank = ``--tokens`` / N
    (``bench/ep_multiprocess.py``). Checks first that every process has a GPU of its own and says
    what is missing."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world == 0:
        print("--multiprocess runs one process per GPU under torchrun: "
              "torchrun --nproc_per_node=N bench/sweep_ep.py --multiprocess", file=sys.stderr)
        return 2
    if gpus < local:
        print(f"--multiprocess: {local} processes on this node need {local} CUDA GPUs (one each); "
              f"{gpus} visible, {local - gpus} missing. With one GPU, run without --multiprocess: "
              f"W virtual ranks share it (--worlds 1 2 4 8); examples/ep_torchrun.py --same-gpu "
              f"checks several processes on one GPU.", file=sys.stderr)
        return 2
    import torch.distributed as dist
    from bench import ep_multiprocess
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    try:
        return ep_multiprocess.run(args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
