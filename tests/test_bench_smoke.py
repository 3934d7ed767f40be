"""The benchmarks' dry runs: every code path on the CPU, tiny shapes, the reference backend.

They check that each script runs end to end and writes CSV, JSON and PNG with the expected
columns, and that every provider's output passed the accuracy check. Nothing here looks at a
time: a dry run measures nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:          # bench/ is a directory of scripts, not an installed package
    sys.path.insert(0, str(REPO))

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

from bench import bench_layer, bench_reference, sweep_ep  # noqa: E402


def _outputs(directory: Path, prefix: str) -> dict:
    files = {p.suffix: p for p in directory.iterdir() if p.name.startswith(prefix)}
    assert set(files) == {".csv", ".json", ".png"}, sorted(p.name for p in directory.iterdir())
    assert files[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(files[".csv"]) as f:
        rows = list(csv.DictReader(f))
    data = json.loads(files[".json"].read_text())
    return {"csv": rows, "json": data}


def test_bench_layer_dry_run(tmp_path, capsys):
    assert bench_layer.main(["--dry-run", "--tokens", "16", "--out-dir", str(tmp_path)]) == 0
    out = _outputs(tmp_path, "layer_dryrun_")
    rows = out["csv"]
    assert list(rows[0]) == bench_layer.COLUMNS
    assert {r["config"] for r in rows} == {"mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite",
                                           "flashmoe-paper"}
    assert {r["provider"] for r in rows} == set(bench_layer.PROVIDERS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["correct"] == "True"
        assert float(r["max_abs_err"]) <= float(r["tol"])
        assert r["clock"] == "host"
        assert float(r["roofline_ms"]) > 0 and r["bound"] in ("compute", "memory") and float(r["pct_roofline"]) > 0
    data = out["json"]
    assert data["meta"]["dry_run"] is True
    assert {"matmul_tflops", "copy_gbps"} <= set(data["ceilings"])
    assert len(data["rows"]) == len(rows)
    assert "DRY RUN" in capsys.readouterr().out


def test_bench_layer_dry_run_of_the_kernel_variants(tmp_path):
    """Every variant provider goes through the run (building, checking, closing); in a dry run
    each is the reference backend, so this checks the plumbing, not the variants."""
    names = ["flashmoe", *bench_layer.EXTRA_PROVIDERS]
    assert bench_layer.main(["--dry-run", "--tokens", "16", "--configs", "flashmoe-paper", "--providers", *names,
                             "--out-dir", str(tmp_path)]) == 0
    rows = _outputs(tmp_path, "layer_dryrun_")["csv"]
    assert [r["provider"] for r in rows] == names
    assert all(r["status"] == "ok" and r["correct"] == "True" for r in rows), rows


def test_sweep_ep_dry_run(tmp_path):
    args = ["--dry-run", "--tokens", "24", "--configs", "mixtral-8x7b", "flashmoe-paper",
            "--out-dir", str(tmp_path)]
    assert sweep_ep.main(args) == 0
    rows = _outputs(tmp_path, "ep_dryrun_")["csv"]
    assert list(rows[0]) == sweep_ep.COLUMNS
    seen = {(r["config"], r["world"], r["provider"]) for r in rows}
    assert seen == {(c, w, p) for c in ("mixtral-8x7b", "flashmoe-paper") for w in ("1", "2", "4", "8")
                    for p in sweep_ep.PROVIDERS}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["max_abs_err"]) <= float(r["tol"])
        assert r["ratio_vs_w1"] != "" and r["speedup_vs_bulk_sync"] != ""


def test_sweep_ep_skewed_routing_loads_the_first_ranks(tmp_path):
    """--routing skewed: the same skew at every W (flashmoe.checks.routing_shift), so W = 1 is
    balanced by definition and the first of W = 8 ranks gets several times its share."""
    args = ["--dry-run", "--tokens", "64", "--configs", "qwen3-30b-a3b", "--worlds", "1", "8",
            "--routing", "skewed", "--out-dir", str(tmp_path)]
    assert sweep_ep.main(args) == 0
    rows = _outputs(tmp_path, "ep_dryrun_")["csv"]
    assert {r["routing"] for r in rows} == {"skewed"}
    load = {r["world"]: float(r["rank_load"]) for r in rows}
    assert load["1"] == 1.0 and load["8"] > 2.0, load
    assert all(r["status"] == "ok" and float(r["max_abs_err"]) <= float(r["tol"]) for r in rows)


def test_sweep_ep_world_that_does_not_divide_the_experts_is_skipped_with_a_reason(tmp_path):
    args = ["--dry-run", "--tokens", "16", "--configs", "mixtral-8x7b", "--worlds", "1", "3",
            "--out-dir", str(tmp_path)]
    assert sweep_ep.main(args) == 0
    rows = _outputs(tmp_path, "ep_dryrun_")["csv"]
    skipped = [r for r in rows if r["world"] == "3"]
    assert len(skipped) == 2
    assert all(r["status"].startswith("skipped: num_experts=8 is not divisible by W=3") for r in skipped)


def test_multiprocess_mode_says_what_is_missing(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert sweep_ep.main(["--multiprocess"]) == 2
    assert "torchrun --nproc_per_node=N" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "64")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert sweep_ep.main(["--multiprocess"]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("step", ["forward", "train"])
def test_bench_reference_times_both_and_checks_their_errors_against_the_rule(step, tmp_path, capsys):
    # the reference backend against transformers' grouped_mm, a forward or a training step
    # (forward and backward), each checked under its own routing; its rows land in the results
    rows = bench_reference.main(["--dry-run", "--tokens", "4", "33", "--out-dir", str(tmp_path)]
                                + (["--train"] if step == "train" else []))
    assert [(r["tokens"], r["provider"]) for r in rows] == [
        (t, p) for t in (4, 33) for p in ("flashmoe_reference", "hf_grouped_mm")]
    for r in rows:
        assert r["step"] == step and r["status"] == "ok" and r["median_ms"] > 0 and r["clock"] == "host"
        assert r["max_abs_err"] <= r["tol"] and r["correct"]
        assert (r["speedup_vs_hf_grouped_mm"] is not None) and r["speedup_vs_hf_grouped_mm"] > 0
    written = _outputs(tmp_path, "reference_dryrun_")
    assert [r["provider"] for r in written["csv"]] == [r["provider"] for r in rows]
    assert "x hf" in capsys.readouterr().out
    # the kit's train stage carries these rows in its case line, as it does bench_layer.py's
    from flashmoe.bringup.commands import _bench_rows
    assert [(r["step"], r["tokens"], r["provider"], r["correct"]) for r in _bench_rows(tmp_path, 0)] == [
        (step, r["tokens"], r["provider"], True) for r in rows]


def test_roofline_is_the_longer_of_compute_and_memory():
    """Mixtral's shapes at the H200's measured ceilings: 128 tokens read nearly every expert's
    weights and are memory-bound, 16384 tokens are compute-bound; the figures are the counts of
    bench.metrics over the ceilings, nothing else."""
    from bench import metrics
    from flashmoe.config import MoEConfig
    config = MoEConfig(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2, dtype="bfloat16")
    ceilings = {"matmul_tflops": 800.0, "copy_gbps": 4000.0}
    for tokens, bound in ((128, "memory"), (16384, "compute")):
        r = metrics.roofline(config, tokens, ceilings)
        nbytes = metrics.expert_weight_bytes(config, tokens) + 2 * tokens * 4096 * 2
        assert r["compute_ms"] == pytest.approx(metrics.flops(config, tokens) / 800e12 * 1e3)
        assert r["memory_ms"] == pytest.approx(nbytes / 4000e9 * 1e3)
        assert r["roofline_ms"] == max(r["compute_ms"], r["memory_ms"]) and r["bound"] == bound


def test_kernel_variants_differ_from_the_default_in_one_choice_each(monkeypatch):
    """flashmoe_128x128: the device's tiles without the wide one (the 128 x 128 one ping-pong on
    Hopper); flashmoe_cooperative: the same tiles, every consumer schedule cooperative."""
    from bench import providers
    from flashmoe.config import MoEConfig
    from flashmoe.host import backend
    from flashmoe.host.plan import DeviceInfo
    monkeypatch.setattr(backend, "_device_info", lambda device: DeviceInfo.for_arch("sm_90a"))
    config = MoEConfig(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8)
    narrow = providers.variant_specs("flashmoe_128x128", config, "cpu")
    cooperative = providers.variant_specs("flashmoe_cooperative", config, "cpu")
    nvshmem = providers.variant_specs("flashmoe_nvshmem", config, "cpu")
    assert [(s.block_m, s.block_n, s.schedule) for s in narrow] == [(128, 128, "pingpong"), (64, 128, "cooperative")]
    assert [(s.block_m, s.block_n, s.schedule) for s in cooperative] == [(128, 128, "cooperative"),
                                                                         (64, 128, "cooperative")]
    assert [s.stages for s in narrow] == [s.stages for s in cooperative]
    assert {s.transport for s in narrow + cooperative} == {"peer"}
    assert nvshmem == [dataclasses.replace(s, transport="nvshmem") for s in cooperative]
    with pytest.raises(ValueError, match="allowed are"):
        providers.variant_specs("flashmoe", config, "cpu")


def test_nvshmem_heap_is_sized_for_the_largest_layer_unless_the_user_set_it(monkeypatch):
    """NVSHMEM's symmetric heap is fixed at init, so a flashmoe_nvshmem run sizes it up front:
    the largest of its layers' heaps at the run's most tokens, plus 1 GiB for NVSHMEM's own."""
    from bench import layers, providers
    from flashmoe.host import backend, runtime
    from flashmoe.host.plan import DeviceInfo, variant_plans
    monkeypatch.setattr(backend, "_device_info", lambda device: DeviceInfo.for_arch("sm_90a"))
    monkeypatch.setenv(runtime.HEAP_SIZE_ENV, "")    # so that the test's end restores the user's
    monkeypatch.delenv(runtime.HEAP_SIZE_ENV)
    configs = [layers.layer(n)[0] for n in ("qwen3-30b-a3b", "mixtral-8x7b")]
    size = providers.reserve_nvshmem_heap(configs, 32768, "cpu")
    assert size == runtime.os.environ[runtime.HEAP_SIZE_ENV]
    mixtral = providers.variant_specs("flashmoe_nvshmem", configs[1], "cpu")
    need = variant_plans(configs[1], mixtral, 1, 32768, DeviceInfo.for_arch("sm_90a"))[0].rank_heap_bytes
    assert need > 2 << 30       # far above NVSHMEM's 1 GiB default
    assert need + (1 << 30) <= runtime.parse_size(size) < need + (2 << 30)
    monkeypatch.setenv(runtime.HEAP_SIZE_ENV, "3G")
    assert providers.reserve_nvshmem_heap(configs, 32768, "cpu") is None
    assert runtime.os.environ[runtime.HEAP_SIZE_ENV] == "3G"


