"""MoEConfig: what the user states about a Mixture-of-Experts layer.

The config is frozen and validated on construction: an invalid value raises ``ValueError``
naming the field, the value and what is allowed. It describes semantics only (what the layer
computes); how the GPU kernel computes it lives in ``flashmoe.host.plan``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped", "silu_clamped")
# Activations defined only for gated experts: the clamped SwiGLUs (they clamp the up half too).
GATED_ONLY_ACTIVATIONS = ("swiglu_clamped", "silu_clamped")
SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_SCORES = ("top2_sum", "max")

# dtype name -> torch dtype. Names are what the config stores, so a config stays hashable and
# printable without torch objects in it.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32"}


def dtype_name(dtype) -> str:
    """Canonical name ('bfloat16', 'float16', 'float32') of a torch dtype or a dtype string."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"dtype={dtype}: allowed are {', '.join(DTYPES)}")
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype, dtype.removeprefix("torch."))
        if name in DTYPES:
            return name
    raise ValueError(f"dtype={dtype!r}: allowed are {', '.join(DTYPES)}")


@dataclass(frozen=True)
class MoEConfig:
    """What a Mixture-of-Experts layer computes (``flashmoe.reference`` is the formula).

    Sizes
        hidden_size (H): the model width, the input's and output's last dimension.
        intermediate_size (I): the width of one routed expert's FFN.
        num_experts (E): routed experts.
        top_k (k): experts each token goes to.
    Experts
        activation: 'silu', 'gelu' (erf), 'gelu_tanh', 'relu', or one of two clamped SwiGLUs
            (gated only) of g = min(x Wg^T, swiglu_limit) and
            u = clamp(x Wu^T, -swiglu_limit, swiglu_limit): 'swiglu_clamped' (GPT-OSS,
            MiniMax-M3) ``g * sigmoid(swiglu_alpha * g) * (u + 1)``, 'silu_clamped'
            (DeepSeek-V4, GLM-5-Next, HY-V4) ``silu(g) * u``.
        gated: True: ``act(x Wg^T) * (x Wu^T)`` then ``W_down`` (SwiGLU with silu), with
            gate_up_proj[e] = [Wg; Wu]; False: ``act(x W1^T) W2^T``.
        swiglu_alpha, swiglu_limit: the constants of the clamped SwiGLUs (finite, > 0; read
            only by them, swiglu_alpha only by 'swiglu_clamped').
        expert_bias: each routed expert has biases, gate_up_bias[e] added after its first
            projection and down_bias[e] after its second (GPT-OSS); the shared experts have none.
        scale_expert_input: the routing weight multiplies the expert's input instead of its
            output, whose outputs are then summed unweighted (Llama4).
        identity_experts (Z): zero-computation experts beside the E routed ones (LongCat-Flash's
            zero_expert_num): the router chooses among E + Z experts, and choosing expert E + z
            adds the token's own input, times its routing weight, to the output.
    Router (always fp32)
        router_bias: a per-expert bias added to the router logits before scoring (GPT-OSS).
        scoring: 'softmax' over the E (+ Z) logits, 'sigmoid' per expert, or 'sqrtsoftplus' per
            expert (sqrt(softplus(logit)), DeepSeek-V4). A softmax over the k chosen logits
            only (GPT-OSS, Granite) is 'softmax' with norm_topk_prob=True.
        norm_topk_prob: divide the k chosen weights by (their sum + norm_topk_epsilon).
        norm_topk_epsilon: the denominator's guard against a zero sum (default 1e-20; LFM2
            uses 1e-6); a number >= 0.
        routed_scaling_factor: multiplies the k weights after the normalisation (DeepSeek).
        n_group, topk_group: group-limited routing: the experts form n_group groups and only
            the best topk_group groups are eligible (n_group=1: no groups).
        group_score: a group's score, the sum of its 2 best scores ('top2_sum', DeepSeek-V3)
            or its best ('max', DeepSeek-V2).
        selection_bias: a per-expert bias added to the scores for choosing experts only, never
            for weighing them (DeepSeek-V3's e_score_correction_bias).
    Shared experts
        num_shared_experts: experts every token goes through, fused into one MLP.
        shared_intermediate_size: the width of one shared expert (None: intermediate_size).
        shared_expert_gate: scale the shared output by sigmoid(x w) (Qwen2-MoE).
    Capacity
        capacity_factor: None: dropless; else each expert keeps at most
            ceil(capacity_factor * tokens * k / E) of its (token, slot) pairs, the highest
            weights first.
    Precision
        dtype: of the activations and expert weights: 'bfloat16', 'float16' or 'float32'
            (aliases such as 'bf16' and torch dtypes are accepted).

    Integers may be Python or numpy integers, numbers Python or numpy floats. The config is
    frozen and checked on construction: a bad value raises ValueError naming the field.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    activation: str = "silu"
    gated: bool = True
    scoring: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    selection_bias: bool = False
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    capacity_factor: float | None = None
    dtype: str = "bfloat16"
    # Fields added after the first release sit last, so positional construction keeps working.
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    scale_expert_input: bool = False
    router_bias: bool = False
    norm_topk_epsilon: float = 1e-20
    identity_experts: int = 0

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "n_group", "topk_group"):
            _require_int(self, name, minimum=1)
        _require_int(self, "num_shared_experts", minimum=0)
        _require_int(self, "identity_experts", minimum=0)
        _require_bool("gated", self.gated)
        _require_bool("norm_topk_prob", self.norm_topk_prob)
        _require_bool("selection_bias", self.selection_bias)
        _require_bool("shared_expert_gate", self.shared_expert_gate)
        for name in ("expert_bias", "scale_expert_input", "router_bias"):
            _require_bool(name, getattr(self, name))
        _require_choice("activation", self.activation, ACTIVATIONS)
        _require_choice("scoring", self.scoring, SCORINGS)
        _require_choice("group_score", self.group_score, GROUP_SCORES)
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

        # Routing chooses among the router's experts: the E routed ones and the Z identity ones.
        chosen_from = f"num_experts={self.num_experts}" + (
            f" + identity_experts={self.identity_experts}" if self.identity_experts else "")
        if self.top_k > self.router_experts:
            raise ValueError(f"top_k={self.top_k}: must be at most {chosen_from}")
        if self.router_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group}: must divide {chosen_from}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group}: must be at most n_group={self.n_group}")
        eligible = self.topk_group * (self.router_experts // self.n_group)
        if self.top_k > eligible:
            experts = "(num_experts + identity_experts)" if self.identity_experts else "num_experts"
            raise ValueError(f"top_k={self.top_k}: only topk_group * {experts} / n_group = {eligible} "
                             "experts are eligible per token")
        if self.n_group > 1 and self.group_score == "top2_sum" and self.router_experts // self.n_group < 2:
            raise ValueError(f"group_score='top2_sum' needs at least 2 experts per group; "
                             f"n_group={self.n_group} leaves {self.router_experts // self.n_group}")
        if self.identity_experts and self.scale_expert_input:
            raise ValueError(f"identity_experts={self.identity_experts} with scale_expert_input=True: "
                             "no model scales the input of identity experts; set one of them off")
        if self.activation in GATED_ONLY_ACTIVATIONS and not self.gated:
            raise ValueError(f"activation={self.activation!r} is defined for gated experts only "
                             "(it clamps and offsets the up half): set gated=True")
        for name in ("swiglu_alpha", "swiglu_limit"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a finite number > 0")
            object.__setattr__(self, name, float(value))
        eps = self.norm_topk_epsilon
        if not _is_real(eps) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"norm_topk_epsilon={eps!r}: must be a finite number >= 0")
        object.__setattr__(self, "norm_topk_epsilon", float(eps))
        rsf = self.routed_scaling_factor
        if not _is_real(rsf) or not math.isfinite(rsf) or rsf <= 0:
            raise ValueError(f"routed_scaling_factor={rsf!r}: must be a finite number > 0")
        object.__setattr__(self, "routed_scaling_factor", float(rsf))

        if self.shared_intermediate_size is not None:
            _require_int(self, "shared_intermediate_size", minimum=1)
            if self.num_shared_experts == 0:
                raise ValueError(f"shared_intermediate_size={self.shared_intermediate_size}: needs "
                                 "num_shared_experts >= 1 (it is 0)")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")

        cf = self.capacity_factor
        if cf is not None:
            if not _is_real(cf) or not math.isfinite(cf) or cf <= 0:
                raise ValueError(f"capacity_factor={cf!r}: must be None (dropless) or a finite number > 0")
            object.__setattr__(self, "capacity_factor", float(cf))
            if self.identity_experts:
                raise ValueError(f"capacity_factor={cf} with identity_experts={self.identity_experts}: "
                                 "a capacity limits the routed experts' rows, and which identity choices "
                                 "it should drop is not defined; use one or the other")

    # Derived facts, one place each.

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def router_experts(self) -> int:
        """The experts the router scores and chooses from: the E routed ones, then the Z
        identity ones (router weight rows, logits and selection bias all have E + Z)."""
        return self.num_experts + self.identity_experts

    @property
    def shared_intermediate_total(self) -> int:
        """Width of the fused shared MLP: the shared experts side by side (0 when there are none).

        Summing n gated MLPs equals one gated MLP whose intermediate is their concatenation,
        which is how DeepSeek stores them; Qwen2-MoE has one shared expert of its own width.
        """
        per_expert = self.shared_intermediate_size or self.intermediate_size
        return self.num_shared_experts * per_expert

    @property
    def up_rows(self) -> int:
        """Rows of one expert's first projection: gate then up (2I) when gated, else I."""
        return (2 if self.gated else 1) * self.intermediate_size

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for a forward over ``num_tokens`` tokens (all ranks together).

        None when dropless. In double precision, left to right. With E an integer the rounded
        quotient never lands on an integer below the exact one, so this is the exact ceiling,
        which the kernel finds without dividing (scheduler.cuh capacity_of).
        """
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


def _require_int(config, name, minimum):
    """Check an integer field (numpy integers too) and store it as a Python int, so configs
    compare, hash and serialise alike whatever integer type they were given."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    object.__setattr__(config, name, int(value))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _require_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be True or False")


def _require_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: allowed are {', '.join(allowed)}")
