"""Which backend runs a forward: the GPU kernel or the reference, decided in one place.

The layer (``flashmoe.layer``) and the functional form (``flashmoe.functional``) both ask
``choose`` and run ``forward_2d``, so they cannot drift apart in when they use the kernel or in
what the reference path computes.
"""

from __future__ import annotations

import torch

from . import reference
from .config import MoEConfig
from .errors import KernelUnavailable

BACKENDS = ("auto", "kernel", "reference", "emulated")

# The reference backend computes the contract with torch's own GEMMs in the dtype where it has
# fast ones (fp32 accumulation inside each GEMM) and everything else in fp32, rounded once: on a
# CPU about as fast as transformers' experts on the same weights (bench/bench_reference.py), more accurate, and
# within the accuracy rule by a margin (flashmoe.accuracy); for float32 it is the fp32 reference.
REFERENCE_MATH = "mixed"


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed are {', '.join(BACKENDS)}")
    return backend


def _import_kernel_backend():
    """(KernelBackend class, None) or (None, why it cannot be imported)."""
    try:
        from flashmoe.host.backend import KernelBackend
    except ImportError as exc:
        return None, f"kernel unavailable: {exc}"
    return KernelBackend, None


def kernel_unavailable_reason(config: MoEConfig, device, virtual_world: int = 1,
                              process_group=None, emulate: bool = False) -> str | None:
    """None when the kernel can run ``config`` on ``device``; else a sentence saying why not.
    ``emulate``: the kernel's source on the CPU emulator instead (backend='emulated')."""
    device = torch.device(device)
    if emulate:
        if device.type != "cpu":
            return (f"the input is on {device}; backend='emulated' runs the kernel's source on "
                    "the CPU emulator and takes CPU tensors")
        kernel_cls, why = _import_kernel_backend()
        return why or kernel_cls.unavailable_reason(config, device, virtual_world, emulate=True)
    if device.type != "cuda":
        return f"the input is on {device}; the kernel runs on CUDA devices only"
    if process_group is not None and _group_size(process_group) > 1:
        # One rank per process: the kernel runs expert-parallel across the group over NVSHMEM
        # (flashmoe.host.group_backend). This answer is this rank's; the layer makes the group
        # agree (group_choose) so that no rank runs the kernel while another runs ep_forward.
        try:
            from flashmoe.host.group_backend import GroupBackend
        except ImportError as exc:
            return f"kernel unavailable: {exc}"
        return GroupBackend.unavailable_reason(config, device, process_group)
    kernel_cls, why = _import_kernel_backend()
    if kernel_cls is None:
        return why
    return kernel_cls.unavailable_reason(config, device, virtual_world)


def new_kernel(config: MoEConfig, device, virtual_world: int, max_tokens: int | None,
               process_group=None, options: dict | None = None):
    """Build the kernel backend (compiles or loads the kernel and allocates its heaps).
    ``max_tokens`` is the most tokens one forward brings; the kernel sizes its buffers per rank.
    ``options`` go to KernelBackend (timeout_s, error_check, blocks_per_rank, emulate)."""
    if process_group is not None and _group_size(process_group) > 1:
        from flashmoe.host.group_backend import GroupBackend
        return GroupBackend(config, torch.device(device), process_group, max_tokens, **dict(options or {}))
    kernel_cls, why = _import_kernel_backend()
    if kernel_cls is None:
        raise KernelUnavailable(why)
    extra = dict(options or {})
    per_rank = None if max_tokens is None else -(-max_tokens // virtual_world)
    return kernel_cls(config, torch.device(device), virtual_world=virtual_world,
                      max_tokens=per_rank, **extra)


def needs_autograd(x: torch.Tensor, weights: reference.MoEWeights) -> bool:
    """True when torch would record a graph through this forward."""
    if not torch.is_grad_enabled():
        return False
    tensors = [x] + [t for t in vars(weights).values() if isinstance(t, torch.Tensor)]
    return any(t.requires_grad for t in tensors)


def choose(backend: str, config: MoEConfig, device: torch.device, grad: bool,
           virtual_world: int = 1, process_group=None, reason_cache: dict | None = None) -> str:
    """'kernel', 'emulated' or 'reference' for this forward; raises KernelUnavailable when
    backend='kernel' (or 'emulated') cannot run. ``grad``: autograd records this forward.
    ``reason_cache`` (a dict) remembers the kernel's availability per device."""
    if backend == "reference":
        return "reference"
    emulate = backend == "emulated"
    key = (device, emulate)
    if reason_cache is not None and key in reason_cache:
        reason = reason_cache[key]
    else:
        reason = kernel_unavailable_reason(config, device, virtual_world, process_group, emulate)
        if reason_cache is not None:
            reason_cache[key] = reason
    which = _decide(backend, reason, grad, "the reference")
    return "emulated" if emulate and which == "kernel" else which


def _decide(backend: str, reason: str | None, grad: bool, fallback: str) -> str:
    """'kernel' when nothing stands against it, else 'reference' (or raise for backend='kernel'
    or 'emulated')."""
    if reason is None and grad:
        # The kernel is forward-only: an output without a graph would silently stop training.
        reason = ("the kernel computes no gradients and autograd is recording this forward; "
                  "run it under torch.no_grad() or torch.inference_mode()")
    if reason is None:
        return "kernel"
    if backend in ("kernel", "emulated"):
        raise KernelUnavailable(f"backend={backend!r} cannot run: {reason}. backend='auto' falls "
                                f"back to {fallback}; backend='reference' always uses it.")
    return "reference"


def group_choose(backend: str, config: MoEConfig, x: torch.Tensor, grad: bool, process_group,
                 reason_cache: dict) -> str:
    """choose() for a rank of a process group: 'kernel' only when every rank can run it (one
    all-reduce per device, remembered in ``reason_cache``), else 'reference' (ep_forward) on
    every rank. Every rank must call forward with its input on the same kind of device and in the
    same autograd mode."""
    if backend == "emulated":
        raise ValueError("backend='emulated' runs one process's kernel on the CPU emulator; with "
                         "a process group use backend='auto' or 'reference'")
    if backend == "reference":
        return "reference"
    if x.device not in reason_cache:
        reason = kernel_unavailable_reason(config, x.device, 1, process_group)
        if x.device.type == "cuda":
            from flashmoe.host.group_backend import group_agrees
            if group_agrees(reason is None, process_group, x.device) is False and reason is None:
                reason = "another rank of the process group cannot run the kernel (its layer says why)"
        reason_cache[x.device] = reason
    return _decide(backend, reason_cache[x.device], grad, "flashmoe.distributed.ep_forward")


def forward_2d(which: str, x2d: torch.Tensor, weights: reference.MoEWeights, config: MoEConfig,
               kernel=None, return_routing: bool = True):
    """Run ``x2d[T, H]`` on the chosen backend; returns (out[T, H] in x's dtype, Routing or None
    when not asked for: reading the kernel's routing back costs a few small copies)."""
    if which in ("kernel", "emulated") and x2d.shape[0] > 0:
        result = kernel().forward(x2d.contiguous(), weights, return_routing=return_routing)
        return result if return_routing else (result, None)
    routing = reference.route(x2d, weights, config)
    out = reference.moe_forward(x2d, weights, config, math=REFERENCE_MATH, routing=routing)
    return out.to(x2d.dtype), routing


def _group_size(group) -> int:
    import torch.distributed as dist
    return dist.get_world_size(group)
