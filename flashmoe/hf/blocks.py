"""Conversion of transformers 5 sparse-MoE blocks into FlashMoELayer.

Supported blocks and what each one computes (read from transformers' modeling files):

    block                      router                                        shared experts
    MixtralSparseMoeBlock      softmax, top-k, always renormalised            -
    Qwen2MoeSparseMoeBlock     softmax, top-k, renormalised if norm_topk_prob  one MLP, sigmoid-gated
    Qwen3MoeSparseMoeBlock     softmax, top-k, renormalised if norm_topk_prob  -
    OlmoeSparseMoeBlock        softmax, top-k, renormalised if norm_topk_prob  -
    DeepseekV3MoE              sigmoid + e_score_correction_bias (selection    n_shared_experts MLPs
                               only), n_group/topk_group with group score =   fused into one
                               sum of the top 2, norm_topk_prob, then
                               routed_scaling_factor

All experts are gated (``act(gate) * up``) with gate_up_proj[E, 2I, H] and down_proj[E, H, I]:
flashmoe's own layout, so expert weights copy as they are. A block is recognised by its class
(or a subclass); a block of another class is accepted when its structure matches one of these
exactly, since the modular transformers code copies these blocks under new names.

Differences that are rounding only: transformers computes the router logits in the model dtype
(flashmoe: fp32) and Qwen rounds the top-k weights to the model dtype. Mixtral's router jitter
applies in training mode only and is not converted.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MoEConfig, dtype_name

# name of the block class -> family
FAMILIES = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV3MoE": "deepseek_v3",
}

# family -> the child modules its block has, exactly
_CHILDREN = {
    "mixtral": {"gate", "experts"},
    "qwen2_moe": {"gate", "experts", "shared_expert", "shared_expert_gate"},
    "qwen3_moe": {"gate", "experts"},
    "olmoe": {"gate", "experts"},
    "deepseek_v3": {"gate", "experts", "shared_experts"},
}

# transformers' hidden_act names -> flashmoe activation
HIDDEN_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}
# activation module class names (what experts.act_fn is) -> flashmoe activation
_ACT_CLASSES = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu",
                "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                "NewGELUActivation": "gelu_tanh", "ReLU": "relu"}


def detect_family(block: nn.Module) -> str:
    """The family of a transformers MoE block, by class (or base class) name, else by structure."""
    for klass in type(block).__mro__:
        if klass.__name__ in FAMILIES:
            return FAMILIES[klass.__name__]
    children = {name for name, _ in block.named_children()}
    gate = getattr(block, "gate", None)
    experts = getattr(block, "experts", None)
    if gate is not None and hasattr(getattr(experts, "gate_up_proj", None), "shape"):
        if children == _CHILDREN["deepseek_v3"] and hasattr(gate, "e_score_correction_bias"):
            return "deepseek_v3"
        if children == _CHILDREN["qwen2_moe"] and hasattr(gate, "norm_topk_prob"):
            return "qwen2_moe"
        if children == _CHILDREN["qwen3_moe"] and hasattr(gate, "norm_topk_prob") \
                and not hasattr(gate, "e_score_correction_bias"):
            return "qwen3_moe"
    raise TypeError(f"from_hf does not know the block {type(block).__name__} (children: "
                    f"{sorted(children) or 'none'}): supported are {', '.join(FAMILIES)} and blocks "
                    "of the same structure. For another block, build a MoEConfig and copy the "
                    "weights into FlashMoELayer with load_state_dict.")


def config_from_hf(block: nn.Module) -> MoEConfig:
    """The MoEConfig of a supported transformers MoE block."""
    family = detect_family(block)
    children = {name for name, _ in block.named_children()}
    if children != _CHILDREN[family]:
        raise TypeError(f"{type(block).__name__} has the children {sorted(children)}; a "
                        f"{family} block has {sorted(_CHILDREN[family])}: not converted, since "
                        "parts of it would be ignored")
    gate, experts = block.gate, block.experts
    _check_experts(experts)
    num_experts, up_rows, hidden = experts.gate_up_proj.shape
    if tuple(gate.weight.shape) != (num_experts, hidden) or getattr(gate, "bias", None) is not None:
        raise ValueError(f"the router ({type(gate).__name__}) must be a bias-free [{num_experts}, "
                         f"{hidden}] weight; got {tuple(gate.weight.shape)}"
                         f"{' with a bias' if getattr(gate, 'bias', None) is not None else ''}")
    intermediate = experts.down_proj.shape[2]
    if up_rows != 2 * intermediate:
        raise ValueError(f"experts.gate_up_proj has {up_rows} rows per expert; gate and up of "
                         f"down_proj's width {intermediate} make {2 * intermediate}")
    fields = dict(hidden_size=hidden, intermediate_size=intermediate, num_experts=num_experts,
                  top_k=int(gate.top_k), activation=_activation(experts), gated=True,
                  dtype=dtype_name(experts.gate_up_proj.dtype))
    if family == "mixtral":
        fields.update(norm_topk_prob=True)
    elif family in ("qwen3_moe", "olmoe"):
        fields.update(norm_topk_prob=bool(gate.norm_topk_prob))
    elif family == "qwen2_moe":
        _check_linear(block.shared_expert_gate, "shared_expert_gate")
        fields.update(norm_topk_prob=bool(gate.norm_topk_prob), num_shared_experts=1,
                      shared_intermediate_size=_shared_width(block.shared_expert, fields["activation"]),
                      shared_expert_gate=True)
    elif family == "deepseek_v3":
        width = _shared_width(block.shared_experts, fields["activation"])
        # The n shared experts are stored fused (one MLP of width n * moe_intermediate_size);
        # splitting the width back only documents the model, the computation is the same.
        n_shared = int(getattr(getattr(block, "config", None), "n_shared_experts", 1) or 1)
        if width % n_shared:
            n_shared = 1
        fields.update(scoring="sigmoid", selection_bias=True, n_group=int(gate.num_group),
                      topk_group=int(gate.topk_group), group_score="top2_sum",
                      norm_topk_prob=bool(gate.norm_topk_prob),
                      routed_scaling_factor=float(gate.routed_scaling_factor),
                      num_shared_experts=n_shared, shared_intermediate_size=width // n_shared)
    return MoEConfig(**fields)


def from_hf(layer_cls, block: nn.Module, backend: str = "auto", **kwargs):
    """Build ``layer_cls`` (FlashMoELayer) from a transformers MoE block, weights copied. The
    parameters land on the block's device unless ``device=`` is given."""
    config = config_from_hf(block)
    kwargs.setdefault("device", block.experts.gate_up_proj.device)
    layer = layer_cls(config, backend=backend, **kwargs)
    with torch.no_grad():
        mine = layer.local_experts
        layer.router_weight.copy_(block.gate.weight.float())
        layer.gate_up_proj.copy_(block.experts.gate_up_proj[mine.start:mine.stop])
        layer.down_proj.copy_(block.experts.down_proj[mine.start:mine.stop])
        if config.selection_bias:
            layer.selection_bias.copy_(block.gate.e_score_correction_bias.float())
        shared = getattr(block, "shared_expert", None)
        if shared is None:
            shared = getattr(block, "shared_experts", None)
        if shared is not None:
            layer.shared_gate_up_proj.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
            layer.shared_down_proj.copy_(shared.down_proj.weight)
        if config.shared_expert_gate:
            layer.shared_gate_weight.copy_(block.shared_expert_gate.weight.float())
    return layer


