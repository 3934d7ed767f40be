"""Quickstart: build a small Qwen3-MoE-shaped layer, run it on the best backend here, check it.

    python examples/quickstart.py [--tokens 256] [--device cpu|cuda] [--dtype bfloat16]

The shapes are Qwen3-30B-A3B's (hidden 2048, expert width 768, 128 experts, top-8, renormalised
softmax routing) scaled down to run in seconds on a CPU. The result is checked against the fp32
reference with the project's tolerance rule (flashmoe.accuracy); the exit code is 1 if it fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import flashmoe
from flashmoe import FlashMoELayer, MoEConfig
from flashmoe.accuracy import check


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backend", default="auto", choices=["auto", "kernel", "reference"])
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args()


def time_forward(layer, x, repeats):
    """Median seconds per forward after two warm-up runs."""
    def sync():
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
    for _ in range(2):
        layer(x)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        layer(x)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    args = parse_args()
    config = MoEConfig(hidden_size=256, intermediate_size=96, num_experts=32, top_k=8,
                       norm_topk_prob=True, dtype=args.dtype)
    torch.manual_seed(0)
    device = torch.device(args.device)
    layer = FlashMoELayer(config, backend=args.backend, device=device, max_tokens=args.tokens)
    x = torch.randn(args.tokens, config.hidden_size, device=device, dtype=config.torch_dtype)

    with torch.inference_mode():          # the kernel is forward-only
        out, routing = layer(x, return_routing=True)
        # The result's own routing: a near-tie may route differently in another precision,
        # which is not an error of the experts.
        ok, err, tol = check(out, x, layer.weights(), config, routing=routing)
        seconds = time_forward(layer, x, args.repeats)

    rows = [
        ("flashmoe", flashmoe.__version__),
        ("config", f"H={config.hidden_size} I={config.intermediate_size} E={config.num_experts} "
                   f"k={config.top_k} {config.dtype}"),
        ("tokens", str(args.tokens)),
        ("device", str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")),
        ("backend", layer.last_backend),
        ("max abs error", f"{err:.3e}"),
        ("tolerance", f"{tol:.3e}"),
        ("check", "ok" if ok else "FAILED"),
        ("time / forward", f"{seconds * 1e3:.3f} ms"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
