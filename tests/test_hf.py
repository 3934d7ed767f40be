"""FlashMoELayer.from_hf against the transformers 5 blocks themselves: small random configs
built locally (nothing downloaded), fp32, random weights with routing far from uniform."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flashmoe import FlashMoELayer
from flashmoe.hf import config_from_hf

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as deepseek_v3  # noqa: E402
from transformers.models.mixtral import modeling_mixtral as mixtral  # noqa: E402
from transformers.models.olmoe import modeling_olmoe as olmoe  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2_moe  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe  # noqa: E402

H = 32
COMMON = dict(hidden_size=H, experts_implementation="eager")


def mixtral_block(**kw):
    config = mixtral.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=8,
                                   num_experts_per_tok=2, **kw)
    return mixtral.MixtralSparseMoeBlock(config)


def qwen2_block(**kw):
    config = qwen2_moe.Qwen2MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=8,
                                      num_experts_per_tok=3, shared_expert_intermediate_size=40,
                                      **{"norm_topk_prob": False, **kw})
    return qwen2_moe.Qwen2MoeSparseMoeBlock(config)


def qwen3_block(**kw):
    config = qwen3_moe.Qwen3MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=16,
                                      num_experts_per_tok=4, **{"norm_topk_prob": True, **kw})
    return qwen3_moe.Qwen3MoeSparseMoeBlock(config)


def olmoe_block(**kw):
    config = olmoe.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                               **{"norm_topk_prob": False, **kw})
    return olmoe.OlmoeSparseMoeBlock(config)


def deepseek_block(**kw):
    fields = dict(moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                  topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    fields.update(kw)
    config = deepseek_v3.DeepseekV3Config(**COMMON, **fields)
    return deepseek_v3.DeepseekV3MoE(config)


@torch.no_grad()
def randomise(block):
    """Random weights: router logits of std ~2 so the top-k is decisive, experts ~unit gain,
    and for DeepSeek a correction bias large enough to change choices."""
    for name, p in block.named_parameters():
        fan_in = p.shape[-1]
        p.normal_(std=(2.0 if name.startswith("gate.") else 1.0) / fan_in ** 0.5)
    gate = block.gate
    if hasattr(gate, "e_score_correction_bias"):
        gate.e_score_correction_bias.normal_(std=0.1)
    return block.eval()


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


BLOCKS = {
    "mixtral": mixtral_block,
    "qwen2_moe": qwen2_block,
    "qwen2_moe_norm": lambda: qwen2_block(norm_topk_prob=True),
    "qwen3_moe": qwen3_block,
    "qwen3_moe_no_norm": lambda: qwen3_block(norm_topk_prob=False),
    "olmoe": olmoe_block,
    "deepseek_v3": deepseek_block,
    "deepseek_v3_no_groups": lambda: deepseek_block(n_group=1, topk_group=1, norm_topk_prob=False,
                                                    routed_scaling_factor=1.0, n_shared_experts=1),
}


@pytest.mark.parametrize("name", BLOCKS)
def test_matches_transformers(name):
    block = randomise(BLOCKS[name]())
    layer = FlashMoELayer.from_hf(block)
    x = torch.randn(2, 13, H)
    with torch.no_grad():
        expected = block(x)
        out = layer(x)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert relative_error(out, expected) < 1e-5
    assert layer.last_backend == "reference"


@pytest.mark.parametrize("hidden_act, activation", [
    ("silu", "silu"), ("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", "gelu_tanh"),
    ("relu", "relu")])
def test_activations_match_transformers(hidden_act, activation):
    block = randomise(qwen3_block(hidden_act=hidden_act))
    layer = FlashMoELayer.from_hf(block)
    assert layer.config.activation == activation
    x = torch.randn(1, 11, H)
    with torch.no_grad():
        assert relative_error(layer(x), block(x)) < 1e-5


def test_configs_read_from_the_blocks():
    c = config_from_hf(mixtral_block())
    assert (c.num_experts, c.top_k, c.intermediate_size, c.norm_topk_prob, c.scoring) == (8, 2, 24, True, "softmax")
    c = config_from_hf(qwen2_block())
    assert (c.num_shared_experts, c.shared_intermediate_size, c.shared_expert_gate, c.norm_topk_prob) == (1, 40, True, False)
    c = config_from_hf(deepseek_block())
    assert (c.scoring, c.selection_bias, c.n_group, c.topk_group, c.group_score) == ("sigmoid", True, 4, 2, "top2_sum")
    assert (c.routed_scaling_factor, c.num_shared_experts, c.shared_intermediate_size) == (2.5, 2, 16)
    assert c.shared_intermediate_total == 32


def test_dtype_and_weights_are_taken_from_the_block():
    block = randomise(qwen2_block()).to(torch.bfloat16)
    layer = FlashMoELayer.from_hf(block, backend="reference")
    assert layer.config.dtype == "bfloat16"
    assert torch.equal(layer.gate_up_proj, block.experts.gate_up_proj)
    assert torch.equal(layer.down_proj, block.experts.down_proj)
    assert layer.router_weight.dtype == torch.float32
    assert torch.equal(layer.router_weight, block.gate.weight.float())
    shared = block.shared_expert
    assert torch.equal(layer.shared_gate_up_proj, torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
    assert torch.equal(layer.shared_down_proj, shared.down_proj.weight)
    # bf16 block vs layer: both within bf16 rounding of the fp32 computation
    x = torch.randn(1, 9, H, dtype=torch.bfloat16)
    with torch.no_grad():
        ideal = FlashMoELayer.from_hf(block.float())(x.float())
        assert relative_error(layer(x).float(), ideal) < 2e-2


def test_a_renamed_copy_is_recognised_by_structure():
    class MyQwen3Block(nn.Module):            # what modular transformers does: same code, new name
        def __init__(self, original):
            super().__init__()
            self.gate, self.experts = original.gate, original.experts

        def forward(self, x):
            return qwen3_moe.Qwen3MoeSparseMoeBlock.forward(self, x)

    original = randomise(qwen3_block())
    block = MyQwen3Block(original)
    x = torch.randn(1, 5, H)
    with torch.no_grad():
        assert relative_error(FlashMoELayer.from_hf(block)(x), original(x)) < 1e-5


def test_unknown_blocks_are_refused_clearly():
    with pytest.raises(TypeError, match=r"from_hf does not know the block Linear .*supported are MixtralSparseMoeBlock"):
        FlashMoELayer.from_hf(nn.Linear(4, 4))
    block = mixtral_block()
    block.extra = nn.Linear(H, H)
    with pytest.raises(TypeError, match=r"has the children \['experts', 'extra', 'gate'\]"):
        FlashMoELayer.from_hf(block)


def test_unsupported_activation_is_refused():
    block = qwen3_block(hidden_act="tanh")
    with pytest.raises(ValueError, match=r"the activation Tanh computes none of flashmoe's gated activations"):
        FlashMoELayer.from_hf(block)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_whole_model_with_blocks_replaced(family):
    """The README's recipe on a tiny two-layer model: the hidden states do not change. DeepSeek's
    first layer is dense (first_k_dense_replace=1) and must be left alone."""
    from flashmoe.hf import FAMILIES
    small = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=48)
    if family == "qwen3_moe":
        config = qwen3_moe.Qwen3MoeConfig(**COMMON, **small, moe_intermediate_size=16, num_experts=8,
                                          num_experts_per_tok=2, head_dim=16)
        model = qwen3_moe.Qwen3MoeModel(config)
    else:
        config = deepseek_v3.DeepseekV3Config(
            **COMMON, **small, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
        model = deepseek_v3.DeepseekV3Model(config)
    for decoder_layer in model.layers:
        if type(decoder_layer.mlp).__name__ in FAMILIES:
            randomise(decoder_layer.mlp)
    model.eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
        replaced = 0
        for decoder_layer in model.layers:
            if type(decoder_layer.mlp).__name__ in FAMILIES:
                decoder_layer.mlp = FlashMoELayer.from_hf(decoder_layer.mlp)
                replaced += 1
        assert replaced == (2 if family == "qwen3_moe" else 1)
        assert relative_error(model(input_ids=ids).last_hidden_state, expected) < 1e-5
