"""``python -m flashmoe.selftest``: build, check and time the kernel in one command.

On a GPU: compiles the specs for the device, runs the kernel against the reference over the case
grid (dtypes, activations, gated/plain, k, E, virtual ranks W, tokens per rank from 0 to 16384,
uniform/skewed/single routing, capacity drops, DeepSeek/Qwen routing and shared experts), checks
bitwise determinism across runs and W, that a stalled rank raises a FlashMoEError naming it and
the layer recovers, runs compute-sanitizer on small cases, and writes every case's error and time
with the device, driver, commit and date to ``--out`` (default bench/results/).

Without a GPU it runs a small grid on the CPU emulator instead (the same kernel source).

    python -m flashmoe.selftest                    # everything this machine can do
    python -m flashmoe.selftest --quick            # a short grid
    python -m flashmoe.selftest --random 50        # 50 random configs
    python -m flashmoe.selftest --soak 10000       # 10,000 forwards, varying tokens and routing
    python -m flashmoe.selftest --sanitize         # compute-sanitizer memcheck/racecheck/synccheck
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from .checks import Case, CaseResult, check_determinism, check_fault, check_routing_given, run_case
from .config import MoEConfig
from .environment import compute_sanitizers
from .environment import describe as environment
from .host.backend import _device_info, shared_memory_problem
from .host.plan import DeviceInfo


# Each family's routing and expert options, without a shape: the cases below add them to theirs, and
# examples/ep_torchrun.py --family to its own. Mixtral: a softmax over all experts, the top-k renormalised.
# Qwen2-MoE: one shared expert behind a sigmoid gate. DeepSeek-V3: sigmoid scores, a selection-only bias,
# groups (E must be a multiple of n_group), scaled weights, shared experts. GPT-OSS: router and expert
# biases, the clamped SwiGLU (a limit of 1 clamps many gate and up elements of O(1) activations; GPT-OSS
# itself: 7). Llama4: a sigmoid top-1 whose weight scales the expert's input, and a shared expert.
# DeepSeek-V4: sqrt(softplus) scores with a selection-only bias, scaled weights, the SiLU clamped SwiGLU in
# the routed and shared experts (DeepSeek-V4 itself: a limit of 10). LongCat-Flash: identity experts (four; the
# cases give more, as LongCat-Flash has 256 beside 512 routed), a selection-only bias, scaled weights.
FAMILY_OPTIONS = {
    "mixtral": dict(norm_topk_prob=True),
    "qwen2": dict(num_shared_experts=1, shared_expert_gate=True),
    "deepseek": dict(scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, norm_topk_prob=True,
                     routed_scaling_factor=2.5, num_shared_experts=2),
    "gpt-oss": dict(activation="swiglu_clamped", swiglu_limit=1.0, expert_bias=True, router_bias=True,
                    norm_topk_prob=True),
    "llama4": dict(top_k=1, scoring="sigmoid", scale_expert_input=True, num_shared_experts=1),
    "deepseek-v4": dict(scoring="sqrtsoftplus", selection_bias=True, norm_topk_prob=True, routed_scaling_factor=1.5,
                        activation="silu_clamped", swiglu_limit=1.0, num_shared_experts=1),
    "longcat-flash": dict(identity_experts=4, selection_bias=True, routed_scaling_factor=6.0),
}


def _cfg(base: dict | None = None, **kw) -> MoEConfig:
    """A config from the selftest defaults, updated by ``base`` then by ``kw``."""
    merged = dict(hidden_size=512, intermediate_size=256, num_experts=8, top_k=2, dtype="bfloat16")
    merged.update(base or {})
    merged.update(kw)
    return MoEConfig(**merged)


def gpu_cases(quick: bool = False) -> list[Case]:
    """The grid: every listed value of every axis appears, with the combinations that matter."""
    cases = []
    for dtype in ("bfloat16", "float16", "float32"):
        for act, gated in (("silu", True), ("gelu", False), ("relu", False), ("gelu_tanh", True)):
            cases.append(Case(f"{dtype}-{act}-{'gated' if gated else 'plain'}",
                              _cfg(dtype=dtype, activation=act, gated=gated), tokens=333))
    for k, E in ((1, 8), (2, 64), (8, 128)):
        cases.append(Case(f"k{k}-E{E}", _cfg(num_experts=E, top_k=k), tokens=1000))
    for W in (1, 2, 4, 8):
        for per_rank in (0, 1, 37):
            cases.append(Case(f"W{W}-tpr{per_rank}", _cfg(num_experts=64, top_k=4), world=W,
                              tokens=per_rank * W))
        cases.append(Case(f"W{W}-uneven", _cfg(num_experts=64, top_k=4), world=W, tokens=W * 100 + 3))
    for routing in ("skewed", "single"):
        for W in (1, 4):
            cases.append(Case(f"{routing}-W{W}", _cfg(num_experts=64, top_k=4), world=W, tokens=777,
                              routing=routing))
    for cf in (0.5, 1.25):
        for W in (1, 4):
            cases.append(Case(f"capacity{cf}-W{W}", _cfg(num_experts=16, top_k=2, capacity_factor=cf),
                              world=W, tokens=500, routing="skewed"))
    deepseek = _cfg(FAMILY_OPTIONS["deepseek"], n_group=8, topk_group=4, num_experts=64, top_k=6,
                    shared_intermediate_size=128)
    cases.append(Case("deepseek-W1", deepseek, tokens=600))
    cases.append(Case("deepseek-W8", deepseek, world=8, tokens=800))
    cases.append(Case("qwen2-shared-gate-W4", _cfg(FAMILY_OPTIONS["qwen2"], num_experts=64, top_k=4,
                                                   shared_intermediate_size=1024), world=4, tokens=512))
    cases.append(Case("gpt-oss-W4", _cfg(FAMILY_OPTIONS["gpt-oss"], num_experts=32, top_k=4), world=4, tokens=600))
    cases.append(Case("llama4-W4", _cfg(FAMILY_OPTIONS["llama4"], num_experts=16), world=4, tokens=600))
    cases.append(Case("deepseek-v4-W4", _cfg(FAMILY_OPTIONS["deepseek-v4"], num_experts=64, top_k=6), world=4,
                      tokens=600))
    cases.append(Case("longcat-flash-W4", _cfg(FAMILY_OPTIONS["longcat-flash"], num_experts=64, identity_experts=32,
                                               top_k=12), world=4, tokens=600))
    if not quick:
        qwen3 = dict(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8, norm_topk_prob=True)
        cases.append(Case("qwen3-tpr16384", _cfg(qwen3), tokens=16384))
        cases.append(Case("qwen3-W8-tpr2048", _cfg(qwen3), world=8, tokens=16384))
        mixtral = dict(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2, norm_topk_prob=True)
        cases.append(Case("mixtral-4096", _cfg(mixtral), tokens=4096))
    return cases


def emulated_cases() -> list[Case]:
    """Tiny shapes the CPU emulator runs in seconds; still every phase and option."""
    small = dict(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2)
    return [
        Case("emu-bf16-swiglu", _cfg(small), tokens=37),
        Case("emu-fp32-gelu-plain", _cfg(small, dtype="float32", activation="gelu", gated=False), tokens=21),
        Case("emu-fp16-k1", _cfg(small, dtype="float16", top_k=1), tokens=19),
        Case("emu-W2", _cfg(small), world=2, tokens=45),
        Case("emu-W2-empty-rank", _cfg(small), world=2, tokens=1),
        Case("emu-shared-gate", _cfg(small, **FAMILY_OPTIONS["qwen2"]), tokens=29),
        Case("emu-capacity", _cfg(small, capacity_factor=0.5), world=2, tokens=40, routing="skewed"),
        Case("emu-deepseek", _cfg(small, num_experts=8, top_k=2, scoring="sigmoid", selection_bias=True,
                                  n_group=4, topk_group=2, routed_scaling_factor=1.5), tokens=33),
        Case("emu-gpt-oss", _cfg({**small, **FAMILY_OPTIONS["gpt-oss"]}, swiglu_limit=1.5), tokens=33),
        Case("emu-llama4", _cfg(small, **FAMILY_OPTIONS["llama4"]), tokens=33),
        Case("emu-deepseek-v4", _cfg(small, **FAMILY_OPTIONS["deepseek-v4"]), tokens=33),
        Case("emu-longcat-flash", _cfg(small, **FAMILY_OPTIONS["longcat-flash"]), tokens=33),
    ]


def routing_given(device, emulate: bool, timeout_s: float) -> tuple[bool, str]:
    """The routing-given kernel (flashmoe.experts_forward) on "no expert" ids and repeats: one
    token, a decode batch and W = 4 virtual ranks, then the weights scaling the experts' inputs
    (scale_expert_input) on W = 2 (tiny shapes on the emulator)."""
    from .host.backend import KernelBackend
    if emulate:
        config = _cfg(hidden_size=64, intermediate_size=32, num_experts=8, top_k=3)
        runs = ((config, 1, 37), (config, 2, 45))
    else:
        config = _cfg(num_experts=16, top_k=4)
        runs = ((config, 1, 1), (config, 1, 300), (config, 4, 999))
    runs += ((config.replace(scale_expert_input=True), 2, runs[-1][2]),)
    passed, details = True, []
    for cfg, world, tokens in runs:
        try:
            backend = KernelBackend(cfg, device, virtual_world=world, emulate=emulate, timeout_s=timeout_s,
                                    error_check="sync", routing="given")
            ok, detail = check_routing_given(backend, tokens, device)
        except Exception as exc:   # unsupported, compile error, ...: a failed check
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        passed &= ok
        scaled = " scaled input" if cfg.scale_expert_input else ""
        details.append(f"W={world} T={tokens}{scaled}: {'ok' if ok else 'FAILED'} ({detail})")
    return passed, "; ".join(details)


def random_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        E = rng.choice([4, 8, 16, 32, 64, 128])
        W = rng.choice([w for w in (1, 2, 4, 8) if E % w == 0])
        n_group = rng.choice([g for g in (1, 2, 4, 8) if E % g == 0 and E // g >= 2])
        topk_group = rng.randint(1, n_group)
        k = rng.randint(1, min(8, topk_group * (E // n_group)))
        shared = rng.choice([0, 0, 1, 2])
        cfg = MoEConfig(hidden_size=rng.choice([64, 256, 512, 1024]), intermediate_size=rng.choice([64, 128, 352]),
                        num_experts=E, top_k=k, activation=rng.choice(["silu", "gelu", "gelu_tanh", "relu"]),
                        gated=rng.random() < 0.7, scoring=rng.choice(["softmax", "sigmoid"]),
                        norm_topk_prob=rng.random() < 0.5, routed_scaling_factor=rng.choice([1.0, 2.5]),
                        n_group=n_group, topk_group=topk_group, selection_bias=rng.random() < 0.3,
                        num_shared_experts=shared, shared_expert_gate=shared > 0 and rng.random() < 0.5,
                        capacity_factor=rng.choice([None, None, 0.75, 1.5]),
                        dtype=rng.choice(["bfloat16", "float16", "float32"]))
        cases.append(Case(f"random{i}", cfg, world=W, tokens=rng.randint(0, 3000),
                          routing=rng.choice(["uniform", "uniform", "skewed", "single"]), seed=seed + i))
    return cases


def _backend_factory(device, emulate: bool, timeout_s: float, gemm: str | None = None, specs=None):
    """make(config, world, timeout_s=..., error_check='sync'): the KernelBackend for them, the last
    one reused (one heap at a time: the big cases need the memory). ``gemm`` forces an engine,
    ``specs(config)`` the kernel specs."""
    from .host.backend import KernelBackend
    cache = {}

    def make(config, world, timeout_s=timeout_s, error_check="sync"):
        key = (config, world, timeout_s, error_check)
        if key not in cache:
            cache.clear()
            cache[key] = KernelBackend(config, device, virtual_world=world, emulate=emulate,
                                       timeout_s=timeout_s, error_check=error_check, gemm=gemm,
                                       spec=specs(config) if specs else None)
        return cache[key]
    return make


def run_grid(cases: list[Case], make, device, info: DeviceInfo | None, time_it: bool) -> list[CaseResult]:
    """Each case on ``make(config, world)``'s backend, printed as it ends. A case whose layout no
    kernel fits on this GPU (``info``; fp32 on a 99 KiB sm_86/sm_89 part) is one the layer runs on
    the reference: skipped (``passed`` None), saying why, not failed."""
    results = []
    for case in cases:
        t0 = time.time()
        unfit = info and shared_memory_problem(case.config, case.world, info)
        try:
            result = (CaseResult(case.describe(), None, detail=f"skipped: this GPU cannot run it: {unfit}") if unfit
                      else run_case(make(case.config, case.world), case, device, time_it=time_it))
        except Exception as exc:   # unsupported config, compile error, ...: a failed case
            result = CaseResult(case.describe(), False, detail=f"{type(exc).__name__}: {exc}")
        results.append(result)
        ms = f"{result.ms:8.3f} ms" if result.ms is not None else " " * 11
        mark = {True: "PASS", False: "FAIL", None: "skip"}[result.passed]
        print(f"  {mark} {case.name:<28} err {result.err:9.2e} tol {result.tol:9.2e} "
              f"{ms} near-ties {result.near_ties:3d} ({time.time() - t0:5.1f} s) {result.detail}", flush=True)
    return results


def build_report(device) -> list[dict]:
    """Compile the shipped specs for this device's arch; return their resource rows."""
    from .host.compile import compile_spec
    from .host.spec import arch_for_capability, shipped_specs
    major, minor = torch.cuda.get_device_capability(device)
    arch = arch_for_capability(major, minor)
    rows = []
    for spec in shipped_specs():
        if spec.arch != arch:
            continue
        k = compile_spec(spec)
        r = k.resources
        rows.append({"spec": spec.key(), "registers": r.registers, "spill_bytes": r.spill_store_bytes + r.spill_load_bytes,
                     "stack": r.stack_bytes, "compile_s": round(k.compile_seconds, 1), "cached": k.from_cache})
    return rows


