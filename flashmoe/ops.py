"""The layer's forward as torch.library custom ops, so torch.compile and torch.export see one
opaque call with known output shapes instead of tracing into the routing (whose per-expert row
counts are data-dependent) or into the kernel's host code.

    flashmoe::moe(x[T, H], weights..., config, backend, virtual_world, grad, return_routing, owner)
        (weights: every field of reference.MoEWeights, in its order; None where absent)
        -> (out[T, H], ids[T, k], weights[T, k], kept[T, k], shared_gate[T])
    flashmoe::moe_backward(grad_out, x, weights..., config, needs) -> grads
    flashmoe::experts(x[T, H], topk_ids[T, k], topk_weights[T, k], gate_up_proj, down_proj,
                      gate_up_bias, down_bias, activation, gated, swiglu_alpha, swiglu_limit,
                      backend, virtual_world, grad)
        -> out[T, H]                                                   (the routing-given form)
    flashmoe::experts_backward(grad_out, ..., needs) -> grads

``config`` is the ``MoEConfig`` as JSON without its dtype (that is x's dtype, so a cast layer
or autocast needs no other string). Routing outputs are empty (shape [0]) unless
``return_routing``; ``shared_gate`` is empty unless the config gates its shared expert.
``backend`` is the user's choice; which one runs is decided inside the op (``backend_select``),
where the kernel's availability is a run-time fact and not something a graph bakes in. ``grad``
says whether autograd records this forward: under it 'auto' runs the reference.

Autograd: in eager mode a forward that autograd records does not take the ops: it runs the
reference as plain torch (``autograd_in_eager``), whose activations autograd keeps. In a compiled
or exported graph the ops' backward recomputes the reference forward under autograd and
differentiates it (``moe_backward``, ``experts_backward``), so nothing but the inputs is saved
(as activation checkpointing would) and the backward is itself one opaque op for the compiler.
Both differentiate the same code and give the same bits (tests/test_autograd.py).

``owner`` names the FlashMoELayer whose kernel (built for its virtual_world, max_tokens and
kernel_options) serves the call; 0, or an owner that no longer exists (an exported program run
in another process), uses a kernel kept per (config, device, virtual_world).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import backend_select, reference
from .config import MoEConfig, dtype_name
from .errors import KernelUnavailable

_WEIGHTS = [f.name for f in dataclasses.fields(reference.MoEWeights)]
_OWNERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()


def register_owner(layer) -> int:
    """A random id under which the op finds ``layer`` (random so that an id baked into an
    exported program never names another process's layer)."""
    key = int.from_bytes(os.urandom(7), "little") + 1
    _OWNERS[key] = layer
    return key


def config_json(config: MoEConfig) -> str:
    fields = dataclasses.asdict(config)
    del fields["dtype"]
    return json.dumps(fields, sort_keys=True)


@functools.lru_cache(maxsize=64)
def _config(text: str, dtype: torch.dtype) -> MoEConfig:
    return MoEConfig(**json.loads(text), dtype=dtype_name(dtype))


@functools.lru_cache(maxsize=16)
def _shared_kernel(config: MoEConfig, device: torch.device, virtual_world: int, emulate: bool,
                   routing: str = "router"):
    options = {"routing": routing, **({"emulate": True} if emulate else {})}
    return backend_select.new_kernel(config, device, virtual_world, max_tokens=None, options=options)


def _weights(tensors) -> reference.MoEWeights:
    return reference.MoEWeights(**dict(zip(_WEIGHTS, tensors)))


@torch.library.custom_op("flashmoe::moe", mutates_args=())
def moe(x: Tensor, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
        selection_bias: Optional[Tensor], shared_gate_up_proj: Optional[Tensor],
        shared_down_proj: Optional[Tensor], shared_gate_weight: Optional[Tensor],
        router_bias: Optional[Tensor], gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor],
        config: str, backend: str, virtual_world: int, grad: bool, return_routing: bool,
        owner: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = _config(config, x.dtype)
    weights = _weights((router_weight, gate_up_proj, down_proj, selection_bias,
                        shared_gate_up_proj, shared_down_proj, shared_gate_weight,
                        router_bias, gate_up_bias, down_bias))
    layer = _OWNERS.get(owner)
    if layer is not None:
        which = backend_select.choose(backend, cfg, x.device, grad, virtual_world,
                                      reason_cache=layer._kernel_reasons)
        kernel = functools.partial(layer._kernel_for, x.device, cfg)
    else:
        which = backend_select.choose(backend, cfg, x.device, grad, virtual_world)
        kernel = functools.partial(_shared_kernel, cfg, x.device, virtual_world, backend == "emulated")
    with reference.no_autocast(x.device):
        out, routing = backend_select.forward_2d(which, x, weights, cfg, kernel=kernel,
                                                 return_routing=return_routing)
    if layer is not None:
        layer.last_backend = which
    out = out.contiguous()                      # the strides the fake promises
    if not return_routing:
        return (out, *_empty_routing(x))
    gate = routing.shared_gate if routing.shared_gate is not None else x.new_empty(0, dtype=torch.float32)
    return (out, routing.ids.long().contiguous(), routing.weights.float().contiguous(),
            routing.kept.bool().contiguous(), gate.contiguous())


def _empty_routing(x: Tensor):
    return (x.new_empty(0, dtype=torch.int64), x.new_empty(0, dtype=torch.float32),
            x.new_empty(0, dtype=torch.bool), x.new_empty(0, dtype=torch.float32))


@moe.register_fake
def _moe_fake(x, router_weight, gate_up_proj, down_proj, selection_bias, shared_gate_up_proj,
              shared_down_proj, shared_gate_weight, router_bias, gate_up_bias, down_bias, config,
              backend, virtual_world, grad, return_routing, owner):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if not return_routing:
        return (out, *_empty_routing(x))
    fields = json.loads(config)
    t, k, gated = x.shape[0], fields["top_k"], fields["shared_expert_gate"]
    return (out, x.new_empty(t, k, dtype=torch.int64), x.new_empty(t, k, dtype=torch.float32),
            x.new_empty(t, k, dtype=torch.bool), x.new_empty(t if gated else 0, dtype=torch.float32))


# x and the weights: the op's tensor arguments, before config.
_TENSOR_ARGS = 1 + len(_WEIGHTS)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_TENSOR_ARGS])
    ctx.config = inputs[_TENSOR_ARGS]
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_out, *_routing_grads):
    needs = list(ctx.needs_input_grad[:_TENSOR_ARGS])
    grads = torch.ops.flashmoe.moe_backward(grad_out, *ctx.saved_tensors, ctx.config, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], *([None] * 6))


