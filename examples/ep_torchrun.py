"""Expert parallelism across processes: one FlashMoELayer rank per process, the kernel over NVSHMEM.

    torchrun --nproc_per_node=N examples/ep_torchrun.py                 # one GPU per process
    torchrun --nproc_per_node=2 examples/ep_torchrun.py --same-gpu      # two NVSHMEM PEs on GPU 0
    torchrun --nproc_per_node=N examples/ep_torchrun.py --family gpt-oss  # another model family's options

Every rank builds the same layer (same seed; it keeps its E/N experts), runs forwards on its own
tokens with the kernel (one launch per rank per forward), and checks each against
``flashmoe.distributed.ep_forward`` computed on the CPU over the same gloo group (the reference
path: fp32 math, and torch's own low-precision error to set the tolerance). Rank 0 prints a table.
--family picks the routing and expert options of a model family (flashmoe.selftest.FAMILY_OPTIONS:
mixtral, qwen2, deepseek, gpt-oss, llama4, deepseek-v4, longcat-flash) at the shape the other options give.

--same-gpu places every process on GPU 0: NVSHMEM's multi-PE-per-GPU mode. Without MPS it is the
"limited" mode: P2P and barrier_all work, but kernels of different processes time-slice instead
of running side by side, so a forward waits a time slice or more per exchange (use a long
--timeout), and nothing guarantees progress. It is a correctness smoke test, not a benchmark.

Exit codes: 0 all forwards match, 1 a mismatch, 2 the GPUs are missing or the options make no
valid config (the message names the field), 3 the platform refused several PEs on one GPU (the
message says how). torchrun itself exits 1 when a process fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from flashmoe import FlashMoELayer, MoEConfig
from flashmoe.accuracy import max_abs_error, tolerance
from flashmoe.distributed import ep_forward
from flashmoe.host.runtime import NvshmemUnavailable
from flashmoe.selftest import FAMILY_OPTIONS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=None, help="default: the family's (llama4: 1), else 2")
    p.add_argument("--family", choices=sorted(FAMILY_OPTIONS), default="mixtral",
                   help="the model family whose routing and expert options the layer has")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank (rank r brings tokens - 7r)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--same-gpu", action="store_true", help="every process on GPU 0 (NVSHMEM MPG)")
    p.add_argument("--timeout", type=float, default=10.0, help="bound of every in-kernel wait, seconds")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = make_config(args)
    except ValueError as e:               # the config's own message names the field
        print(f"these options make no valid layer (--family {args.family}): {e}", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:
        print("run it under torchrun: torchrun --nproc_per_node=N examples/ep_torchrun.py", file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    gpus = torch.cuda.device_count()
    if gpus == 0:
        print(f"rank {rank}: no CUDA GPU visible: this example runs the kernel. The reference path "
              "runs without one: python -m pytest tests/test_distributed.py", file=sys.stderr)
        return 2
    if gpus < local_world and not args.same_gpu:
        print(f"rank {rank}: {local_world} processes on this node need {local_world} GPUs (one each); "
              f"{gpus} visible, {local_world - gpus} missing. Run --nproc_per_node={gpus}, or add "
              "--same-gpu to put several NVSHMEM PEs on one GPU (limited MPG: kernels time-slice).",
              file=sys.stderr)
        return 2
    device = torch.device("cuda", 0 if args.same_gpu else local)
    torch.cuda.set_device(device)
    # gloo: NCCL refuses two ranks on one GPU, and the CPU reference runs over the same group.
    dist.init_process_group("gloo")
    try:
        return run(args, config, rank, world, device)
    finally:
        dist.destroy_process_group()


def make_config(args) -> MoEConfig:
    """The shape the options give, with the family's options; an explicit --top-k wins."""
    options = {"top_k": 2, **FAMILY_OPTIONS[args.family]}
    if args.top_k is not None:
        options["top_k"] = args.top_k
    return MoEConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_experts=args.experts, dtype="bfloat16", **options)


def run(args, config: MoEConfig, rank: int, world: int, device: torch.device) -> int:
    torch.manual_seed(0)
    layer = FlashMoELayer(config, backend="kernel", process_group=dist.group.WORLD, device="cpu",
                          max_tokens=args.tokens, kernel_options={"timeout_s": args.timeout})
    ref = FlashMoELayer(config, backend="reference", process_group=dist.group.WORLD, device="cpu")
    ref.load_state_dict(layer.state_dict())       # the same weights, kept on the CPU
    layer = layer.to(device)
    rows, ok_all = [], True
    for step in range(args.steps):
        n = max(args.tokens - 7 * rank - step, 0)
        x = torch.randn(n, config.hidden_size, generator=torch.Generator().manual_seed(100 * step + rank))
        x = x.to(torch.bfloat16)
        try:
            with torch.no_grad():
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                out = layer(x.to(device))
                layer.synchronize()
                ms = (time.perf_counter() - start) * 1e3
        except NvshmemUnavailable:          # an installation problem; its message says what to install
            raise
        except Exception as e:              # noqa: BLE001 - the platform's own refusal, reported
            if args.same_gpu and step == 0:
                print(f"rank {rank}: several NVSHMEM PEs on one GPU refused by the platform: "
                      f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
                os._exit(3)
            raise
        ideal, native = reference_outputs(x, config, ref.weights())
        err = max_abs_error(out.cpu(), ideal)
        tol = tolerance(max_abs_error(native, ideal))
        ok_all &= err <= tol
        rows.append((step, n, ms, err, tol, layer.last_backend))
    transports = layer._kernel.transports if layer._kernel is not None else "-"
    gathered = [None] * world
    dist.all_gather_object(gathered, (rank, str(device), transports, rows, ok_all))
    if rank == 0:
        print(f"{args.family}: {config}")
        print_table(gathered, layer._kernel.runtime.describe() if layer._kernel else "")
    agree = [None] * world
    dist.all_gather_object(agree, ok_all)
    if rank == 0:
        print(f"match ep_forward: {'yes' if all(agree) else 'NO'}")
    return 0 if all(agree) else 1


def reference_outputs(x, config, w):
    """ep_forward of this rank's tokens on the CPU over the gloo group: fp32 and native math."""
    with torch.no_grad():
        ideal = ep_forward(x, w, config, dist.group.WORLD, math="fp32")
        native = ep_forward(x, w, config, dist.group.WORLD, math="native")
    return ideal, native


def print_table(gathered, runtime: str) -> None:
    if runtime:
        print(runtime)
    print(f"{'rank':>4} {'device':<8} {'step':>4} {'tokens':>6} {'ms':>8} {'err':>9} {'tol':>9} "
          f"{'backend':<9} transports")
    for rank, device, transports, rows, _ in sorted(gathered):
        for step, n, ms, err, tol, backend in rows:
            flag = "" if err <= tol else "  OVER TOLERANCE"
            print(f"{rank:>4} {device:<8} {step:>4} {n:>6} {ms:>8.3f} {err:>9.2e} {tol:>9.2e} "
                  f"{backend:<9} {transports}{flag}")


if __name__ == "__main__":
    sys.exit(main())
