"""Published forward times of fused and expert-parallel MoE layers that bench/model_ep.py prints
beside its predictions: the FlashMoE paper's 8 x H100 figures, an independent bf16 run of it, and
DeepEP's dispatch and combine figures. Each is quoted with where it comes from."""

from __future__ import annotations

from flashmoe.config import MoEConfig

# Published forward times (ms), 8 GPUs, k = 2, H = I = 2048, ungated GELU, by (E, tokens per GPU).
# FlashMoE paper (Aimuyo, Oh, Singh, NeurIPS'25, arXiv 2506.04667; the figures in its repository's
# plots/), 8 x H100: FlashMoE in fp32/TF32; Megatron-TE, Megatron-CUTLASS, FasterMoE in fp16.
# E = 32: its latency table. Other E: its expert-scaling figure at 16K tokens, read off bars
# (+-0.3 ms); Megatron there is ~37 for both at E = 16, 64, 128.
PAPER = {
    (32, 4096): {"FlashMoE": 2.1, "Meg-TE": 10.0, "Meg-CUTLASS": 9.9, "FasterMoE": 10.3},
    (32, 8192): {"FlashMoE": 3.7, "Meg-TE": 18.9, "Meg-CUTLASS": 18.9, "FasterMoE": 21.3},
    (32, 16384): {"FlashMoE": 7.0, "Meg-TE": 36.9, "Meg-CUTLASS": 36.9, "FasterMoE": 45.3},
    (8, 16384): {"FlashMoE": 8.3, "Meg-TE": 36.6, "Meg-CUTLASS": 36.3, "FasterMoE": 30.6},
    (16, 16384): {"FlashMoE": 8.2, "Meg-TE": 37.0, "Meg-CUTLASS": 37.0, "FasterMoE": 38.9},
    (64, 16384): {"FlashMoE": 7.0, "Meg-TE": 37.1, "Meg-CUTLASS": 37.1, "FasterMoE": 48.5},
    (128, 16384): {"FlashMoE": 8.5, "Meg-TE": 37.2, "Meg-CUTLASS": 37.2, "FasterMoE": 55.8},
}
# FlashMoE issue #21: an independent bf16 run, EP8, 8192 tokens per GPU, E = 32, k = 2,
# H = I = 2048, on a 78-SM GPU (likely H20).
INDEPENDENT_BF16 = {"FlashMoE": 3.93, "Meg-TE": 4.03, "SGLang": 4.90}
# DeepEP README: H800 (NVLink ~160 GB/s per direction) + CX7 400 Gb/s, H 7168, top-8 of 256,
# FP8 dispatch / BF16 combine. V1 normal kernels, EP8 over NVLink, 4096 tokens, top-4 groups:
# GB/s (dispatch, combine). V1 low-latency kernels, EP8, 128 tokens: us (dispatch, combine).
DEEPEP_NORMAL_GBPS, DEEPEP_LL_US = (153, 158), (77, 114)
COLUMNS = ("FlashMoE", "Meg-TE", "Meg-CUTLASS", "FasterMoE")


def published(config: MoEConfig, T: int) -> dict:
    """The paper's FlashMoE (fp32) on fp32 rows, its 16-bit baselines on bf16 rows, and the
    independent bf16 run (marked *) on its row."""
    if (config.hidden_size, config.intermediate_size, config.top_k, config.gated) != (2048, 2048, 2, False):
        return {}
    paper = PAPER.get((config.num_experts, T), {})
    if config.dtype == "float32":
        return {"FlashMoE": paper["FlashMoE"]} if paper else {}
    out = {name: v for name, v in paper.items() if name != "FlashMoE"}
    if (config.num_experts, T) == (32, 8192):
        out["FlashMoE"] = f"{INDEPENDENT_BF16['FlashMoE']}*"
    return out
