"""The contract: what a flashmoe layer computes, in plain torch. Also the CPU backend.

The GPU kernel must match this module; every kernel test compares against it.

Routing (always fp32)
    logits  = fp32(x) @ fp32(W_router)^T                               [T, E]
    scores  = softmax(logits) or sigmoid(logits)
    select  = scores + bias            (selection bias: chooses experts, never weighs them)
    groups  (n_group > 1): a group's score is the sum of its two best ``select`` values
            ('top2_sum', DeepSeek-V3) or its best ('max', DeepSeek-V2); only the best
            ``topk_group`` groups stay eligible
    ids     = the k best eligible experts by ``select``, best first; ties go to the lower expert
            index (and to the lower group index when choosing groups), so routing is deterministic
    weights = scores[ids]; divided by (their sum + 1e-20) if norm_topk_prob; times
            routed_scaling_factor

Capacity (capacity_factor set)
    Each expert keeps at most C = ceil(cf * T_total * k / E) of its (token, slot) pairs: the ones
    with the highest routing weight, ties to the lower token index (over all ranks' tokens, in
    rank order). A NaN weight ranks lowest. A dropped pair contributes nothing.

Experts (weights in the transformers 5 layout)
    gated:  h = act(x @ gate^T) * (x @ up^T)  with gate_up_proj[e] = [gate; up], shape [2I, H]
    plain:  h = act(x @ W1^T)                 with gate_up_proj[e] = W1, shape [I, H]
    y = h @ down_proj[e]^T                    down_proj[e] has shape [H, I]
    The shared experts are one MLP of width ``num_shared_experts * shared_intermediate_size``
    applied to every token, optionally scaled by sigmoid(fp32(x) @ w_shared_gate^T).

Combine
    out[t] = sum_j weights[t, j] * y_{ids[t, j]}(x[t])  (+ gate[t] * shared(x[t]))
    accumulated in fp32 in slot order j = 0..k-1, shared last, then rounded once to the dtype.

Precision (``math=``)
    'contract'  what the kernel does: fp32 arithmetic on dtype operands, with h and each
                expert's output y rounded to the dtype (h feeds GEMM1 in the dtype, y travels
                back to the token's rank in the dtype). For float32 inputs the expert GEMMs
                use TF32 operands (rounded to nearest), as the kernel's tensor cores do.
    'fp32'      the same formula with no rounding at all and fp32 output: the ideal result
                errors are measured against.
    'native'    what a torch user gets in the dtype: matmuls, activation, weighting and the
                sum all in the dtype (TF32 operands for float32), as transformers' experts do.
                ``flashmoe.accuracy`` compares the kernel's error with this one's.
Routing is identical in all three, so they differ only by rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import MoEConfig

MATH_MODES = ("contract", "fp32", "native")


@dataclass
class MoEWeights:
    """The tensors a layer computes with (shapes for E experts, H hidden, I intermediate)."""

    router_weight: torch.Tensor                     # [E, H] fp32
    gate_up_proj: torch.Tensor                      # [E, 2I or I, H] dtype
    down_proj: torch.Tensor                         # [E, H, I] dtype
    selection_bias: torch.Tensor | None = None      # [E] fp32
    shared_gate_up_proj: torch.Tensor | None = None  # [2Is or Is, H] dtype
    shared_down_proj: torch.Tensor | None = None    # [H, Is] dtype
    shared_gate_weight: torch.Tensor | None = None  # [1, H] fp32


@dataclass
class Routing:
    """What the router decided for T tokens."""

    ids: torch.Tensor            # [T, k] int64, best first
    weights: torch.Tensor        # [T, k] fp32 combine weights
    kept: torch.Tensor           # [T, k] bool; all True when dropless
    shared_gate: torch.Tensor | None = None   # [T] fp32 when the shared expert is gated
    logits: torch.Tensor | None = None        # [T, E] fp32


def router_logits(x2d: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    return x2d.float() @ router_weight.float().t()


def _topk_stable(values: torch.Tensor, k: int):
    """Top-k along the last dim, best first, ties to the lower index (torch.topk leaves ties open)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]
    return values.gather(-1, order), order


