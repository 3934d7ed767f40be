"""Plain-torch baselines on the layer's own weights: what a torch user writes without flashmoe.

``torch_loop``  router, then one expert at a time: index_select its rows, two matmuls,
                weight, index_add into the output (bf16 throughout, as transformers' eager
                experts do).
``bulk_sync``   expert parallelism the bulk-synchronous way, on one GPU: W source ranks route
                their tokens, gather rows into per-destination-rank / per-expert contiguous
                send buffers, an all-to-all (here a device copy into receive buffers), a grouped
                GEMM per destination rank, the all-to-all back and the weighted combine. On one
                GPU the all-to-alls are HBM copies, faster than NVLink, so this baseline is
                an optimistic stand-in for the multi-GPU one.
Both route with an fp32 router (fp32 logits, softmax or sigmoid, top-k, renormalise, scale) as
flashmoe does, so their routing matches the reference and their error measures expert math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashmoe import reference
from flashmoe.config import MoEConfig
from flashmoe.host.backend import split_tokens
from flashmoe.reference import MoEWeights, Routing


def torch_router(x2d: torch.Tensor, w: MoEWeights, config: MoEConfig) -> Routing:
    """The router a torch user writes. Group-limited routing or a selection bias (not in the
    benchmarked layers) go through ``flashmoe.reference.route`` instead."""
    if config.n_group > 1 or config.selection_bias or config.capacity_factor is not None:
        return reference.route(x2d, w, config)
    logits = F.linear(x2d.float(), w.router_weight.float())
    scores = reference.router_scores(logits, config.scoring)
    weights, ids = torch.topk(scores, config.top_k, dim=-1)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * config.routed_scaling_factor
    return Routing(ids=ids, weights=weights, kept=torch.ones_like(ids, dtype=torch.bool))


def _mlp_tail(h: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    return reference._activate(h, config)       # act(gate) * up, act, or a clamped SwiGLU, in h's dtype


def torch_loop(x2d: torch.Tensor, w: MoEWeights, config: MoEConfig, routing: Routing | None = None):
    """out[T, H] in x's dtype. One host sync (the per-expert counts) per forward."""
    if config.num_shared_experts:
        raise NotImplementedError("torch_loop covers routed experts only")
    routing = routing or torch_router(x2d, w, config)
    k = config.top_k
    flat = routing.ids.reshape(-1)
    order = torch.argsort(flat, stable=True)             # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=config.num_experts).tolist()
    slot_weight = routing.weights.reshape(-1)
    out = torch.zeros_like(x2d)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tokens = pairs // k
        h = _mlp_tail(x2d.index_select(0, tokens) @ w.gate_up_proj[e].t(), config)
        y = (h @ w.down_proj[e].t()) * slot_weight[pairs, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def grouped_mm(a: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a[S, K] times weight[G, N, K]^T per group of rows (``offs``: int32 ends of the groups),
    as transformers' grouped_mm experts call it; a loop where torch has no grouped GEMM."""
    wt = weight.transpose(-2, -1)
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(a, wt, offs=offs)
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(a, wt, offs=offs)
    out = a.new_empty(a.shape[0], weight.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ weight[g].t()
        start = end
    return out


def bulk_sync(x2d: torch.Tensor, w: MoEWeights, config: MoEConfig, world: int,
              routing: Routing | None = None) -> torch.Tensor:
    """out[T, H]: the bulk-synchronous expert-parallel forward of W ranks, run on one GPU.

    Tokens are split over source ranks as flashmoe's virtual ranks split them; experts over
    destination ranks in contiguous blocks of E / W. Every phase finishes for all ranks before
    the next starts, which is what "bulk-synchronous" means here."""
    if config.num_shared_experts:
        raise NotImplementedError("bulk_sync covers routed experts only")
    T, H = x2d.shape
    E, k = config.num_experts, config.top_k
    per_rank = E // world
    routing = routing or torch_router(x2d, w, config)
    dev = x2d.device
    sizes = torch.tensor(split_tokens(T, world), device=dev)
    src_of_token = torch.repeat_interleave(torch.arange(world, device=dev), sizes, output_size=T)
    pair_expert = routing.ids.reshape(-1)
    pair_token = torch.arange(T * k, device=dev) // k
    pair_src = src_of_token[pair_token]

    # 1. Dispatch: each source rank packs its rows by (destination rank, expert). Experts are
    #    numbered rank-major, so ordering by (src, expert) is ordering by (src, dst, expert).
    send_order = torch.argsort(pair_src * E + pair_expert, stable=True)
    send = x2d.index_select(0, pair_token[send_order])
    send_expert, send_src = pair_expert[send_order], pair_src[send_order]
    # 2. All-to-all: destination d receives [src 0 .. W-1] segments, each still expert-packed.
    #    The split sizes a real all_to_all_single needs on the host: the one sync per forward.
    counts = torch.bincount(pair_expert, minlength=E)
    rows_per_rank = counts.view(world, per_rank).sum(dim=1).tolist()
    recv_order = torch.argsort((send_expert // per_rank) * world + send_src, stable=True)
    recv = send.index_select(0, recv_order)
    # 3. Each destination rank sorts its rows by local expert and runs two grouped GEMMs.
    expert_order = torch.argsort(send_expert[recv_order], stable=True)
    rows = recv.index_select(0, expert_order)
    offs = torch.cumsum(counts.view(world, per_rank), dim=1).to(torch.int32)
    y = torch.empty_like(rows)
    start = 0
    for d, n in enumerate(rows_per_rank):
        if n == 0:
            continue
        mine = slice(d * per_rank, (d + 1) * per_rank)
        h = _mlp_tail(grouped_mm(rows[start:start + n], w.gate_up_proj[mine], offs[d]), config)
        y[start:start + n] = grouped_mm(h, w.down_proj[mine], offs[d])
        start += n
    # 4. All-to-all back: undo the expert sort, the exchange and the packing, each a copy.
    back = torch.empty_like(y).index_copy_(0, expert_order, y)
    back = torch.empty_like(back).index_copy_(0, recv_order, back)
    pairs = torch.empty_like(back).index_copy_(0, send_order, back)
    # 5. Combine: weighted sum of each token's k outputs in fp32, rounded once.
    weighted = pairs.view(T, k, H).float() * routing.weights.float().unsqueeze(-1)
    return weighted.sum(dim=1).to(x2d.dtype)
