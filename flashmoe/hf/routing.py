"""How each transformers family routes, as MoEConfig fields read from its block and router
(``blocks.py`` finds the block's family and its parts)."""

from __future__ import annotations

import torch

from ..reference import router_scores

# Families whose router is DeepSeek-V3's (the same code under other names).
_DEEPSEEK_V3_ROUTERS = ("deepseek_v3", "glm4_moe", "dots1", "exaone_moe", "mimo_v2_flash", "glm5_next")
# What DeepSeek-V3's routing reads from its router: a block of another class is taken for one
# only when its router has all of it.
DEEPSEEK_V3_ROUTER_ATTRIBUTES = ("e_score_correction_bias", "num_group", "topk_group", "norm_topk_prob",
                                 "routed_scaling_factor")

# LFM2-MoE adds this to the top-k sum it divides by (a constant of its modeling code).
LFM2_NORM_EPSILON = 1e-6


def _softmax_renormalised(block, router) -> dict:
    return dict(norm_topk_prob=True)


def _softmax_plain(block, router) -> dict:
    return dict(norm_topk_prob=False)


def _softmax_optional_norm(block, router) -> dict:
    return dict(norm_topk_prob=bool(router.norm_topk_prob))


def _deepseek_v3_routing(block, router) -> dict:
    return dict(scoring="sigmoid", selection_bias=True, n_group=int(router.num_group),
                topk_group=int(router.topk_group), group_score="top2_sum",
                norm_topk_prob=bool(router.norm_topk_prob),
                routed_scaling_factor=float(router.routed_scaling_factor))


def _mistral4_routing(block, router) -> dict:
    # DeepSeek-V3's groups over softmax scores, no selection bias; Mistral-Large-4 always
    # renormalises (its router has no norm_topk_prob).
    return dict(n_group=int(router.num_group), topk_group=int(router.topk_group), group_score="top2_sum",
                norm_topk_prob=bool(getattr(router, "norm_topk_prob", True)),
                routed_scaling_factor=float(router.routed_scaling_factor))


def _sigmoid_biased_renormalised(scale: str | None):
    """Sigmoid scores, a selection bias, the top k renormalised, then times the router's
    ``scale`` attribute (MiniMax-M2: none; HY-V3, AFMoE: their own names for it)."""
    def routing(block, router) -> dict:
        return dict(scoring="sigmoid", selection_bias=True, norm_topk_prob=True,
                    routed_scaling_factor=float(getattr(router, scale)) if scale else 1.0)
    return routing


def _sigmoid_biased_block_scaled(block, router) -> dict:
    """Sigmoid scores, the router's selection bias, the top k renormalised, then times the
    block's routed_scaling_factor (MiniMax-M3, Step-3.7, Laguna)."""
    return dict(scoring="sigmoid", selection_bias=True, norm_topk_prob=True,
                routed_scaling_factor=float(block.routed_scaling_factor))


def _laguna_routing(block, router) -> dict:
    softcap = float(router.router_logit_softcapping)
    if softcap > 0:
        raise ValueError(f"Laguna's moe_router_logit_softcapping={softcap} passes the router logits "
                         "through tanh before the sigmoid, which MoEConfig has no field for: 0 converts")
    return _sigmoid_biased_block_scaled(block, router)


def _beam_routing(block, router) -> dict:
    # DeepSeek-V3's router, the scaling factor kept on the block
    return dict(scoring="sigmoid", selection_bias=True, n_group=int(router.num_group),
                topk_group=int(router.topk_group), group_score="top2_sum",
                norm_topk_prob=bool(router.norm_topk_prob),
                routed_scaling_factor=float(block.routed_scaling_factor))


def _deepseek_v4_routing(block, router) -> dict:
    if hasattr(router, "tid2eid"):
        raise ValueError("DeepSeek-V4's hash-routed layers ('hash_moe' in mlp_layer_types) choose each "
                         "token's experts by its token id (tid2eid), which MoEConfig's router does not: "
                         "their experts still run in flashmoe with experts_implementation='flashmoe'")
    return dict(scoring=_elementwise_scoring(router.score_fn, "DeepSeek-V4's scoring_func"),
                selection_bias=True, norm_topk_prob=True,
                routed_scaling_factor=float(router.routed_scaling_factor))


def _elementwise_scoring(score_fn, what: str) -> str:
    """The MoEConfig scoring an elementwise score function computes, found by running it."""
    probe = torch.linspace(-30.0, 30.0, 241).unsqueeze(0)
    with torch.no_grad():
        theirs = score_fn(probe.clone())
    for scoring in ("sigmoid", "sqrtsoftplus"):
        if torch.allclose(theirs.float(), router_scores(probe, scoring), rtol=1e-6, atol=1e-7):
            return scoring
    raise ValueError(f"{what} ({type(score_fn).__name__}) computes neither sigmoid nor sqrt(softplus) "
                     "on a probe input, the elementwise scorings MoEConfig has")


def _longcat_flash_routing(block, router) -> dict:
    # softmax over the routed and identity experts, a selection-only bias, no renormalisation
    return dict(selection_bias=True, routed_scaling_factor=float(router.routed_scaling_factor))


