"""The kernel with the routing given (``KernelBackend.forward(routing=...)``, what
``flashmoe.experts_forward`` runs on a GPU), on the CPU emulator against the reference: the
router phase replaced by the caller's ids and weights, dispatch, GEMMs and combine unchanged.
Ids include "no expert" (negative, E and beyond, past int32) and repeats, on several virtual
ranks, with 0 and 1 tokens, on both GEMM engines."""

from __future__ import annotations

from dataclasses import replace

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
                      stages=3, scale_input=cfg.scale_expert_input)


def wgmma(cfg):
    return replace(wgmma_spec(cfg.dtype, cfg.gated, stages=3), scale_input=cfg.scale_expert_input)


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
    # GPT-OSS's experts: biases and the clamped SwiGLU (a limit of 1.5 clamps many elements)
    ("bf16-gpt-oss-k3-W2", config(activation="swiglu_clamped", swiglu_limit=1.5, expert_bias=True), 2, 45,
     mma_sync),
    ("fp16-gpt-oss-wgmma-k2", config(dtype="float16", activation="swiglu_clamped", swiglu_limit=1.5,
                                     expert_bias=True, top_k=2), 1, 40, wgmma),
    # DeepSeek-V4's SiLU clamped SwiGLU (activation code 5) in the wgmma epilogue
    ("bf16-silu-clamped-wgmma-k2-W2", config(activation="silu_clamped", swiglu_limit=1.0, top_k=2), 2, 40, wgmma),
    # the weights scale the experts' inputs (vLLM's apply_router_weight_on_input); token 4's repeated
    # expert runs once, its input scaled by the two slots' summed weight
    ("bf16-scaled-input-k3-W2", config(scale_expert_input=True), 2, 45, mma_sync),
    ("bf16-scaled-input-wgmma-k3-W2", config(scale_expert_input=True), 2, 45, wgmma),
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


def test_experts_forward_runs_gpt_oss_experts_in_their_own_layout():
    """flashmoe.experts_forward on the emulated kernel with GPT-OSS's layout (gate_up_proj
    [E, H, 2I], gate and up columns alternating, biases alternating with them, the clamped SwiGLU):
    the biases reach the kernel reordered with their weights. Judged by the accuracy rule against
    the reference on the same routing, in the kernel's own layout."""
    from flashmoe import accuracy, experts_forward, reference
    g = torch.Generator().manual_seed(5)
    E, H, I, T = 4, 64, 32, 29

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)
    gate_up, down = rnd(E, H, 2 * I, scale=H ** -0.5), rnd(E, I, H, scale=I ** -0.5)
    gate_up_bias, down_bias, x = rnd(E, 2 * I), rnd(E, H), rnd(T, H)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    w = torch.rand(T, 2, generator=g)
    out = experts_forward(x, ids, w, gate_up, down, gate_up_bias=gate_up_bias, down_bias=down_bias,
                          transposed=True, interleaved=True, activation="swiglu_clamped", swiglu_limit=1.5,
                          backend="emulated")
    cfg = config(num_experts=E, top_k=2, activation="swiglu_clamped", swiglu_limit=1.5, expert_bias=True)
    gates_then_ups = lambda t: torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)     # noqa: E731
    weights = reference.MoEWeights(router_weight=None, gate_up_proj=gates_then_ups(gate_up).transpose(1, 2),
                                   down_proj=down.transpose(1, 2), gate_up_bias=gates_then_ups(gate_up_bias),
                                   down_bias=down_bias)
    ok, err, tol = accuracy.check(out, x, weights, cfg, routing=reference.given_routing(ids, w, E))
    assert ok, f"error {err:.3g} above tolerance {tol:.3g}"