moe.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("flashmoe::moe_backward", mutates_args=())
def moe_backward(grad_out: Tensor, x: Tensor, router_weight: Tensor, gate_up_proj: Tensor,
                 down_proj: Tensor, selection_bias: Optional[Tensor],
                 shared_gate_up_proj: Optional[Tensor], shared_down_proj: Optional[Tensor],
                 shared_gate_weight: Optional[Tensor], router_bias: Optional[Tensor],
                 gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], config: str,
                 needs: list[bool]) -> list[Tensor]:
    cfg = _config(config, x.dtype)

    def forward(x, *weights):
        return reference.moe_forward(x, _weights(weights), cfg,
                                     math=backend_select.REFERENCE_MATH).to(x.dtype)
    return _recomputed_grads(forward, grad_out, (x, router_weight, gate_up_proj, down_proj,
                                                 selection_bias, shared_gate_up_proj,
                                                 shared_down_proj, shared_gate_weight,
                                                 router_bias, gate_up_bias, down_bias), needs)


@moe_backward.register_fake
def _moe_backward_fake(grad_out, x, router_weight, gate_up_proj, down_proj, selection_bias,
                       shared_gate_up_proj, shared_down_proj, shared_gate_weight, router_bias,
                       gate_up_bias, down_bias, config, needs):
    return _grads_like((x, router_weight, gate_up_proj, down_proj, selection_bias,
                        shared_gate_up_proj, shared_down_proj, shared_gate_weight, router_bias,
                        gate_up_bias, down_bias), needs)


# The routing-given form: the experts and the combine, with ids and weights from the caller.

@functools.lru_cache(maxsize=64)
def experts_config(hidden: int, intermediate: int, num_experts: int, slots: int, activation: str,
                   gated: bool, bias: bool, swiglu_alpha: float, swiglu_limit: float,
                   scale_expert_input: bool, dtype: torch.dtype) -> MoEConfig:
    """The MoEConfig of a routing-given call (its routing fields unused): sizes from the tensors,
    top_k the slots given, at most E (more slots than experts can only repeat or skip)."""
    return MoEConfig(hidden_size=hidden, intermediate_size=intermediate, num_experts=num_experts,
                     top_k=min(slots, num_experts), activation=activation, gated=gated, expert_bias=bias,
                     swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit,
                     scale_expert_input=scale_expert_input, dtype=dtype_name(dtype))


