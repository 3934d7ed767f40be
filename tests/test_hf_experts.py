"""experts_implementation="flashmoe" on whole tiny transformers models (random configs built
locally, nothing downloaded, fp32): the logits equal the same model's with "eager"."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
import flashmoe.hf  # noqa: E402,F401  (registers the implementation)
from flashmoe.hf import activations  # noqa: E402
from flashmoe.hf import experts as hf_experts  # noqa: E402

# Sizes every family gets where its config has the field.
SMALL = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, head_dim=16, vocab_size=64,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             max_position_embeddings=64, shared_expert_intermediate_size=16, n_shared_experts=1,
             n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
             qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=0)
NO_SPECIAL_TOKENS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=None)

# model_type -> config fields beyond SMALL; served by flashmoe exactly
SERVED = {
    "mixtral": {}, "qwen2_moe": {}, "qwen3_moe": {}, "olmoe": {}, "deepseek_v2": {},
    "deepseek_v3": dict(head_dim=8), "glm4_moe": {}, "glm4_moe_lite": {}, "dots1": {},
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"]),
    "granitemoe": {}, "granitemoeshared": {},
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, layer_types=["mamba", "attention"]),
    "ernie4_5_moe": {}, "hunyuan_v1_moe": {}, "minimax": {}, "minimax_m2": {},
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                  expert_layer_offset=0, use_mamba_kernels=False),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "phimoe": {}, "flex_olmo": NO_SPECIAL_TOKENS, "exaone_moe": {}, "solar_open": {}, "afmoe": {},
    "cohere2_moe": {}, "laguna": {}, "mellum": {}, "hy_v3": {},
    # transposed, biased, interleaved gate/up, clamped SwiGLU
    "gpt_oss": {},
    # transposed
    "aria_text": {},
    # transposed, biased, concatenated gate/up, clamped SwiGLU
    "openai_privacy_filter": NO_SPECIAL_TOKENS,
    # ungated experts (up_proj only)
    "nemotron_h": dict(layers_block_type=["moe", "attention"], mlp_hidden_act="relu"),
    # their own gates: SiLU clamped SwiGLUs, the limit kept as limit and as swiglu_limit
    "deepseek_v4": dict(q_lora_rank=16, swiglu_limit=0.8), "hy_v4": dict(q_lora_rank=16, **NO_SPECIAL_TOKENS),
}
# model_type -> (config fields, what the fallback warning names)
FALLBACK = {
    "nemotron_h": (dict(layers_block_type=["moe", "attention"], mlp_hidden_act="relu2"),
                   "the activation ReLUSquaredActivation"),
}


def build(model_type: str, implementation: str = "eager", **fields):
    config_cls = transformers.CONFIG_MAPPING[model_type]
    defaults = config_cls()
    kwargs = {k: v for k, v in SMALL.items() if hasattr(defaults, k)}
    kwargs.update(fields)
    config = config_cls(**kwargs)
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation=implementation)
    except ValueError:      # a family without a causal-LM head
        model = transformers.AutoModel.from_config(config, experts_implementation=implementation)
    randomise_experts(model)
    return model.eval()


@torch.no_grad()
def randomise_experts(model) -> None:
    """Expert tensors of unit gain, biases and routers large enough to matter (transformers'
    init makes the experts' contribution negligible next to the residual stream)."""
    for module in model.modules():
        if hasattr(module, "has_gate"):
            for name, p in module.named_parameters(recurse=False):
                p.normal_(std=(0.5 if "bias" in name else 1.0) / p.shape[-1] ** 0.5)


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def relative_error(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def fresh_warnings():
    hf_experts._WARNED.clear()
    yield
    hf_experts._WARNED.clear()


@pytest.fixture
def calls(monkeypatch):
    """The experts_forward calls made for the models' experts (not for identifying them)."""
    seen = []
    original = hf_experts.experts_forward

    def spy(x, *args, **kwargs):
        if kwargs.get("backend") != "reference":
            seen.append(kwargs)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(hf_experts, "experts_forward", spy)
    return seen


@pytest.mark.parametrize("model_type", SERVED)
def test_served_families_match_eager(model_type, calls):
    model = build(model_type, **SERVED[model_type])
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    expected = logits(model, ids)
    model.set_experts_implementation("flashmoe")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)     # no fallback
        out = logits(model, ids)
    assert calls, "flashmoe's experts_forward was not called"
    assert relative_error(out, expected) < 1e-5


def test_layouts_are_read_from_the_modules(calls):
    """GPT-OSS: transposed, biased, interleaved, clamped SwiGLU with the module's constants."""
    model = build("gpt_oss", swiglu_limit=5.0)
    experts = model.model.layers[0].mlp.experts
    experts.alpha = 1.5
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    expected = logits(model, ids)
    model.set_experts_implementation("flashmoe")
    out = logits(model, ids)
    assert relative_error(out, expected) < 1e-5
    assert calls[0]["transposed"] and calls[0]["interleaved"] and "gate_up_bias" in calls[0]
    plan, _ = activations.plan_for(experts)
    assert (plan.activation, plan.swiglu_alpha, plan.swiglu_limit) == ("swiglu_clamped", 1.5, 5.0)


@pytest.mark.parametrize("model_type", FALLBACK)
def test_what_flashmoe_cannot_compute_falls_back_with_one_warning(model_type):
    fields, missing = FALLBACK[model_type]
    model = build(model_type, **fields)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    expected = logits(model, ids)
    model.set_experts_implementation("flashmoe")
    with pytest.warns(UserWarning, match="flashmoe cannot compute") as record:
        out = logits(model, ids)
    messages = [str(w.message) for w in record if "flashmoe cannot compute" in str(w.message)]
    assert len(messages) == 1, messages          # once per experts class, not per layer or call
    assert missing in messages[0]
    assert relative_error(out, expected) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        logits(model, ids)                      # no second warning


def test_an_own_gate_flashmoe_cannot_compute_falls_back(monkeypatch):
    model = build("deepseek_v4", q_lora_rank=16, swiglu_limit=0.8)
    experts_class = type(model.model.layers[0].mlp.experts)

    def clamp_after_silu(self, gate_up):            # Step-3.7's order: the clamp after the activation
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate).clamp(max=self.limit) * up.clamp(-self.limit, self.limit)

    monkeypatch.setattr(experts_class, "_apply_gate", clamp_after_silu)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    expected = logits(model, ids)
    model.set_experts_implementation("flashmoe")
    with pytest.warns(UserWarning, match="its own gate DeepseekV4Experts._apply_gate computes none"):
        out = logits(model, ids)
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("limit", [0.5, 50.0])
def test_a_clamp_is_told_from_none_at_any_limit(limit):
    """A shared MLP that keeps no limit attribute is still probed past the routed experts' limit:
    its clamp (or the lack of one) decides whether it computes their activation."""
    class SharedMLP(torch.nn.Module):
        def __init__(self, clamp):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4, bias=False)
            self.down_proj, self.clamp = torch.nn.Linear(4, 8, bias=False), clamp

        def forward(self, x):
            gate, up = self.gate_proj(x), self.up_proj(x)
            if self.clamp:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            return self.down_proj(torch.nn.functional.silu(gate) * up)

    plan = activations.ExpertsPlan("silu_clamped", gated=True, swiglu_limit=limit)
    assert activations.shared_computes(SharedMLP(clamp=True), plan)
    assert not activations.shared_computes(SharedMLP(clamp=False), plan)
    assert activations.shared_computes(SharedMLP(clamp=False), activations.ExpertsPlan("silu", gated=True))