def _flint_routing(block, router) -> dict:
    return dict(scoring="sigmoid", norm_topk_prob=bool(router.norm_topk_prob))


def _dbrx_routing(block, router) -> dict:
    # DBRX divides the top-k softmax weights by their L^p norm; for p = 1 that is their sum.
    p = block.moe_normalize_expert_weights
    if p is not None and float(p) != 1.0:
        raise ValueError(f"DBRX's moe_normalize_expert_weights={p} divides the top-k weights by their "
                         f"L{p:g} norm, which MoEConfig has no field for: 1 (their sum) and None convert")
    return dict(norm_topk_prob=p is not None)


def _deepseek_v2_routing(block, router) -> dict:
    fields = dict(routed_scaling_factor=float(router.routed_scaling_factor))
    if router.topk_method == "group_limited_greedy":
        fields.update(n_group=int(router.num_group), topk_group=int(router.topk_group),
                      group_score="max")
    elif router.topk_method != "greedy":
        raise ValueError(f"DeepSeek-V2's topk_method={router.topk_method!r} has no MoEConfig "
                         "equivalent: 'greedy' and 'group_limited_greedy' convert")
    return fields


# ERNIE's moe_norm_min up to which its clamp is accepted: a chosen top-k sum below it needs
# every chosen expert's probability below it, which only a selection bias overriding the scores
# by orders of magnitude brings about.
ERNIE_NORM_MIN_LIMIT = 1e-6


def _ernie_routing(block, router) -> dict:
    if float(router.norm_min) > ERNIE_NORM_MIN_LIMIT:
        raise ValueError(f"ERNIE's moe_norm_min={router.norm_min} clamps the top-k sum from below, "
                         f"which MoEConfig (norm_topk_epsilon adds to the sum) matches only for a "
                         f"clamp that never binds: moe_norm_min <= {ERNIE_NORM_MIN_LIMIT} converts")
    return dict(selection_bias=True, norm_topk_prob=True)


def _llama4_routing(block, router) -> dict:
    # sigmoid is monotonic, so the top-k of the logits is the top-k of the sigmoid scores.
    return dict(scoring="sigmoid", scale_expert_input=True)


def _lfm2_routing(block, router) -> dict:
    fields = dict(scoring="sigmoid", selection_bias=bool(block.use_expert_bias),
                  norm_topk_prob=bool(router.norm_topk_prob),
                  routed_scaling_factor=float(router.routed_scaling_factor))
    if fields["norm_topk_prob"]:
        fields["norm_topk_epsilon"] = LFM2_NORM_EPSILON
    return fields


# family -> its routing fields (beyond E, k and the dtype), from the block and its router
ROUTING = {
    "mixtral": _softmax_renormalised, "minimax": _softmax_renormalised,
    "hunyuan_v1_moe": _softmax_renormalised, "qwen3_5_moe": _softmax_renormalised,
    "gpt_oss": _softmax_renormalised, "granitemoe": _softmax_renormalised,
    "granitemoeshared": _softmax_renormalised, "granitemoe_swa": _softmax_renormalised,
    "granitemoehybrid": _softmax_renormalised, "qwen3_vl_moe": _softmax_renormalised,
    "aria": _softmax_renormalised,
    "jamba": _softmax_plain,
    "dbrx": _dbrx_routing,
    "qwen2_moe": _softmax_optional_norm, "qwen3_next": _softmax_optional_norm,
    "qwen3_moe": _softmax_optional_norm, "olmoe": _softmax_optional_norm,
    "flex_olmo": _softmax_optional_norm, "lara_mini": _softmax_optional_norm,
    **{family: _deepseek_v3_routing for family in _DEEPSEEK_V3_ROUTERS},
    "deepseek_v2": _deepseek_v2_routing,
    "ernie4_5_moe": _ernie_routing,
    "llama4": _llama4_routing,
    "lfm2_moe": _lfm2_routing,
    "mistral4": _mistral4_routing, "mistral_large4": _mistral4_routing,
    "minimax_m2": _sigmoid_biased_renormalised(None),
    "hy_v3": _sigmoid_biased_renormalised("router_scaling_factor"),
    "afmoe": _sigmoid_biased_renormalised("route_scale"),
    "laguna": _laguna_routing,
    "minimax_m3_vl": _sigmoid_biased_block_scaled, "step3p7": _sigmoid_biased_block_scaled,
    "beam": _beam_routing, "deepseek_v4": _deepseek_v4_routing, "flint": _flint_routing,
    "longcat_flash": _longcat_flash_routing,
}


def router_jitter(block, router, family: str):
    """The relative noise by which a family's router scales its input in training mode (the
    experts see the scaled input too); 0 or None: none."""
    if family == "dbrx":
        return router.moe_jitter_eps
    return getattr(block, "jitter_noise", 0.0)


def selection_bias(block, router, family: str) -> torch.Tensor:
    """The tensor a family adds to the scores for the selection only."""
    if family in ("lfm2_moe", "afmoe"):
        return block.expert_bias
    if family in ("minimax_m2", "hy_v3"):
        return block.e_score_correction_bias
    if family == "ernie4_5_moe":
        return router.moe_statics.e_score_correction_bias      # [1, E]
    return router.e_score_correction_bias
