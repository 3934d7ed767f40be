"""The reference backend on a CPU against transformers' own ``grouped_mm`` experts block.

A layer runs on the CPU wherever the kernel cannot (no GPU, a training step, a test), so its
reference path should cost no more than what a transformers user already has. Both run the same
bf16 weights (shared, not copied) of a Qwen3-MoE-shaped block scaled to fit a CPU; every row
prints both medians (host clock, after warm-up, under ``torch.inference_mode``), their ratio,
and each one's max-abs error against the fp32 reference under its own routing, with the
accuracy rule's tolerance (``flashmoe.accuracy``).

    python bench/bench_cpu.py                     # 16, 256 and 2048 tokens
    python bench/bench_cpu.py --tokens 64 --dtype float16 --threads 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):       # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import hf_baseline
from flashmoe import FlashMoELayer, MoEConfig, accuracy


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 2048])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = MoEConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_experts=args.experts, top_k=args.top_k, norm_topk_prob=True,
                       dtype=args.dtype)
    torch.manual_seed(0)
    layer = FlashMoELayer(config, backend="reference").eval()
    hf = hf_baseline.build("qwen3_moe", config, layer.weights())
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}: Qwen3-MoE-shaped "
          f"H={config.hidden_size} I={config.intermediate_size} E={config.num_experts} "
          f"k={config.top_k} {config.dtype}")
    print(f"{'tokens':>7} {'flashmoe ms':>12} {'hf grouped_mm ms':>17} {'speed-up':>9} "
          f"{'flashmoe err':>13} {'hf err':>9} {'tolerance':>10}")
    rows = []
    with torch.inference_mode():
        for t in args.tokens:
            x = torch.randn(t, config.hidden_size).to(config.torch_dtype)
            ours = median_ms(lambda: layer(x), args.repeats)
            theirs = median_ms(lambda: hf_baseline.forward(hf, x), args.repeats)
            out, routing = layer(x, return_routing=True)
            _, err, tol = accuracy.check(out, x, layer.weights(), config, routing=routing)
            hf_out = hf_baseline.forward(hf, x)
            _, hf_err, hf_tol = accuracy.check(hf_out, x, layer.weights(), config,
                                               routing=hf_baseline.routing(hf, x))
            row = dict(tokens=t, flashmoe_ms=ours, hf_grouped_mm_ms=theirs, speedup=theirs / ours,
                       flashmoe_err=err, hf_err=hf_err, tolerance=tol)
            rows.append(row)
            print(f"{t:>7} {ours:>12.2f} {theirs:>17.2f} {theirs / ours:>8.2f}x "
                  f"{err:>13.2e} {hf_err:>9.2e} {tol:>10.2e}" + ("" if err <= tol else "  WRONG"))
    return rows


if __name__ == "__main__":
    main()
