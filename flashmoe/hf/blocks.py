"""Conversion of transformers 5 sparse-MoE blocks into FlashMoELayer.

Supported blocks and what each one computes (read from transformers' modeling files). "top-k,
renormalised" is also how flashmoe expresses a softmax taken over the k best logits only
(GPT-OSS, Granite): both give exp(l_i) / sum of exp(l_j) over the chosen j.

    block (family)                   router                                  shared experts
    MixtralSparseMoeBlock, MiniMax-  softmax, top-k, renormalised            -
      SparseMoeBlock, HunYuanMoEV1-                                          (HunYuan: one MLP)
      Moe, Qwen3VLMoeTextSparse-
      MoeBlock
    Qwen2MoeSparseMoeBlock, Qwen3-   softmax, top-k, renormalised if         one MLP, sigmoid-gated
      NextSparseMoeBlock             norm_topk_prob
    Qwen3_5MoeSparseMoeBlock         softmax, top-k, renormalised            one MLP, sigmoid-gated
    Qwen3MoeSparseMoeBlock, Olmoe-,  softmax, top-k, renormalised if         -
      FlexOlmoSparseMoeBlock         norm_topk_prob
    LaraMiniSparseMoeBlock           softmax, top-k, renormalised if         one MLP
                                     norm_topk_prob
    DbrxFFN                          softmax, top-k, renormalised if         -
                                     moe_normalize_expert_weights is 1
                                     (None: not)
    JambaSparseMoeBlock              softmax, top-k                          -
    GraniteMoeMoE, GraniteMoe-       softmax over the top-k logits           - (Granite-MoE-Shared's
      SharedMoE, -HybridMoE,                                                 and -Hybrid's shared
      -SWAMoE; AriaTextMoELayer                                              MLP sits in the decoder
                                                                             layer, outside; Aria:
                                                                             one MLP)
    GptOssMLP                        logits + bias, softmax over the top-k   -
                                     logits; experts with biases and the
                                     clamped SwiGLU ('swiglu_clamped')
    Llama4TextMoe                    sigmoid of the top-k logits, which      one MLP
                                     scales the expert's input
    DeepseekV3MoE, Glm4MoeMoE,       sigmoid + e_score_correction_bias       n shared MLPs fused
      Dots1MoE, ExaoneMoeSparse-     (selection only), groups scored by      into one (MiMo: none)
      MoEBlock, MiMoV2FlashMoE,      their top-2 sum, norm_topk_prob, then
      Glm5NextTextMoE (SiLU clamped  routed_scaling_factor (Beam: the
      SwiGLU), BeamMoE               block's)
    DeepseekV4SparseMoeBlock         sqrt(softplus) (or sigmoid) + e_score_- one MLP
                                     correction_bias, renormalised, times
                                     routed_scaling_factor; hash-routed
                                     layers refused; SiLU clamped SwiGLU
    FlintSparseMoeBlock              sigmoid, top-k, renormalised if         one MLP
                                     norm_topk_prob
    Mistral4MoE, MistralLarge4-      softmax, groups scored by their top-2   n shared MLPs fused
      TextMoE                        sum, norm_topk_prob (Large 4: always),  into one
                                     routed_scaling_factor
    MiniMaxM2SparseMoeBlock,         sigmoid + a selection bias (the block's - (HY-V3, AFMoE: n
      HYV3MoE, AfmoeSparseMoeBlock,  or the router's e_score_correction_-    shared MLPs fused;
      LagunaSparseMoeBlock,          bias, or expert_bias) renormalised,     Laguna, MiniMax-M3,
      MiniMaxM3VLSparseMoeBlock      times router_scaling_factor (HY-V3),    Step-3.7: one MLP)
      (clamped SwiGLU), Step3p7-     route_scale (AFMoE) or the block's
      SparseMoeBlock                 routed_scaling_factor (Laguna, M3,
                                     Step-3.7)
    DeepseekV2Moe, DeepseekOcr2-     softmax, top-k ('greedy') or within the n shared MLPs fused
      TextMoe, UnlimitedOcrTextMoe
                                     topk_group groups of best max score
                                     ('group_limited_greedy'), times
                                     routed_scaling_factor
    Ernie4_5_MoeSparseMoeBlock       softmax + e_score_correction_bias       optional, fused
                                     (selection only), renormalised
    Lfm2MoeSparseMoeBlock            sigmoid (+ expert_bias for selection),  -
                                     renormalised with +1e-6 if
                                     norm_topk_prob, routed_scaling_factor
    LongcatFlashMoE                  softmax over the routed and the         -
                                     zero-computation experts (identity_-
                                     experts: zero_expert_num), + e_score_-
                                     correction_bias (selection only),
                                     times routed_scaling_factor

Experts are gated. transformers' experts decorator records their layout (is_transposed,
is_concatenated, has_bias); flashmoe's is gate_up_proj[E, 2I, H] = [gate; up] and
down_proj[E, H, I], so transposed weights (GPT-OSS, Llama4) are transposed and interleaved gate/up
columns (GPT-OSS) split into gate then up while copying. DBRX's experts are not decorated: each
of gate (w1), up (v1) and down (w2, transposed) is one [E * I, H] matrix. A block is recognised by
its class (or a subclass); a block of another class is accepted when its structure matches the
Qwen2/Qwen3/DeepSeek-V3 blocks exactly (its router too), since the modular transformers code
copies these under new names. Blocks refused by class, each for what MoEConfig does not express
(``REFUSED``): PhiMoE's, Inkling's, ZAYA's, Kolibri-1's, A.X-K1's and Muse Spark's.

What the experts compute between their projections is identified by running their gate
(``activations.py``; DBRX's and Llama4's by their activation's class), and the shared MLP must
compute the same: so DeepSeek-V4's and GLM-5-Next's SiLU clamped SwiGLU and MiniMax-M3's (GPT-OSS's,
on concatenated gate/up) convert, while a gate no activation matches (Step-3.7's clamped layers,
which clamp after the SiLU) or a shared MLP that differs (HY-V4's, unclamped) leaves its block
with the reason; their experts still run in flashmoe through experts_implementation="flashmoe"
where the gate is one flashmoe computes.

GPT-OSS's and Llama4's blocks return (hidden states, router output) and their decoder layers
unpack the pair; a layer converted from them does the same (``returns_router_logits``: the second
item is the router logits [T, E], which the decoder layers discard).

Differences that are rounding only: transformers computes the router logits in the model dtype
(flashmoe: fp32) and several families round the top-k weights to the model dtype; flashmoe adds
1e-20 to a top-k sum that ERNIE clamps from below at moe_norm_min instead (the two differ only if
the chosen experts' probabilities sum below moe_norm_min, 1e-12 by default) and MiniMax-M2,
MiniMax-M3, Step-3.7 and Flint leave out; DeepSeek-V4 takes its scores from logits in the model
dtype; Beam computes its experts' activation in fp32 (as flashmoe does); HY-V3 without enable_moe_fp32_combine rounds the routed sum before adding the shared expert's
(flashmoe adds them in fp32). Mistral 4 sets the scores outside the chosen groups to 0, not -inf:
the same choice while the eligible experts' softmax probabilities are above 0; DBRX divides by
the top-k sum without an epsilon. Router jitter (Mixtral, MiniMax, MiniMax-M2: ``jitter_noise``;
DBRX: ``moe_jitter_eps``) carries over to the layer, which applies it in training mode.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import nn

from ..config import MoEConfig, dtype_name
from .activations import ExpertsPlan, activation_name, plan_for, shared_computes
from .routing import DEEPSEEK_V3_ROUTER_ATTRIBUTES, ROUTING, router_jitter, selection_bias

# name of the block class -> family
FAMILIES = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV3MoE": "deepseek_v3",
    "MiniMaxSparseMoeBlock": "minimax",
    "HunYuanMoEV1Moe": "hunyuan_v1_moe",
    "Qwen3NextSparseMoeBlock": "qwen3_next",
    "Qwen3_5MoeSparseMoeBlock": "qwen3_5_moe",
    "FlexOlmoSparseMoeBlock": "flex_olmo",
    "JambaSparseMoeBlock": "jamba",
    "GraniteMoeMoE": "granitemoe",
    "GraniteMoeSharedMoE": "granitemoeshared",
    "GptOssMLP": "gpt_oss",
    "Llama4TextMoe": "llama4",
    "Glm4MoeMoE": "glm4_moe",
    "Dots1MoE": "dots1",
    "ExaoneMoeSparseMoEBlock": "exaone_moe",
    "DeepseekV2Moe": "deepseek_v2",
    "Ernie4_5_MoeSparseMoeBlock": "ernie4_5_moe",
    "Lfm2MoeSparseMoeBlock": "lfm2_moe",
    "GraniteMoeSWAMoE": "granitemoe_swa",
    "GraniteMoeHybridMoE": "granitemoehybrid",
    "Qwen3VLMoeTextSparseMoeBlock": "qwen3_vl_moe",
    "Mistral4MoE": "mistral4",
    "MistralLarge4TextMoE": "mistral_large4",
    "MiniMaxM2SparseMoeBlock": "minimax_m2",
    "MiMoV2FlashMoE": "mimo_v2_flash",
    "HYV3MoE": "hy_v3",
    "AfmoeSparseMoeBlock": "afmoe",
    "AriaTextMoELayer": "aria",
    "LagunaSparseMoeBlock": "laguna",
    "LaraMiniSparseMoeBlock": "lara_mini",
    "DbrxFFN": "dbrx",
    "DeepseekV4SparseMoeBlock": "deepseek_v4",
    "Glm5NextTextMoE": "glm5_next",
    "MiniMaxM3VLSparseMoeBlock": "minimax_m3_vl",
    "Step3p7SparseMoeBlock": "step3p7",
    "BeamMoE": "beam",
    "FlintSparseMoeBlock": "flint",
    "DeepseekOcr2TextMoe": "deepseek_v2",           # DeepSeek-V2's language model in DeepSeek-OCR 2
    "UnlimitedOcrTextMoe": "deepseek_v2",           # and in Unlimited-OCR
    "LongcatFlashMoE": "longcat_flash",
}

# family -> the router's child Linear that holds its weight (the others' routers hold it)
_ROUTER_LINEAR = {"hunyuan_v1_moe": "wg", "afmoe": "gate", "dbrx": "layer", "longcat_flash": "classifier"}

# name of a block class flashmoe knows and cannot convert -> what it lacks
REFUSED = {
    "PhimoeSparseMoeBlock": (
        "PhiMoE's sparsemixer router (each of its top-2 weights is a softmax over only the experts "
        "whose logit lies within a relative 2 * router_jitter_noise of the best remaining one) has "
        "no MoEConfig equivalent"),
    "InklingMoE": (
        "Inkling's shared experts are weighted by the router (their logits are normalised together "
        "with the chosen experts'), which MoEConfig has no field for"),
    "ZayaSparseMoeBlock": (
        "ZAYA's router (an MLP whose state passes from layer to layer, with a skip expert) is not "
        "one linear map, which MoEConfig's router is"),
    "Kolibri1SparseMoeBlock": (
        "Kolibri-1's router chooses experts by logit plus e_score_correction_bias (MoEConfig's "
        "selection bias is added to the sigmoid scores, which orders experts differently)"),
    "AXK1MoE": "A.X-K1's block normalises its output (post_mlp_layernorm), which MoEConfig has no field for",
    "MuseSparkMoE": (
        "Muse Spark's experts work in a projected, normalised space (pre_expert_proj, pre_expert_norm, "
        "post_expert_proj), which MoEConfig has no field for"),
}


class _Spec(NamedTuple):
    """Where a family keeps its parts: the child that routes, the shared MLP and its gate
    (None: none), and whether its forward returns (hidden states, router output)."""

    router: str = "gate"
    shared: str | None = None
    shared_gate: str | None = None
    returns_router_output: bool = False


_QWEN2 = _Spec(shared="shared_expert", shared_gate="shared_expert_gate")
_DEEPSEEK = _Spec(shared="shared_experts")
_SPECS = {
    "mixtral": _Spec(), "minimax": _Spec(), "qwen3_moe": _Spec(), "olmoe": _Spec(),
    "flex_olmo": _Spec(), "lfm2_moe": _Spec(), "qwen3_vl_moe": _Spec(), "minimax_m2": _Spec(),
    "mimo_v2_flash": _Spec(), "dbrx": _Spec(router="router"),
    "lara_mini": _Spec(shared="shared_expert"), "laguna": _DEEPSEEK,
    "qwen2_moe": _QWEN2, "qwen3_next": _QWEN2, "qwen3_5_moe": _QWEN2,
    "deepseek_v3": _DEEPSEEK, "glm4_moe": _DEEPSEEK, "dots1": _DEEPSEEK, "exaone_moe": _DEEPSEEK,
    "deepseek_v2": _DEEPSEEK, "mistral4": _DEEPSEEK, "mistral_large4": _DEEPSEEK, "hy_v3": _DEEPSEEK,
    "ernie4_5_moe": _DEEPSEEK,          # its shared MLP is optional (None when there is none)
    "hunyuan_v1_moe": _Spec(shared="shared_mlp"),
    "jamba": _Spec(router="router"), "granitemoe": _Spec(router="router"),
    "granitemoeshared": _Spec(router="router"), "granitemoe_swa": _Spec(router="router"),
    "granitemoehybrid": _Spec(router="router"),
    "afmoe": _Spec(router="router", shared="shared_experts"), "aria": _Spec(router="router", shared="shared_experts"),
    "deepseek_v4": _DEEPSEEK, "glm5_next": _DEEPSEEK, "minimax_m3_vl": _DEEPSEEK,
    "step3p7": _DEEPSEEK, "beam": _Spec(), "flint": _Spec(shared="shared_expert"),
    "longcat_flash": _Spec(router="router"),
    "gpt_oss": _Spec(router="router", returns_router_output=True),
    "llama4": _Spec(router="router", shared="shared_expert", returns_router_output=True),
}

def detect_family(block: nn.Module) -> str:
    """The family of a transformers MoE block, by class (or base class) name, else by structure.
    Raises TypeError for a block it does not know, ValueError for one it knows cannot convert."""
    for klass in type(block).__mro__:
        if klass.__name__ in REFUSED:
            raise ValueError(f"{type(block).__name__}: {REFUSED[klass.__name__]}; not converted")
        if klass.__name__ in FAMILIES:
            return FAMILIES[klass.__name__]
    children = _children(block)
    gate = getattr(block, "gate", None)
    experts = getattr(block, "experts", None)
    if gate is not None and hasattr(getattr(experts, "gate_up_proj", None), "shape"):
        if children == _expected_children(_DEEPSEEK) \
                and all(hasattr(gate, name) for name in DEEPSEEK_V3_ROUTER_ATTRIBUTES):
            return "deepseek_v3"
        if children == _expected_children(_QWEN2) and hasattr(gate, "norm_topk_prob"):
            return "qwen2_moe"
        if children == _expected_children(_Spec()) and hasattr(gate, "norm_topk_prob") \
                and not hasattr(gate, "e_score_correction_bias"):
            return "qwen3_moe"
    raise TypeError(f"from_hf does not know the block {type(block).__name__} (children: "
                    f"{sorted(children) or 'none'}): supported are {', '.join(FAMILIES)} and blocks "
                    "of the same structure. For another block, build a MoEConfig and copy the "
                    "weights into FlashMoELayer with load_state_dict.")


def known_block(module: nn.Module) -> bool:
    """Whether ``module``'s class (or a base class) is a block flashmoe converts or refuses."""
    return any(klass.__name__ in FAMILIES or klass.__name__ in REFUSED for klass in type(module).__mro__)


