"""An independent float64 implementation of the MoE forward, token by token in plain Python
loops, written from the contract's text (not from flashmoe.reference) to check it. Dropless only."""

from __future__ import annotations

import math

import torch

ACTIVATIONS = {
    "silu": lambda v: v / (1.0 + math.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))),
    "gelu_tanh": lambda v: 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3))),
    "relu": lambda v: max(v, 0.0),
}


def _best(values, count):
    """Indices of the ``count`` largest values, best first, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:count]


def route_token(x, w, config):
    """(ids, weights) of one token: lists of length k."""
    e = config.num_experts + config.identity_experts     # the identity experts follow the routed ones
    logits = [sum(a * b for a, b in zip(x, w.router_weight[j])) for j in range(e)]
    if config.scoring == "softmax":
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        scores = [v / sum(exps) for v in exps]
    elif config.scoring == "sigmoid":
        scores = [1.0 / (1.0 + math.exp(-v)) for v in logits]
    else:   # sqrtsoftplus
        scores = [math.sqrt(math.log1p(math.exp(v))) for v in logits]
    select = list(scores)
    if config.selection_bias:
        select = [s + b for s, b in zip(scores, w.selection_bias)]
    eligible = list(range(e))
    if config.n_group > 1:
        size = e // config.n_group
        groups = [select[g * size:(g + 1) * size] for g in range(config.n_group)]
        if config.group_score == "top2_sum":
            group_scores = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        else:
            group_scores = [max(g) for g in groups]
        chosen = _best(group_scores, config.topk_group)
        eligible = [j for j in range(e) if j // size in chosen]
    ranked = sorted(eligible, key=lambda j: (-select[j], j))[:config.top_k]
    weights = [scores[j] for j in ranked]
    if config.norm_topk_prob:
        total = sum(weights) + 1e-20
        weights = [v / total for v in weights]
    return ranked, [v * config.routed_scaling_factor for v in weights]


def _clamped_swiglu(gate, up, config):
    """The clamped SwiGLUs of one gate and up element."""
    limit = config.swiglu_limit
    g, u = min(gate, limit), max(-limit, min(up, limit))
    if config.activation == "swiglu_clamped":
        return g / (1.0 + math.exp(-config.swiglu_alpha * g)) * (u + 1.0)
    return g / (1.0 + math.exp(-g)) * u


def mlp(x, gate_up, down, config):
    width = len(down[0])
    pre = [sum(a * b for a, b in zip(x, r)) for r in gate_up]
    if config.activation in ("swiglu_clamped", "silu_clamped"):
        h = [_clamped_swiglu(pre[r], pre[width + r], config) for r in range(width)]
        return [sum(a * b for a, b in zip(h, r)) for r in down]
    act = ACTIVATIONS[config.activation]
    if config.gated:
        h = [act(pre[r]) * pre[width + r] for r in range(width)]
    else:
        h = [act(v) for v in pre]
    return [sum(a * b for a, b in zip(h, r)) for r in down]


def oracle_forward(x: torch.Tensor, weights, config) -> torch.Tensor:
    """float64 output [T, H] for x [T, H]."""
    w = type(weights)(**{k: (v.detach().double().tolist() if v is not None else None) for k, v in vars(weights).items()})
    out = []
    for row in x.double().tolist():
        ids, ws = route_token(row, w, config)
        acc = [0.0] * config.hidden_size
        for e, wt in zip(ids, ws):
            if e >= config.num_experts:      # an identity expert: the token itself
                y = row
            elif config.scale_expert_input:    # the weight scales the expert's input, not its output
                y, wt = mlp([wt * a for a in row], w.gate_up_proj[e], w.down_proj[e], config), 1.0
            else:
                y = mlp(row, w.gate_up_proj[e], w.down_proj[e], config)
            acc = [a + wt * b for a, b in zip(acc, y)]
        if config.num_shared_experts:
            y = mlp(row, w.shared_gate_up_proj, w.shared_down_proj, config)
            gate = 1.0
            if config.shared_expert_gate:
                z = sum(a * b for a, b in zip(row, w.shared_gate_weight[0]))
                gate = 1.0 / (1.0 + math.exp(-z))
            acc = [a + gate * b for a, b in zip(acc, y)]
        out.append(acc)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape[0], config.hidden_size)