# The cases `--sanitize` runs under each tool: a W = 2 case with uneven tokens per rank and a W = 4
# one with capacity (the bring-up kit's sanitizer stage runs the smallest W = 2 case).
SANITIZED_CASES = ("W2-tpr37", "capacity0.5-W4")


def sanitize(cases: list[str], tools=("memcheck", "racecheck", "synccheck"), limit_s: float | None = None,
             log_dir: Path | None = None, sanitizer: tuple[str, str] | None = None) -> list[dict]:
    """Run the named cases under compute-sanitizer, each tool in its own process, killed (with
    its children) after ``limit_s`` seconds. With ``log_dir``, each run's whole report goes to
    ``sanitize-<tool>-<case>.log`` there: a row keeps only the first lines of each kind of report,
    and every access a race pairs with is in the rest; a racecheck that reports races runs once
    more for their hazards (each names the byte, the block and both threads) into
    ``sanitize-racecheck-<case>-hazards.log``. The newest compute-sanitizer here runs
    (environment.compute_sanitizers); one that refuses this driver gives way to the next.
    ``sanitizer``: this (version, path) one instead, ``-<version>`` added to its logs' names."""
    found = [sanitizer] if sanitizer else compute_sanitizers()
    if not found:
        return [{"tool": t, "passed": None, "detail": "compute-sanitizer not found"} for t in tools]
    rows = []
    for tool in tools:
        for name in cases:
            t0 = time.time()
            log = log_dir / f"sanitize-{tool}-{name}{'-' + sanitizer[0] if sanitizer else ''}.log" if log_dir else None
            for version, exe in list(found):
                code, output = _sanitizer_run(exe, tool, name, limit_s, log)
                if UNSUPPORTED_DRIVER not in output or len(found) == 1:
                    break
                found.remove((version, exe))
            summary = [ln for ln in output.splitlines() if "ERROR SUMMARY" in ln]
            detail = summary[-1] if summary else output[-400:]
            if code is None:
                detail = f"killed after {limit_s:.0f} s; " + detail
            findings = sanitizer_findings(output)
            detail = "; ".join([detail] + [f"{f['count']}x {f['report']}" for f in findings[:3]])
            row = {"tool": tool, "case": name, "passed": code == 0 or _only_foreign(output, findings),
                   "detail": detail, "findings": findings, "sanitizer": version} | ({"log": log.name} if log else {})
            if tool == "racecheck" and code == 99 and log:
                hazards = log.with_name(log.stem + "-hazards.log")
                _sanitizer_run(exe, tool, name, limit_s, hazards, HAZARD_REPORT)
                row["hazards_log"] = hazards.name
            rows.append(row | {"seconds": round(time.time() - t0, 1)})
    return rows


