"""The bring-up kit (python -m flashmoe.bringup) on the CPU: every stage the emulator can run
passes and the others say why they were skipped; a kit killed mid-run leaves the stages it
finished; a stage past its limit is killed and recorded; the budget is honoured; the longer
checks run as emulated and dry runs; the probes compile for both archs without spills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flashmoe.bringup import runner
from flashmoe.bringup.commands import BENCHMARKS, shown_args
from flashmoe.bringup.stages import GROUPS, STAGES
from flashmoe.host import emulator

REPO = Path(__file__).resolve().parent.parent
needs_emulator = pytest.mark.skipif(emulator.emulator_available() is not None,
                                    reason=f"emulator unavailable: {emulator.emulator_available()}")


def kit(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flashmoe.bringup", "--emulate", "--out", str(out), *args]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "bringup.jsonl").read_text().splitlines()]


@needs_emulator
def test_emulated_kit_runs_every_stage_it_can_and_says_why_not_for_the_rest(tmp_path):
    # The budget only caps the run (about 2 minutes with a cold kernel cache on 2 cores): a bench
    # stage skipped for the budget on a slow machine would fail this test for nothing.
    proc = subprocess.run(kit(tmp_path, "--budget-s", "400"), cwd=REPO, capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = records(tmp_path)
    assert lines[0]["type"] == "start" and lines[-1]["type"] == "summary"
    stages = {r["stage"]: r for r in lines if r["type"] == "stage"}
    assert list(stages) == GROUPS["kit"]
    for name in ("environment", "probes", "kernel_mma_sync", "kernel_wgmma", "ranks", "robustness", "bench"):
        assert stages[name]["status"] == "passed" and stages[name]["passed"] > 0, stages[name]
    cases = [r for r in lines if r["type"] == "case"]
    # No compute-sanitizer without a GPU: the emulator's racecheck, with each engine and schedule.
    assert stages["sanitizer"]["status"] == "passed", stages["sanitizer"]
    assert [r["case"].split(" W2")[0] for r in cases if r["stage"] == "sanitizer"] == [
        f"racecheck (emulator) {engine}" for engine in ("mma_sync", "wgmma ping-pong", "wgmma cooperative")]
    assert all(r["passed"] is not False for r in cases)
    probes = {r["case"] for r in cases if r["stage"] == "probes"}
    for part in ("tile nb=2", "tile nb=1", "TMA 4-D box", "bounded mbarrier wait", "router", "router, 70 tokens",
                 "router, 40 tokens", "router, 5 tokens", "bounded flag wait", "trace records"):
        assert any(part in name for name in probes), part
    graph = [r for r in cases if "CUDA graph" in r["case"]]
    assert graph and graph[0]["passed"] is None and "GPU" in graph[0]["skipped"]
    assert lines[-1]["failed"] == [] and lines[-1]["commit"]


def test_a_case_names_its_command_with_the_output_dir_as_dir():
    """An output directory beside the checkout whose name starts with the checkout's (repo-kit next
    to repo) is not a path inside it: the bench stage once crashed on relative_to there."""
    beside = Path(str(REPO) + "-kit")
    script = REPO / "bench" / "bench_layer.py"
    assert shown_args([str(script), "--tokens", "128", "--out-dir", str(beside)], beside) == \
        "bench/bench_layer.py --tokens 128 --out-dir DIR"
    assert shown_args([str(script), "--out-dir", str(REPO / "out")], REPO / "out") == \
        "bench/bench_layer.py --out-dir DIR"


@needs_emulator
def test_a_kit_killed_mid_run_leaves_the_stages_it_finished(tmp_path):
    proc = subprocess.Popen(kit(tmp_path, "--budget-s", "300"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    jsonl = tmp_path / "bringup.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.exists() and '"stage": "probes", "status"' in jsonl.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the kit ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = records(tmp_path)        # every line whole: each is written and flushed at once
    stages = {r["stage"]: r["status"] for r in lines if r["type"] == "stage"}
    assert stages.get("environment") == "passed" and stages.get("probes") == "passed", stages
    assert not any(r["type"] == "summary" for r in lines)
    assert sum(r["type"] == "case" and r["stage"] == "probes" for r in lines) > 5


def test_a_stage_past_its_limit_is_killed_and_recorded_with_its_log(tmp_path):
    # Half a second is less than the stage process needs to import torch.
    record = runner.run_stage_process("environment", tmp_path, 0.5, emulate=True, quick=True)
    assert record["status"] == "timeout" and "0.5 s limit" in record["reason"]
    assert records(tmp_path)[-1] == record and "log_tail" in record


def test_stages_the_budget_cannot_hold_are_skipped_with_the_reason(tmp_path):
    assert runner.main(["--emulate", "--out", str(tmp_path), "--budget-s", "5"]) == 0
    lines = records(tmp_path)
    skipped = [r for r in lines if r["type"] == "stage"]
    assert len(skipped) == len(GROUPS["kit"]) and all(r["status"] == "skipped" and "budget" in r["reason"] for r in skipped)
    assert lines[-1]["type"] == "summary"


@needs_emulator
def test_longer_checks_run_emulated_or_dry_and_say_why_not_where_they_need_a_gpu(tmp_path):
    proc = subprocess.run(kit(tmp_path, "--stages", "selftest,soak,trace,trace_ep,gpu_tests,sanitize_large",
                              "--budget-s", "300"), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = records(tmp_path)
    stages = {r["stage"]: r for r in lines if r["type"] == "stage"}
    assert list(stages) == ["selftest", "soak", "trace", "trace_ep", "gpu_tests", "sanitize_large"]
    cases = {r["stage"]: r for r in lines if r["type"] == "case"}
    # The selftest's own grid and extras, its JSON beside the JSONL (the soak writes one too).
    assert cases["selftest"]["passed"] and "cases passed; extras passed" in cases["selftest"]["detail"], cases["selftest"]
    grids = [json.loads(p.read_text()) for p in tmp_path.glob("selftest-*.json")]
    assert any(g["cases"] and g["summary"]["failed"] == 0 and g["extras"]["fault"]["passed"] for g in grids), grids
    assert cases["soak"]["passed"] and "'failed': 0" in cases["soak"]["detail"], cases["soak"]
    # The trace stage ran bench_layer.py dry: its rows came back with the case, its output in its log.
    assert cases["trace"]["passed"] and {(r["config"], r["tokens"]) for r in cases["trace"]["rows"]} == {
        (c, t) for c in ("qwen3-30b-a3b", "mixtral-8x7b", "flashmoe-paper") for t in (128, 4096, 16384)}
    assert "dry" in (tmp_path / "trace.log").read_text().lower()
    # bench/compare.py reads the rows the kit carried, each under its own key.
    from bench import compare
    kit_rows = compare.read_rows([tmp_path / "bringup.jsonl"])
    assert cases["trace_ep"]["passed"] and {(r["config"], r["world"]) for r in cases["trace_ep"]["rows"]} == {
        (c, w) for c in ("mixtral-8x7b", "deepseek-v2-lite") for w in (1, 8)}
    assert {k[0] for k in kit_rows} == {"trace", "trace_ep"}
    assert len(kit_rows) == len(cases["trace"]["rows"]) + len(cases["trace_ep"]["rows"])
    for name in ("gpu_tests", "sanitize_large"):
        assert stages[name]["status"] == "skipped" and "GPU" in stages[name]["reason"], stages[name]


def test_the_groups_cover_every_stage_and_each_benchmark_line_parses():
    assert GROUPS["kit"] + GROUPS["longer"] == list(STAGES)
    from bench import bench_layer, bench_reference, sweep_ep
    for name, (script, *args) in BENCHMARKS.items():
        assert name in STAGES
        module = {"bench/bench_layer.py": bench_layer, "bench/sweep_ep.py": sweep_ep,
                  "bench/bench_reference.py": bench_reference}[script]
        module.parse_args(args)       # an option or a choice the script does not know exits


def test_a_command_killed_at_its_limit_leaves_its_output_in_its_log(tmp_path):
    from flashmoe.selftest import run_bounded
    log = tmp_path / "stage.log"
    log.write_text("an earlier run\n")
    code, output = run_bounded([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                               2.0, log=log)
    assert code is None and output == "started\n"
    assert log.read_text() == "an earlier run\nstarted\n"


class FakeStages:
    """runner.run_stage_process standing in for the stage processes: each stage takes ``seconds``
    of a fake clock (capped at its limit; none when it skips itself) and ends with the status
    ``statuses`` gives it."""

    def __init__(self, statuses: dict, seconds: float):
        self.statuses, self.seconds, self.now, self.ran = statuses, seconds, 0.0, []

    def monotonic(self) -> float:
        return self.now

    def run(self, name, out, limit_s, emulate, quick):
        self.ran.append((name, limit_s))
        status = self.statuses.get(name, "passed" if self.seconds <= limit_s else "timeout")
        self.now += 0 if status == "skipped" else min(self.seconds, limit_s)
        record = {"type": "stage", "stage": name, "status": status, "seconds": min(self.seconds, limit_s)}
        runner.append(out / "bringup.jsonl", record)
        return record


@pytest.mark.parametrize("kit_fails", [False, True, "sanitizer"])
def test_then_stages_run_only_after_a_clean_run_and_the_summary_names_what_is_left(tmp_path, monkeypatch,
                                                                                    kit_fails):
    # Each stage takes 100 s: probes and ranks (or the sanitizer) fill 200 s of the 270; gpu_tests
    # skips itself (no GPU) with 70 s, less than its limit, and is not left over; selftest gets 70
    # of its 180 and is cut short; soak does not start (no time left). A failed sanitizer alone does
    # not hold the --then stages back.
    second = "sanitizer" if kit_fails == "sanitizer" else "ranks"
    fake = FakeStages({second: "failed", "gpu_tests": "skipped"} if kit_fails else {"gpu_tests": "skipped"},
                      seconds=100)
    monkeypatch.setattr(runner, "run_stage_process", fake.run)
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=fake.monotonic, strftime=time.strftime))
    code = runner.main(["--emulate", "--out", str(tmp_path), "--budget-s", "270", "--stages", f"probes,{second}",
                        "--then", f"gpu_tests,selftest,soak,{second}"])
    lines = records(tmp_path)
    stages = {r["stage"]: r for r in lines if r["type"] == "stage"}
    assert lines[0]["then"] == ["gpu_tests", "selftest", "soak"]      # a stage named in both runs once
    assert list(stages) == ["probes", second, "gpu_tests", "selftest", "soak"]
    if kit_fails == "sanitizer":
        assert fake.ran == [("probes", 150), ("sanitizer", 170), ("gpu_tests", 70), ("selftest", 70)]
        assert lines[-1]["failed"] == ["sanitizer", "selftest"] and code == 1
        # The sanitizer had less than its 180 s: a rerun may pass, so it is named with the others.
        assert lines[-1]["left"] == ["sanitizer", "selftest", "soak"]
    elif kit_fails:
        assert code == 1 and [n for n, _ in fake.ran] == ["probes", "ranks"]
        for name in ("gpu_tests", "selftest", "soak"):
            assert stages[name]["status"] == "skipped" and stages[name]["reason"] == "--then: ranks did not run clean"
        assert lines[-1]["failed"] == ["ranks"] and lines[-1]["left"] == []
    else:
        assert fake.ran == [("probes", 150), ("ranks", 150), ("gpu_tests", 70), ("selftest", 70)]
        assert stages["selftest"]["status"] == "timeout" and "budget" in stages["soak"]["reason"]
        assert lines[-1]["left"] == ["selftest", "soak"] and code == 1


def test_a_stage_named_twice_runs_once_in_its_first_place():
    assert runner._expand("sanitize_large,longer,soak") == ["sanitize_large"] + [
        n for n in runner.GROUPS["longer"] if n != "sanitize_large"]


def test_unknown_stages_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        runner.main(["--out", str(tmp_path), "--stages", "environment,warp_drive"])
    with pytest.raises(SystemExit):
        runner.main(["--out", str(tmp_path), "--then", "longest"])


@pytest.mark.parametrize("arch,wide", [("sm_90a", False), ("sm_90a", True), ("sm_80", False)])
def test_probes_compile_without_spills(arch, wide, tmp_path, monkeypatch):
    """The probe unit of the kit's first probe build per arch (wgmma on Hopper, mma_sync on sm_80),
    and of its wide-tile build: every probe kernel is in the cubin, none spills."""
    from flashmoe.bringup.probes import probe_spec
    from flashmoe.bringup.stages import gpu_probe_specs
    from flashmoe.host import compile as C
    from flashmoe.host import cubin
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(tmp_path))
    spec = probe_spec(next(s for s in gpu_probe_specs(arch) if (s.block_n == 256) == wide))
    kernel = C.compile_spec(spec, unit="probes")
    assert kernel.resources.spill_bytes == 0 and kernel.resources.stack_bytes == 0, kernel.resources
    names = ["flashmoe_probe_tile", "flashmoe_probe_router", "flashmoe_probe_wait", "flashmoe_probe_trace"]
    names += ["flashmoe_probe_tma_box"] if spec.gemm == "wgmma" else []
    for name in names:
        assert cubin.kernel_info(kernel.cubin, name).entry, name


def test_sanitizer_reports_are_grouped_by_their_first_line():
    from flashmoe.selftest import sanitizer_findings
    output = "\n".join([
        "========= COMPUTE-SANITIZER",
        "flashmoe selftest on NVIDIA H200",
        "========= Invalid __global__ read of size 4 bytes",
        "=========     at flashmoe_kernel+0x1a0",
        "=========     by thread (3,0,0) in block (7,0,0)",
        "=========     Address 0x7f00 is out of bounds",
        "=========",
        "========= Program hit CUDA_ERROR_NOT_FOUND (error 500) due to \"named symbol not found\" on CUDA API call "
        "to cuGetProcAddress.",
        "=========     Saved host backtrace up to driver entry point at error",
        "========= Invalid __global__ read of size 4 bytes",
        "=========     at flashmoe_kernel+0x1a0",
        "========= ERROR SUMMARY: 3 errors",
    ])
    found = sanitizer_findings(output)
    assert [(f["report"][:24], f["count"]) for f in found] == [
        ("Invalid __global__ read ", 2), ("Program hit CUDA_ERROR_N", 1)]
    assert found[0]["first"] == ["at flashmoe_kernel+0x1a0", "by thread (3,0,0) in block (7,0,0)",
                                 "Address 0x7f00 is out of bounds"]


def test_racecheck_hazards_are_grouped_by_kind_and_races_by_where():
    """A hazard report names one byte of one block: one group per kind of hazard. An analysis
    report names source locations: one group each."""
    from flashmoe.selftest import sanitizer_findings
    hazards = [f"========= Error: Potential RAW hazard detected at __shared__ 0x{a:x} in block ({b},0,0) :\n"
               f"=========     Write Thread (0,0,0) at produce+0x3f9d0 in tasks.cuh:144" for a in (0x34b40, 0x34b41)
               for b in (0, 7)]
    races = [f"========= Error: Race reported between Read access at consume+0x{pc:x} in tasks.cuh:195\n"
             "=========     and Write access at produce+0x3f9d0 in tasks.cuh:144 [3280 hazards]"
             for pc in (0x248a0, 0x24920)]
    found = sanitizer_findings("\n".join([*hazards, "========= Error: Potential WAR hazard detected at __shared__ 0x10 "
                                            "in block (1,0,0) :", *races]))
    assert [(f["report"][:40], f["count"]) for f in found] == [
        ("Error: Potential RAW hazard detected at ", 4), ("Error: Potential WAR hazard detected at ", 1),
        ("Error: Race reported between Read access", 1), ("Error: Race reported between Read access", 1)]
    assert found[0]["report"].endswith("__shared__ 0x34b40 in block (0,0,0) :")


def test_a_sanitizer_run_keeps_its_whole_report_in_a_log(tmp_path, monkeypatch):
    """A row keeps the first lines of each kind of report; the log keeps every line (a racecheck
    hazard's other accesses come after its first lines), with the tool's exit status judged."""
    from flashmoe import selftest
    hazard = [f"=========     and Write access at produce+0x{i:x} in tasks.cuh:{100 + i} [9 hazards]" for i in range(8)]
    fake = fake_sanitizer(tmp_path / "bin", "2025.3.1.0", [
        "========= Error: Race reported between Read access at consume+0x10 in tasks.cuh:195", *hazard,
        "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"], 99)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    (row,) = selftest.sanitize(["W2-tpr1"], tools=("racecheck",), limit_s=30, log_dir=tmp_path)
    assert row["passed"] is False and row["log"] == "sanitize-racecheck-W2-tpr1.log"
    assert row["sanitizer"] == "2025.3.1.0" and row["hazards_log"] == "sanitize-racecheck-W2-tpr1-hazards.log"
    assert "--racecheck-report hazard" not in (tmp_path / row["log"]).read_text()
    assert "--racecheck-report hazard" in (tmp_path / row["hazards_log"]).read_text()
    assert len(row["findings"][0]["first"]) < len(hazard)
    assert all(line in (tmp_path / row["log"]).read_text() for line in hazard)


def fake_sanitizer(where: Path, version: str, report: list[str], code: int) -> Path:
    """A compute-sanitizer that says its version, or its arguments and ``report``, and exits with ``code``."""
    fake = where / "compute-sanitizer"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'Version {version} (build 1)'; exit 0; fi\n"
                    "echo \"args: $*\"\ncat <<'END'\n" + "\n".join(report) + f"\nEND\nexit {code}\n")
    fake.chmod(0o755)
    return fake


def test_the_newest_sanitizer_runs_and_one_that_refuses_the_driver_gives_way(tmp_path, monkeypatch):
    """The toolkit's compute-sanitizer is on PATH; the wheel's lies under a sys.path entry. The
    newest runs; where it refuses the driver, the next one runs, and the log keeps both."""
    from flashmoe import selftest
    from flashmoe.environment import compute_sanitizers
    clean = ["========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"]
    old = fake_sanitizer(tmp_path / "toolkit", "2025.3.1.0", clean, 0)
    # No other compute-sanitizer of this machine in the way.
    monkeypatch.setenv("PATH", os.pathsep.join([str(old.parent), "/usr/bin", "/bin"]))
    base = [e for e in sys.path if not (Path(e) / "nvidia" / "cu13" / "bin" / "compute-sanitizer").exists()]
    for refuses in (False, True):
        site = tmp_path / f"site-{refuses}"
        report = ["========= Detected an unsupported driver version. Please update your CUDA installation"] \
            if refuses else clean
        new = fake_sanitizer(site / "nvidia" / "cu13" / "bin", "2026.4.0.0", report, 1 if refuses else 0)
        monkeypatch.setattr(sys, "path", [str(site), *base])
        assert compute_sanitizers() == [("2026.4.0.0", str(new)), ("2025.3.1.0", str(old))]
        (row,) = selftest.sanitize(["W2-tpr1"], tools=("racecheck",), limit_s=30, log_dir=site)
        assert row["passed"] and row["sanitizer"] == ("2025.3.1.0" if refuses else "2026.4.0.0")
        assert ("unsupported driver" in (site / row["log"]).read_text()) is refuses


def test_the_kit_judges_by_the_newest_sanitizer_and_records_the_older_racecheck(tmp_path, monkeypatch):
    import torch

    from flashmoe.bringup import stages
    race = ["========= Error: Race reported between Read access at consume+0x10 in tasks.cuh:195",
            "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"]
    old = fake_sanitizer(tmp_path / "toolkit", "2025.3.1.0", race, 99)
    fake_sanitizer(tmp_path / "site" / "nvidia" / "cu13" / "bin", "2026.4.0.0", ["========= ERROR SUMMARY: 0 errors"], 0)
    monkeypatch.setenv("PATH", os.pathsep.join([str(old.parent), "/usr/bin", "/bin"]))
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    st = stages.Stage("sanitizer", tmp_path, torch.device("cpu"), emulate=False, quick=True,
                      deadline=time.monotonic() + 120)
    stages.sanitizer(st)
    rows = {(r["tool"], r["sanitizer"]): r for r in records(tmp_path)}
    assert list(rows) == [(tool, "2026.4.0.0") for tool in ("memcheck", "racecheck", "synccheck")] + [
        ("racecheck", "2025.3.1.0")]
    assert all(r["passed"] for r in list(rows.values())[:3])
    older = rows["racecheck", "2025.3.1.0"]
    assert older["passed"] is None and older["verdict"] is False and "tasks.cuh:195" in older["detail"]
    assert st.counts == {"passed": 3, "failed": 0, "skipped": 1}
    assert (tmp_path / "sanitize-racecheck-W2-tpr1-2025.3.1.0.log").exists()


def test_without_a_compute_sanitizer_the_stage_says_so(tmp_path, monkeypatch):
    import torch

    from flashmoe.bringup import stages
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    monkeypatch.setattr(sys, "path", [e for e in sys.path
                                      if not (Path(e) / "nvidia" / "cu13" / "bin" / "compute-sanitizer").exists()])
    st = stages.Stage("sanitizer", tmp_path, torch.device("cpu"), emulate=False, quick=True,
                      deadline=time.monotonic() + 60)
    stages.sanitizer(st)
    rows = records(tmp_path)
    assert [r["tool"] for r in rows] == ["memcheck", "racecheck", "synccheck"]
    assert all(r["passed"] is None and r["detail"] == "compute-sanitizer not found" for r in rows)


def test_memcheck_passes_when_only_cuda_bindings_lookups_were_reported():
    from flashmoe.selftest import _only_foreign, sanitizer_findings
    lookup = ("========= Program hit CUDA_ERROR_INVALID_VALUE (error 1) due to \"invalid argument\" on CUDA API "
              "call to cuGetProcAddress_v2.\n=========     Saved host backtrace up to driver entry point at error\n")
    ours = "========= Invalid __global__ write of size 16 bytes\n=========     at flashmoe_kernel+0x40\n"
    for body, n, ok in ((lookup * 3, 3, True), (lookup * 3 + ours, 4, False), (ours, 1, False), ("", None, False)):
        output = body + (f"========= ERROR SUMMARY: {n} errors\n" if n is not None else "")
        assert _only_foreign(output, sanitizer_findings(output)) is ok


def test_a_named_commit_wins_over_the_checkout(monkeypatch):
    # A GPU machine got a copy of the tree with a .git naming an older commit: the name given wins.
    from flashmoe import environment
    monkeypatch.setenv(environment.COMMIT_ENV, "c0ffee")
    assert environment.commit() == "c0ffee"
    monkeypatch.delenv(environment.COMMIT_ENV)
    assert environment.commit() not in ("c0ffee", "unknown")


def test_the_kit_builds_up_front_every_kernel_the_later_stages_select():
    # The environment stage builds these on every core; a stage meeting one it did not build
    # compiles it alone, on GPU time.
    from dataclasses import replace

    from flashmoe.bringup.stages import planned_specs
    from flashmoe.host.plan import DeviceInfo, kernel_specs, layer_specs
    from flashmoe.host.spec import WIDE_BLOCK_N, select_spec
    from flashmoe.selftest import gpu_cases
    smem = 227 * 1024
    kernels, probes = planned_specs("sm_90a", smem)
    keys = {s.key() for s in kernels}
    assert len(keys) == len(kernels) and probes
    for case in gpu_cases():
        for spec in layer_specs(case.config, case.world, DeviceInfo(max_smem_per_block=smem, arch="sm_90a")):
            assert spec.key() in keys, (case.name, spec)
    prefill = select_spec("bfloat16", True, "sm_90a", smem, 128)
    wide = select_spec("bfloat16", True, "sm_90a", smem, 128, block_n=WIDE_BLOCK_N)
    for spec in (prefill, wide, replace(prefill, routing="given"), replace(prefill, trace=True),
                 replace(wide, trace=True), select_spec("bfloat16", True, "sm_90a", smem, 128, gemm="mma_sync")):
        assert spec.key() in keys, spec
    assert not any(s.arch != "sm_90a" for s in kernels)
    # The trace stage's layers, traced, in bands and row by row (bench/providers.py flashmoe_rowtiles);
    # the trace_ep stage's, traced, at each of its W.
    from bench import layers
    from flashmoe.bringup.commands import BENCHMARKS
    info = DeviceInfo(max_smem_per_block=smem, arch="sm_90a")
    for name in option(BENCHMARKS["trace"], "--configs"):
        for spec in kernel_specs(layers.layer(name)[0], 1, info):
            for band in (spec.band_tiles, 1):
                assert replace(spec, trace=True, band_tiles=band).key() in keys, (name, band, spec)
    for name in option(BENCHMARKS["trace_ep"], "--configs"):
        for world in map(int, option(BENCHMARKS["trace_ep"], "--worlds")):
            for spec in kernel_specs(layers.layer(name)[0], world, info):
                assert replace(spec, trace=True).key() in keys, (name, world, spec)


def option(args: list[str], flag: str) -> list[str]:
    """The values of ``flag`` in a command line (those up to the next flag)."""
    rest = args[args.index(flag) + 1:]
    return rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]


def test_the_kit_on_a_99_kib_gpu_builds_and_runs_what_fits_and_skips_fp32_saying_why(tmp_path, monkeypatch):
    # An RTX 4090 / L40S / A10: no fp32 pipeline fits its 99 KiB of shared memory a block, and the
    # layer refuses fp32 there; the kit builds the rest and records fp32 cases as skipped.
    import torch

    from flashmoe.bringup import stages
    from flashmoe.checks import Case
    from flashmoe.host.plan import DeviceInfo
    smem = 99 * 1024
    kernels, probes = stages.planned_specs("sm_89", smem)
    assert {s.dtype for s in kernels} == {"bfloat16", "float16"} and probes
    assert [s.dtype for s in stages.gpu_probe_specs("sm_89", smem)] == ["bfloat16"]
    monkeypatch.setattr(stages, "_device_info", lambda device: DeviceInfo(sm_count=128, max_smem_per_block=smem,
                                                                         arch="sm_89"))
    st = stages.Stage("kernel_mma_sync", tmp_path, torch.device("cpu"), emulate=False, quick=True,
                      deadline=time.monotonic() + 60)
    stages.run_cases(st, [Case("fp32-swiglu-t333", stages._cfg(dtype="float32"), tokens=333)], gemm="mma_sync")
    [row] = records(tmp_path)
    assert row["passed"] is None and "no float32 spec" in row["skipped"] and st.counts["skipped"] == 1


def test_the_selftest_on_a_99_kib_gpu_skips_fp32_saying_why_and_runs_the_rest(capsys):
    # The selftest's grid on an RTX 4090 / L40S: its fp32 cases are layouts the layer runs on the
    # reference there, so they are skipped with the reason, not failed; every other case runs.
    import torch

    from flashmoe.checks import Case
    from flashmoe.host.plan import DeviceInfo
    from flashmoe.selftest import _cfg, run_grid
    asked = []

    def make(config, world):       # stands in for the backend: the case fails, saying it ran
        asked.append(config.dtype)
        raise RuntimeError("ran")
    info = DeviceInfo(sm_count=128, max_smem_per_block=99 * 1024, arch="sm_89")
    fp32, bf16 = (Case(f"{d}-t33", _cfg(dtype=d), tokens=33) for d in ("float32", "bfloat16"))
    skipped, ran = run_grid([fp32, bf16], make, torch.device("cpu"), info, time_it=False)
    assert asked == ["bfloat16"]
    assert skipped.passed is None and "this GPU cannot run it" in skipped.detail and "float32" in skipped.detail
    assert ran.passed is False and "ran" in ran.detail
    out = capsys.readouterr().out
    assert "skip float32-t33" in out and "FAIL bfloat16-t33" in out
