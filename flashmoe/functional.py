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


def experts_forward(x, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *,
                    gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                    transposed: bool = False, interleaved: bool = False, activation: str = "silu",
                    gated: bool = True, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                    scale_expert_input: bool = False, expert_map: torch.Tensor | None = None,
                    backend: str = "auto", virtual_world: int = 1) -> torch.Tensor:
    """The experts and the combine with the routing given, the form of vLLM's and SGLang's
    ``fused_experts``: token t goes to experts ``topk_ids[t, j]`` weighted by
    ``topk_weights[t, j]``. An id outside 0..E-1 marks "no expert" and is skipped; an expert
    named twice by one token runs once, with the two weights summed.

    Shapes, for x[..., H] with T tokens, E experts of width I:
        topk_ids, topk_weights   [T, k] (integer ids, floating weights)
        gate_up_proj             [E, 2I, H] (gate rows then up rows; [E, I, H] with gated=False)
        down_proj                [E, H, I]
        gate_up_bias, down_bias  [E, 2I or I] and [E, H] (optional; both or neither)
    in x's dtype, as transformers stores them. ``transposed=True``: gate_up_proj [E, H, 2I] and
    down_proj [E, I, H]; the kernel reads a copy in its own layout, made when the weights it
    last ran differ (so on every call when calls alternate between layers). ``interleaved=True``:
    the gate and up rows alternate (gate 0, up 0, gate 1, ...), reordered on every call.
    ``activation``: one of ``flashmoe.config.ACTIVATIONS``; 'swiglu_clamped' (GPT-OSS) reads
    ``swiglu_alpha`` and ``swiglu_limit``, 'silu_clamped' (DeepSeek-V4) ``swiglu_limit``.
    ``scale_expert_input=True`` (Llama4; vLLM's ``apply_router_weight_on_input``): the weight
    scales the expert's input instead of its output, ``expert(w x)``, and the combine adds the
    outputs unweighted; a repeated expert's summed weight scales its one input.
    ``expert_map`` (vLLM's, for expert parallelism): an integer tensor [G] that maps the global
    ids in ``topk_ids`` (0..G-1) to this rank's experts 0..E-1, -1 (or any value outside 0..E-1)
    for an expert held elsewhere; such slots, and ids outside 0..G-1, are skipped.

    Returns x's shape and dtype; the weighted sum is fp32, rounded once. ``backend`` and
    ``virtual_world`` as in ``FlashMoELayer``: on a GPU 'auto' runs the flashmoe kernel with its
    router replaced by the given routing (dispatch to W virtual ranks, expert GEMMs with their
    biases, combine) when the kernel supports the shapes (backend='kernel' says why not) and
    autograd is not recording; else the reference ('mixed' math). The op is ``flashmoe::experts``
    (torch.compile / export take it whole; autograd reaches x, topk_weights, the experts and
    their biases).
    """
    backend_select.check_backend(backend)
    if not isinstance(virtual_world, int) or isinstance(virtual_world, bool) or virtual_world < 1:
        raise ValueError(f"virtual_world={virtual_world!r}: must be an integer >= 1")
    for name, flag in (("transposed", transposed), ("interleaved", interleaved), ("gated", gated),
                       ("scale_expert_input", scale_expert_input)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}={flag!r}: must be True or False")
    if interleaved and not gated:
        raise ValueError("interleaved=True reorders gate and up rows: it needs gated=True")
    _check_experts(x, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                   transposed, gated)
    if expert_map is not None:
        topk_ids = _local_ids(topk_ids, expert_map)
    if transposed:
        gate_up_proj, down_proj = gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2)
    if interleaved:
        rows = gate_up_proj.shape[1]
        order = torch.cat([torch.arange(0, rows, 2), torch.arange(1, rows, 2)]).to(x.device)
        gate_up_proj = gate_up_proj.index_select(1, order)
        gate_up_bias = None if gate_up_bias is None else gate_up_bias.index_select(1, order)
    if not torch.compiler.is_compiling():     # the op checks them again, where tracing cannot reach
        try:
            ops.experts_config(x.shape[-1], down_proj.shape[-1], down_proj.shape[0], topk_ids.shape[1],
                               activation, gated, gate_up_bias is not None, swiglu_alpha, swiglu_limit,
                               scale_expert_input, x.dtype)
        except ValueError as e:
            raise ValueError(f"experts_forward: {e}") from None
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias))
    x2d = x.reshape(-1, x.shape[-1])
    out = ops.experts_2d(x2d, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                         activation, gated, float(swiglu_alpha), float(swiglu_limit), scale_expert_input,
                         backend, virtual_world, grad)
    return out.reshape(x.shape)