def config_from_hf(block: nn.Module) -> MoEConfig:
    """The MoEConfig of a supported transformers MoE block."""
    return Conversion(block).config


def from_hf(layer_cls, block: nn.Module, backend: str = "auto", **kwargs):
    """Build ``layer_cls`` (FlashMoELayer) from a transformers MoE block, weights copied. The
    parameters land on the block's device unless ``device=`` is given."""
    conversion = Conversion(block)
    config, jitter = conversion.config, conversion.jitter or 0.0
    if not isinstance(jitter, numbers.Real) or not 0 <= jitter < 1:
        raise ValueError(f"{type(block).__name__}'s router jitter {jitter!r}: expected a number in [0, 1)")
    kwargs.setdefault("device", conversion.gate_up[0].device)
    layer = layer_cls(config, backend=backend, **kwargs)
    with torch.no_grad():
        for theirs, mine in weight_pairs(conversion, layer):
            mine.copy_(theirs)
    layer.returns_router_logits = _SPECS[conversion.family].returns_router_output
    layer.jitter_noise = float(jitter)
    return layer


def weight_pairs(conversion: "Conversion", layer) -> list:
    """(the block's tensor as a view in flashmoe's layout, the layer's tensor it goes to) for
    every tensor the layer takes from the block, this rank's experts only: ``from_hf`` copies
    each pair into the layer, ``flashmoe.hf.unconvert`` back into the block."""
    config, mine = layer.config, slice(layer.local_experts.start, layer.local_experts.stop)

    def concatenated(parts, value):      # parts concatenated along dim 1 -> slices of value
        pairs, start = [], 0
        for part in parts:
            pairs.append((part[mine], value[:, start:start + part.shape[1]]))
            start += part.shape[1]
        return pairs

    pairs = [(conversion.router_weight, layer.router_weight)]
    pairs += concatenated(conversion.gate_up, layer.gate_up_proj)
    pairs.append((conversion.down[mine], layer.down_proj))
    if config.router_bias:
        pairs.append((conversion.router_bias, layer.router_bias))
    if config.selection_bias:
        pairs.append((conversion.selection_bias.reshape(-1), layer.selection_bias))
    if config.expert_bias:
        pairs += concatenated(conversion.gate_up_bias, layer.gate_up_bias)
        pairs.append((conversion.down_bias[mine], layer.down_bias))
    shared = conversion.shared
    if shared is not None:
        parts = (shared.gate_up_proj,) if hasattr(shared, "gate_up_proj") else (shared.gate_proj, shared.up_proj)
        start = 0
        for part in parts:
            rows = part.weight.shape[0]
            pairs.append((part.weight, layer.shared_gate_up_proj[start:start + rows]))
            start += rows
        pairs.append((shared.down_proj.weight, layer.shared_down_proj))
    if config.shared_expert_gate:
        pairs.append((conversion.shared_gate.weight, layer.shared_gate_weight))
    return pairs


