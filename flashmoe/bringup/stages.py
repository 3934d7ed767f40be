"""The stages of the bring-up kit. Each runs in a process of its own (``runner.py`` starts it with
``--run-stage NAME``), writes one JSONL line per case the moment the case ends, and a stage line
last; the runner adds the stage line itself when the process dies or runs out of time.

A stage never stops at the first failure: every case records what it saw (errors, diagnosis,
kernel error records), so one run says which components work. A case raising is a failed case;
a CUDA context that no longer works ends the stage (nothing after it could run).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

from .. import checks, selftest
from ..checks import Case
from ..environment import compute_sanitizers
from ..host import emulator
from ..host.backend import _device_info, shared_memory_problem
from ..host.plan import DeviceInfo
from ..host.resources import performance_losses
from ..host.spec import WIDE_BLOCK_N, KernelSpec, device_specs, select_spec, select_specs, wgmma_spec
from .commands import benchmark, gpu_tests, selftest_grid, soak
from .stage import ContextLost, Stage

_cfg = selftest._cfg      # a config from the selftest's defaults (H 512, I 256, E 8, k 2, bf16)


# ---------------------------------------------------------------- 0: environment

HELLO = """struct HelloArgs { int* out; int n; };
extern "C" __global__ void flashmoe_hello(const HelloArgs a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < a.n) a.out[i] = 3 * i + 1;
}
"""


def environment(st: Stage) -> str:
    from ..environment import describe
    from ..host.compile import nvrtc_compile
    st.case("describe", lambda: {"passed": True, **describe(None if st.emulate else st.device)})

    def hello():
        cubin, _ = nvrtc_compile(HELLO, options=[f"--gpu-architecture={st.arch}"], name="hello.cu")
        if st.emulate:
            return {"passed": True, "cubin_bytes": len(cubin), "launched": False, "detail": "built; no GPU to launch it"}
        import ctypes

        from ..host.launch import CudaModule

        class HelloArgs(ctypes.Structure):
            _fields_ = [("out", ctypes.c_void_p), ("n", ctypes.c_int)]
        n = 1000
        out = torch.full((n,), -1, dtype=torch.int32, device=st.device)
        module = CudaModule(cubin, st.device.index)
        module.launch(module.function("flashmoe_hello"), HelloArgs(out.data_ptr(), n), 4, 256, 0,
                      torch.cuda.current_stream(st.device).cuda_stream, cooperative=False)
        ok = torch.equal(out.cpu(), torch.arange(n, dtype=torch.int32) * 3 + 1)
        return {"passed": ok, "cubin_bytes": len(cubin), "launched": True,
                "detail": "launched, output right" if ok else "launched, output WRONG"}
    st.case("trivial_cubin", hello)
    if not st.emulate:
        build(st)
    return ""


def planned_specs(arch: str, smem: int) -> tuple[list[KernelSpec], list[KernelSpec]]:
    """(kernel specs, probe specs) the later stages of a GPU run use, for building them up front
    in parallel: what the layer selects on this device (the selftest, ``pytest -m gpu`` and the
    benchmarks run those), its bf16 ones with the trace, in bands and row by row (the trace
    stage), and on Hopper the portable engine for the layouts ``engine_cases`` runs and the
    128 x 128 tile cooperative."""
    from .probes import probe_spec
    kernels = device_specs(arch, smem)
    traced = [replace(s, trace=True) for s in kernels if (s.dtype, s.routing) == ("bfloat16", "router")]
    kernels += traced + [replace(s, band_tiles=1) for s in traced if not s.scale_input]
    if arch == "sm_90a":
        layouts = (("bfloat16", True), ("bfloat16", False), ("float16", False), ("float32", True))
        kernels += [s for dtype, gated in layouts for s in select_specs(dtype, gated, arch, smem, "mma_sync")]
        kernels.append(cooperative(select_spec("bfloat16", True, arch, smem, 128)))
    return list({s.key(): s for s in kernels}.values()), [probe_spec(s) for s in gpu_probe_specs(arch, smem)]


def cooperative(spec: KernelSpec) -> KernelSpec:
    """``spec`` with its wgmma consumers cooperative: the 128 x 128 tile ships ping-pong, and a
    case that fails one way and passes the other points at the schedule."""
    return replace(spec, schedule="cooperative")


def build(st: Stage) -> None:
    """Every cubin the later stages launch, compiled in parallel, resources recorded."""
    from ..build import compile_many
    kernels, probes = planned_specs(st.arch, st.smem)
    t0 = time.monotonic()
    units = ["kernel"] * len(kernels) + ["probes"] * len(probes)
    results = compile_many(kernels + probes, jobs=max(1, min(16, os.cpu_count() or 1)), units=units)
    for spec, unit, result in zip(kernels + probes, units, results):
        st.case(f"build {unit} {spec.key()}", lambda r=result: _build_row(r))
    print(f"  built {len(kernels)} kernels and {len(probes)} probe units in {time.monotonic() - t0:.1f} s", flush=True)


def _build_row(result) -> dict:
    if isinstance(result, Exception):
        return {"passed": False, "error": f"{type(result).__name__}: {str(result)[:4000]}"}
    kernel, _ = result
    r, losses = kernel.resources, performance_losses(kernel.log)
    return {"passed": r.spill_bytes == 0 and not losses, "registers": r.registers, "spill_bytes": r.spill_bytes,
            "stack_bytes": r.stack_bytes, "static_smem": r.static_smem_bytes, "performance_losses": losses,
            "compile_s": round(kernel.compile_seconds, 2), "cached": kernel.from_cache}


# ---------------------------------------------------------------- 1: component probes

def gpu_probe_specs(arch: str, smem: int | None = None) -> list[KernelSpec]:
    """The probe builds of a GPU run: each engine and dtype at the shipped tiles (``smem``: shared
    memory per block, default the arch's nominal)."""
    smem = smem or DeviceInfo.for_arch(arch).max_smem_per_block
    specs = []
    for dtype in ("bfloat16", "float32"):
        with contextlib.suppress(ValueError):   # fp32 on a 99 KiB part: the layer refuses it there too
            specs.append(select_spec(dtype, True, arch, smem, 128, gemm="mma_sync"))
    if arch == "sm_90a":
        specs = [select_spec(d, True, arch, smem, 128) for d in ("bfloat16", "float16", "float32")] + \
                [select_spec("bfloat16", True, arch, smem, 64),
                 select_spec("bfloat16", True, arch, smem, 128, block_n=WIDE_BLOCK_N),
                 cooperative(select_spec("bfloat16", True, arch, smem, 128))] + specs
    return specs


def emulated_probe_specs() -> list[KernelSpec]:
    """The emulated run's: the wgmma engine (the tests' 3-stage build) and mma_sync."""
    return [wgmma_spec("bfloat16", True, stages=3), KernelSpec(arch="sm_80", dtype="bfloat16", stages=3)]


def probes(st: Stage) -> str:
    from . import probes as P
    specs = emulated_probe_specs() if st.emulate else gpu_probe_specs(st.arch, st.smem)
    ks = (136, 72) if st.emulate else (512, 200)          # whole stages, and a K tail
    for i, spec in enumerate(specs):
        label = f"{spec.gemm} {spec.dtype} {spec.block_m}x{spec.block_n}" + \
            (f" {spec.schedule}" if spec.gemm == "wgmma" else "")
        made = {}

        def load(spec=spec):
            made["runner"] = P.ProbeRunner(spec, st.device)
            return {"passed": True, "spec": made["runner"].spec.key()}
        st.case(f"{label}: build and load", load)
        if "runner" not in made:
            continue
        runner = made["runner"]
        tma_modes = (True, False) if spec.gemm == "wgmma" else (False,)
        for nb in (2, 1):
            for use_tma in tma_modes:
                # The first build: whole stages and a K tail; the others one of each.
                for k in (ks if i == 0 else (ks[0] if nb == 2 else ks[1],)):
                    st.case(f"{label}: tile nb={nb} K={k} B by {'TMA' if use_tma else 'cp.async'}",
                            lambda: P.check_tile(runner, nb, k, use_tma))
        if spec.gemm == "wgmma" and (i == 0 or not st.quick):
            st.case(f"{label}: TMA 4-D box", lambda: P.check_tma_box(runner))
            st.case(f"{label}: bounded mbarrier wait", lambda: P.check_tma_box(runner, expect_extra=True,
                                                                               timeout_ns=20_000_000))
        if i == 0:
            # The probe runs 4 blocks: 300 tokens are 5 chunks, each block routes whole ones; with
            # fewer chunks than blocks the logits are shared out first (device/roles/logits.cuh).
            st.case("router, softmax top-4 of 64, near ties",
                    lambda: P.check_router(runner, _cfg(num_experts=64, top_k=4), 300))
            for n, e, k, way in ((70, 64, 4, "tiles"), (40, 128, 8, "64-row halves"), (5, 64, 4, "row slices")):
                st.case(f"router, {n} tokens of {e} experts ({way} spread over the blocks), near ties",
                        lambda n=n, e=e, k=k: P.check_router(runner, _cfg(num_experts=e, top_k=k), n))
            st.case("router, sigmoid + bias + groups (DeepSeek), near ties",
                    lambda: P.check_router(runner, _cfg(num_experts=64, top_k=6, scoring="sigmoid", selection_bias=True,
                                                        n_group=8, topk_group=4, norm_topk_prob=True,
                                                        routed_scaling_factor=2.5), 300))
            st.case("router, top-8 of 1024 (every warp's selection values at the kernel's limit), near ties",
                    lambda: P.check_router(runner, _cfg(num_experts=1024, top_k=8), 300))
            st.case("bounded flag wait", lambda: P.check_wait(runner))
            st.case("trace records", lambda: P.check_trace(runner))
    return ""


# ---------------------------------------------------------------- 2, 3: the whole kernel, W = 1

def engine_cases(st: Stage) -> list[Case]:
    if st.emulate:
        small = dict(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2)
        cases = [Case(f"bf16-swiglu-t{t}", _cfg(small), tokens=t) for t in (1, 37)]
        cases.append(Case("fp32-gelu-plain-t21", _cfg(small, dtype="float32", activation="gelu", gated=False), tokens=21))
        if not st.quick:
            cases.append(Case("bf16-H192-I160-t130", _cfg(small, hidden_size=192, intermediate_size=160), tokens=130,
                              routing="single"))
        return cases
    tokens = (1, 7, 64, 333) if st.quick else (1, 7, 64, 333, 1000, 4096)
    cases = [Case(f"bf16-swiglu-t{t}", _cfg(), tokens=t) for t in tokens]
    cases += [Case("fp16-gelu-plain-t333", _cfg(dtype="float16", activation="gelu", gated=False), tokens=333),
              Case("fp32-swiglu-t333", _cfg(dtype="float32"), tokens=333),
              Case("bf16-relu-plain-t333", _cfg(activation="relu", gated=False), tokens=333)]
    # Enough tiles for the wgmma engine's wide 128 x 256 tile (plan.choose_tile; a case's `tile`
    # field says which ran): gated GELU, the widest epilogue, and a plain one.
    wide = dict(hidden_size=2048, intermediate_size=1024, num_experts=16)
    cases += [Case("bf16-geglu-wide-t4096", _cfg(wide, activation="gelu"), tokens=4096),
              Case("fp16-gelu-plain-wide-t4096", _cfg(wide, dtype="float16", activation="gelu", gated=False),
                   tokens=4096)]
    if not st.quick:
        cases.append(Case("bf16-qwen3-width-t2048", _cfg(hidden_size=2048, intermediate_size=768, num_experts=16),
                          tokens=2048))
    return cases


def run_cases(st: Stage, cases: list[Case], gemm: str | None = None, specs=None) -> None:
    """Each case on a backend of ``gemm`` (or ``specs(config)``); a case whose layout no kernel fits
    on this GPU (fp32 on a 99 KiB part, where the layer refuses it too) is skipped, saying so."""
    make = selftest._backend_factory(st.device, st.emulate, timeout_s=0.05 if st.emulate else 5.0, gemm=gemm,
                                     specs=specs)
    info = None if st.emulate or specs else _device_info(st.device)
    for case in cases:
        unfit = info and shared_memory_problem(case.config, case.world, info, gemm)
        st.case(case.name, (lambda why=unfit: {"passed": None, "skipped": f"this GPU cannot run it: {why}"})
                if unfit else (lambda c=case: checks.run_case(make(c.config, c.world), c, st.device,
                                                              time_it=not st.emulate)))


def kernel_mma_sync(st: Stage) -> str:
    run_cases(st, engine_cases(st), gemm="mma_sync")
    return ""


def kernel_wgmma(st: Stage) -> str:
    if st.arch != "sm_90a":
        return f"the wgmma engine needs a Hopper GPU (sm_90a); this one is {st.arch}"
    run_cases(st, engine_cases(st), gemm="wgmma")

    def cooperative_specs(config):
        base = ([wgmma_spec(config.dtype, config.gated, stages=3)] if st.emulate
                else select_specs(config.dtype, config.gated, st.arch, st.smem, "wgmma"))
        return [cooperative(s) for s in base]
    tokens = (37,) if st.emulate else (1000, 4096)
    small = dict(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2) if st.emulate else {}
    run_cases(st, [Case(f"bf16-swiglu-cooperative-t{t}", _cfg(small), tokens=t) for t in tokens],
              specs=cooperative_specs)
    return ""


# ---------------------------------------------------------------- 4: virtual ranks and routing

def rank_cases(st: Stage) -> list[Case]:
    if st.emulate:
        small, family = dict(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2), selftest.FAMILY_OPTIONS
        cases = [Case("W2-t45", _cfg(small), world=2, tokens=45), Case("W2-t1-empty-rank", _cfg(small), world=2, tokens=1),
                 Case("W4-t0", _cfg(small), world=4, tokens=0), Case("W4-uneven-t43", _cfg(small), world=4, tokens=43),
                 Case("capacity0.5-W2-skewed", _cfg(small, capacity_factor=0.5), world=2, tokens=40, routing="skewed"),
                 Case("deepseek-W2", _cfg(small, scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2,
                                          norm_topk_prob=True, routed_scaling_factor=1.5, num_shared_experts=1,
                                          shared_intermediate_size=32), world=2, tokens=33),
                 Case("qwen2-shared-gate-W2", _cfg(small, **family["qwen2"]), world=2, tokens=29),
                 Case("gpt-oss-W2", _cfg({**small, **family["gpt-oss"]}, swiglu_limit=1.5), world=2, tokens=33),
                 Case("llama4-W2", _cfg(small, **family["llama4"]), world=2, tokens=33),
                 Case("deepseek-v4-W2", _cfg(small, **family["deepseek-v4"]), world=2, tokens=33),
                 Case("longcat-flash-W2", _cfg(small, **family["longcat-flash"]), world=2, tokens=33)]
        return cases if st.quick else cases + [Case("W8-t50", _cfg(small), world=8, tokens=50)]
    return [c for c in selftest.gpu_cases(quick=True)
            if c.world > 1 or c.name.startswith(("W1-", "skewed", "single", "capacity", "deepseek"))]


def ranks(st: Stage) -> str:
    run_cases(st, rank_cases(st))
    return ""


# ---------------------------------------------------------------- 5: compute-sanitizer

SANITIZED_CASE = "W2-tpr1"     # the smallest W = 2 case of the selftest grid


def sanitizer(st: Stage) -> str:
    if st.emulate:
        return emulated_racecheck(st)
    return sanitize(st, [SANITIZED_CASE], compare=True)


def emulated_racecheck(st: Stage) -> str:
    """On a CPU: the emulator's shared-memory race check (device/emulation/racecheck.cpp), what
    racecheck checks on a GPU, on a W = 2 case whose K runs several times round the stage ring,
    with each engine and wgmma schedule. A race fails the case with both places named."""
    case = Case("W2-H512-t150", _cfg(dict(hidden_size=512, intermediate_size=128, num_experts=8, top_k=2)),
                world=2, tokens=150)
    with mock.patch.dict(os.environ, {emulator.RACECHECK_ENV: "1"}):   # every kernel built here checks
        for name, gemm, specs in (("mma_sync", "mma_sync", None), ("wgmma ping-pong", "wgmma", None),
                                  ("wgmma cooperative", None,
                                   lambda c: [cooperative(wgmma_spec(c.dtype, c.gated, stages=3))])):
            run_cases(st, [replace(case, name=f"racecheck (emulator) {name} {case.name}")], gemm=gemm, specs=specs)
    return ""


def sanitize_large(st: Stage) -> str:
    return sanitize(st, list(selftest.SANITIZED_CASES))


def sanitize(st: Stage, cases: list[str], compare: bool = False) -> str:
    """memcheck, racecheck and synccheck on each of ``cases`` with the newest compute-sanitizer,
    each run in its own process, killed at its share of the stage's time. ``compare``: then
    racecheck again with every other compute-sanitizer here, for the record only: an older one
    may report hazards a newer one knows to be false (environment.compute_sanitizers)."""
    if st.emulate:
        return "compute-sanitizer needs a GPU"
    found = compute_sanitizers()
    runs = [(tool, case, None) for tool in ("memcheck", "racecheck", "synccheck") for case in cases]
    n_compare = max(len(found) - 1, 0) * len(cases) if compare else 0
    used = set()
    for i, run in enumerate(runs):
        used.add(sanitize_run(st, *run, share=st.left() / (len(runs) - i + n_compare)).get("sanitizer"))
    others = [(s, case) for s in found if compare and s[0] not in used for case in cases]
    for i, (other, case) in enumerate(others):
        sanitize_run(st, "racecheck", case, other, share=st.left() / (len(others) - i))
    return ""


def sanitize_run(st: Stage, tool: str, case: str, other: tuple[str, str] | None, share: float) -> dict:
    """One tool on one case as a case of the stage: with the newest compute-sanitizer, or with
    ``other`` (version, path) for the record (its row skipped, its own verdict kept beside)."""
    def run():
        row = selftest.sanitize([case], tools=(tool,), limit_s=max(10.0, share - 3), log_dir=st.out,
                                sanitizer=other)[0]
        if other:
            row.update(passed=None, verdict=row["passed"],
                       skipped="for the record: the stage's verdict is the newest compute-sanitizer's")
        return row
    return st.case(f"{tool} {case}" + (f" (compute-sanitizer {other[0]})" if other else ""), run, min_s=15)


# ---------------------------------------------------------------- 6: determinism, faults, graphs

def robustness(st: Stage) -> str:
    make = selftest._backend_factory(st.device, st.emulate, timeout_s=0.05 if st.emulate else 5.0)
    small = dict(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2) if st.emulate else {}
    det = Case("determinism", _cfg(small, num_experts=8 if st.emulate else 64, top_k=2 if st.emulate else 4),
               tokens=99 if st.emulate else 999, routing="skewed")
    worlds = (1, 2) if st.emulate else (1, 2, 4, 8)
    st.case(f"bitwise determinism across runs and W in {worlds}", lambda: _pair(checks.check_determinism(
        make, det, st.device, worlds)))
    fault = Case("fault", _cfg(small, num_experts=8, top_k=2), world=2 if st.emulate else 4, tokens=60 if st.emulate else 200)
    st.case("stalled rank raises FlashMoEError naming it; next forward correct",
            lambda: _pair(checks.check_fault(make, fault, st.device, stalled_rank=1)))
    st.case("stalled rank with error_check='none': next forward correct, synchronize() raises",
            lambda: _pair(checks.check_fault_unchecked(make, fault, st.device, stalled_rank=1)))
    if st.emulate:
        st.case("CUDA graph capture and replay", lambda: {"passed": None, "skipped": "CUDA graphs need a GPU"})
    else:
        st.case("CUDA graphs: capture per token count, replays with changing counts",
                lambda: _pair(checks.check_graph(make, _cfg(num_experts=64, top_k=4), st.device)))
        st.case("flashmoe.cuda_graphs on a layer: padded replays of any count up to the bound",
                lambda: _pair(checks.check_layer_graphs(_cfg(num_experts=64, top_k=4,
                                                             num_shared_experts=1), st.device)))
    return ""


def _pair(result: tuple[bool, str]) -> dict:
    return {"passed": result[0], "detail": result[1]}


STAGES = {
    # name: (function, seconds it may take at most, what it checks)
    "environment": (environment, 150, "GPU, driver, toolchain versions; a trivial cubin built and launched; "
                                      "every cubin of the later stages built"),
    "probes": (probes, 150, "GEMM tiles of both engines, a TMA box, the router, bounded waits, trace records"),
    "kernel_mma_sync": (kernel_mma_sync, 120, "the whole kernel with mma_sync (forced on Hopper), W = 1"),
    "kernel_wgmma": (kernel_wgmma, 120, "the whole kernel with wgmma + TMA, W = 1"),
    "ranks": (ranks, 150, "W = 2..8 virtual ranks, 0/1/uneven tokens, capacity, DeepSeek and Qwen2 routing"),
    "sanitizer": (sanitizer, 180, "compute-sanitizer memcheck, racecheck, synccheck on the smallest W = 2 case "
                                  "(emulated: the emulator's racecheck with each engine)"),
    "robustness": (robustness, 150, "determinism, a stalled rank, error_check='none', CUDA-graph replay"),
    "bench": (benchmark, 300, "a few bench/bench_layer.py rows"),
    # The longer checks, in the order the hardware validation needs them.
    "selftest": (selftest_grid, 180, "python -m flashmoe.selftest: the whole case grid with its large cases, "
                                     "determinism, a stalled rank, the routing-given kernel"),
    "soak": (soak, 150, "10000 forwards of changing sizes and routings: errors and memory growth"),
    "gpu_tests": (gpu_tests, 240, "pytest -m gpu, two NVSHMEM processes on one GPU among them"),
    "bench_grid": (benchmark, 300, "bench/bench_layer.py: every layer, 128 to 32768 tokens"),
    "trace": (benchmark, 120, "the kernel's trace on two layers: where the time goes, what the tile bands gain"),
    "tiles": (benchmark, 240, "the shipped tiles against 128 x 128 ping-pong, cooperative and NVSHMEM-built"),
    "sweep_ep": (benchmark, 180, "bench/sweep_ep.py: W = 1..8 virtual ranks"),
    "sweep_skewed": (benchmark, 90, "W = 8 against W = 1 under skewed routing (work sharing)"),
    "trace_ep": (benchmark, 120, "the kernel's trace of W = 1 and W = 8 virtual ranks: what the ranks cost"),
    "sanitize_large": (sanitize_large, 300, "compute-sanitizer on the selftest's larger cases (--sanitize)"),
    "train": (benchmark, 120, "a training step (the reference backend) against transformers' grouped_mm experts"),
}
# `--stages kit` (the default) is the bring-up kit; `--stages longer` what comes once it runs clean.
GROUPS = {"kit": list(STAGES)[:8], "longer": list(STAGES)[8:]}


def run_stage(name: str, out: Path, emulate: bool, quick: bool, limit_s: float) -> int:
    """The body of a stage process: run stage ``name``, record its cases and its end."""
    device = torch.device("cpu") if emulate else torch.device("cuda", torch.cuda.current_device())
    st = Stage(name, out, device, emulate, quick, time.monotonic() + limit_s - 5)
    function = STAGES[name][0]
    print(f"== stage {name} ({'emulated' if emulate else device}, {limit_s:.0f} s)", flush=True)
    try:
        reason = function(st)
    except ContextLost as exc:
        st.counts["failed"] += 1
        reason = str(exc)
    return st.finish(reason or "")
