"""The work counts every benchmark row is divided by (useful FLOPs, expert-weight bytes) and the
roofline they give against the ceilings a run measures."""

from __future__ import annotations

import torch

from flashmoe.config import MoEConfig
from flashmoe.reference import Routing


def flops(config: MoEConfig, tokens: int) -> int:
    """Useful floating-point operations of one forward over ``tokens`` tokens (dropless).

    router          2 * T * H * E
    routed experts  2 * T * k * H * I * (3 if gated else 2)   (gate + up + down, or up + down)
    shared experts  2 * T * H * Is * (3 if gated else 2), Is = the fused shared width,
                    plus 2 * T * H for a sigmoid-gated shared expert

    A multiply-add counts 2. Activation, routing softmax/top-k and the weighted combine are
    elementwise and left out: the count is the matrix work any implementation must do, so
    FLOPs / time compares implementations on the same scale as a dense matmul's rate.
    """
    t, h = tokens, config.hidden_size
    mats = 3 if config.gated else 2
    total = 2 * t * h * config.num_experts
    total += 2 * t * config.top_k * h * config.intermediate_size * mats
    total += 2 * t * h * config.shared_intermediate_total * mats
    if config.shared_expert_gate:
        total += 2 * t * h
    return total


def bytes_per_expert(config: MoEConfig) -> int:
    """Bytes of one routed expert's weights: gate_up [up_rows, H] plus down [H, I]."""
    element = config.torch_dtype.itemsize
    return (config.up_rows + config.intermediate_size) * config.hidden_size * element


def expert_weight_bytes(config: MoEConfig, tokens: int, routing: Routing | None = None) -> int:
    """Bytes of expert weights one forward must read at least once.

    = (routed experts that receive >= 1 kept token) x (gate_up + down bytes of one expert)
      + the shared experts' weights (every token uses them)

    With ``routing`` the active experts are counted from it; without, the count is the
    expectation under uniform routing, E * (1 - (1 - k/E)^T) (each token picks k distinct
    experts). The router's fp32 weights are not expert weights and are left out. Bytes / time
    against the measured copy bandwidth says how close a forward runs to the memory floor,
    which is what bounds it at small token counts.
    """
    e, k = config.num_experts, config.top_k
    if routing is not None:
        active = int(torch.unique(routing.ids[routing.kept]).numel())
    else:
        active = e * (1.0 - (1.0 - k / e) ** tokens)
    element = config.torch_dtype.itemsize
    shared_rows = (2 if config.gated else 1) * config.shared_intermediate_total
    shared = (shared_rows + config.shared_intermediate_total) * config.hidden_size * element
    return int(round(active * bytes_per_expert(config))) + shared


def roofline(config: MoEConfig, tokens: int, ceilings: dict, routing: Routing | None = None) -> dict:
    """The time a forward could take at best on this GPU, from its work alone: the useful FLOPs at
    the measured dense matmul rate, or the bytes it must move at the measured copy bandwidth,
    whichever is longer. The bytes are the expert weights it must read once
    (``expert_weight_bytes``) plus x read once and the output written once; everything a fused
    kernel keeps on chip or in L2 (routing, intermediates, results on their way home) is left out.

    Returns ``roofline_ms``, ``compute_ms``, ``memory_ms`` and ``bound`` ("compute" or "memory").
    A measured time over ``roofline_ms`` is how far a provider runs from the hardware's limit.
    """
    element = config.torch_dtype.itemsize
    nbytes = expert_weight_bytes(config, tokens, routing) + 2 * tokens * config.hidden_size * element
    compute_ms = flops(config, tokens) / (ceilings["matmul_tflops"] * 1e12) * 1e3
    memory_ms = nbytes / (ceilings["copy_gbps"] * 1e9) * 1e3
    return {"roofline_ms": max(compute_ms, memory_ms), "compute_ms": compute_ms, "memory_ms": memory_ms,
            "bound": "compute" if compute_ms >= memory_ms else "memory"}