class Conversion:
    """What a block computes, read once: its family, the MoEConfig, and its tensors as views in
    flashmoe's layout (``gate_up`` and ``gate_up_bias`` as parts to concatenate along the rows:
    gate then up, so interleaved columns are split without a copy of the whole block)."""

    def __init__(self, block: nn.Module):
        self.family = detect_family(block)
        try:
            self._read(block, self.family)
        except AttributeError as error:      # a block whose class changed under its name
            raise TypeError(f"{type(block).__name__} lacks what a {self.family} block has ({error}): "
                            "not converted") from error

    def _read(self, block: nn.Module, family: str) -> None:
        spec = _SPECS[family]
        children = _children(block)
        expected = _expected_children(spec)
        if family == "ernie4_5_moe" and block.shared_experts is None:
            expected = expected - {"shared_experts"}
        if children != expected:
            raise TypeError(f"{type(block).__name__} has the children {sorted(children)}; a "
                            f"{family} block has {sorted(expected)}: not converted, since "
                            "parts of it would be ignored")
        router = getattr(block, spec.router)
        # LongCat-Flash's zero-computation experts: chosen by the router, computing nothing
        identity = int(getattr(block.experts, "zero_expert_num", 0) or 0)
        self._read_experts(block.experts, family, identity)
        num_experts, hidden = self.gate_up[0].shape[0], self.gate_up[0].shape[2]
        self._read_router(router, family, num_experts + identity, hidden)
        self.shared = getattr(block, spec.shared) if spec.shared else None
        self.shared_gate = getattr(block, spec.shared_gate) if spec.shared_gate else None
        self.plan = self._plan(block.experts, family)
        # DBRX's block holds top_k, the others' routers do
        top_k = router.top_k if hasattr(router, "top_k") else block.top_k
        fields = dict(hidden_size=hidden, intermediate_size=self.down.shape[2],
                      num_experts=num_experts, top_k=int(top_k), gated=True,
                      dtype=dtype_name(self.gate_up[0].dtype), router_bias=self.router_bias is not None,
                      expert_bias=self.down_bias is not None, identity_experts=identity,
                      **self.plan.config_fields())
        fields.update(ROUTING[family](block, router))
        self.selection_bias = selection_bias(block, router, family) if fields.get("selection_bias") else None
        self.jitter = router_jitter(block, router, family)
        if self.shared is not None:
            fields.update(self._shared_fields(block))
        self.config = MoEConfig(**fields)

    def _read_experts(self, experts: nn.Module, family: str, identity: int) -> None:
        self.gate_up_bias = self.down_bias = None
        if family == "dbrx":
            mlp = experts.mlp
            shape = (mlp.moe_num_experts, mlp.ffn_hidden_size, mlp.hidden_size)
            if any(w.shape != (shape[0] * shape[1], shape[2]) for w in (mlp.w1, mlp.v1, mlp.w2)):
                raise ValueError(f"DBRX's experts w1, v1 and w2 must each be [E * I, H] = "
                                 f"[{shape[0] * shape[1]}, {shape[2]}]")
            self.gate_up = (mlp.w1.view(shape), mlp.v1.view(shape))
            self.down = mlp.w2.view(shape).transpose(1, 2)
            return
        layout = _expert_layout(experts, family)
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if layout["is_transposed"]:            # [E, H, 2I] and [E, I, H]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if identity and gate_up.shape[0] == down.shape[0] + identity:
            gate_up = gate_up[:down.shape[0]]  # LongCat-Flash's rows for its identity experts, never read
        self.gate_up, self.down = _gate_then_up(gate_up, layout), down
        if layout["has_bias"]:
            self.gate_up_bias = _gate_then_up(experts.gate_up_proj_bias, layout)
            self.down_bias = experts.down_proj_bias
        num_experts, up_rows, hidden = gate_up.shape
        intermediate = down.shape[2]
        if up_rows != 2 * intermediate or tuple(down.shape[:2]) != (num_experts, hidden):
            raise ValueError(f"experts.gate_up_proj {tuple(experts.gate_up_proj.shape)} and "
                             f"down_proj {tuple(experts.down_proj.shape)} do not form gated experts "
                             f"(gate and up of width I, then down back to H)")

    def _read_router(self, router: nn.Module, family: str, num_experts: int, hidden: int) -> None:
        """``num_experts``: the experts the router chooses from (identity ones included)."""
        # HunYuan's, AFMoE's, DBRX's and LongCat-Flash's routers keep their projection in a child
        # Linear; the others hold the weight.
        linear = getattr(router, _ROUTER_LINEAR[family]) if family in _ROUTER_LINEAR else router
        self.router_weight = linear.weight
        # LongCat-Flash's router multiplies by its classifier's weight alone, bias or not
        self.router_bias = None if family == "longcat_flash" else getattr(linear, "bias", None)
        if tuple(self.router_weight.shape) != (num_experts, hidden):
            raise ValueError(f"the router ({type(router).__name__}) weight has shape "
                             f"{tuple(self.router_weight.shape)}: expected [{num_experts}, {hidden}]")
        if self.router_bias is not None and tuple(self.router_bias.shape) != (num_experts,):
            raise ValueError(f"the router ({type(router).__name__}) bias has shape "
                             f"{tuple(self.router_bias.shape)}: expected [{num_experts}]")

    @staticmethod
    def _plan(experts: nn.Module, family: str) -> ExpertsPlan:
        """What the experts compute between their projections: for the decorated experts as
        ``experts_implementation="flashmoe"`` identifies it, by running their gate; DBRX's and
        Llama4's (undecorated: no gate to run) by their activation's class."""
        if family == "dbrx":
            return ExpertsPlan(activation_name(experts.mlp), gated=True)
        if not hasattr(experts, "_apply_gate"):
            return ExpertsPlan(activation_name(experts), gated=True)
        plan, missing = plan_for(experts)
        if plan is None:
            raise ValueError(f"{type(experts).__name__}: {missing}; not converted")
        return plan

    def _shared_fields(self, block: nn.Module) -> dict:
        width = _shared_width(self.shared, self.plan)
        if self.shared_gate is not None:
            _check_linear(self.shared_gate, _SPECS[self.family].shared_gate)
            return dict(num_shared_experts=1, shared_intermediate_size=width, shared_expert_gate=True)
        # n shared experts are stored fused (one MLP of width n * moe_intermediate_size);
        # splitting the width back only documents the model, the computation is the same.
        n_shared = _shared_count(block)
        if width % n_shared:
            n_shared = 1
        return dict(num_shared_experts=n_shared, shared_intermediate_size=width // n_shared)


def _children(block: nn.Module) -> set:
    return {name for name, _ in block.named_children()}


def _expected_children(spec: _Spec) -> set:
    return {"experts", spec.router} | {name for name in (spec.shared, spec.shared_gate) if name}


def _expert_layout(experts: nn.Module, family: str) -> dict:
    """The experts' layout flags, as transformers' experts decorator records them; checked
    convertible."""
    if family == "llama4":
        # Llama4's experts are not decorated; its code multiplies by [E, H, 2I] then chunks.
        return dict(is_transposed=True, is_concatenated=True, has_bias=False)
    layout = {"is_transposed": getattr(experts, "is_transposed", False),
              "is_concatenated": getattr(experts, "is_concatenated", True),
              "has_bias": getattr(experts, "has_bias", False)}
    if not getattr(experts, "has_gate", True):
        raise ValueError(f"{type(experts).__name__} has no gate (has_gate=False): flashmoe converts "
                         "gated experts (gate_up_proj) only")
    if getattr(experts, "has_post_expert_norm", False):
        raise ValueError(f"{type(experts).__name__} normalises each expert's output "
                         "(has_post_expert_norm=True), which MoEConfig has no field for")
    return layout


def _gate_then_up(t: torch.Tensor, layout: dict) -> tuple:
    """``t`` [E, 2I, ...] (rows gate then up, or interleaved gate0, up0, gate1, ...) as the
    parts (gate, up) to concatenate along dim 1: views, no copy."""
    if layout["is_concatenated"]:
        return (t,)
    return (t[:, 0::2], t[:, 1::2])


def _shared_count(block: nn.Module) -> int:
    """How many shared experts the block's config says its fused shared MLP holds (1 if it
    does not say)."""
    config = getattr(block, "config", None)
    for name in ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 1:
            return value
    return 1


def _shared_width(mlp: nn.Module, plan: ExpertsPlan) -> int:
    """Width of a shared-expert MLP (gate_proj / up_proj / down_proj, or a fused gate_up_proj and
    down_proj), checked convertible: bias-free Linears around the routed experts' activation."""
    fused = hasattr(mlp, "gate_up_proj")
    for name in ("gate_up_proj", "down_proj") if fused else ("gate_proj", "up_proj", "down_proj"):
        _check_linear(getattr(mlp, name, None), f"shared expert {name}")
    if not shared_computes(mlp, plan):
        raise ValueError(f"the shared expert ({type(mlp).__name__}) does not compute the routed experts' "
                         f"activation {plan.config_fields()}: flashmoe uses one activation for both")
    return mlp.gate_up_proj.out_features // 2 if fused else mlp.gate_proj.out_features


def _check_linear(linear: nn.Module, name: str) -> None:
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        raise ValueError(f"{name} must be a bias-free nn.Linear to convert; got {linear!r}")
