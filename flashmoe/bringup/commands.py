"""Stages of the bring-up kit that run a command as a user would type it: the selftest's grid
(``python -m flashmoe.selftest``), the soak (``--soak``), ``pytest -m gpu`` and the benchmarks
(``bench/``). Each command's output goes to ``DIR/<stage>.log`` as it comes, and it is bounded by
its stage's time."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import selftest

if TYPE_CHECKING:
    from .stage import Stage

REPO = Path(__file__).resolve().parents[2]


def shown_args(args: list[str], out: Path) -> str:
    """A command line as its case names it: the output directory as DIR, paths inside the checkout
    relative to it (an output directory beside the checkout, /x/repo-out, is not inside /x/repo)."""
    return " ".join("DIR" if a == str(out) else str(Path(a).relative_to(REPO)) if Path(a).is_relative_to(REPO)
                    else a for a in args)


def run_command(st: Stage, args: list[str], summary: str = "") -> None:
    """``python ARGS`` from the checkout as the stage's case: its output goes to DIR/<stage>.log as
    it comes (a kill keeps it), it is killed with what it started 5 s before the stage's time is
    up, and it passes when it exits 0. The case's detail is the last output line (the last one
    holding ``summary`` when given); the rows of the benchmark results it wrote come along."""
    log = st.out / f"{st.name}.log"

    def run():
        since = time.time()
        code, output = selftest.run_bounded([sys.executable, *args], max(10.0, st.left() - 5), log=log, cwd=REPO)
        lines = [ln.strip() for ln in output.splitlines() if ln.strip() and summary in ln]
        detail = "killed at the stage's time limit" if code is None else f"exit {code}"
        return {"passed": code == 0, "exit_code": code, "log": log.name, "rows": _bench_rows(st.out, since),
                "detail": f"{detail}: {lines[-1] if lines else 'no output'}", "output_tail": output[-1500:]}
    st.case("python " + shown_args(args, st.out), run, min_s=30)


def _bench_rows(out: Path, since: float) -> list[dict]:
    """The main fields of every row of the benchmark results written to ``out`` after ``since``."""
    keys = ("config", "tokens", "world", "routing", "step", "provider", "tile", "status", "median_ms", "pct_matmul",
            "pct_copy", "speedup_vs_torch_loop", "speedup_vs_hf_grouped_mm", "correct")
    rows = []
    for path in sorted([*out.glob("layer_*.json"), *out.glob("ep_*.json"), *out.glob("reference_*.json")]):
        if path.stat().st_mtime >= since and not path.name.endswith(".trace.json"):
            rows += [{k: r[k] for k in keys if k in r} for r in json.loads(path.read_text()).get("rows", [])]
    return rows


# Each benchmark stage's command line (bench/README.md has what each prints). On a CPU they run
# as dry runs: the reference instead of the kernel, the plumbing checked, nothing measured.
TIMED = ["--repeats", "10", "--warmup", "3"]
BENCHMARKS = {
    "bench": ["bench/bench_layer.py", "--configs", "qwen3-30b-a3b", "mixtral-8x7b", "--tokens", "128", "4096", *TIMED],
    "bench_grid": ["bench/bench_layer.py", *TIMED],
    # 16384 tokens: more 64-token chunks than blocks, the router's other way (whole chunks a block);
    # the paper layer there is where bench/model_ep.py's router stands least checked.
    "trace": ["bench/bench_layer.py", "--configs", "qwen3-30b-a3b", "mixtral-8x7b", "flashmoe-paper",
              "--tokens", "128", "4096", "16384", "--providers", "flashmoe", "flashmoe_rowtiles", "--trace", "4096",
              "--repeats", "3", "--warmup", "1"],
    "tiles": ["bench/bench_layer.py", "--configs", "qwen3-30b-a3b", "deepseek-v2-lite", "flashmoe-paper",
              "--tokens", "2048", "16384", "--providers", "flashmoe", "flashmoe_128x128", "flashmoe_cooperative",
              "flashmoe_nvshmem", *TIMED],
    "sweep_ep": ["bench/sweep_ep.py", *TIMED],
    "sweep_skewed": ["bench/sweep_ep.py", "--configs", "qwen3-30b-a3b", "--tokens", "4096", "--worlds", "1", "8",
                     "--routing", "skewed", "--providers", "flashmoe", *TIMED],
    # Two layers whose W = 8 missed 1.15x of W = 1 (docs/performance.md), traced at both.
    "trace_ep": ["bench/sweep_ep.py", "--configs", "mixtral-8x7b", "deepseek-v2-lite", "--tokens", "4096",
                 "--worlds", "1", "8", "--providers", "flashmoe", "--trace", "4096", "--repeats", "3", "--warmup", "1"],
    # A training step runs the reference backend (autograd records): its grouped GEMMs against transformers'.
    "train": ["bench/bench_reference.py", "--train", "--tokens", "512", "4096", "16384", *TIMED],
}


def benchmark(st: Stage) -> str:
    script, *args = BENCHMARKS[st.name]
    if not (REPO / script).is_file():
        return f"{REPO / script} is not here (the benchmarks live in a checkout, not in the installed package)"
    run_command(st, [str(REPO / script), *args, "--out-dir", str(st.out)] + (["--dry-run"] if st.emulate else []))
    return ""


def selftest_grid(st: Stage) -> str:
    """The whole selftest as a user runs it: every case of its grid (the large ones too: 16384
    tokens per rank, Mixtral's width) and its extras, into the selftest JSON the results keep."""
    run_command(st, ["-m", "flashmoe.selftest", "--out", str(st.out)] + (["--emulate"] if st.emulate else []),
                summary="cases passed")
    return ""


def soak(st: Stage) -> str:
    forwards = "2" if st.emulate else "10000"
    run_command(st, ["-m", "flashmoe.selftest", "--only", "none", "--no-extras", "--soak", forwards,
                     "--out", str(st.out)] + (["--emulate"] if st.emulate else []), summary="soak:")
    return ""


def gpu_tests(st: Stage) -> str:
    if st.emulate:
        return "the tests marked gpu need a GPU"
    # --durations: where the stage's minutes go, for planning the next GPU session.
    run_command(st, ["-m", "pytest", "-m", "gpu", "-q", "-rs", "--durations=15", "-p", "no:cacheprovider",
                     str(REPO / "tests")])
    return ""