@torch.library.custom_op("flashmoe::experts", mutates_args=())
def experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up_proj: Tensor,
            down_proj: Tensor, gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor],
            activation: str, gated: bool, swiglu_alpha: float, swiglu_limit: float, scale_expert_input: bool,
            backend: str, virtual_world: int, grad: bool) -> Tensor:
    cfg = _experts_op_config(x, topk_ids, down_proj, activation, gated, gate_up_bias, swiglu_alpha, swiglu_limit,
                             scale_expert_input)
    if topk_ids.shape[1] == cfg.top_k:
        which = backend_select.choose(backend, cfg, x.device, grad, virtual_world)
    elif backend in ("kernel", "emulated"):
        raise KernelUnavailable(f"backend={backend!r} cannot run: topk_ids has {topk_ids.shape[1]} slots "
                                f"per token for {cfg.num_experts} experts, the kernel at most one per expert. "
                                "backend='auto' falls back to the reference; backend='reference' always uses it.")
    else:       # more slots than experts: a valid routing repeats or skips; the reference takes it
        which = "reference"
    if which in ("kernel", "emulated") and x.shape[0] > 0:
        kernel = _shared_kernel(cfg, x.device, virtual_world, which == "emulated", "given")
        weights = reference.MoEWeights(router_weight=None, gate_up_proj=gate_up_proj, down_proj=down_proj,
                                       gate_up_bias=gate_up_bias, down_bias=down_bias)
        return kernel.forward(x.contiguous(), weights, routing=(topk_ids, topk_weights))
    return _experts_reference(x, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, cfg)


def _experts_reference(x, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, cfg):
    return reference.experts_forward(x, topk_ids, topk_weights, gate_up_proj, down_proj, cfg,
                                     math=backend_select.REFERENCE_MATH, gate_up_bias=gate_up_bias,
                                     down_bias=down_bias).to(x.dtype).contiguous()


def experts_2d(x2d: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
               gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], activation: str, gated: bool,
               swiglu_alpha: float, swiglu_limit: float, scale_expert_input: bool, backend: str,
               virtual_world: int, grad: bool) -> Tensor:
    """``flashmoe::experts``, or under autograd in eager mode the reference it would run
    (``autograd_in_eager``)."""
    if autograd_in_eager(grad, backend):
        cfg = _experts_op_config(x2d, topk_ids, down_proj, activation, gated, gate_up_bias, swiglu_alpha,
                                 swiglu_limit, scale_expert_input)
        return _experts_reference(x2d, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                                  cfg)
    return torch.ops.flashmoe.experts(x2d, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias,
                                      down_bias, activation, gated, swiglu_alpha, swiglu_limit, scale_expert_input,
                                      backend, virtual_world, grad)


def _experts_op_config(x, topk_ids, down_proj, activation, gated, gate_up_bias, swiglu_alpha, swiglu_limit,
                       scale_expert_input):
    return experts_config(x.shape[-1], down_proj.shape[-1], down_proj.shape[0], topk_ids.shape[1], activation,
                          gated, gate_up_bias is not None, swiglu_alpha, swiglu_limit, scale_expert_input, x.dtype)


@experts.register_fake
def _experts_fake(x, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                  gated, swiglu_alpha, swiglu_limit, scale_expert_input, backend, virtual_world, grad):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_EXPERTS_TENSORS = 7     # x, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias


def _experts_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_EXPERTS_TENSORS])
    ctx.expert_math = inputs[_EXPERTS_TENSORS:_EXPERTS_TENSORS + 5]   # activation, gated, alpha, limit, scale


def _experts_backward_autograd(ctx, grad_out):
    needs = list(ctx.needs_input_grad[:_EXPERTS_TENSORS])
    grads = torch.ops.flashmoe.experts_backward(grad_out, *ctx.saved_tensors, *ctx.expert_math, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], *([None] * 8))


experts.register_autograd(_experts_backward_autograd, setup_context=_experts_setup_context)


@torch.library.custom_op("flashmoe::experts_backward", mutates_args=())
def experts_backward(grad_out: Tensor, x: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                     gate_up_proj: Tensor, down_proj: Tensor, gate_up_bias: Optional[Tensor],
                     down_bias: Optional[Tensor], activation: str, gated: bool, swiglu_alpha: float,
                     swiglu_limit: float, scale_expert_input: bool, needs: list[bool]) -> list[Tensor]:
    cfg = _experts_op_config(x, topk_ids, down_proj, activation, gated, gate_up_bias, swiglu_alpha, swiglu_limit,
                             scale_expert_input)

    def forward(x, ids, w, gate_up, down, gate_up_bias, down_bias):
        return _experts_reference(x, ids, w, gate_up, down, gate_up_bias, down_bias, cfg)
    needs = [need and i != 1 for i, need in enumerate(needs)]     # ids have no gradient
    return _recomputed_grads(forward, grad_out, (x, topk_ids, topk_weights, gate_up_proj, down_proj,
                                                 gate_up_bias, down_bias), needs)