def test_a_traced_run_of_w_ranks_records_each_ranks_course(tmp_path, monkeypatch):
    """sweep_ep.py --trace: a provider of W virtual ranks keeps its source's trace, and each traced
    row gets its timeline files and the rank split; at W = 1 the source runs, without a rank split.
    On the CPU emulator (the provider's kernel check stubbed, since the emulator is not the kernel
    backend a GPU run must time)."""
    import torch

    from bench import compare, providers, report
    from flashmoe import FlashMoELayer
    from flashmoe.config import MoEConfig
    from flashmoe.host import emulator
    if emulator.emulator_available() is not None:
        pytest.skip(f"emulator unavailable: {emulator.emulator_available()}")
    monkeypatch.setattr(providers.backend_select, "kernel_unavailable_reason", lambda *a: None)
    config = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=4, top_k=2)
    torch.manual_seed(0)
    source = FlashMoELayer(config, backend="emulated", max_tokens=40, kernel_options={"trace_capacity": 64})
    x = torch.randn(40, 64).to(torch.bfloat16)
    rows = {}
    for world in (1, 2):
        layer = providers.flashmoe(source, virtual_world=world, max_tokens=40 // world).forward
        assert (layer is source) == (world == 1) and layer.kernel_options["trace_capacity"] == 64
        with torch.no_grad():
            layer(x)
        rows[world] = report.attach_trace(layer, str(tmp_path / f"ep_cpu_1_tiny_40_w{world}"))
        assert (tmp_path / f"ep_cpu_1_tiny_40_w{world}.trace.json").is_file()
    # A traced row's figures leave its key alone (compare.py matches it with the run before, traced or not).
    assert not set(rows[1]) & set(compare.KEY) and not set(rows[2]) & set(compare.KEY)
    assert "rank_split" not in rows[1] and "x 2 blocks" in rows[1]["phases"]
    assert rows[2]["rank_split"].startswith("2 ranks of ") and "x 4 blocks" in rows[2]["phases"]
    pairs, _ = compare.trace_pairs([tmp_path / "ep_cpu_1_tiny_40_w1.trace.json"],
                                   [tmp_path / "ep_cpu_1_tiny_40_w2.trace.json"])
    assert [name for name, *_ in pairs] == ["tiny 40 tokens W=1 -> tiny 40 tokens W=2"]
