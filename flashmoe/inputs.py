"""Checks of what a caller hands to a forward: the input tensor and the weight tensors.

Every backend runs behind these checks, so a mistake is reported once, in the caller's terms
(what was expected, what was given, what to do), instead of as a shape error deep in a matmul
or, worse, a kernel reading the wrong bytes.
"""

from __future__ import annotations

import torch

from .config import MoEConfig
from .reference import MoEWeights


def check_input(x, config: MoEConfig, weight_device: torch.device | None = None) -> None:
    """Raise TypeError / ValueError unless ``x`` is a [..., H] tensor of the config's dtype on
    the weights' device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x is a {type(x).__name__}: expected a torch.Tensor of shape [..., "
                        f"{config.hidden_size}] (flashmoe.moe_forward also takes DLPack arrays)")
    if x.dim() == 0 or x.shape[-1] != config.hidden_size:
        raise ValueError(f"x has shape {tuple(x.shape)}: the last dimension must be "
                         f"hidden_size={config.hidden_size}")
    if not x.is_floating_point():
        raise TypeError(f"x has dtype {x.dtype}: expected a floating-point tensor of dtype "
                        f"torch.{config.dtype}")
    if x.dtype != config.torch_dtype:
        raise TypeError(f"x has dtype {x.dtype} but config.dtype is {config.dtype!r}: cast the "
                        f"input (x.to(torch.{config.dtype})) or use a layer built for {x.dtype}")
    if weight_device is not None and x.device != weight_device:
        raise ValueError(f"x is on {x.device} but the weights are on {weight_device}: move the "
                         f"input (x.to('{weight_device}')) or the layer (layer.to('{x.device}'))")


def check_weights(weights: MoEWeights, config: MoEConfig, num_experts: int | None = None) -> None:
    """Raise ValueError / TypeError unless every tensor the config needs is there with the
    right shape and dtype. ``num_experts`` is how many routed experts the tensors hold (fewer
    than config.num_experts when a process holds only its expert-parallel share)."""
    e_router, h = config.router_experts, config.hidden_size
    e = config.num_experts if num_experts is None else num_experts
    fp32, dt = torch.float32, config.torch_dtype
    want = {
        "router_weight": ((e_router, h), fp32),
        "gate_up_proj": ((e, config.up_rows, h), dt),
        "down_proj": ((e, h, config.intermediate_size), dt),
    }
    if config.selection_bias:
        want["selection_bias"] = ((e_router,), fp32)
    if config.num_shared_experts:
        rows = (2 if config.gated else 1) * config.shared_intermediate_total
        want["shared_gate_up_proj"] = ((rows, h), dt)
        want["shared_down_proj"] = ((h, config.shared_intermediate_total), dt)
    if config.shared_expert_gate:
        want["shared_gate_weight"] = ((1, h), fp32)
    if config.router_bias:
        want["router_bias"] = ((e_router,), fp32)
    if config.expert_bias:
        want["gate_up_bias"] = ((e, config.up_rows), dt)
        want["down_bias"] = ((e, h), dt)
    device = weights.router_weight.device if isinstance(weights.router_weight, torch.Tensor) else None
    for name, (shape, dtype) in want.items():
        t = getattr(weights, name)
        if t is None:
            raise ValueError(f"weights.{name} is None: the config needs it with shape {shape}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weights.{name} is a {type(t).__name__}: expected a torch.Tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"weights.{name} has shape {tuple(t.shape)}: expected {shape} for "
                             f"this config")
        if t.dtype != dtype:
            raise TypeError(f"weights.{name} has dtype {t.dtype}: expected {dtype} (the router, "
                            f"its biases and the shared gate are fp32; expert weights and "
                            f"expert biases are config.dtype)")
        if t.device != device:
            raise ValueError(f"weights.{name} is on {t.device} but weights.router_weight is on "
                             f"{device}: all weights must be on one device")
