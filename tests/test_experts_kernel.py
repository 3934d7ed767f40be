"""The kernel with the routing given (``KernelBackend.forward(routing=...)``, what
``flashmoe.experts_forward`` runs on a GPU), on the CPU emulator against the reference: the
router phase replaced by the caller's ids and weights, dispatch, GEMMs and combine unchanged.
Ids include "no expert" (negative, E and beyond, past int32) and repeats, on several virtual
ranks, with 0 and 1 tokens, on both GEMM engines."""

from __future__ import annotations

import pytest
import torch

from flashmoe.checks import check_routing_given, given_routing_inputs
from flashmoe.config import MoEConfig
from flashmoe.host import emulator
from flashmoe.host.backend import KernelBackend
from flashmoe.host.spec import KernelSpec, wgmma_spec

pytestmark = pytest.mark.skipif(emulator.emulator_available() is not None,
                                reason=f"emulator unavailable: {emulator.emulator_available()}")

TIMEOUT_S = 0.05      # as tests/test_kernel_emulated.py: a broken protocol fails in about a second


def config(**kw) -> MoEConfig:
    fields = dict(hidden_size=64, intermediate_size=32, num_experts=8, top_k=3, dtype="bfloat16")
    fields.update(kw)
    return MoEConfig(**fields)


_BACKENDS: dict = {}


def backend(cfg: MoEConfig, world: int, spec: KernelSpec) -> KernelBackend:
    key = (cfg, world, spec)
    if key not in _BACKENDS:
        _BACKENDS[key] = KernelBackend(cfg, None, virtual_world=world, emulate=True, timeout_s=TIMEOUT_S,
                                       error_check="sync", spec=spec, routing="given")
    return _BACKENDS[key]


def mma_sync(cfg):
    return KernelSpec(arch="sm_80", dtype=cfg.dtype, gated=cfg.gated, block_m=128, block_n=128, threads=256,
                      stages=3)


def wgmma(cfg):
    return wgmma_spec(cfg.dtype, cfg.gated, stages=3)


CASES = [
    ("bf16-swiglu-k3", config(), 1, 37, mma_sync),
    ("bf16-swiglu-k3-W2", config(), 2, 45, mma_sync),
    ("bf16-swiglu-k3-W4-odd", config(), 4, 23, mma_sync),
    ("fp32-gelu-plain-k1-W2", config(dtype="float32", activation="gelu", gated=False, top_k=1), 2, 21, mma_sync),
    ("fp16-relu-k2-one-token", config(dtype="float16", activation="relu", top_k=2), 1, 1, mma_sync),
    ("bf16-W2-one-token", config(), 2, 1, mma_sync),
    ("bf16-no-tokens", config(), 1, 0, mma_sync),
    ("bf16-wgmma-k2-W2", config(top_k=2), 2, 40, wgmma),
    ("bf16-swiglu-k8-W2", config(top_k=8), 2, 30, mma_sync),   # combine batches across tokens
]


@pytest.mark.parametrize("name,cfg,world,tokens,spec", CASES, ids=[c[0] for c in CASES])
def test_given_routing_matches_the_reference(name, cfg, world, tokens, spec):
    ok, detail = check_routing_given(backend(cfg, world, spec(cfg)), tokens, "cpu", seed=len(name))
    assert ok, f"{name}: {detail}"


def test_results_do_not_depend_on_the_number_of_virtual_ranks():
    cfg = config()
    x, weights, ids, topk_weights = given_routing_inputs(cfg, 45, "cpu", seed=3)
    outs = [backend(cfg, w, mma_sync(cfg)).forward(x, weights, routing=(ids, topk_weights)) for w in (1, 2, 4)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_the_routing_goes_with_the_kernel_built_for_it():
    cfg = config()
    x, weights, ids, topk_weights = given_routing_inputs(cfg, 10, "cpu", seed=1)
    kernel = backend(cfg, 1, mma_sync(cfg))
    with pytest.raises(ValueError, match=r"must both be \(10, 3\)"):
        kernel.forward(x, weights, routing=(ids[:, :2], topk_weights[:, :2]))
    with pytest.raises(ValueError, match="goes with a backend built with routing='given'"):
        kernel.forward(x, weights)
    router = KernelBackend(cfg, None, emulate=True, timeout_s=TIMEOUT_S, spec=mma_sync(cfg))
    with pytest.raises(ValueError, match="this one has routing='router'"):
        router.forward(x, weights, routing=(ids, topk_weights))
