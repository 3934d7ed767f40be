"""Build kernel cubins ahead of time and report their resources: ``python -m flashmoe.build``.

    python -m flashmoe.build                          # every shipped spec, both archs
    python -m flashmoe.build --arch sm_80 --jobs 2    # one arch, two compiler processes
    python -m flashmoe.build --arch sm_90a --spec gemm=wgmma stages=3 --no-cache

Each kernel lands in the disk cache (flashmoe.host.compile), so later processes, including those
run with FLASHMOE_ASSERT_NO_COMPILE=1, load it without compiling. The table shows, per spec:
registers, spill and stack bytes, static shared memory, the dynamic shared memory a Plan asks for
on a representative layer (``REPRESENTATIVE_LAYER``) against the arch's per-block limit, the
tensor-core instructions in the SASS, the compile time and whether it came from the cache.
The exit code is 1 when a spec fails to compile, spills, has ptxas report a performance loss
(serialised wgmma, setmaxnreg ignored), or does not fit in shared memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from .config import MoEConfig
from .host import cubin
from .host.compile import CompiledKernel, compile_spec
from .host.plan import DeviceInfo, make_plan
from .host.resources import performance_losses
from .host.spec import ARCHS, KernelSpec, shipped_specs

# A Qwen3-30B-A3B-sized layer over 8 ranks, one hosted per GPU: dynamic shared memory depends on
# the spec and on E, W (router and dispatch scratch, task map), not on the token count.
REPRESENTATIVE_LAYER = dict(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8)
REPRESENTATIVE_WORLD = 8
TENSOR_CORE_OPCODES = ("HMMA", "HGMMA")


def plan_smem_bytes(spec: KernelSpec) -> int:
    """Dynamic shared memory per block of the representative layer (even above the limit)."""
    config = MoEConfig(**REPRESENTATIVE_LAYER, gated=spec.gated, dtype=spec.dtype,
                       scale_expert_input=spec.scale_input)
    unlimited = dataclasses.replace(DeviceInfo.for_arch(spec.arch), max_smem_per_block=1 << 30)
    return make_plan(config, spec, world=REPRESENTATIVE_WORLD, num_local_ranks=1,
                     device=unlimited).smem_bytes


def problems(kernel: CompiledKernel) -> list[str]:
    """Why this kernel must not ship (empty when it may)."""
    found = []
    res, spec = kernel.resources, kernel.spec
    if res.spill_bytes:
        found.append(f"spills {res.spill_store_bytes} B stored / {res.spill_load_bytes} B loaded")
    found += [f"ptxas: {line}" for line in performance_losses(kernel.log)]
    limit = DeviceInfo.for_arch(spec.arch).max_smem_per_block
    total = res.static_smem_bytes + plan_smem_bytes(spec)
    if total > limit:
        found.append(f"needs {total} B of shared memory per block, "
                     f"the {spec.arch} limit is {limit} B")
    return found


def label(spec: KernelSpec) -> str:
    text = (f"{spec.arch} {spec.dtype} {'gated' if spec.gated else 'plain'} {spec.gemm} "
            f"{spec.block_m}x{spec.block_n} s{spec.stages} t{spec.threads}")
    text += " nvshmem" if spec.transport == "nvshmem" else ""
    text += " given" if spec.routing == "given" else ""
    text += " scale_input" if spec.scale_input else ""
    return text + (" trace" if spec.trace else "")


def _build_one(spec: KernelSpec, use_cache: bool, unit: str = "kernel"):
    """(kernel, tensor-core opcode counts or None) or the exception; runs in a worker process."""
    try:
        kernel = compile_spec(spec, use_cache=use_cache, unit=unit)
    except Exception as e:                     # reported per spec; the other specs still build
        return e
    try:
        counts = cubin.opcode_counts(cubin.sass(kernel.cubin))
    except (OSError, RuntimeError):            # no cuobjdump / nvdisasm here: column shows n/a
        counts = None
    return kernel, counts


def compile_many(specs: list[KernelSpec], *, jobs: int = 1, use_cache: bool = True,
                 units: list[str] | None = None) -> list:
    """``_build_one`` of every spec (of ``units[i]``: the kernel by default, or its probes), in
    ``jobs`` processes (NVRTC holds the GIL and serialises threads: measured 2 threads x 5 s
    compile = 14 s). Order follows ``specs``."""
    units = units or ["kernel"] * len(specs)
    jobs = max(1, min(jobs, len(specs)))
    if jobs == 1:
        return [_build_one(s, use_cache, u) for s, u in zip(specs, units)]
    # fork: workers inherit the parent's module state (an include root or cache dir set in-process).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method)) as pool:
        return list(pool.map(_build_one, specs, [use_cache] * len(specs), units))


def _parse_spec(items: list[str], arch: str) -> KernelSpec:
    fields = {f.name: f for f in dataclasses.fields(KernelSpec)}
    values = {"arch": arch}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--spec {item!r}: expected KEY=VALUE with KEY in {', '.join(fields)}")
        kind = type(fields[name].default)
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise SystemExit(f"--spec {item!r}: {name} is true or false")
            values[name] = raw.lower() in ("1", "true", "yes")
        else:
            values[name] = kind(raw)
    try:
        return KernelSpec(**values)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--spec: {e}") from None


def _row(spec: KernelSpec, result) -> tuple[list[str], list[str]]:
    if isinstance(result, Exception):
        first = str(result).splitlines()[0] if str(result) else type(result).__name__
        return [label(spec), "FAILED: " + first], [f"{label(spec)}: {result}"]
    kernel, counts = result
    res = kernel.resources
    dynamic, limit = plan_smem_bytes(spec), DeviceInfo.for_arch(spec.arch).max_smem_per_block
    tc = ["n/a" if counts is None else str(counts.get(op, 0)) for op in TENSOR_CORE_OPCODES]
    if spec.arch == "sm_80":
        tc[1] = "-"                           # no wgmma before Hopper
    row = [label(spec), str(res.registers), str(res.spill_bytes), str(res.stack_bytes),
           str(res.static_smem_bytes), f"{res.static_smem_bytes + dynamic}/{limit}", *tc,
           f"{kernel.compile_seconds:.1f}", "hit" if kernel.from_cache else "built"]
    return row, [f"{label(spec)}: {p}" for p in problems(kernel)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashmoe.build",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=ARCHS, help="one arch (default: all)")
    parser.add_argument("--all", action="store_true",
                        help="every shipped spec (the default without --spec)")
    parser.add_argument("--spec", nargs="+", metavar="KEY=VAL", help="one custom KernelSpec")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile even when cached; write nothing")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)

    archs = [args.arch] if args.arch else list(ARCHS)
    specs = []
    if args.spec:
        specs += [_parse_spec(args.spec, arch) for arch in archs]
    if args.all or not args.spec:
        specs += [s for s in shipped_specs() if s.arch in archs]
    specs = list(dict.fromkeys(specs))       # --spec arch=... names the same spec per --arch
    results = compile_many(specs, jobs=args.jobs, use_cache=not args.no_cache)

    header = ["spec", "regs", "spill B", "stack B", "smem static", "static+dyn/limit",
              *TENSOR_CORE_OPCODES, "compile s", "cache"]
    rows, failures = [header], []
    for spec, result in zip(specs, results):
        row, problems_of_spec = _row(spec, result)
        rows.append(row)
        failures += problems_of_spec
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(header))]
    for r in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
    print(f"\ndynamic shared memory: make_plan({REPRESENTATIVE_LAYER}, "
          f"world={REPRESENTATIVE_WORLD})")
    for failure in failures:
        print("FAIL " + failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
