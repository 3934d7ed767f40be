"""moe_forward: the layer's forward as a function of (input, weights, config).

Takes torch tensors, or any array with ``__dlpack__`` (cupy, numpy, jax...): those are viewed as
torch tensors without a copy and the result is handed back as an array of the input's library
(``<library>.from_dlpack``), so a cupy caller stays in cupy.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import torch

from . import backend_select
from .config import MoEConfig
from .inputs import check_input, check_weights
from .reference import MoEWeights


def moe_forward(x, weights: MoEWeights, config: MoEConfig, backend: str = "auto", *,
                virtual_world: int = 1):
    """The MoE forward of ``x[..., H]`` (torch tensor or DLPack array) with ``weights`` (torch
    tensors or DLPack arrays). Returns the output in the same shape, dtype and kind as ``x``.

    ``backend`` as in ``FlashMoELayer``: 'auto', 'kernel' or 'reference'. The kernel backend
    for a (config, device, virtual_world) is built once and kept.
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
    which = backend_select.choose(backend, config, x, weights, virtual_world)
    x2d = x.reshape(-1, config.hidden_size)
    out, _ = backend_select.forward_2d(
        which, x2d, weights, config,
        kernel=lambda: _cached_kernel(config, x.device, virtual_world))
    out = out.reshape(x.shape)
    return out if library is None else library.from_dlpack(out)


@functools.lru_cache(maxsize=16)
def _cached_kernel(config: MoEConfig, device: torch.device, virtual_world: int):
    return backend_select.new_kernel(config, device, virtual_world, max_tokens=None)


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
