"""Blocks flashmoe does not convert: each is refused with what MoEConfig lacks for it (a
ValueError from from_hf, the reason in convert's report, the block left in place), never read as
another family and never a crash inside convert."""

from __future__ import annotations

import importlib
import re

import pytest
from torch import nn

transformers = pytest.importorskip("transformers")
from flashmoe import FlashMoELayer  # noqa: E402
from flashmoe.hf import config_from_hf, convert, detect_family  # noqa: E402
from hf_models import SMALL, make_block  # noqa: E402
from test_hf_families import first_block  # noqa: E402


# name -> (the block, built from a small config; what its refusal names)
REFUSED = {
    "inkling": (lambda: make_block("inkling", "InklingMoE", "InklingTextConfig", hidden_size=32,
                               moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                               n_shared_experts=1),
                "Inkling's shared experts are weighted by the router"),
    "zaya": (lambda: make_block("zaya", "ZayaSparseMoeBlock", "ZayaConfig", 1, hidden_size=32,
                            moe_intermediate_size=16, num_experts=8, num_experts_per_tok=1,
                            router_hidden_size=16),
             "ZAYA's router .* is not one linear map"),
    "kolibri1": (lambda: make_block("kolibri1", "Kolibri1SparseMoeBlock", "Kolibri1Config", hidden_size=32,
                                    moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                    shared_expert_intermediate_size=16),
                 "Kolibri-1's router chooses experts by logit plus e_score_correction_bias"),
    "axk1": (lambda: make_block("axk1", "AXK1MoE", "AXK1Config", hidden_size=32, moe_intermediate_size=16,
                                num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
                                topk_group=1),
             "A.X-K1's block normalises its output"),
    "muse_spark": (lambda: make_block("muse_spark", "MuseSparkMoE", "MuseSparkTextConfig", hidden_size=32,
                                      num_attention_heads=2, moe_hidden_size=16, moe_intermediate_size=16,
                                      num_local_experts=8, num_experts_per_tok=2),
                   "Muse Spark's experts work in a projected, normalised space"),
    # refused for what the block computes, found by running its parts: a token-id router, a shared
    # expert without the routed experts' clamp, a clamp after the SiLU
    "deepseek_v4_hash": (lambda: make_block("deepseek_v4", "DeepseekV4SparseMoeBlock", "DeepseekV4Config", 0,
                                            hidden_size=32, intermediate_size=16, num_local_experts=8,
                                            num_experts_per_tok=2, vocab_size=64),
                         "DeepSeek-V4's hash-routed layers .* choose each token's experts by its token id"),
    "hy_v4": (lambda: make_block("hy_v4", "HYV4MoE", "HYV4Config", hidden_size=32, moe_intermediate_size=16,
                                 num_local_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                                 n_shared_experts=1),
              r"the shared expert \(HYV4MLP\) does not compute the routed experts' activation .*silu_clamped"),
    "step3p7_clamped": (lambda: make_block("step3p7", "Step3p7SparseMoeBlock", "Step3p7TextConfig", 0,
                                           hidden_size=32, moe_intermediate_size=16, num_local_experts=8,
                                           num_experts_per_tok=2, share_expert_dim=16, swiglu_limits=[7.0]),
                        r"its own gate Step3p7Experts._apply_gate computes none of flashmoe's gated activations"),
}


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_block_is_left_with_its_reason(name):
    make, reason = REFUSED[name]
    block = make()
    with pytest.raises(ValueError, match=reason):
        FlashMoELayer.from_hf(block)
    model = Holder(mlp=block)
    with pytest.warns(UserWarning, match="converted no block of Holder"):
        report = convert(model)
    assert list(report.left) == ["mlp"] and model.mlp is block
    assert re.search(reason, report.left["mlp"])


def test_phimoe_is_refused_naming_its_router():
    module = importlib.import_module("transformers.models.phimoe")
    config = module.PhimoeConfig(**{k: v for k, v in SMALL.items() if k != "experts_implementation"},
                                 intermediate_size=24, num_local_experts=4)
    block = module.PhimoeForCausalLM(config).model.layers[0].mlp
    with pytest.raises(ValueError, match=r"PhiMoE's sparsemixer router .* has no MoEConfig equivalent"):
        FlashMoELayer.from_hf(block)


def test_unconvertible_variants_name_the_feature():
    with pytest.raises(ValueError, match=r"topk_method='noaux_tc' has no MoEConfig equivalent"):
        block = first_block("deepseek_v2")
        block.gate.topk_method = "noaux_tc"
        config_from_hf(block)
    with pytest.raises(ValueError, match=r"moe_norm_min=0.5 clamps the top-k sum"):
        config_from_hf(first_block("ernie4_5_moe", moe_norm_min=0.5))
    with pytest.raises(ValueError, match=r"shared expert gate_proj must be a bias-free nn.Linear"):
        config_from_hf(first_block("ernie4_5_moe", use_bias=True))
    with pytest.raises(ValueError, match=r"moe_router_logit_softcapping=30.0 passes the router logits through tanh"):
        config_from_hf(first_block("laguna", moe_router_logit_softcapping=30.0))
    with pytest.raises(ValueError, match=r"moe_normalize_expert_weights=2.0 divides the top-k weights by their L2"):
        config_from_hf(first_block("dbrx", ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2,
                                                           moe_normalize_expert_weights=2.0)))


def test_a_block_of_another_class_is_read_as_deepseek_v3_only_with_its_router():
    """A block of a class flashmoe does not know, with DeepSeek-V3's children and a selection
    bias, is DeepSeek-V3's under another name only when its router holds DeepSeek-V3's groups
    and scale; Laguna's router does not (its scale is on the block): the block is refused by
    name, not read as DeepSeek-V3's."""
    for family, expected in (("deepseek_v3", "deepseek_v3"), ("laguna", None)):
        parts = first_block(family)
        block = Holder(experts=parts.experts, gate=parts.gate, shared_experts=parts.shared_experts)
        if expected:
            assert detect_family(block) == expected
            continue
        with pytest.raises(TypeError, match="from_hf does not know the block Holder"):
            detect_family(block)
        with pytest.warns(UserWarning, match="converted no block"):
            report = convert(Holder(mlp=block))
        assert "does not know the block Holder" in report.left["mlp"]


def test_a_known_block_missing_a_part_is_refused_not_crashed():
    """A block whose class changed under its name (here: Laguna's router without its
    softcapping attribute) is refused with what it lacks, inside convert's report too."""
    block = first_block("laguna")
    del block.gate.router_logit_softcapping
    with pytest.raises(TypeError, match="LagunaSparseMoeBlock lacks what a laguna block has .*softcapping"):
        config_from_hf(block)
    with pytest.warns(UserWarning, match="converted no block"):
        report = convert(Holder(mlp=block))
    assert "lacks what a laguna block has" in report.left["mlp"]


def test_dbrx_router_jitter_carries_over_within_0_1():
    block = first_block("dbrx")
    block.router.moe_jitter_eps = 0.25
    assert FlashMoELayer.from_hf(block).jitter_noise == 0.25
    block.router.moe_jitter_eps = 1.5
    with pytest.raises(ValueError, match=r"DbrxFFN's router jitter 1.5: expected a number in \[0, 1\)"):
        FlashMoELayer.from_hf(block)