def _check_experts(experts: nn.Module) -> None:
    # transformers' experts decorator records the layout; flashmoe's is concatenated [gate; up],
    # not transposed, gated, without biases.
    expected = {"is_transposed": False, "is_concatenated": True, "has_bias": False,
                "has_gate": True, "has_post_expert_norm": False}
    for attr, want in expected.items():
        if getattr(experts, attr, want) != want:
            raise ValueError(f"experts.{attr}={getattr(experts, attr)}: flashmoe converts experts "
                             f"with {attr}={want} only")


def _activation(module: nn.Module) -> str:
    """flashmoe's name of the activation ``module.act_fn`` runs. The module is what actually
    runs, so it decides; config.hidden_act is the fallback for a module without act_fn."""
    act = getattr(module, "act_fn", None)
    if act is not None:
        if type(act).__name__ in _ACT_CLASSES:
            return _ACT_CLASSES[type(act).__name__]
        described = type(act).__name__
    else:
        hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
        if hidden_act in HIDDEN_ACTS:
            return HIDDEN_ACTS[hidden_act]
        described = repr(hidden_act)
    raise ValueError(f"activation {described} has no flashmoe equivalent: supported hidden_act "
                     f"values are {', '.join(HIDDEN_ACTS)}")


def _shared_width(mlp: nn.Module, activation: str) -> int:
    """Width of a shared-expert MLP (gate_proj / up_proj / down_proj), checked convertible."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        _check_linear(getattr(mlp, name, None), f"shared expert {name}")
    shared_activation = _activation(mlp)
    if shared_activation != activation:
        raise ValueError(f"the shared expert's activation {shared_activation!r} differs from the "
                         f"routed experts' {activation!r}: flashmoe uses one activation for both")
    return mlp.gate_proj.out_features


def _check_linear(linear: nn.Module, name: str) -> None:
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        raise ValueError(f"{name} must be a bias-free nn.Linear to convert; got {linear!r}")