def _sanitizer_run(exe: str, tool: str, case: str, limit_s: float | None, log: Path | None,
                   options: tuple[str, ...] = ()) -> tuple[int | None, str]:
    """compute-sanitizer ``exe`` running ``tool`` on selftest case ``case`` (run_bounded)."""
    return run_bounded([exe, "--tool", tool, *options, "--error-exitcode", "99", sys.executable, "-m",
                        "flashmoe.selftest", "--only", case, "--no-write", "--no-extras", "--timeout", "300"],
                       limit_s, log=log)


# racecheck's hazard reports in place of its analysis: the analysis names source lines only, a
# hazard the byte, the block and the two threads. The first 500 (a forward can make thousands).
HAZARD_REPORT = ("--racecheck-report", "hazard", "--print-limit", "500")

# What a compute-sanitizer newer than the driver says before it stops (2026.4 needs driver 580).
UNSUPPORTED_DRIVER = "unsupported driver version"

# Reports that are not flashmoe's. On an H200 (driver 580, CUDA 13.0) memcheck reported 34 API
# errors, every one CUDA_ERROR_INVALID_VALUE from cuGetProcAddress_v2 called inside cuda-bindings'
# driver loader (cydriver) as it looks up driver entry points. Every driver call flashmoe makes is
# checked and raises, so its own API errors fail the case without memcheck.
FOREIGN_REPORTS = ("on CUDA API call to cuGetProcAddress",)


