"""The contract: what a flashmoe layer computes, in plain torch. Also the CPU backend.

The GPU kernel must match this module; every kernel test compares against it.

Routing (always fp32)
    logits  = fp32(x) @ fp32(W_router)^T  (+ router_bias)              [T, E + Z]
            (Z = identity_experts, usually 0: routing scores and chooses among all E + Z)
    scores  = softmax(logits), sigmoid(logits) or sqrt(softplus(logits))
    select  = scores + bias            (selection bias: chooses experts, never weighs them)
    groups  (n_group > 1): a group's score is the sum of its two best ``select`` values
            ('top2_sum', DeepSeek-V3) or its best ('max', DeepSeek-V2); only the best
            ``topk_group`` groups stay eligible
    ids     = the k best eligible experts by ``select``, best first; ties go to the lower expert
            index (and to the lower group index when choosing groups), so routing is deterministic
    weights = scores[ids]; divided by (their sum + norm_topk_epsilon, default 1e-20) if
            norm_topk_prob; times routed_scaling_factor

Capacity (capacity_factor set)
    Each expert keeps at most C = ceil(cf * T_total * k / E) of its (token, slot) pairs: the ones
    with the highest routing weight, ties to the lower token index (over all ranks' tokens, in
    rank order). A NaN weight ranks lowest. A dropped pair contributes nothing.

Experts (weights in the transformers 5 layout)
    gated:  h = act(x @ gate^T) * (x @ up^T)  with gate_up_proj[e] = [gate; up], shape [2I, H]
    plain:  h = act(x @ W1^T)                 with gate_up_proj[e] = W1, shape [I, H]
    y = h @ down_proj[e]^T                    down_proj[e] has shape [H, I]
    expert_bias: gate_up_bias[e] is added to x @ [gate; up]^T (or x @ W1^T) and down_bias[e]
            to y, each in the precision of its projection's result before rounding
    'swiglu_clamped' (gated): g = min(x @ gate^T, limit), u = clamp(x @ up^T, -limit, limit),
            h = g * sigmoid(alpha * g) * (u + 1); 'silu_clamped' (gated): h = silu(g) * u
    scale_expert_input: the routing weight scales the expert's input, not its output: expert
            ids[t, j]'s first projection is weights[t, j] * (x[t] @ gate_up^T), before its bias
            and in that result's precision (= (weights[t, j] * x[t]) @ gate_up^T, one rounding
            fewer; 'native' scales x[t] in the dtype, as transformers does), and its output is
            combined with weight 1
    identity experts (identity_experts = Z > 0): y_e(x) = x for e = E .. E + Z - 1, the token's
            own row in the dtype; no computation, weighed and summed in its slot like any expert's
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
    'mixed'     the CPU/GPU backend's fast path: the contract, with each expert GEMM a torch
                matmul in the dtype (fp32 accumulation inside the GEMM; its result rounded to
                the dtype) where torch has a fast one (bfloat16 everywhere, float16 on CUDA
                and for a few rows on a CPU; elsewhere the operands go to fp32). Activation, weighting and the sum stay
                fp32, rounded once. For float32 it is 'fp32' exactly.
Routing is identical in all four, so they differ only by rounding. Autocast never applies: the
router is fp32 and the experts compute in the dtype of their operands.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import GATED_ONLY_ACTIVATIONS, MoEConfig
from .fast_matmul import fast_matmul_dtype, grouped_mm_serves

MATH_MODES = ("contract", "fp32", "native", "mixed")


@dataclass
class MoEWeights:
    """The tensors a layer computes with (shapes for E experts, H hidden, I intermediate)."""

    router_weight: torch.Tensor                     # [E + Z, H] fp32 (Z identity experts)
    gate_up_proj: torch.Tensor                      # [E, 2I or I, H] dtype
    down_proj: torch.Tensor                         # [E, H, I] dtype
    selection_bias: torch.Tensor | None = None      # [E + Z] fp32
    shared_gate_up_proj: torch.Tensor | None = None  # [2Is or Is, H] dtype
    shared_down_proj: torch.Tensor | None = None    # [H, Is] dtype
    shared_gate_weight: torch.Tensor | None = None  # [1, H] fp32
    router_bias: torch.Tensor | None = None         # [E + Z] fp32, added to the router logits
    gate_up_bias: torch.Tensor | None = None        # [E, 2I or I] dtype
    down_bias: torch.Tensor | None = None           # [E, H] dtype


@dataclass
class Routing:
    """What the router decided for T tokens."""

    ids: torch.Tensor            # [T, k] int64, best first (E and above: identity experts)
    weights: torch.Tensor        # [T, k] fp32 combine weights
    kept: torch.Tensor           # [T, k] bool; all True when dropless
    shared_gate: torch.Tensor | None = None   # [T] fp32 when the shared expert is gated
    logits: torch.Tensor | None = None        # [T, E + Z] fp32


def router_logits(x2d: torch.Tensor, router_weight: torch.Tensor,
                  router_bias: torch.Tensor | None = None) -> torch.Tensor:
    logits = x2d.float() @ router_weight.float().t()
    return logits if router_bias is None else logits + router_bias.float()


def router_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """The scores [T, E + Z] of fp32 router logits under ``scoring`` (MoEConfig.scoring)."""
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    return torch.sigmoid(logits) if scoring == "sigmoid" else F.softplus(logits).sqrt()


def _topk_stable(values: torch.Tensor, k: int):
    """Top-k along the last dim, best first, ties to the lower index (torch.topk leaves ties open)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]
    return values.gather(-1, order), order


