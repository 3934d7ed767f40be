"""examples/ep_torchrun.py's options: each family's config is the one the kernel runs across ranks.

The example itself runs the kernel under torchrun (tests/test_ep_gpu.py, on a GPU); what it decides
before that is checked here.
"""

from __future__ import annotations

import dataclasses
import pathlib
import runpy

import pytest

from flashmoe.host.backend import shared_memory_problem
from flashmoe.host.plan import DeviceInfo, kernel_support
from flashmoe.host.spec import KernelSpec
from flashmoe.selftest import FAMILY_OPTIONS

EXAMPLE = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "ep_torchrun.py"),
                         run_name="ep_torchrun")


def config_of(*argv):
    return EXAMPLE["make_config"](EXAMPLE["parse_args"](list(argv)))


@pytest.mark.parametrize("family", sorted(FAMILY_OPTIONS))
def test_each_family_runs_on_the_kernel_across_ranks(family):
    config = config_of("--family", family)
    for name, value in FAMILY_OPTIONS[family].items():
        assert getattr(config, name) == value, name
    for world in (2, 8):
        spec = KernelSpec(arch="sm_90a", dtype=config.dtype, gated=config.gated,
                          scale_input=config.scale_expert_input)
        assert kernel_support(config, spec, world) is None
        assert shared_memory_problem(config, world, DeviceInfo(arch="sm_90a")) is None


def test_the_default_is_mixtral_and_an_explicit_top_k_wins():
    assert config_of() == config_of("--family", "mixtral")
    assert config_of().top_k == 2 and config_of().norm_topk_prob
    assert config_of("--family", "llama4").top_k == 1
    llama4_k2 = config_of("--family", "llama4", "--top-k", "2")
    assert llama4_k2 == dataclasses.replace(config_of("--family", "llama4"), top_k=2)


def test_a_shape_the_family_cannot_take_is_refused_before_any_process_starts(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert EXAMPLE["main"](["--family", "deepseek", "--experts", "6"]) == 2
    assert "n_group=4: must divide num_experts=6" in capsys.readouterr().err
    assert EXAMPLE["main"](["--family", "deepseek"]) == 2        # valid: then it asks for torchrun
    assert "run it under torchrun" in capsys.readouterr().err