def _only_foreign(output: str, findings: list[dict]) -> bool:
    """Whether every error the tool counted is one of FOREIGN_REPORTS (and there was a summary)."""
    total = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    foreign = sum(f["count"] for f in findings if any(r in f["report"] for r in FOREIGN_REPORTS))
    return bool(total) and int(total[-1]) == foreign


# Where a racecheck hazard report happened (one byte of one block): its kind is the rest of the line.
_HAZARD_WHERE = re.compile(r"(?<=__shared__ )0x[0-9a-fA-F]+|(?<=in block )\(\d+, ?\d+, ?\d+\)")


def sanitizer_findings(output: str, limit: int = 8, context: int = 4) -> list[dict]:
    """compute-sanitizer's reports, one per distinct first line (a racecheck hazard's byte and
    block aside) with how often it came and the first such report with the lines after it
    (where: kernel, thread, address, API call), at most ``limit``."""
    prefix = "========= "
    found: dict[str, dict] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(prefix) or line[len(prefix):][:1] in ("", " "):
            continue
        head = line[len(prefix):]
        if head.startswith(("ERROR SUMMARY", "COMPUTE-SANITIZER", "RACECHECK SUMMARY", "LEAK SUMMARY")):
            continue
        kind = _HAZARD_WHERE.sub("...", head)
        if kind in found:
            found[kind]["count"] += 1
        elif len(found) < limit:
            after = [ln[len(prefix):].strip() for ln in lines[i + 1: i + 1 + context]
                     if ln.startswith(prefix + " ")]
            found[kind] = {"report": head, "count": 1, "first": after}
    return list(found.values())


