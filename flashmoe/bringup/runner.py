"""The bring-up kit's driver: stages in order, each in its own time-limited process, within a budget.

Each stage (``stages.STAGES``) runs as ``python -m flashmoe.bringup --run-stage NAME``: a fault
that takes its CUDA context down, or a hang, costs that stage only. Its output goes to
``DIR/bringup.log``; its cases and its end go to ``DIR/bringup.jsonl`` the moment they happen. When
a stage process dies or runs past its limit (it is killed with everything it started), the runner
writes the stage's line itself, with the end of its log. A stage starts only while the budget
has at least ``MIN_STAGE_S`` left; one that does not start is recorded as skipped with the
reason. ``--stages`` takes stage names and the groups of ``stages.GROUPS`` (the kit, the default;
the longer checks); ``--then`` names stages to run after those only when every one of them ran
clean, so one call spends what is left of its budget on the longer checks when the kit passes and
keeps it for a fix when it does not. A failed sanitizer stage alone does not hold them back: its
reports are findings to chase, while every result the kernel gave was checked and right, so the
measurements of the longer checks still hold (the run is still not clean, and exits 1). The last
line is a summary: it names the stages left for another call (skipped for the budget, or given less
than their limit and failed or killed). Exit status 0 when no stage failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .stage import append
from .stages import GROUPS, STAGES

MIN_STAGE_S = 20
LOG_TAIL = 3000


def find(jsonl: Path, **match) -> dict | None:
    """The last record with these field values (e.g. a stage's own end record)."""
    if not jsonl.exists():
        return None
    for line in reversed(jsonl.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:          # a line cut short by a kill
            continue
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def _log_tail(log: Path, offset: int) -> str:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")[-LOG_TAIL:]


def run_stage_process(name: str, out: Path, limit_s: float, emulate: bool, quick: bool) -> dict:
    """Run one stage process; returns its stage record (its own, or one written for it)."""
    jsonl, log = out / "bringup.jsonl", out / "bringup.log"
    cmd = [sys.executable, "-m", "flashmoe.bringup", "--run-stage", name, "--out", str(out),
           "--limit-s", f"{limit_s:.3g}"] + (["--emulate"] if emulate else []) + (["--quick"] if quick else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])        # flashmoe importable wherever it lives
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log, "ab") as f:
        offset = f.tell()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    record = find(jsonl, type="stage", stage=name)
    if record is None:
        record = {"type": "stage", "stage": name, "seconds": round(time.monotonic() - t0, 1),
                  "status": "timeout" if code is None else "crashed",
                  "reason": (f"killed after its {limit_s:.3g} s limit" if code is None
                             else f"the stage process exited with {code} before recording its end"),
                  "log_tail": _log_tail(log, offset)}
        append(jsonl, record)
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmoe.bringup", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="where bringup.jsonl and bringup.log go")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock seconds for all stages")
    ap.add_argument("--emulate", action="store_true", help="the CPU emulator instead of a GPU")
    ap.add_argument("--quick", action="store_true", help="fewer cases per stage")
    ap.add_argument("--stages", default="kit",
                    help=f"comma-separated stages or groups: kit ({','.join(GROUPS['kit'])}, the default), "
                         f"longer ({','.join(GROUPS['longer'])})")
    ap.add_argument("--then", default="",
                    help="stages or groups to run after --stages only when every one of those ran clean, "
                         "a failed sanitizer aside (--then longer: the longer checks in what is left of the budget)")
    ap.add_argument("--run-stage", help=argparse.SUPPRESS)      # the stage processes
    ap.add_argument("--limit-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run_stage:
        from .stages import run_stage
        return run_stage(args.run_stage, args.out, args.emulate, args.quick, args.limit_s)

    names = _expand(args.stages)
    then = [n for n in _expand(args.then) if n not in names]
    unknown = [n for n in names + then if n not in STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}: choose from {', '.join(STAGES)} or the groups {', '.join(GROUPS)}")
    jsonl = args.out / "bringup.jsonl"
    t_start = time.monotonic()
    from ..environment import commit, smi_query
    append(jsonl, {"type": "start", "argv": sys.argv[1:] if argv is None else list(argv), "commit": commit(),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget_s,
                   "emulate": args.emulate, "stages": names, "then": then})
    print(f"flashmoe bring-up: {', '.join(names)}{f' (then {len(then)} more if they run clean)' if then else ''} "
          f"within {args.budget_s:.0f} s -> {jsonl}", flush=True)
    results, left_over = {}, []
    for name in names + then:
        left = args.budget_s - (time.monotonic() - t_start)
        hello = find(jsonl, type="case", stage="environment", case="trivial_cubin")
        ran_environment = results.get("environment", {}).get("status", "skipped") != "skipped"
        not_clean = [n for n in names if results[n]["status"] in FAILED and n not in SANITIZERS] \
            if name in then else []
        if ran_environment and not (hello and hello.get("passed")):
            record = skip(jsonl, name, "the environment stage could not build and launch a trivial cubin")
        elif not_clean:
            record = skip(jsonl, name, f"--then: {', '.join(not_clean)} did not run clean")
        elif left < MIN_STAGE_S:
            record = skip(jsonl, name, f"budget: {left:.0f} s left, a stage starts with at least {MIN_STAGE_S} s")
            left_over.append(name)
        else:
            limit = min(STAGES[name][1], left)
            record = run_stage_process(name, args.out, limit, args.emulate, args.quick)
            if limit < STAGES[name][1] and record["status"] in FAILED:
                left_over.append(name)          # cut short by the budget, or failed: its lines say which
        results[name] = record
        counts = ", ".join(f"{record[k]} {k}" for k in ("passed", "failed", "skipped") if record.get(k))
        print(f"{record['status'].upper():>8} {name:<16} {record.get('seconds', 0):6.1f} s  {counts}"
              f"{'  ' + record['reason'] if record.get('reason') else ''}", flush=True)
    statuses = {n: r["status"] for n, r in results.items()}
    failed = [n for n, s in statuses.items() if s in FAILED]
    described = find(jsonl, type="case", stage="environment", case="describe") or {}
    if not described and not args.emulate:      # a run without the environment stage: ask nvidia-smi
        smi = smi_query(("name", "driver_version"))
        described = {"device": smi.get("name"), "driver": smi.get("driver_version")}
    append(jsonl, {"type": "summary", "stages": statuses, "failed": failed, "left": left_over,
                   "budget_s": args.budget_s,
                   "seconds": round(time.monotonic() - t_start, 1), "commit": commit(),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   **{k: described.get(k) for k in ("device", "driver", "driver_cuda", "nvrtc", "torch")}})
    print(f"{'all stages ran clean' if not failed else 'not clean: ' + ', '.join(failed)}; "
          f"{time.monotonic() - t_start:.0f} s; results in {jsonl}", flush=True)
    if left_over:
        print(f"left for another call (skipped for the budget, or cut short by it or failed): "
              f"--stages {','.join(left_over)}", flush=True)
    return 1 if failed else 0


FAILED = ("failed", "timeout", "crashed")
SANITIZERS = ("sanitizer", "sanitize_large")   # their failure does not hold back --then (above)


def _expand(stages: str) -> list[str]:
    """Stage names from a comma-separated list of names and groups, in order, each once (its first
    place: ``sanitize_large,longer`` runs it before the rest of the group)."""
    return list(dict.fromkeys(s for n in stages.split(",") if n for s in GROUPS.get(n, [n])))


def skip(jsonl: Path, name: str, reason: str) -> dict:
    record = {"type": "stage", "stage": name, "status": "skipped", "reason": reason}
    append(jsonl, record)
    return record
