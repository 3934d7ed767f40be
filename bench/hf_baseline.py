"""transformers' ``grouped_mm`` experts on the layer's own weights (no copies of the experts).

The experts implementation is chosen the documented transformers 5 way: the config's
``_experts_implementation = "grouped_mm"``, read on every forward by the
``@use_experts_implementation`` decorator of each model's experts class
(``transformers/integrations/moe.py``), which then runs ``grouped_mm_experts_forward``
(``torch.nn.functional.grouped_mm`` or ``torch._grouped_mm``).

Per family:
    mixtral     MixtralSparseMoeBlock (router: logits in the model dtype, softmax, top-k, renorm)
    qwen3_moe   Qwen3MoeSparseMoeBlock (same router; weights rounded to the model dtype)
    deepseek_v2 DeepseekV2TopkRouter (fp32 logits, greedy top-k) + DeepseekV2Experts: the
                block without its shared experts, since the benchmarked layer is routed only
    plain       ungated experts (the FlashMoE paper's GELU MLP): transformers has no such
                model, so a minimal experts class is declared with the same decorator and
                ``has_gate=False`` (the switch grouped_mm_experts_forward reads), routed by
                MixtralTopKRouter (softmax, top-k, renormalised, as that layer is).
The router keeps the dtype the model would give it (bf16 for Mixtral and Qwen3), so its routing
can differ from flashmoe's fp32 router on near-ties; the benchmark checks each provider against
the reference under the provider's own routing and reports how often routings agree.
"""

from __future__ import annotations

import torch
from torch import nn

from flashmoe.config import MoEConfig
from flashmoe.reference import MoEWeights, Routing

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v2", "plain")


class RoutedMoE(nn.Module):
    """A router module and an experts module, wired as the transformers blocks wire them."""

    def __init__(self, gate: nn.Module, experts: nn.Module):
        super().__init__()
        self.gate, self.experts = gate, experts

    def forward(self, x2d: torch.Tensor) -> torch.Tensor:
        _, weights, ids = self.gate(x2d)
        return self.experts(x2d, ids, weights)


def _param(t: torch.Tensor, dtype=None) -> nn.Parameter:
    """A frozen parameter sharing ``t``'s storage (a copy only when the dtype changes)."""
    return nn.Parameter(t.detach() if dtype is None else t.detach().to(dtype), requires_grad=False)


def _plain_experts_class():
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_gate=False)
    class PlainExperts(nn.Module):
        """Ungated experts, up_proj [E, I, H] and down_proj [E, H, I] (transformers' layout)."""

        def __init__(self, config):
            super().__init__()
            self.num_experts = config.num_local_experts
            self.up_proj = nn.Parameter(torch.empty(self.num_experts, config.intermediate_size,
                                                    config.hidden_size))
            self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size,
                                                      config.intermediate_size))
            self.act_fn = ACT2FN[config.hidden_act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise NotImplementedError("only the grouped_mm experts implementation is benchmarked")

    return PlainExperts


_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def build(family: str, config: MoEConfig, weights: MoEWeights) -> nn.Module:
    """The transformers module for ``family`` on ``weights``; ``module(x2d) -> out2d`` and
    ``module.gate(x2d) -> (logits, weights, ids)``. Raises ImportError / ValueError with the
    reason when it cannot be built."""
    if family not in FAMILIES:
        raise ValueError(f"no transformers baseline for family {family!r}")
    if config.num_shared_experts or config.selection_bias or config.n_group > 1 or config.scoring != "softmax":
        raise ValueError("the transformers baselines here cover softmax top-k routed experts only")
    if config.activation not in _HF_ACT:
        raise ValueError(f"the transformers baselines here cover the activations {', '.join(_HF_ACT)}, "
                         f"not {config.activation!r}")
    dt = config.torch_dtype
    common = dict(hidden_size=config.hidden_size, num_experts_per_tok=config.top_k,
                  hidden_act=_HF_ACT[config.activation])
    # Built on the meta device: the real tensors are the layer's, assigned below.
    with torch.device("meta"):
        if family == "mixtral":
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
            if not config.norm_topk_prob:
                raise ValueError("Mixtral's router always renormalises the top-k weights")
            hf = MixtralConfig(intermediate_size=config.intermediate_size,
                               num_local_experts=config.num_experts, **common)
            module, router_dtype = MixtralSparseMoeBlock(hf), dt
        elif family == "qwen3_moe":
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
            hf = Qwen3MoeConfig(moe_intermediate_size=config.intermediate_size,
                                num_experts=config.num_experts, norm_topk_prob=config.norm_topk_prob,
                                **common)
            module, router_dtype = Qwen3MoeSparseMoeBlock(hf), dt
        elif family == "deepseek_v2":
            from transformers import DeepseekV2Config
            from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds
            if config.norm_topk_prob:
                raise ValueError("DeepSeek-V2's router does not renormalise the top-k weights")
            hf = DeepseekV2Config(moe_intermediate_size=config.intermediate_size,
                                  n_routed_experts=config.num_experts, n_group=1, topk_group=1,
                                  topk_method="greedy",
                                  routed_scaling_factor=config.routed_scaling_factor, **common)
            module = RoutedMoE(ds.DeepseekV2TopkRouter(hf), ds.DeepseekV2Experts(hf))
            router_dtype = torch.float32
        else:
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
            if not config.norm_topk_prob:
                raise ValueError("the plain-experts baseline routes as Mixtral: renormalised top-k")
            hf = MixtralConfig(intermediate_size=config.intermediate_size,
                               num_local_experts=config.num_experts, **common)
            module = RoutedMoE(MixtralTopKRouter(hf), _plain_experts_class()(hf))
            router_dtype = dt
    hf._experts_implementation = "grouped_mm"
    if module.experts.config._experts_implementation != "grouped_mm":
        raise ValueError("this transformers version does not select experts implementations "
                         "through config._experts_implementation")
    module.gate.weight = _param(weights.router_weight, router_dtype)
    if config.gated:
        module.experts.gate_up_proj = _param(weights.gate_up_proj)
    else:
        module.experts.up_proj = _param(weights.gate_up_proj)
    module.experts.down_proj = _param(weights.down_proj)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"transformers module has tensors this baseline does not fill: {left}")
    return module.eval()


def forward(module: nn.Module, x2d: torch.Tensor) -> torch.Tensor:
    """The module's output for x2d [T, H] (the transformers blocks take [batch, seq, H])."""
    if isinstance(module, RoutedMoE):
        return module(x2d)
    return module(x2d.unsqueeze(0)).squeeze(0)


def routing(module: nn.Module, x2d: torch.Tensor) -> Routing:
    """The routing the module's own router chooses for x2d (for the accuracy check)."""
    _, weights, ids = module.gate(x2d)
    return Routing(ids=ids.long(), weights=weights.float(), kept=torch.ones_like(ids, dtype=torch.bool))