def _check_experts(x, ids, weights, gate_up, down, gate_up_bias, down_bias, transposed, gated) -> None:
    from .config import DTYPES
    for name, t in (("x", x), ("topk_ids", ids), ("topk_weights", weights),
                    ("gate_up_proj", gate_up), ("down_proj", down)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is a {type(t).__name__}: expected a torch.Tensor")
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
                         "must be 3-D: [E, 2I or I, H] and [E, H, I] (transposed: [E, H, 2I or I] "
                         "and [E, I, H])")
    e, inter = down.shape[0], down.shape[1 if transposed else 2]
    rows = (2 if gated else 1) * inter
    want_gate_up, want_down = (((e, hidden, rows), (e, inter, hidden)) if transposed
                               else ((e, rows, hidden), (e, hidden, inter)))
    if tuple(gate_up.shape) != want_gate_up or tuple(down.shape) != want_down:
        up = "2I" if gated else "I"
        layout = f"[E, H, {up}] and [E, I, H]" if transposed else f"[E, {up}, H] and [E, H, I]"
        raise ValueError(f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
                         f"do not fit H={hidden}: expected {list(want_gate_up)} and {list(want_down)}, "
                         f"i.e. {layout} with I={inter}{' (transposed)' if transposed else ''}")
    if (gate_up_bias is None) != (down_bias is None):
        raise ValueError("give both gate_up_bias and down_bias, or neither")
    if gate_up_bias is not None:
        for name, t, shape in (("gate_up_bias", gate_up_bias, (e, rows)), ("down_bias", down_bias, (e, hidden))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} is {got}: expected a tensor of shape {list(shape)}")
    biases = (("gate_up_bias", gate_up_bias), ("down_bias", down_bias)) if gate_up_bias is not None else ()
    for name, t in (("gate_up_proj", gate_up), ("down_proj", down), *biases):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}: expected x's dtype {x.dtype}")
    for name, t in (("topk_ids", ids), ("topk_weights", weights), ("gate_up_proj", gate_up),
                    ("down_proj", down), *biases):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: one device for all")


def _local_ids(ids: torch.Tensor, expert_map) -> torch.Tensor:
    """``expert_map[ids]``, -1 where an id is outside the map (no host sync: the kernel and the
    reference skip every id outside 0..E-1, so the map's own values need no check)."""
    if (not isinstance(expert_map, torch.Tensor) or expert_map.dim() != 1 or expert_map.numel() == 0
            or expert_map.is_floating_point() or expert_map.is_complex() or expert_map.dtype == torch.bool):
        got = (f"shape {tuple(expert_map.shape)} and dtype {expert_map.dtype}"
               if isinstance(expert_map, torch.Tensor) else f"a {type(expert_map).__name__}")
        raise ValueError(f"expert_map has {got}: expected a 1-D integer tensor [G], G >= 1, mapping each "
                         "global expert id to a local one (-1: held elsewhere)")
    if expert_map.device != ids.device:
        raise ValueError(f"expert_map is on {expert_map.device} but topk_ids is on {ids.device}: "
                         "one device for all")
    size = expert_map.shape[0]
    local = expert_map[ids.clamp(0, size - 1)].long()   # long: the -1 below must not wrap in an unsigned map
    return torch.where((ids >= 0) & (ids < size), local, -1)