def route(x2d: torch.Tensor, weights: MoEWeights, config: MoEConfig,
          token_index: torch.Tensor | None = None, num_tokens_total: int | None = None) -> Routing:
    """Route T tokens. ``token_index`` / ``num_tokens_total`` place them among all ranks' tokens
    for the capacity ranking (default: these tokens are all there is, in order)."""
    with no_autocast(x2d.device):
        return _route(x2d, weights, config, token_index, num_tokens_total)


def no_autocast(device: torch.device):
    """A context where autocast is off on ``device``: the router is fp32 by contract, and a
    matmul that autocast recasts would no longer compute what this module defines."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _route(x2d, weights, config, token_index, num_tokens_total) -> Routing:
    if config.router_bias and weights.router_bias is None:
        raise ValueError("config.router_bias=True but no router_bias tensor was given")
    logits = router_logits(x2d, weights.router_weight,
                           weights.router_bias if config.router_bias else None)
    scores = router_scores(logits, config.scoring)
    select = scores
    if config.selection_bias:
        if weights.selection_bias is None:
            raise ValueError("config.selection_bias=True but no selection_bias tensor was given")
        select = scores + weights.selection_bias.float()
    if config.n_group > 1:
        t = select.shape[0]
        grouped = select.view(t, config.n_group, config.router_experts // config.n_group)
        if config.group_score == "top2_sum":
            group_scores = _topk_stable(grouped, 2)[0].sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        best_groups = _topk_stable(group_scores, config.topk_group)[1]
        eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        eligible = eligible.repeat_interleave(config.router_experts // config.n_group, dim=1)
        select = select.masked_fill(~eligible, float("-inf"))
    _, ids = _topk_stable(select, config.top_k)
    w = scores.gather(1, ids)
    if config.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + config.norm_topk_epsilon)
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


def activation(h: torch.Tensor, name: str, inplace: bool = False, *, alpha: float = 1.702,
               limit: float = 7.0) -> torch.Tensor:
    """act(h); ``inplace`` overwrites h where torch has an in-place form (silu, relu).

    For the clamped SwiGLUs (gated only) this is the gate half, ``g * sigmoid(alpha * g)``
    ('swiglu_clamped') or ``silu(g)`` ('silu_clamped') with g = min(h, limit); ``_activate``
    applies the up half's clamp (and offset)."""
    if name in GATED_ONLY_ACTIVATIONS:
        g = h.clamp(max=limit)
        return g * torch.sigmoid(g * alpha) if name == "swiglu_clamped" else F.silu(g)
    if name == "silu":
        return F.silu(h, inplace=inplace)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "relu":
        return F.relu(h, inplace=inplace)
    raise ValueError(f"activation={name!r}")


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 explicit mantissa bits), nearest with ties away from zero."""
    bits = t.float().contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    # Keep NaN/Inf as they are (the add would carry into the exponent of a NaN payload).
    return torch.where(torch.isfinite(t), rounded, t.float())


def _activate(h: torch.Tensor, config: MoEConfig, dtype: torch.dtype | None = None) -> torch.Tensor:
    """act(gate) * up for a gated expert (h = [gate, up] along the last dim), else act(h);
    computed in ``dtype`` (default h's). The product promotes the up half in the same pass
    instead of a separate copy, and runs in place unless autograd records it (a fresh output
    costs more than the multiplication)."""
    recording = torch.is_grad_enabled() and h.requires_grad
    if config.activation in GATED_ONLY_ACTIVATIONS:
        return _swiglu_clamped(h, config, dtype)
    if config.gated:
        g, u = h.chunk(2, dim=-1)
        fresh = dtype is not None and dtype != g.dtype      # g.to(dtype) is then a new tensor
        a = activation(g.to(dtype or g.dtype), config.activation, inplace=fresh and not recording)
        return a * u if recording else a.mul_(u)
    return activation(h.to(dtype or h.dtype), config.activation)


def _swiglu_clamped(h: torch.Tensor, config: MoEConfig, dtype: torch.dtype | None) -> torch.Tensor:
    """A clamped SwiGLU on h = [gate, up]: act(gate) * (clamp(up, -limit, limit) + 1) (GPT-OSS's
    'swiglu_clamped') or act(gate) * clamp(up, -limit, limit) ('silu_clamped'), act as in
    ``activation``; computed in ``dtype`` (default h's)."""
    g, u = h.chunk(2, dim=-1)
    dtype = dtype or g.dtype
    limit = config.swiglu_limit
    a = activation(g.to(dtype), config.activation, alpha=config.swiglu_alpha, limit=limit)
    u = u.to(dtype).clamp(-limit, limit)
    return a * (u + 1 if config.activation == "swiglu_clamped" else u)


def _add_bias(t: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t + bias (broadcast over rows), in ``dtype`` (default t's); t itself when there is none."""
    if bias is None:
        return t if dtype is None else t.to(dtype)
    dtype = dtype or t.dtype
    return t.to(dtype) + bias.to(dtype)


def _scale_rows(t: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """t's rows times ``scale`` [n] (fp32) in fp32; t itself when there is none."""
    return t if scale is None else t.float() * scale[:, None]


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, config: MoEConfig,
               math: str = "contract", gate_up_bias: torch.Tensor | None = None,
               down_bias: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """One expert (or the fused shared MLP) on rows ``x`` [n, H]. Returns [n, H]: fp32 for
    math='fp32', else the dtype of ``x``. ``gate_up_bias`` [2I or I] and ``down_bias`` [H]
    (the expert's own biases, config.expert_bias) are added after their projection, in the
    precision that projection's result has before it is rounded. ``scale`` [n] (fp32; the
    rows' routing weights with config.scale_expert_input, else None) multiplies the first
    projection's rows before its bias (math='native' in bf16 or fp16: the rows of x, in the
    dtype, as transformers does)."""
    dtype = x.dtype
    if math == "mixed":
        fast = fast_matmul_dtype(dtype, x.device, x.shape[0])
        pre = _add_bias(_scale_rows(x.to(fast) @ gate_up.to(fast).t(), scale), gate_up_bias,
                        None if gate_up_bias is None else torch.float32)
        h = _activate(pre, config, torch.float32).to(dtype)
        y = h.to(fast) @ down.to(fast).t()
        return _add_bias(y, down_bias, None if down_bias is None else torch.float32).to(dtype)
    tf32 = dtype == torch.float32 and math != "fp32"
    if math == "native" and dtype != torch.float32:
        if scale is not None:
            x = x * scale.to(dtype)[:, None]
        h = _activate(_add_bias(x @ gate_up.t(), gate_up_bias), config)
        return _add_bias(h @ down.t(), down_bias)
    operand = _tf32 if tf32 else (lambda t: t.float())
    h = _activate(_add_bias(_scale_rows(operand(x) @ operand(gate_up).t(), scale), gate_up_bias), config)
    if math == "fp32":
        return _add_bias(h @ down.float().t(), down_bias)
    h = h.to(dtype)
    return _add_bias(operand(h) @ operand(down).t(), down_bias).to(dtype)


def moe_forward(x: torch.Tensor, weights: MoEWeights, config: MoEConfig, math: str = "contract",
                routing: Routing | None = None) -> torch.Tensor:
    """The layer's forward on ``x[..., H]``. ``routing`` overrides the router (tests feed the
    kernel's own routing back to compare expert math without near-tie routing flips)."""
    if math not in MATH_MODES:
        raise ValueError(f"math={math!r}: allowed are {', '.join(MATH_MODES)}")
    lead, hidden = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, hidden)
    with no_autocast(x.device):
        if routing is None:
            routing = route(x2d, weights, config)
        biases = (weights.gate_up_bias, weights.down_bias) if config.expert_bias else (None, None)
        tok, slot, y = routed_experts(x2d, routing, weights.gate_up_proj, weights.down_proj,
                                      config, math, *biases)
        tok, slot, y = with_identity(x2d, routing, config, tok, slot, y)
        shared = None
        if config.num_shared_experts:
            shared = expert_mlp(x2d, weights.shared_gate_up_proj, weights.shared_down_proj,
                                config, math)
        return combine(tok, slot, y, shared, combine_routing(routing, config), math,
                       x.dtype).reshape(*lead, hidden)


def experts_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    gate_up: torch.Tensor, down: torch.Tensor, config: MoEConfig,
                    math: str = "contract", gate_up_bias: torch.Tensor | None = None,
                    down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The experts and combine with the routing given: token t goes to experts
    ``topk_ids[t, j]`` with weights ``topk_weights[t, j]`` (an id outside 0..E-1 marks "no
    expert" and is skipped; an expert named twice by one token runs once, in its first slot,
    with the weights summed in slot order); ``x[T, H]`` -> [T, H]. Of the config only the
    expert math is read (gated, the activation and its constants, scale_expert_input); E, H, I
    come from the tensors, and the biases [E, 2I or I], [E, H] are given or None."""
    if math not in MATH_MODES:
        raise ValueError(f"math={math!r}: allowed are {', '.join(MATH_MODES)}")
    routing = given_routing(topk_ids, topk_weights, gate_up.shape[0])
    with no_autocast(x.device):
        tok, slot, y = routed_experts(x, routing, gate_up, down, config, math, gate_up_bias, down_bias)
        return combine(tok, slot, y, None, combine_routing(routing, config), math, x.dtype)


def given_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> Routing:
    """A caller's (ids, weights) as a Routing: slots with an id outside 0..E-1 and repeats of
    an earlier slot's expert are not kept; a repeat's weight is added to the first slot's."""
    live = (topk_ids >= 0) & (topk_ids < num_experts)
    ids = torch.where(live, topk_ids, 0).long()
    weights = torch.where(live, topk_weights.float(), 0.0)
    kept = live.clone()
    for j in range(1, ids.shape[-1]):
        for i in range(j):
            repeat = kept[..., j] & kept[..., i] & (ids[..., j] == ids[..., i])
            weights[..., i] = weights[..., i] + torch.where(repeat, weights[..., j], 0.0)
            kept[..., j] &= ~repeat
    return Routing(ids=ids, weights=torch.where(kept, weights, 0.0), kept=kept)


def routed_experts(x2d: torch.Tensor, routing: Routing, gate_up: torch.Tensor, down: torch.Tensor,
                   config: MoEConfig, math: str, gate_up_bias: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None):
    """(tok, slot, y): every kept (token, slot) pair and its expert's output ``y[n]`` (with
    config.scale_expert_input, on its input scaled by the routing weight, so ``combine_routing``
    then gives 1)."""
    tok, slot, rows = expert_rows(routing, gate_up.shape[0])
    return tok, slot, run_experts(x2d[tok], rows, gate_up, down, config, math, gate_up_bias, down_bias,
                                  expert_scale(tok, slot, routing, config))


def with_identity(x2d: torch.Tensor, routing: Routing, config: MoEConfig, tok: torch.Tensor,
                  slot: torch.Tensor, y: torch.Tensor):
    """(tok, slot, y) of the routed experts' pairs, with the kept pairs that chose an identity
    expert (id >= E) added: their output is the token's row of ``x2d`` itself."""
    if not config.identity_experts:
        return tok, slot, y
    t_id, s_id = torch.nonzero(routing.kept & (routing.ids >= config.num_experts), as_tuple=True)
    return torch.cat([tok, t_id]), torch.cat([slot, s_id]), torch.cat([y, x2d[t_id].to(y.dtype)])


def expert_scale(tok: torch.Tensor, slot: torch.Tensor, routing: Routing, config: MoEConfig) -> torch.Tensor | None:
    """The ``scale`` of ``run_experts`` for the pairs (tok[n], slot[n]): with
    config.scale_expert_input their routing weights in fp32, else None."""
    return routing.weights[tok, slot].float() if config.scale_expert_input else None


def combine_routing(routing: Routing, config: MoEConfig) -> Routing:
    """The routing ``combine`` weighs the expert outputs with: ``routing`` itself, or with
    config.scale_expert_input (the weight already scaled the input) weights of 1."""
    if not config.scale_expert_input:
        return routing
    return Routing(ids=routing.ids, weights=torch.ones_like(routing.weights), kept=routing.kept,
                   shared_gate=routing.shared_gate, logits=routing.logits)


def expert_rows(routing: Routing, num_experts: int):
    """The kept (token, slot) pairs of experts 0..E-1 (not the identity experts past them)
    grouped by expert, tokens in order within an expert: (tok, slot, rows), ``rows[e]`` the
    number of pairs expert e has (a list: one host sync)."""
    tok, slot = torch.nonzero(routing.kept & (routing.ids < num_experts), as_tuple=True)
    expert = routing.ids[tok, slot]
    order = torch.argsort(expert, stable=True)
    rows = torch.bincount(expert, minlength=num_experts).tolist()
    return tok[order], slot[order], rows


def run_experts(x: torch.Tensor, rows: list[int], gate_up: torch.Tensor, down: torch.Tensor,
                config: MoEConfig, math: str, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Expert e on the next ``rows[e]`` rows of ``x``, for every e: [sum(rows), H] (fp32 for
    math='fp32', else x's dtype). ``gate_up_bias`` [E, 2I or I] and ``down_bias`` [E, H] are
    the experts' biases (None: none); ``scale`` [sum(rows)] is ``expert_mlp``'s."""
    if math == "mixed" and grouped_mm_serves(x, rows, gate_up, down):
        # One grouped GEMM per projection: the products of one matmul per expert (on a CPU the
        # same bits, checked by the tests; a GPU's grouped kernel may sum in another order),
        # without a call, an activation and a copy per expert.
        offs = torch.tensor(rows, device=x.device).cumsum(0).to(torch.int32)
        expert_of_row = None
        if gate_up_bias is not None or down_bias is not None:
            expert_of_row = torch.repeat_interleave(torch.arange(len(rows), device=x.device),
                                                    torch.tensor(rows, device=x.device))
        pre = _scale_rows(F.grouped_mm(x, gate_up.transpose(1, 2), offs=offs), scale)
        if gate_up_bias is not None:
            pre = pre.float() + gate_up_bias[expert_of_row].float()
        h = _activate(pre, config, torch.float32)
        y = F.grouped_mm(h.to(x.dtype), down.transpose(1, 2), offs=offs)
        if down_bias is not None:
            y = (y.float() + down_bias[expert_of_row].float()).to(x.dtype)
        return y
    pieces, start = [], 0
    for e, n in enumerate(rows):
        if n:
            pieces.append(expert_mlp(x[start:start + n], gate_up[e], down[e], config, math,
                                     None if gate_up_bias is None else gate_up_bias[e],
                                     None if down_bias is None else down_bias[e],
                                     None if scale is None else scale[start:start + n]))
            start += n
    if pieces:
        return torch.cat(pieces)
    return x.new_zeros(0, x.shape[1], dtype=torch.float32 if math == "fp32" else x.dtype)


def combine(tok: torch.Tensor, slot: torch.Tensor, y: torch.Tensor, shared: torch.Tensor | None,
            routing: Routing, math: str, dtype: torch.dtype) -> torch.Tensor:
    """The combine step: ``y[n]`` is the expert output of token ``tok[n]``'s slot ``slot[n]``
    (kept pairs only, each at most once), ``shared[T, H]`` the shared output or None. Sums the
    weighted outputs in slot order j = 0..k-1, shared last, and rounds once; ``dtype`` is the
    input's. Shared with the expert-parallel path (flashmoe.distributed) so it combines in
    exactly the same order as one process."""
    acc_dtype = dtype if math == "native" else torch.float32
    out_dtype = torch.float32 if math == "fp32" else dtype
    (t, k), hidden = routing.ids.shape, y.shape[1]
    # y slot-major ([slot, token]: each slot's rows contiguous), zeros where a pair was dropped,
    # whose weight becomes 0 (so a NaN weight of a dropped pair contributes nothing). A copy to
    # each pair's place (not a gather): its backward is a gather too, where a gather's is a
    # scatter-add into a zeroed [T * k, H].
    position = slot * t + tok
    every_pair = position.shape[0] == t * k
    y = (y.new_empty if every_pair else y.new_zeros)(t * k, hidden).index_copy(0, position, y)
    w = torch.where(routing.kept, routing.weights, 0).to(acc_dtype)
    out = torch.zeros(t, hidden, dtype=acc_dtype, device=y.device)
    # One view per slot (unbind: its backward stacks the k gradients once, where indexing y[j]
    # would zero a whole [k, T, H] gradient per slot).
    for w_j, y_j in zip(w.unbind(1), y.view(k, t, hidden).unbind(0)):   # fixed slot order
        out += w_j[:, None] * y_j                   # y promotes to acc_dtype
    if shared is not None:
        shared = shared.to(acc_dtype)
        if routing.shared_gate is not None:
            shared = routing.shared_gate.to(acc_dtype)[:, None] * shared
        out = out + shared
    return out.to(out_dtype)