def route(x2d: torch.Tensor, weights: MoEWeights, config: MoEConfig,
          token_index: torch.Tensor | None = None, num_tokens_total: int | None = None) -> Routing:
    """Route T tokens. ``token_index`` / ``num_tokens_total`` place them among all ranks' tokens
    for the capacity ranking (default: these tokens are all there is, in order)."""
    logits = router_logits(x2d, weights.router_weight)
    scores = torch.softmax(logits, dim=-1) if config.scoring == "softmax" else torch.sigmoid(logits)
    select = scores
    if config.selection_bias:
        if weights.selection_bias is None:
            raise ValueError("config.selection_bias=True but no selection_bias tensor was given")
        select = scores + weights.selection_bias.float()
    if config.n_group > 1:
        t = select.shape[0]
        grouped = select.view(t, config.n_group, config.num_experts // config.n_group)
        if config.group_score == "top2_sum":
            group_scores = _topk_stable(grouped, 2)[0].sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        best_groups = _topk_stable(group_scores, config.topk_group)[1]
        eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        eligible = eligible.repeat_interleave(config.num_experts // config.n_group, dim=1)
        select = select.masked_fill(~eligible, float("-inf"))
    _, ids = _topk_stable(select, config.top_k)
    w = scores.gather(1, ids)
    if config.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * config.routed_scaling_factor

    shared_gate = None
    if config.shared_expert_gate:
        if weights.shared_gate_weight is None:
            raise ValueError("config.shared_expert_gate=True but no shared_gate_weight was given")
        shared_gate = torch.sigmoid(x2d.float() @ weights.shared_gate_weight.float().t()).squeeze(-1)

    if token_index is None:
        token_index = torch.arange(x2d.shape[0], device=x2d.device)
    if num_tokens_total is None:
        num_tokens_total = x2d.shape[0]
    kept = capacity_keep(ids, w, config, token_index, num_tokens_total)
    return Routing(ids=ids, weights=w, kept=kept, shared_gate=shared_gate, logits=logits)


def capacity_keep(ids: torch.Tensor, w: torch.Tensor, config: MoEConfig,
                  token_index: torch.Tensor, num_tokens_total: int) -> torch.Tensor:
    """[T, k] mask of the (token, slot) pairs each expert keeps under the capacity rule."""
    capacity = config.capacity(num_tokens_total)
    if capacity is None:
        return torch.ones_like(ids, dtype=torch.bool)
    k = ids.shape[1]
    expert = ids.reshape(-1)
    priority = torch.nan_to_num(w.reshape(-1).float(), nan=float("-inf"))
    token = token_index.reshape(-1, 1).expand(-1, k).reshape(-1)
    # Successive stable sorts: by token, then by priority (descending), then by expert. The
    # result is grouped by expert, best priority first, ties in token order.
    order = torch.argsort(token, stable=True)
    order = order[torch.argsort(priority[order], descending=True, stable=True)]
    order = order[torch.argsort(expert[order], stable=True)]
    sorted_expert = expert[order]
    first = torch.searchsorted(sorted_expert, sorted_expert, right=False)
    rank_in_expert = torch.arange(order.numel(), device=ids.device) - first
    kept = torch.empty_like(expert, dtype=torch.bool)
    kept[order] = rank_in_expert < capacity
    return kept.view_as(ids)


def activation(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "relu":
        return F.relu(h)
    raise ValueError(f"activation={name!r}")


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 explicit mantissa bits), nearest with ties away from zero."""
    bits = t.float().contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    # Keep NaN/Inf as they are (the add would carry into the exponent of a NaN payload).
    return torch.where(torch.isfinite(t), rounded, t.float())


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, config: MoEConfig,
               math: str = "contract") -> torch.Tensor:
    """One expert (or the fused shared MLP) on rows ``x`` [n, H]. Returns [n, H]: fp32 for
    math='fp32', else the dtype of ``x``."""
    dtype = x.dtype
    tf32 = dtype == torch.float32 and math != "fp32"
    if math == "native" and dtype != torch.float32:
        h = x @ gate_up.t()
        if config.gated:
            g, u = h.chunk(2, dim=-1)
            h = activation(g, config.activation) * u
        else:
            h = activation(h, config.activation)
        return h @ down.t()
    operand = _tf32 if tf32 else (lambda t: t.float())
    h = operand(x) @ operand(gate_up).t()
    if config.gated:
        g, u = h.chunk(2, dim=-1)
        h = activation(g, config.activation) * u
    else:
        h = activation(h, config.activation)
    if math == "fp32":
        return h @ down.float().t()
    h = h.to(dtype)
    return (operand(h) @ operand(down).t()).to(dtype)


def moe_forward(x: torch.Tensor, weights: MoEWeights, config: MoEConfig, math: str = "contract",
                routing: Routing | None = None) -> torch.Tensor:
    """The layer's forward on ``x[..., H]``. ``routing`` overrides the router (tests feed the
    kernel's own routing back to compare expert math without near-tie routing flips)."""
    if math not in MATH_MODES:
        raise ValueError(f"math={math!r}: allowed are {', '.join(MATH_MODES)}")
    lead, hidden = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, hidden)
    if routing is None:
        routing = route(x2d, weights, config)
    acc_dtype = x.dtype if math == "native" else torch.float32
    t = x2d.shape[0]

    # y[t, j]: the output of token t's j-th expert; computed expert by expert.
    y = torch.zeros(t, config.top_k, hidden, dtype=acc_dtype, device=x.device)
    live = routing.kept
    for e in torch.unique(routing.ids[live]).tolist():
        tok, slot = torch.nonzero((routing.ids == e) & live, as_tuple=True)
        y[tok, slot] = expert_mlp(x2d[tok], weights.gate_up_proj[e], weights.down_proj[e], config,
                                  math).to(acc_dtype)
    shared = None
    if config.num_shared_experts:
        shared = expert_mlp(x2d, weights.shared_gate_up_proj, weights.shared_down_proj, config, math)
    return combine(y, shared, routing, math, x.dtype).reshape(*lead, hidden)


def combine(y: torch.Tensor, shared: torch.Tensor | None, routing: Routing, math: str,
            dtype: torch.dtype) -> torch.Tensor:
    """The combine step on expert outputs ``y[T, k, H]`` and the shared output ``shared[T, H]``
    (or None): sum of the kept slots' weighted outputs in slot order, shared last, rounded once.
    ``dtype`` is the input's dtype. Shared here so the expert-parallel path (flashmoe.distributed)
    combines in exactly the same order as the single-process one."""
    acc_dtype = dtype if math == "native" else torch.float32
    out_dtype = torch.float32 if math == "fp32" else dtype
    y = y.to(acc_dtype)
    live = routing.kept
    w = routing.weights.to(acc_dtype)
    out = torch.zeros(y.shape[0], y.shape[2], dtype=acc_dtype, device=y.device)
    for j in range(y.shape[1]):                 # fixed slot order
        out = out + torch.where(live[:, j:j + 1], w[:, j:j + 1] * y[:, j], 0)
    if shared is not None:
        shared = shared.to(acc_dtype)
        if routing.shared_gate is not None:
            shared = routing.shared_gate.to(acc_dtype)[:, None] * shared
        out = out + shared
    return out.to(out_dtype)
