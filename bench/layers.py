"""The MoE layers the benchmarks run: one layer of each model, as flashmoe configs."""

from __future__ import annotations

from flashmoe.config import MoEConfig

# name -> (config, transformers family used to build the grouped_mm baseline)
LAYERS: dict[str, tuple[MoEConfig, str]] = {
    # Mixtral-8x7B: softmax over 8 experts, top-2, always renormalised.
    "mixtral-8x7b": (MoEConfig(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2,
                               activation="silu", norm_topk_prob=True), "mixtral"),
    # Qwen3-30B-A3B: 128 narrow experts, top-8, renormalised.
    "qwen3-30b-a3b": (MoEConfig(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8,
                                activation="silu", norm_topk_prob=True), "qwen3_moe"),
    # DeepSeek-V2-Lite, routed experts only (its 2 shared experts are left out): softmax,
    # greedy top-6 of 64, not renormalised, routed_scaling_factor 1.0.
    "deepseek-v2-lite": (MoEConfig(hidden_size=2048, intermediate_size=1408, num_experts=64, top_k=6,
                                   activation="silu", norm_topk_prob=False), "deepseek_v2"),
    # The FlashMoE paper's layer: plain (ungated) GELU experts; its combine divides by the sum
    # of the top-k probabilities, i.e. renormalised top-2.
    "flashmoe-paper": (MoEConfig(hidden_size=2048, intermediate_size=2048, num_experts=32, top_k=2,
                                 activation="gelu", gated=False, norm_topk_prob=True), "plain"),
}

TOKENS = (128, 512, 2048, 8192, 16384, 32768)
DRY_RUN_TOKENS = (16, 64)


def scaled_down(config: MoEConfig, hidden: int = 64) -> MoEConfig:
    """The same layer (experts, top-k, routing, activation) at a width a CPU runs in
    milliseconds: hidden 64, the expert width scaled alike, rounded up to a multiple of 16
    (grouped GEMMs move rows as 16-byte vectors)."""
    inter = config.intermediate_size * hidden / config.hidden_size
    inter = max(32, 16 * -(-int(inter) // 16))
    return config.replace(hidden_size=hidden, intermediate_size=inter)


def layer(name: str, dry_run: bool = False) -> tuple[MoEConfig, str]:
    if name not in LAYERS:
        raise SystemExit(f"unknown config {name!r}: choose from {', '.join(LAYERS)}")
    config, family = LAYERS[name]
    return (scaled_down(config) if dry_run else config), family
