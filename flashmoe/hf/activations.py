"""What a transformers experts module (or a shared-expert MLP) computes between its two
projections, identified by running it.

On a probe input the module's ``_apply_gate`` (gated experts), ``act_fn`` (plain experts) or
whole forward with identity projections (a shared MLP) must equal one of flashmoe's activations,
computed by ``experts_forward`` itself with the module's own constants (a clamped SwiGLU's alpha
and limit, read from the attributes the families keep them under). So a renamed or
re-implemented activation is recognised, and a custom one (another clamp, a softcap) is never
mistaken for a known one. ``experts_implementation="flashmoe"`` (``experts.py``) and
``convert`` (``blocks.py``) both decide here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import ACTIVATIONS, GATED_ONLY_ACTIVATIONS as _CLAMPED
from ..functional import experts_forward

# transformers' hidden_act names -> flashmoe activation
HIDDEN_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}
# activation module class names (what experts.act_fn is) -> flashmoe activation
ACT_CLASSES = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu",
               "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
               "NewGELUActivation": "gelu_tanh", "ReLU": "relu"}
# torch functions an experts module may hold as act_fn -> flashmoe activation
ACT_FUNCTIONS = {torch.nn.functional.silu: "silu", torch.nn.functional.relu: "relu"}

# Attribute names under which modules keep the constants of a clamped SwiGLU (GPT-OSS: alpha,
# limit; MiniMax-M3, GLM-5-Next, HY-V4: swiglu_*; DeepSeek-V4: limit).
_ALPHAS, _LIMITS = ("alpha", "swiglu_alpha"), ("limit", "swiglu_limit")
_DEFAULT_SWIGLU = (1.702, 7.0)
_PROBE_WIDTH = 16       # intermediate columns of a probe input


@dataclass(frozen=True)
class ExpertsPlan:
    """What an experts module computes between its projections, as flashmoe's activation."""

    activation: str
    gated: bool
    interleaved: bool = False
    swiglu_alpha: float = _DEFAULT_SWIGLU[0]
    swiglu_limit: float = _DEFAULT_SWIGLU[1]

    def config_fields(self) -> dict:
        """The MoEConfig (and experts_forward) fields of this activation."""
        if self.activation not in _CLAMPED:
            return dict(activation=self.activation)
        return dict(activation=self.activation, swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit)


def activation_name(module: nn.Module) -> str:
    """flashmoe's name of the activation ``module.act_fn`` (Llama4's MLP, DBRX's experts:
    ``activation_fn``) runs, by its class. The module is what actually runs, so it decides;
    config.hidden_act is the fallback for a module without one."""
    act = getattr(module, "act_fn", None)
    if act is None:
        act = getattr(module, "activation_fn", None)
    if act is not None:
        if type(act).__name__ in ACT_CLASSES:
            return ACT_CLASSES[type(act).__name__]
        for function, name in ACT_FUNCTIONS.items():      # a torch function itself (LFM2-MoE)
            if act is function:
                return name
        described = getattr(act, "__name__", type(act).__name__)
    else:
        hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
        if hidden_act in HIDDEN_ACTS:
            return HIDDEN_ACTS[hidden_act]
        described = repr(hidden_act)
    raise ValueError(f"activation {described} has no flashmoe equivalent: supported hidden_act "
                     f"values are {', '.join(HIDDEN_ACTS)}")


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


def shared_computes(mlp: nn.Module, plan: ExpertsPlan) -> bool:
    """Whether a shared-expert MLP (bias-free gate_proj / up_proj / down_proj Linears, or one
    fused gate_up_proj) computes ``plan``'s activation between its projections: its own forward,
    run with identity projections so that the probe rows reach its activation as they are."""
    width = _PROBE_WIDTH
    eye = torch.eye(2 * width)
    params = {"down_proj.weight": torch.eye(width)}
    if hasattr(mlp, "gate_up_proj"):
        params["gate_up_proj.weight"] = eye
    else:
        params.update({"gate_proj.weight": eye[:width], "up_proj.weight": eye[width:]})
    return _computes(lambda probe: torch.func.functional_call(mlp, params, (probe,)),
                     replace(plan, interleaved=False), _constants(mlp)[1])


def _plan_key(experts) -> tuple:
    constants = tuple(getattr(experts, name, None) for name in _ALPHAS + _LIMITS)
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
    hint = ACT_CLASSES.get(type(act).__name__)
    alphas, limits = _constants(experts)
    for plan in _candidates(gated, hint, alphas, limits):
        if _computes(between, plan, limits):
            return plan, ""
    from transformers.integrations.moe import _default_apply_gate
    if gated and getattr(type(experts), "_apply_gate", None) is not _default_apply_gate:
        what = f"its own gate {type(experts).__name__}._apply_gate"
    else:
        what = f"the activation {type(act).__name__}"
    return None, (f"{what} computes none of flashmoe's {'gated ' if gated else ''}activations "
                  f"({', '.join(ACTIVATIONS)}) on a probe input")


def _constants(module) -> tuple[list[float], list[float]]:
    """The clamped SwiGLUs' alphas and finite limits ``module`` keeps (the defaults if none)."""
    def numbers(names, default):
        found = [float(v) for v in (getattr(module, n, None) for n in names)
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        return sorted(set(found)) or [default]
    return numbers(_ALPHAS, _DEFAULT_SWIGLU[0]), numbers(_LIMITS, _DEFAULT_SWIGLU[1])


def _candidates(gated: bool, hint: str | None, alphas: list[float], limits: list[float]):
    """The plans to try, the activation the class name suggests first."""
    order = [hint] if hint in ACTIVATIONS else []
    order += [a for a in ACTIVATIONS if a not in order]
    layouts = (False, True) if gated else (False,)
    for activation in order:
        if activation in _CLAMPED and not gated:
            continue
        constants = [(a, limit) for a in (alphas if activation == "swiglu_clamped" else alphas[:1])
                     for limit in limits] if activation in _CLAMPED else [_DEFAULT_SWIGLU]
        for alpha, limit in constants:
            for interleaved in layouts:
                yield ExpertsPlan(activation, gated, interleaved, alpha, limit)


def _computes(between, plan: ExpertsPlan, limits: list[float]) -> bool:
    """Whether ``between`` (an activation, or a gate on [gate, up] rows) computes what flashmoe
    computes for ``plan``, judged on a probe input of both signs that reaches past twice every
    clamp limit, the module's (``limits``) and the plan's, in the gate and in the up columns."""
    width = _PROBE_WIDTH
    generator = torch.Generator().manual_seed(0)
    cols = 2 * width if plan.gated else width
    probe = torch.randn(64, cols, generator=generator) * 4
    reach = max([12.0, 2 * plan.swiglu_limit] + [2 * limit for limit in limits])
    probe[0] = torch.linspace(-reach, reach, cols)
    probe[1] = probe[0].flip(0)
    probe[2] = probe[0].view(2, -1).t().reshape(-1) if plan.gated else -probe[0]   # each half both signs
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
    with torch.no_grad():
        out = experts_forward(probe, ids, weights, gate_up, down, gated=plan.gated, interleaved=plan.interleaved,
                              backend="reference", **plan.config_fields())
    return out[:, :width]
