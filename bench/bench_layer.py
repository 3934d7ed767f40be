"""One MoE layer on one GPU: flashmoe against a torch loop and transformers' grouped_mm experts.

    python bench/bench_layer.py [--configs ...] [--tokens ...] [--providers ...] [--repeats N]
    python bench/bench_layer.py --dry-run        # CPU, tiny shapes, reference backend

Every row is checked once against the fp32 reference (``flashmoe.accuracy`` rule) before it is
timed, and is reported as a fraction of the two ceilings measured at the start of the same run:
the dense bf16 matmul rate (useful FLOPs / time) and the copy bandwidth (expert-weight bytes /
time), and against the roofline those ceilings give the row (``bench.metrics.roofline``: the
longer of its FLOPs at the matmul rate and its bytes at the copy bandwidth). Speed-ups are over
the baselines of the same row, and only between correct results. With ``--trace N`` each
flashmoe row (a kernel variant's too) also gets the kernel's phase table: the share of the
launch's block time spent in route, dispatch, selections, GEMM0, GEMM1 and combine, and in no
task (waiting or idle).
Writes ``bench/results/layer_<device>_<date>.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):       # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import layers, providers, report, timing
from bench.measure import measure, speedups
from flashmoe import FlashMoELayer, reference

PROVIDERS = ("flashmoe", "torch_loop", "hf_grouped_mm")
# On request: kernel variants, to measure what a choice gains (providers.KERNEL_VARIANTS).
EXTRA_PROVIDERS = providers.KERNEL_VARIANTS
BASELINES = ("torch_loop", "hf_grouped_mm")
COLUMNS = ["config", "hidden", "intermediate", "experts", "top_k", "gated", "tokens", "provider", "tile",
           "status", "median_ms", "q1_ms", "q3_ms", "min_ms", "repeats", "clock", "tflops",
           "pct_matmul", "weight_gb", "weight_gbps", "pct_copy", "roofline_ms", "bound", "pct_roofline",
           "max_abs_err", "tol", "correct", "route_agree"] + [f"speedup_vs_{b}" for b in BASELINES] + \
    ["sm_busy", "comm_overlap", "phases", "route_split", "note"]
TABLE = [("config", "config", ""), ("tokens", "tokens", ""), ("provider", "provider", ""), ("tile", "tile", ""),
         ("median_ms", "ms", ".4g"), ("tflops", "TFLOP/s", ".4g"), ("pct_matmul", "%mm", ".3g"),
         ("weight_gbps", "wGB/s", ".4g"), ("pct_copy", "%copy", ".3g"), ("roofline_ms", "roof ms", ".3g"),
         ("pct_roofline", "%roof", ".3g"),
         ("max_abs_err", "err", ".2e"), ("tol", "tol", ".2e"), ("route_agree", "route", ".4f"),
         ("speedup_vs_torch_loop", "x loop", ".3g"), ("speedup_vs_hf_grouped_mm", "x hf", ".3g"),
         ("status", "status", "")]
WIDTHS = {"config": 16, "provider": 20, "tokens": 6, "tile": 7}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(layers.LAYERS), choices=list(layers.LAYERS))
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help=f"default {list(layers.TOKENS)} ({list(layers.DRY_RUN_TOKENS)} with --dry-run)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS + EXTRA_PROVIDERS,
                   help=f"default {' '.join(PROVIDERS)}; flashmoe_128x128 is flashmoe without the wide tile, "
                        "flashmoe_cooperative also without ping-pong consumers, flashmoe_nvshmem that "
                        "in the NVSHMEM build a process-group layer runs (one PE; needs nvshmem4py)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 30; 2 dry)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; 1 dry)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA-graph replays (a provider that cannot be captured is timed eagerly)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, reference backend: runs every path, measures nothing")
    p.add_argument("--out-dir", default=None, help="default bench/results (a temp dir with --dry-run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="record the kernel's timeline (N records per block) and write, per row, a "
                        "Perfetto JSON, a PNG timeline and the SM-busy / overlap figures")
    args = p.parse_args(argv)
    args.tokens = args.tokens or list(layers.DRY_RUN_TOKENS if args.dry_run else layers.TOKENS)
    args.repeats = args.repeats or (2 if args.dry_run else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 5)
    return args


def build_providers(names, source: FlashMoELayer, family: str, dry_run: bool):
    """{name: Provider or the reason it is unavailable}."""
    config, weights = source.config, source.weights()
    made = {}
    for name in names:
        try:
            if name == "flashmoe" or name in providers.KERNEL_VARIANTS:
                made[name] = providers.flashmoe(source, dry_run=dry_run, variant=name)
            elif name == "torch_loop":
                made[name] = providers.torch_loop(config, weights)
            else:
                made[name] = providers.hf_grouped_mm(config, weights, family)
        except providers.Unavailable as exc:
            made[name] = str(exc)
    return made


def main(argv=None) -> int:
    args = parse_args(argv)
    device = timing.pick_device(args.dry_run)
    with timing.cpu_threads(1 if args.dry_run else None):
        return run(args, device)


def run(args, device: torch.device) -> int:
    torch.manual_seed(args.seed)
    meta = report.run_metadata(device, args.dry_run)
    ceilings = timing.measure_ceilings(device, args.dry_run)
    report.print_header(meta, ceilings)
    stem = report.output_stem("layer", meta, args.out_dir)
    rows: list[dict] = []
    show = report.RowPrinter(TABLE, WIDTHS)
    if "flashmoe_nvshmem" in args.providers and not args.dry_run:
        size = providers.reserve_nvshmem_heap([layers.layer(n)[0] for n in args.configs], max(args.tokens), device)
        if size:
            print(f"flashmoe_nvshmem: NVSHMEM symmetric heap {size} (the largest layer's, plus NVSHMEM's own)")
    try:
        _run_configs(args, device, meta, ceilings, stem, rows, show)
    finally:
        from flashmoe.host.runtime import active_runtime
        if (rt := active_runtime()) is not None:    # flashmoe_nvshmem initialised NVSHMEM
            rt.close()
    print("\nsummary")
    report.print_table(rows, TABLE)
    png = _plot(stem, rows, meta, ceilings)
    print(f"wrote {stem}.csv, {stem}.json" + (f", {png}" if png else ""))
    return 0


def _run_configs(args, device, meta, ceilings, stem, rows, show) -> None:
    for name in args.configs:
        config, family = layers.layer(name, args.dry_run)
        shape = dict(config=name, hidden=config.hidden_size, intermediate=config.intermediate_size,
                     experts=config.num_experts, top_k=config.top_k, gated=config.gated)
        traced = args.trace and not args.dry_run
        source = FlashMoELayer(config, backend="reference" if args.dry_run else "kernel",
                               device=device, max_tokens=max(args.tokens),
                               kernel_options={"trace_capacity": args.trace} if traced else None)
        weights = source.weights()
        made = build_providers(args.providers, source, family, args.dry_run)
        for tokens in args.tokens:
            inputs = timing.rotating_inputs((tokens, config.hidden_size), config.torch_dtype, device,
                                            seed=args.seed + tokens)
            with torch.inference_mode():
                ref_routing = reference.route(inputs[0], weights, config)
            group = []
            for pname in args.providers:
                p = made[pname]
                if isinstance(p, str):
                    group.append({"provider": pname, "tokens": tokens, "status": f"skipped: {p}"})
                    continue
                group.append(measure(p, inputs, weights, config, ref_routing, ceilings,
                                     warmup=args.warmup, repeats=args.repeats, graph=args.cuda_graph))
                if pname.startswith("flashmoe") and not args.dry_run:
                    group[-1]["tile"] = providers.kernel_tile(p.forward)
                if traced and pname.startswith("flashmoe") and group[-1].get("status") == "ok":
                    variant = "" if pname == "flashmoe" else f"_{pname}"
                    group[-1].update(report.attach_trace(p.forward, f"{stem}_{name}_{tokens}{variant}"))
            speedups(group, list(BASELINES))
            for r in group:
                r.update(shape)
                show(r)
                report.print_trace(r)
            rows += group
            report.write_results(stem, COLUMNS, rows, meta, ceilings)
            del inputs
        for p in made.values():
            if not isinstance(p, str):
                try:
                    p.close()
                except Exception as exc:    # the next layer's rows say if it mattered
                    print(f"{p.name}: closing it failed: {providers.one_line(exc)}")
        del made, source, weights
        if not args.dry_run:       # after each config, so a run cut short still has its plot
            _plot(stem, rows, meta, ceilings)


def _plot(stem, rows, meta, ceilings):
    title = f"MoE layer forward, {meta['device_name']}, {meta['date_utc']}"
    if meta["dry_run"]:
        title += " (DRY RUN: not a measurement)"
    return report.plot(f"{stem}.png", rows, y="tflops", ylabel="useful TFLOP/s", series="provider",
                       title=title, hline=ceilings["matmul_tflops"], hline_label="dense bf16 matmul")


if __name__ == "__main__":
    sys.exit(main())
