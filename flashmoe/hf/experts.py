"""``experts_implementation="flashmoe"``: transformers' experts modules computed by
``flashmoe.experts_forward``.

transformers 5 routes every decorated experts class (``@use_experts_implementation``) through
its ``ExpertsInterface``: ``forward(self, hidden_states, top_k_index, top_k_weights)`` on the
experts module, the router's choice given. ``register()`` (run when ``flashmoe.hf`` is imported)
adds ``flashmoe`` there, so ``from_pretrained(..., experts_implementation="flashmoe")`` and
``model.set_experts_implementation("flashmoe")`` work for every such model.

Every layout the decorator declares is read from the module: transposed weights, biases,
ungated experts (``up_proj``), interleaved gate/up rows. What the experts compute between the
two projections (``act_fn``, or ``_apply_gate`` for gated experts) is identified by running it
(``activations.py``). A module flashmoe cannot compute exactly (a post-expert norm, an
unknown activation, a dtype flashmoe does not run) runs its class's own forward instead, with
one ``UserWarning`` per experts class naming what is missing.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from ..config import DTYPES
from ..functional import experts_forward
from .activations import plan_for

NAME = "flashmoe"


def register() -> None:
    """Add ``flashmoe`` to transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    if ALL_EXPERTS_FUNCTIONS.get(NAME) is not flashmoe_experts_forward:
        ExpertsInterface.register(NAME, flashmoe_experts_forward)


def flashmoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``ExpertsInterface`` function: ``self`` is a decorated transformers experts module."""
    plan, missing = plan_for(self)
    dtype = _weight(self, "gate_up_proj" if getattr(self, "has_gate", True) else "up_proj").dtype
    if plan is not None and dtype not in DTYPES.values():
        plan, missing = None, f"its weights are {dtype} (flashmoe runs {', '.join(DTYPES)})"
    if plan is None:
        _warn_once(type(self), missing)
        return inspect.unwrap(type(self).forward)(self, hidden_states, top_k_index, top_k_weights)
    gate_up = self.gate_up_proj if plan.gated else self.up_proj
    biases = {}
    if self.has_bias:
        biases = dict(gate_up_bias=self.gate_up_proj_bias if plan.gated else self.up_proj_bias,
                      down_bias=self.down_proj_bias)
    # Like transformers' grouped_mm path: the GEMMs run in the weights' dtype (an autocast
    # model may hand fp32 activations to bf16 experts), the result in the input's.
    out = experts_forward(hidden_states.to(dtype), top_k_index, top_k_weights, gate_up,
                          self.down_proj, transposed=bool(self.is_transposed),
                          interleaved=plan.interleaved, gated=plan.gated, **biases, **plan.config_fields())
    return out.to(hidden_states.dtype)


def _weight(experts, name: str) -> torch.Tensor:
    t = getattr(experts, name, None)
    return t if isinstance(t, torch.Tensor) else experts.down_proj


_WARNED: set = set()


def _warn_once(klass: type, missing: str) -> None:
    if klass in _WARNED:
        return
    _WARNED.add(klass)
    warnings.warn(f"experts_implementation='flashmoe': flashmoe cannot compute {klass.__name__} "
                  f"exactly: {missing}; running {klass.__name__}'s own forward instead",
                  UserWarning, stacklevel=3)
