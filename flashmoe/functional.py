"""moe_forward: the layer's forward as a function of (input, weights, config).

Takes torch tensors, or any array with ``__dlpack__`` (cupy, numpy, jax...): those are viewed as
torch tensors without a copy and the result is handed back as an array of the input's library
(``<library>.from_dlpack``), so a cupy caller stays in cupy.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

from . import backend_select, ops
from .config import MoEConfig
from .inputs import check_input, check_weights
from .reference import MoEWeights


def moe_forward(x, weights: MoEWeights, config: MoEConfig, backend: str = "auto", *,
                virtual_world: int = 1):
    """The MoE forward of ``x[..., H]`` (torch tensor or DLPack array) with ``weights`` (torch
    tensors or DLPack arrays). Returns the output in the same shape, dtype and kind as ``x``.

    ``backend`` as in ``FlashMoELayer``: 'auto', 'kernel', 'reference' or 'emulated'. The
    kernel backend for a (config, device, virtual_world) is built once and kept. The forward is
    the custom op ``flashmoe::moe``, as the layer's.
    """
    backend_select.check_backend(backend)
    library = None
    if not isinstance(x, torch.Tensor):
        library = _array_library(x)
        x = _as_tensor(x, "x")
    weights = MoEWeights(**{f.name: _as_tensor(getattr(weights, f.name), f"weights.{f.name}")
                            for f in dataclasses.fields(MoEWeights)})
    check_input(x, config, weights.router_weight.device)
    check_weights(weights, config)
    out, _ = ops.forward_2d(x.reshape(-1, config.hidden_size), weights, config, backend=backend,
                            virtual_world=virtual_world)
    out = out.reshape(x.shape)
    return out if library is None else library.from_dlpack(out)


def _as_tensor(a, name: str):
    if a is None or isinstance(a, torch.Tensor):
        return a
    if not hasattr(a, "__dlpack__"):
        raise TypeError(f"{name} is a {type(a).__name__}: expected a torch.Tensor or an array "
                        "with __dlpack__ (cupy, numpy, ...)")
    return torch.from_dlpack(a)


def _array_library(a):
    """The module whose from_dlpack builds arrays of ``a``'s kind (cupy for a cupy array)."""
    if not hasattr(a, "__dlpack__"):
        raise TypeError(f"x is a {type(a).__name__}: expected a torch.Tensor or an array with "
                        "__dlpack__ (cupy, numpy, ...)")
    root = type(a).__module__.partition(".")[0]
    library = importlib.import_module(root)
    if not hasattr(library, "from_dlpack"):
        raise TypeError(f"x is a {type(a).__module__}.{type(a).__name__}, whose library {root} has "
                        "no from_dlpack to return the result with: pass a torch tensor instead")
    return library


EXPERTS_BACKENDS = ("auto", "reference")


def experts_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *,
                    activation: str = "silu", gated: bool = True, backend: str = "auto"):
    """The experts and the combine with the routing given, the form of vLLM's and SGLang's
    ``fused_experts``: token t goes to experts ``topk_ids[t, j]`` weighted by
    ``topk_weights[t, j]``; an id outside 0..E-1 marks "no expert" and is skipped.

    ``x[..., H]``; ``topk_ids`` / ``topk_weights`` ``[T, k]`` for the T tokens of x;
    ``gate_up_proj[E, 2I, H]`` (gate then up; ``[E, I, H]`` with ``gated=False``) and
    ``down_proj[E, H, I]`` in x's dtype, as transformers stores them. Returns x's shape and
    dtype; the weighted sum is fp32, rounded once. The op is ``flashmoe::experts``
    (torch.compile / export take it whole; autograd reaches x, topk_weights and the experts).
    Every backend ('auto', 'reference') computes the reference's 'mixed' math.
    """
    if backend not in EXPERTS_BACKENDS:
        raise ValueError(f"backend={backend!r}: the routing-given form runs on "
                         f"{' or '.join(map(repr, EXPERTS_BACKENDS))} (the reference)")
    _check_experts(x, topk_ids, topk_weights, gate_up_proj, down_proj, activation, gated)
    x2d = x.reshape(-1, x.shape[-1])
    out = torch.ops.flashmoe.experts(x2d, topk_ids, topk_weights, gate_up_proj, down_proj,
                                     activation, gated, backend)
    return out.reshape(x.shape)


def _check_experts(x, ids, weights, gate_up, down, activation, gated) -> None:
    from .config import ACTIVATIONS, DTYPES
    for name, t in (("x", x), ("topk_ids", ids), ("topk_weights", weights),
                    ("gate_up_proj", gate_up), ("down_proj", down)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is a {type(t).__name__}: expected a torch.Tensor")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: allowed are {', '.join(ACTIVATIONS)}")
    if x.dtype not in DTYPES.values():
        raise TypeError(f"x has dtype {x.dtype}: expected one of {', '.join(DTYPES)}")
    if x.dim() == 0:
        raise ValueError("x is a scalar: expected [..., H]")
    tokens, hidden = x.numel() // max(x.shape[-1], 1), x.shape[-1]
    if ids.dim() != 2 or ids.shape[0] != tokens or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"topk_ids has shape {tuple(ids.shape)} and dtype {ids.dtype}: expected "
                         f"integer ids of shape [{tokens}, k] (one row per token of x)")
    if weights.shape != ids.shape or not weights.is_floating_point():
        raise ValueError(f"topk_weights has shape {tuple(weights.shape)} and dtype "
                         f"{weights.dtype}: expected floating weights shaped like topk_ids "
                         f"{tuple(ids.shape)}")
    if gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
                         "must be [E, 2I or I, H] and [E, H, I]")
    e, inter = down.shape[0], down.shape[2]
    rows = (2 if gated else 1) * inter
    if tuple(gate_up.shape) != (e, rows, hidden) or down.shape[1] != hidden:
        raise ValueError(f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
                         f"do not fit H={hidden}: expected [E, {rows}, {hidden}] "
                         f"({'gate then up, ' if gated else ''}I={inter}) and [E, {hidden}, I]")
    for name, t in (("gate_up_proj", gate_up), ("down_proj", down)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}: expected x's dtype {x.dtype}")
    for name, t in (("topk_ids", ids), ("topk_weights", weights), ("gate_up_proj", gate_up),
                    ("down_proj", down)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: one device for all")