@experts_backward.register_fake
def _experts_backward_fake(grad_out, x, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias,
                           down_bias, activation, gated, swiglu_alpha, swiglu_limit, scale_expert_input, needs):
    needs = [need and i != 1 for i, need in enumerate(needs)]
    return _grads_like((x, topk_ids, topk_weights, gate_up_proj, down_proj, gate_up_bias, down_bias), needs)


# Backward by recomputation, shared by both ops.

def _recomputed_grads(forward, grad_out: Tensor, inputs, needs) -> list[Tensor]:
    """d(forward(*inputs))/d(input) . grad_out for each input with ``needs`` set (zeros where
    the input does not reach the output), an empty tensor for the others."""
    with _autograd_inside_op(), reference.no_autocast(grad_out.device):
        leaves = [None if t is None else t.detach().requires_grad_(bool(need))
                  for t, need in zip(inputs, needs)]
        out = forward(*leaves)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
                     if wanted and out.requires_grad else [None] * len(wanted))
    grads = []
    for t in leaves:
        if t is None or not t.requires_grad:
            grads.append(grad_out.new_empty(0))
        else:
            g = next(found)
            grads.append(torch.zeros_like(t) if g is None else g)
    return grads


def _grads_like(inputs, needs) -> list[Tensor]:
    """What ``_recomputed_grads`` returns, as shapes (for the fake kernels)."""
    empty = next(t for t in inputs if t is not None).new_empty(0)
    return [torch.empty_like(t) if t is not None and need else torch.empty_like(empty)
            for t, need in zip(inputs, needs)]


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd on inside an op's implementation, where the dispatcher has switched it off (the
    op runs below the autograd key): grad mode and the autograd dispatch keys both re-enabled."""
    keys = torch._C.DispatchKey
    with torch.enable_grad(), \
            torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False), \
            torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False):
        yield


def autograd_in_eager(grad: bool, backend: str) -> bool:
    """Whether a forward that autograd records runs the reference as plain torch instead of
    through the op: in eager mode, with a backend that runs the reference under autograd anyway
    ('auto', 'reference'). Autograd then keeps the reference's activations, as for any module,
    and the backward differentiates them instead of computing the forward a second time (the
    same bits; a training step about a quarter shorter, bench/bench_reference.py --train). A
    compiled or exported graph keeps the op: the compiler cannot trace the routing's
    data-dependent row counts, and the op's backward saves only the inputs."""
    return grad and backend in ("auto", "reference") and not torch.compiler.is_compiling()


def forward_2d(x2d: Tensor, weights: reference.MoEWeights, config: MoEConfig, *, backend: str,
               virtual_world: int = 1, return_routing: bool = False, owner: int = 0,
               config_text: str | None = None):
    """``flashmoe::moe`` on ``x2d[T, H]`` (or, under autograd in eager mode, the reference it
    would run: ``autograd_in_eager``): (out[T, H], Routing or None). The router logits of a
    returned Routing are computed here, in plain torch (differentiable, fp32). ``config_text``
    is ``config_json(config)`` when the caller keeps it (a compiled caller must: building it
    is not traceable)."""
    grad = backend_select.needs_autograd(x2d, weights)
    if autograd_in_eager(grad, backend):
        out, routing = backend_select.forward_2d("reference", x2d, weights, config)   # autocast off inside
        layer = _OWNERS.get(owner)
        if layer is not None:
            layer.last_backend = "reference"
        if not return_routing:
            return out, None
        # as the op returns them: the decisions without a graph, the logits differentiable
        decided = {name: None if t is None else t.detach()
                   for name, t in vars(routing).items() if name != "logits"}
        return out, dataclasses.replace(routing, **decided)
    out, ids, topk_weights, kept, gate = torch.ops.flashmoe.moe(
        x2d, *(getattr(weights, name) for name in _WEIGHTS), config_text or config_json(config), backend,
        virtual_world, grad, return_routing, owner)
    if not return_routing:
        return out, None
    with reference.no_autocast(x2d.device):
        logits = reference.router_logits(x2d, weights.router_weight,
                                         weights.router_bias if config.router_bias else None)
    return out, reference.Routing(ids=ids, weights=topk_weights, kept=kept,
                                  shared_gate=gate if config.shared_expert_gate else None,
                                  logits=logits)
