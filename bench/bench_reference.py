"""The reference backend against transformers' own ``grouped_mm`` experts: a forward, or a training step.

A layer runs its reference backend wherever the kernel cannot: on a CPU, and on any device while
autograd records, so every training step runs it (in eager mode as plain torch, whose activations
autograd keeps). It should cost no more than what a transformers user already has. Both run the same
weights of a layer of ``bench/layers.py`` (shared, not copied; transformers' block, built by
``bench/hf_baseline.py``, routes with its own router); on a CPU the layer is scaled down to
``--hidden`` (default 1024). Each row, per implementation: the median time (CUDA events on a GPU,
the host clock on a CPU, inputs rotating past the L2) and the output's max-abs error against the
fp32 reference under the implementation's own routing, with the accuracy rule's tolerance
(``flashmoe.accuracy``); flashmoe's row has its speed-up over transformers'. ``--train`` times
forward and backward: the gradients of the input and of every weight, router and experts, that
an optimizer step needs.

    python bench/bench_reference.py                  # the GPU if there is one, else the CPU
    python bench/bench_reference.py --train --tokens 512 4096 16384
    python bench/bench_reference.py --device cpu --tokens 64 --dtype float16 --threads 8
    python bench/bench_reference.py --dry-run        # CPU, tiny shapes: every path, nothing measured

Writes ``bench/results/reference_<device>_<date>.{csv,json,png}`` (``--out-dir``: there instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):       # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import hf_baseline, layers, report, timing
from bench.measure import speedups
from bench.providers import check, one_line
from flashmoe import FlashMoELayer, reference

PROVIDERS = ("flashmoe_reference", "hf_grouped_mm")
COLUMNS = ["config", "hidden", "intermediate", "experts", "top_k", "dtype", "step", "tokens", "provider",
           "status", "median_ms", "q1_ms", "q3_ms", "repeats", "clock", "max_abs_err", "tol", "correct",
           "route_agree", "speedup_vs_hf_grouped_mm"]
TABLE = [("config", "config", ""), ("step", "step", ""), ("tokens", "tokens", ""), ("provider", "provider", ""),
         ("median_ms", "ms", ".4g"), ("max_abs_err", "err", ".2e"), ("tol", "tol", ".2e"),
         ("route_agree", "route", ".4f"), ("speedup_vs_hf_grouped_mm", "x hf", ".3g"), ("status", "status", "")]
WIDTHS = {"config": 16, "provider": 18, "tokens": 6, "step": 7}
CPU_TOKENS, GPU_TOKENS = (16, 256, 2048), (512, 4096, 16384)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["qwen3-30b-a3b"], choices=list(layers.LAYERS))
    p.add_argument("--train", action="store_true", help="time forward and backward (default: a forward)")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help=f"default {list(GPU_TOKENS)} on a GPU, {list(CPU_TOKENS)} on a CPU")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: the GPU if there is one")
    p.add_argument("--hidden", type=int, default=1024, help="the hidden size a CPU runs the layers at")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 10; 2 dry)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; 1 dry)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: runs every path, measures nothing")
    p.add_argument("--out-dir", default=None, help="default bench/results (a temp dir with --dry-run)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = args.device.type == "cuda"
    args.tokens = args.tokens or list(layers.DRY_RUN_TOKENS if args.dry_run else GPU_TOKENS if on_gpu else CPU_TOKENS)
    args.repeats = args.repeats or (2 if args.dry_run else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 2)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    with timing.cpu_threads(1 if args.dry_run else args.threads):
        return run(args)


def run(args) -> list[dict]:
    device = args.device
    meta = report.run_metadata(device, args.dry_run)
    print(f"device: {meta['device_name']}  torch {meta['torch']}  transformers {meta['transformers']}  "
          f"{torch.get_num_threads()} CPU threads  commit {meta['git_commit']}  {meta['date_utc']}")
    if args.dry_run:
        print("DRY RUN: CPU, scaled-down shapes; the numbers below measure nothing")
    stem = report.output_stem("reference", meta, args.out_dir)
    show, rows = report.RowPrinter(TABLE, WIDTHS), []
    step = "train" if args.train else "forward"
    for name in args.configs:
        config, family = layers.layer(name, args.dry_run)
        if device.type == "cpu" and not args.dry_run:
            config = layers.scaled_down(config, args.hidden)
        config = config.replace(dtype=args.dtype)
        torch.manual_seed(0)
        layer = FlashMoELayer(config, backend="reference", device=device).eval()
        weights = layer.weights()
        hf = hf_baseline.build(family, config, weights)
        for p in hf.parameters():           # shared with the layer's, frozen by build()
            p.requires_grad_(args.train)
        made = {"flashmoe_reference": (layer, lambda x: layer(x, return_routing=True)),
                "hf_grouped_mm": (lambda x: hf_baseline.forward(hf, x),
                                  lambda x: (hf_baseline.forward(hf, x), hf_baseline.routing(hf, x)))}
        leaves = {"flashmoe_reference": [p for p in layer.parameters() if p.requires_grad],
                  "hf_grouped_mm": list(hf.parameters())}
        shape = dict(config=name, hidden=config.hidden_size, intermediate=config.intermediate_size,
                     experts=config.num_experts, top_k=config.top_k, dtype=config.dtype, step=step)
        for tokens in args.tokens:
            inputs = timing.rotating_inputs((tokens, config.hidden_size), config.torch_dtype, device, seed=tokens)
            with torch.no_grad():
                ref_routing = reference.route(inputs[0], weights, config)
            group = [_measure(pname, *made[pname], leaves[pname], inputs, weights, config, ref_routing, args)
                     for pname in PROVIDERS]
            speedups(group, ["hf_grouped_mm"])
            for r in group:
                r.update(shape)
                show(r)
            rows += group
            report.write_results(stem, COLUMNS, rows, meta, {})
            del inputs
    print("\nsummary")
    report.print_table(rows, TABLE)
    title = f"MoE layer {'training step' if args.train else 'forward'}, {meta['device_name']}, {meta['date_utc']}"
    png = report.plot(f"{stem}.png", rows, y="median_ms", ylabel="ms", series="provider", logy=True,
                      title=title + (" (DRY RUN: not a measurement)" if args.dry_run else ""))
    print(f"wrote {stem}.csv, {stem}.json" + (f", {png}" if png else ""))
    return rows


def _measure(name, forward, checked, leaves, inputs, weights, config, ref_routing, args) -> dict:
    """One implementation's row: its output under its own routing checked once (with autograd
    recording for --train, as the training step computes it), then its forward or training step
    timed."""
    row = {"provider": name, "tokens": inputs[0].shape[0]}
    try:
        with torch.set_grad_enabled(args.train):
            out, routing = checked(inputs[0])
            row.update(check(out.detach(), inputs[0], weights, config, routing, ref_routing))
            if name == "flashmoe_reference" and forward.last_backend != "reference":
                raise RuntimeError(f"the layer ran on the {forward.last_backend} backend")
            del out
        if args.train:
            grad = torch.randn_like(inputs[0])
            xs = [x.detach().requires_grad_() for x in inputs]
            t = timing.time_fn(lambda x: torch.autograd.grad(forward(x), [x, *leaves], grad), xs,
                               warmup=args.warmup, repeats=args.repeats)
        else:
            with torch.inference_mode():
                t = timing.time_fn(forward, inputs, warmup=args.warmup, repeats=args.repeats)
    except torch.OutOfMemoryError as exc:
        return {**row, "status": f"skipped: out of memory ({one_line(exc, 100)})"}
    finally:
        if inputs[0].device.type == "cuda":
            torch.cuda.empty_cache()
    return {**row, "status": "ok" if row["correct"] else "WRONG (over tolerance)", "median_ms": t.median_ms,
            "q1_ms": t.q1_ms, "q3_ms": t.q3_ms, "repeats": t.repeats, "clock": t.clock}


if __name__ == "__main__":
    main()
