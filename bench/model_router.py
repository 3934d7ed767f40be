"""The router's part of bench/model_ep.py: one rank's routing time, from the kernel's split of the
work over its blocks and rates fitted to the committed H200 traces."""

from __future__ import annotations

import math

from flashmoe.config import MoEConfig
from flashmoe.host.plan import CHUNK_TOKENS

# The router of commit 446305b (now flashmoe/device/roles/logits.cuh and router.cuh), from its
# kernel traces (results/layer_nvidia-h200_20261130-164405_*.trace.json.gz; tests/test_model_ep.py
# holds the model to them). Its logits were bound by the shared-memory reads of the busiest block
# (Qwen3 at 4096 tokens: 64-token x 128-row tiles, 3072 reads per k over K = 2048 in 290.7 us;
# Mixtral at 4096: 4-row slices, 512 per k over K = 4096 in 102.4 us), or, for a few tokens, by
# one block streaming its chunk's x (Qwen3 at 128 tokens: 256 KB in 44.6 us; Mixtral: 512 KB in
# 80.2 us). Selection (scores, top-k, counts) then takes a chunk's block a time linear in E (Qwen3,
# E = 128: 81.8 us at 4096 tokens, 104.7 at 128; Mixtral, E = 8: 16.0 and 20.7). The later router
# (eight staging loads in flight, selection from shared memory, k-major tiles bound by their FMAs,
# 64-row halves) is not modelled until its traces refit it: x, tiles and selection high.
ROUTER_SMEM_READS_PER_NS = 21.06    # per SM, the mean of the two prefill rows
ROUTER_X_GBPS = 6.21                # per SM, the mean of the two decode rows
ROUTER_SELECT_US = (13.35, 0.624)   # per chunk: a + b E, through the means at E = 8 and E = 128
ROUTER_PASS_ROWS, ROUTER_TILE_READS = 128, 64 * 128 // 32 * 12   # 446305b: a tile's rows, its reads per k


def route_s(config: MoEConfig, tokens: int, blocks: int, threads: int) -> tuple[float, float]:
    """(logits, selection) seconds of one rank's routing, 446305b's kernel's way: with at
    least as many 64-token chunks as blocks, each block its chunks' 128-row passes; with fewer,
    every block a share first (spread_logits: row slices or 128-row tiles, whichever gives the
    busiest block fewer shared-memory reads), then each chunk's block selects."""
    rows = config.num_experts + (1 if config.shared_expert_gate else 0)
    H, b = config.hidden_size, 4 if config.dtype == "float32" else 2
    chunks, ntok = math.ceil(tokens / CHUNK_TOKENS), min(tokens, CHUNK_TOKENS)
    passes = math.ceil(rows / ROUTER_PASS_ROWS)
    items = math.ceil(chunks / blocks) * passes if chunks >= blocks else math.ceil(chunks * passes / blocks)
    reads = items * ROUTER_TILE_READS       # the busiest block's, per k
    if chunks < blocks:
        ne = max(1, min(ROUTER_PASS_ROWS, threads // ntok, math.ceil(rows * chunks / blocks)))
        slices = math.ceil(rows / ne)
        slice_reads = math.ceil(chunks * slices / blocks) * ntok * ne * 2
        if slice_reads <= reads:
            items, reads = math.ceil(chunks * slices / blocks), slice_reads
    logits = max(reads * H / ROUTER_SMEM_READS_PER_NS * 1e-9, items * ntok * H * b / (ROUTER_X_GBPS * 1e9))
    a, per_expert = ROUTER_SELECT_US
    return logits, math.ceil(chunks / blocks) * (a + per_expert * config.num_experts) * 1e-6
