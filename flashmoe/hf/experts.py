"""``experts_implementation="flashmoe"``: transformers' experts modules computed by
``flashmoe.experts_forward``.

transformers 5 routes every decorated experts class (``@use_experts_implementation``) through
its ``ExpertsInterface``: ``forward(self, hidden_states, top_k_index, top_k_weights)`` on the
experts module, the router's choice given. ``register()`` (run when ``flashmoe.hf`` is imported)
adds ``flashmoe`` there, so ``from_pretrained(..., experts_implementation="flashmoe")`` and
``model.set_experts_implementation("flashmoe")`` work for every such model.

Every layout the decorator declares is read from the module: transposed weights, biases,
ungated experts (``up_proj``), interleaved gate/up rows. What the experts compute between the
two projections (``act_fn``, or ``_apply_gate`` for gated experts) is identified by running it:
on a probe input it must equal one of flashmoe's activations, computed by ``experts_forward``
itself, so a renamed or re-implemented activation is recognised and a custom one is never
mistaken for a known one. A module flashmoe cannot compute exactly (a post-expert norm, an
unknown activation, a dtype flashmoe does not run) runs its class's own forward instead, with
one ``UserWarning`` per experts class naming what is missing.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

from ..config import ACTIVATIONS, DTYPES
from ..functional import experts_forward
from .blocks import _ACT_CLASSES

NAME = "flashmoe"

# Attribute names under which experts modules keep the constants of a clamped SwiGLU.
_SWIGLU_CONSTANTS = (("alpha", "limit"), ("swiglu_alpha", "swiglu_limit"))
_DEFAULT_SWIGLU = (1.702, 7.0)


@dataclass(frozen=True)
class ExpertsPlan:
    """How one experts module maps onto ``experts_forward``."""

    activation: str
    gated: bool
    interleaved: bool = False
    swiglu_alpha: float = _DEFAULT_SWIGLU[0]
    swiglu_limit: float = _DEFAULT_SWIGLU[1]


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
    swiglu = {}
    if plan.activation == "swiglu_clamped":
        swiglu = dict(swiglu_alpha=plan.swiglu_alpha, swiglu_limit=plan.swiglu_limit)
    # Like transformers' grouped_mm path: the GEMMs run in the weights' dtype (an autocast
    # model may hand fp32 activations to bf16 experts), the result in the input's.
    out = experts_forward(hidden_states.to(dtype), top_k_index, top_k_weights, gate_up,
                          self.down_proj, transposed=bool(self.is_transposed),
                          interleaved=plan.interleaved, activation=plan.activation,
                          gated=plan.gated, **biases, **swiglu)
    return out.to(hidden_states.dtype)


def plan_for(experts) -> tuple[ExpertsPlan | None, str]:
    """(plan, "") when flashmoe computes ``experts`` exactly, else (None, what is missing).
    Cached on the module, keyed by what the plan depends on."""
    key = _plan_key(experts)
    cached = experts.__dict__.get("_flashmoe_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    result = _make_plan(experts)
    experts.__dict__["_flashmoe_plan"] = (key, result)
    return result


def _plan_key(experts) -> tuple:
    constants = tuple(getattr(experts, name, None) for pair in _SWIGLU_CONSTANTS for name in pair)
    return (type(experts), id(getattr(experts, "act_fn", None)), getattr(experts, "has_gate", True),
            getattr(experts, "has_bias", False), getattr(experts, "has_post_expert_norm", False),
            getattr(experts, "is_concatenated", True), constants)


def _make_plan(experts) -> tuple[ExpertsPlan | None, str]:
    if getattr(experts, "has_post_expert_norm", False):
        return None, "it has a post-expert norm (has_post_expert_norm=True)"
    gated = bool(getattr(experts, "has_gate", True))
    names = ["gate_up_proj" if gated else "up_proj", "down_proj"]
    if getattr(experts, "has_bias", False):
        names += ["gate_up_proj_bias" if gated else "up_proj_bias", "down_proj_bias"]
    for name in names:
        if not isinstance(getattr(experts, name, None), torch.Tensor):
            return None, f"it lacks the tensor {name} its layout declares"
    act = getattr(experts, "act_fn", None)
    between = experts._apply_gate if gated else act
    if between is None:
        return None, "it has no act_fn"
    hint = _ACT_CLASSES.get(type(act).__name__)
    for plan in _candidates(experts, gated, hint):
        if _computes(between, plan):
            return plan, ""
    from transformers.integrations.moe import _default_apply_gate
    if gated and getattr(type(experts), "_apply_gate", None) is not _default_apply_gate:
        what = f"its own gate {type(experts).__name__}._apply_gate"
    else:
        what = f"the activation {type(act).__name__}"
    return None, (f"{what} computes none of flashmoe's {'gated ' if gated else ''}activations "
                  f"({', '.join(ACTIVATIONS)}) on a probe input")


def _candidates(experts, gated: bool, hint: str | None):
    """The plans to try, the activation the class name suggests first."""
    order = [hint] if hint in ACTIVATIONS else []
    order += [a for a in ACTIVATIONS if a not in order]
    constants = [tuple(float(getattr(experts, n)) for n in pair) for pair in _SWIGLU_CONSTANTS
                 if all(isinstance(getattr(experts, n, None), (int, float)) for n in pair)]
    layouts = (False, True) if gated else (False,)
    for activation in order:
        if activation == "swiglu_clamped" and not gated:
            continue
        for alpha, limit in (constants or [_DEFAULT_SWIGLU]) if activation == "swiglu_clamped" \
                else [_DEFAULT_SWIGLU]:
            for interleaved in layouts:
                yield ExpertsPlan(activation, gated, interleaved, alpha, limit)


def _computes(between, plan: ExpertsPlan) -> bool:
    """Whether ``between`` (an activation, or a gate on [gate, up] rows) computes what flashmoe
    computes for ``plan``, judged on a probe input that spans the clamp limits and both signs."""
    width = 8
    generator = torch.Generator().manual_seed(0)
    cols = 2 * width if plan.gated else width
    probe = torch.randn(64, cols, generator=generator) * 4
    probe[0] = torch.linspace(-12, 12, cols)
    try:
        with torch.no_grad():
            theirs = between(probe.clone())
    except Exception:       # an activation that cannot run on a CPU fp32 probe is not one of ours
        return False
    if not isinstance(theirs, torch.Tensor) or theirs.shape != (64, width):
        return False
    return torch.allclose(theirs.float(), _flashmoe_between(probe, plan), rtol=1e-5, atol=1e-6)


def _flashmoe_between(probe: torch.Tensor, plan: ExpertsPlan) -> torch.Tensor:
    """What flashmoe computes between the projections, read through ``experts_forward`` with
    one expert whose projections are identities: the probe rows go in as gate_up's output."""
    rows, cols = probe.shape
    width = cols // 2 if plan.gated else cols
    gate_up = torch.eye(cols).unsqueeze(0)
    down = torch.eye(cols, width).unsqueeze(0)      # [E=1, H=cols, I=width]
    ids = torch.zeros(rows, 1, dtype=torch.long)
    weights = torch.ones(rows, 1)
    swiglu = {}
    if plan.activation == "swiglu_clamped":
        swiglu = dict(swiglu_alpha=plan.swiglu_alpha, swiglu_limit=plan.swiglu_limit)
    with torch.no_grad():
        out = experts_forward(probe, ids, weights, gate_up, down, activation=plan.activation,
                              gated=plan.gated, interleaved=plan.interleaved, backend="reference",
                              **swiglu)
    return out[:, :width]


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
