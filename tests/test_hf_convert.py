"""flashmoe.hf.convert / unconvert on whole tiny transformers models (random configs built
locally, fp32): the converted model computes what the original did, unconvert gives it back."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from flashmoe import FlashMoELayer  # noqa: E402
from flashmoe.hf import convert, unconvert  # noqa: E402
from test_hf_experts import SERVED, build, relative_error  # noqa: E402

CONVERTED = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "qwen3_next", "glm4_moe",
             "dots1", "deepseek_v2", "gpt_oss", "granitemoe", "jamba", "lfm2_moe", "minimax",
             "hunyuan_v1_moe", "ernie4_5_moe", "exaone_moe", "flex_olmo"]


def moe_blocks(model) -> dict:
    """path -> module holding a decorated transformers experts module (what transformers itself
    marks as experts), found independently of convert."""
    return {path.rpartition(".")[0]: type(model.get_submodule(path.rpartition(".")[0])).__name__
            for path, m in model.named_modules() if hasattr(m, "has_gate")}


def ids(seed=1):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("model_type", CONVERTED)
def test_convert_replaces_every_block_and_keeps_the_logits(model_type):
    model = build(model_type, **SERVED[model_type])
    original = copy.deepcopy(model)
    blocks = moe_blocks(model)
    report = convert(model, backend="reference")
    assert report.converted == blocks and not report.left
    for path in blocks:
        layer = model.get_submodule(path)
        assert isinstance(layer, FlashMoELayer) and layer.backend == "reference"
    assert relative_error(logits(model, ids()), logits(original, ids())) < 1e-5


def test_dense_layers_are_left_alone():
    model = build("deepseek_v3", **SERVED["deepseek_v3"], first_k_dense_replace=1)
    dense = model.model.layers[0].mlp
    report = convert(model)
    assert list(report.converted) == ["model.layers.1.mlp"]
    assert model.model.layers[0].mlp is dense


def test_blocks_outside_mlp_are_found():
    model = build("granitemoe")
    assert list(convert(model).converted) == [f"model.layers.{i}.block_sparse_moe" for i in range(2)]


def test_a_refused_block_is_reported_with_the_reason():
    model = build("phimoe")
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="converted no block of PhimoeForCausalLM"):
        report = convert(model)
    assert not report.converted and set(report.left) == set(moe_blocks(original))
    assert all("sparsemixer" in reason for reason in report.left.values())
    assert "left model.layers.0.mlp: PhimoeSparseMoeBlock" in str(report)
    assert relative_error(logits(model, ids()), logits(original, ids())) == 0


def test_a_model_without_moe_blocks_warns():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match="it has no sparse-MoE block"):
        assert not convert(model).converted


def test_convert_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        convert("Qwen/Qwen3-30B-A3B")


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_unconvert_restores_the_blocks_with_the_current_weights(model_type):
    model = build(model_type, **SERVED[model_type])
    names = {k: v.shape for k, v in model.state_dict().items()}
    classes = moe_blocks(model)
    convert(model)
    with torch.no_grad():       # stands in for training: every converted tensor changes
        for module in model.modules():
            if isinstance(module, FlashMoELayer):
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
    trained = logits(model, ids())
    assert unconvert(model) == list(classes)
    assert moe_blocks(model) == classes
    assert {k: v.shape for k, v in model.state_dict().items()} == names
    assert not any(t.is_meta for t in model.state_dict().values())
    assert relative_error(logits(model, ids()), trained) < 1e-5
    convert(model)              # and again: the same layers
    assert relative_error(logits(model, ids()), trained) < 1e-5