def run_bounded(cmd: list[str], limit_s: float | None, log: Path | None = None,
                **kwargs) -> tuple[int | None, str]:
    """(exit code, stdout + stderr) of ``cmd``; exit code None when it ran past ``limit_s`` and
    was killed with every process it started (its own process group). With ``log``, the output is
    appended to that file as it comes (what a kill from outside leaves) and read back from it."""
    with open(log, "ab") if log else contextlib.nullcontext() as sink:
        start = sink.tell() if sink else 0
        proc = subprocess.Popen(cmd, stdout=sink or subprocess.PIPE, stderr=subprocess.STDOUT, text=sink is None,
                                start_new_session=True, **kwargs)
        try:
            output, _ = proc.communicate(timeout=limit_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            code = None
    if log:
        with open(log, "rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
    return code, output


def soak(make, device, n: int, seed: int) -> dict:
    """n forwards with varying token counts and routings; every 50th checked against the reference;
    device memory must not grow after the first forwards."""
    from .checks import make_inputs
    from . import accuracy
    rng = random.Random(seed)
    cfg = _cfg(num_experts=64, top_k=4, capacity_factor=None)
    backend = make(cfg, 4)
    inputs = [make_inputs(Case("soak", cfg, world=4, tokens=rng.randint(1, 2048),
                               routing=rng.choice(["uniform", "skewed", "single"]), seed=seed + i), device)
              for i in range(8)]
    backend.forward(*make_inputs(Case("soak", cfg, world=4, tokens=2048), device))  # plan at full size
    backend.synchronize()
    memory0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    checked = failed = 0
    t0 = time.time()
    for i in range(n):
        x, w = inputs[i % len(inputs)]
        x = x[: rng.randint(0, x.shape[0])]
        out, routing = backend.forward(x, w, return_routing=True)
        if i % 50 == 0:
            backend.synchronize()
            ok, _, _ = accuracy.check(out, x, w, cfg, routing=routing)
            checked += 1
            failed += not ok
    backend.synchronize()
    memory1 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    return {"forwards": n, "checked": checked, "failed": failed, "memory_growth_bytes": memory1 - memory0,
            "seconds": round(time.time() - t0, 1),
            "passed": failed == 0 and memory1 - memory0 <= 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmoe.selftest", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "bench" / "results"))
    ap.add_argument("--quick", action="store_true", help="skip the large cases")
    ap.add_argument("--only", default=None, help="glob of case names to run")
    ap.add_argument("--random", type=int, default=0, help="also run N random configs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--soak", type=int, default=0, help="N forwards of the soak test")
    ap.add_argument("--sanitize", action="store_true", help="run compute-sanitizer on small cases")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds a kernel wait may take")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-extras", action="store_true", help="skip build, determinism and fault checks")
    ap.add_argument("--emulate", action="store_true", help="use the CPU emulator even with a GPU")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available() and not args.emulate
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    make = _backend_factory(device, emulate=not gpu, timeout_s=args.timeout)
    report = {"environment": environment(device), "cases": [], "extras": {}}
    print(f"flashmoe selftest on {report['environment']['device']}", flush=True)

    if gpu and not args.no_extras:
        report["build"] = build_report(device)
        for row in report["build"]:
            print(f"  built {row['spec']}: {row['registers']} regs, {row['spill_bytes']} B spilled, "
                  f"{row['compile_s']} s{' (cached)' if row['cached'] else ''}")

    cases = gpu_cases(args.quick) if gpu else emulated_cases()
    cases += random_cases(args.random, args.seed) if args.random else []
    if args.only:
        cases = [c for c in cases if fnmatch.fnmatch(c.name, args.only)]
    results = run_grid(cases, make, device, _device_info(device) if gpu else None, time_it=gpu)
    report["cases"] = [r.row() for r in results]

    extras_ok = True
    if not args.no_extras:
        det_case = Case("determinism", _cfg(num_experts=64, top_k=4, capacity_factor=None), tokens=999,
                        routing="skewed")
        worlds = (1, 2, 4, 8) if gpu else (1, 2)
        ok, detail = check_determinism(make, det_case, device, worlds)
        report["extras"]["determinism"] = {"passed": ok, "detail": detail}
        fault_case = Case("fault", _cfg(num_experts=8, top_k=2), world=4 if gpu else 2, tokens=200)
        ok2, detail2 = check_fault(make, fault_case, device, stalled_rank=1)
        report["extras"]["fault"] = {"passed": ok2, "detail": detail2}
        ok3, detail3 = routing_given(device, not gpu, args.timeout)
        report["extras"]["routing_given"] = {"passed": ok3, "detail": detail3}
        for name, (ok_, d) in (("determinism", (ok, detail)), ("fault", (ok2, detail2)),
                               ("routing_given", (ok3, detail3))):
            print(f"  {'PASS' if ok_ else 'FAIL'} {name}: {d}")
        extras_ok = ok and ok2 and ok3
    if args.soak:
        report["extras"]["soak"] = soak(make, device, args.soak, args.seed)
        print(f"  soak: {report['extras']['soak']}")
        extras_ok &= report["extras"]["soak"]["passed"]
    if args.sanitize and gpu:
        report["extras"]["sanitize"] = sanitize(list(SANITIZED_CASES))
        for row in report["extras"]["sanitize"]:
            print(f"  {'PASS' if row['passed'] else 'FAIL'} sanitize {row['tool']} {row.get('case', '')}: {row['detail']}")
        extras_ok &= all(r["passed"] for r in report["extras"]["sanitize"])

    passed = sum(r.passed is True for r in results)
    skipped = sum(r.passed is None for r in results)
    failed = len(results) - passed - skipped
    report["summary"] = {"cases": len(results), "passed": passed, "failed": failed, "skipped": skipped,
                         "extras_passed": extras_ok}
    print(f"{passed}/{len(results) - skipped} cases passed" + (f" ({skipped} skipped: this GPU cannot run them)"
                                                               if skipped else "")
          + f"; extras {'passed' if extras_ok else 'FAILED'}")
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = report["environment"]["device"].replace(" ", "-").replace("(", "").replace(")", "")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = out / f"selftest-{slug}-{stamp}.json"
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"results: {path}")
    return 0 if not failed and extras_ok else 1


if __name__ == "__main__":
    sys.exit(main())