def test_a_renamed_activation_is_identified_by_what_it_computes():
    model = build("qwen3_moe")
    experts = model.model.layers[0].mlp.experts

    class MySwish(torch.nn.Module):             # silu under a name no table knows
        def forward(self, x):
            return x * torch.sigmoid(x)

    experts.act_fn = MySwish()
    assert activations.plan_for(experts)[0].activation == "silu"

    class Shifted(torch.nn.Module):             # a class name that says silu, computing else
        def forward(self, x):
            return torch.nn.functional.silu(x) + 0.01

    Shifted.__name__ = "SiLUActivation"
    experts.act_fn = Shifted()
    plan, missing = activations.plan_for(experts)
    assert plan is None and "the activation SiLUActivation computes none" in missing


def test_from_config_with_flashmoe_matches_eager(calls):
    eager = build("mixtral")
    served = build("mixtral", implementation="flashmoe")
    served.load_state_dict(eager.state_dict())
    assert served.config._experts_implementation == "flashmoe"
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    assert relative_error(logits(served, ids), logits(eager, ids)) < 1e-5
    assert calls


def test_training_through_flashmoe_gives_eager_gradients():
    model = build("qwen3_moe")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    grads = []
    for implementation in ("eager", "flashmoe"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].mlp.experts.gate_up_proj.grad.clone())
    assert relative_error(grads[1], grads[0]) < 1e-5


def test_registration_is_idempotent():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    hf_experts.register()
    hf_experts.register()
    assert ALL_EXPERTS_FUNCTIONS["flashmoe"] is hf_experts.flashmoe_experts_forward
    assert list(ALL_EXPERTS_FUNCTIONS).count("flashmoe") == 1


def test_import_flashmoe_does_not_import_transformers():
    code = "import sys, flashmoe; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
