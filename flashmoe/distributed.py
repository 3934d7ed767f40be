"""Expert parallelism over torch.distributed, on the reference path (gloo on CPU, nccl on GPU).

W ranks; rank r holds the weights of experts ``plan.rank_experts(r, E, W)`` only, the router and
shared-expert weights are replicated, and every rank brings its own tokens. One forward:

1. all-gather the token counts, so each rank knows where its tokens sit among all ranks' tokens
   (rank-major order) and the global token count the capacity is computed from;
2. route locally, then send each (token, slot) pair to the rank owning its expert (all-to-all);
3. the owner decides capacity over the pairs of *all* ranks (highest weight, ties to the lower
   global token index) and runs its experts on the kept rows;
4. the results travel back (all-to-all) and the home rank combines them with
   ``reference.combine``: the same slot order, shared experts last, as one process.

The result equals ``reference.moe_forward`` on the concatenation of all ranks' tokens. Each
expert sees its rows in global token order, as in one process, so the expert GEMMs have the same
operands in the same order.

This path is forward-only: no gradient crosses the all-to-all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import reference
from .backend_select import needs_autograd
from .config import MoEConfig
from .host.plan import experts_per_rank, rank_experts
from .inputs import check_input
from .reference import MoEWeights


def ep_forward(x_local: torch.Tensor, weights: MoEWeights, config: MoEConfig, group=None, *,
               math: str = "contract", return_routing: bool = False):
    """Expert-parallel forward of this rank's tokens ``x_local[..., H]``; a collective: every
    rank of ``group`` (default: the world) must call it, also a rank with no tokens.

    ``weights.gate_up_proj`` / ``down_proj`` hold either this rank's E/W experts or all E (then
    this rank uses its slice). ``math`` is as in ``reference.moe_forward``. Returns the output
    (x's shape; fp32 for math='fp32', else x's dtype) and, if asked, this rank's ``Routing``
    with ``kept`` as the experts' owners decided it.
    """
    if math not in reference.MATH_MODES:
        raise ValueError(f"math={math!r}: allowed are {', '.join(reference.MATH_MODES)}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ep_forward needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) on every rank")
    if needs_autograd(x_local, weights):
        raise RuntimeError("expert-parallel forward computes no gradients and autograd is "
                           "recording this forward: run it under torch.no_grad() or "
                           "torch.inference_mode()")
    check_input(x_local, config)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    e_all, hidden = config.num_experts, config.hidden_size
    per_rank = experts_per_rank(e_all, world)
    mine = rank_experts(rank, e_all, world)
    gate_up, down = _local_experts(weights, mine, e_all)

    lead = x_local.shape[:-1]
    x2d = x_local.reshape(-1, hidden)
    device = x2d.device
    t_local = x2d.shape[0]

    # 1. Where this rank's tokens sit among all ranks' tokens.
    counts = _all_gather_count(t_local, group, device)
    offset, total = sum(counts[:rank]), sum(counts)
    token_index = offset + torch.arange(t_local, device=device)

    # 2. Route. route() applies the capacity to this rank's pairs alone: a pair that C local
    # pairs beat is beaten by at least C pairs overall, so only locally kept pairs can survive
    # and only those travel. The owner makes the final decision.
    routing = reference.route(x2d, weights, config, token_index=token_index, num_tokens_total=total)
    tok, slot = torch.nonzero(routing.kept, as_tuple=True)         # token-major
    expert = routing.ids[tok, slot]
    order = torch.argsort(expert // per_rank, stable=True)         # by destination, token order kept
    tok, slot, expert = tok[order], slot[order], expert[order]
    send = torch.bincount(expert // per_rank, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    send_sizes, recv_sizes = send.tolist(), recv.tolist()

    rows = _exchange(x2d[tok], recv_sizes, send_sizes, group)
    meta = _exchange(torch.stack([token_index[tok], expert], dim=1), recv_sizes, send_sizes, group)
    priority = _exchange(routing.weights[tok, slot].float(), recv_sizes, send_sizes, group)
    src_token, src_expert = meta[:, 0], meta[:, 1]

    # 3. Capacity over all ranks' pairs for my experts, then the experts on the kept rows.
    # Rows arrive grouped by source rank in token order: global token order per expert.
    keep = reference.capacity_keep(src_expert[:, None], priority[:, None], config,
                                   src_token, total)[:, 0]
    out_dtype = torch.float32 if math == "fp32" else x2d.dtype
    y_recv = torch.zeros(rows.shape[0], hidden, dtype=out_dtype, device=device)
    for e in torch.unique(src_expert[keep]).tolist():
        sel = torch.nonzero(keep & (src_expert == e), as_tuple=True)[0]
        local = e - mine.start
        y_recv[sel] = reference.expert_mlp(rows[sel], gate_up[local], down[local], config,
                                           math).to(out_dtype)

    # 4. Back to the home rank, in the order the pairs were sent; combine there.
    y_back = _exchange(y_recv, send_sizes, recv_sizes, group)
    keep_back = _exchange(keep.to(torch.uint8), send_sizes, recv_sizes, group).bool()
    y = torch.zeros(t_local, config.top_k, hidden, dtype=out_dtype, device=device)
    y[tok, slot] = y_back
    kept = torch.zeros_like(routing.kept)
    kept[tok, slot] = keep_back
    routing.kept = kept
    shared = None
    if config.num_shared_experts:
        shared = reference.expert_mlp(x2d, weights.shared_gate_up_proj, weights.shared_down_proj,
                                      config, math)
    out = reference.combine(y, shared, routing, math, x2d.dtype).reshape(*lead, hidden)
    return (out, routing) if return_routing else out


def _local_experts(weights: MoEWeights, mine: range, num_experts: int):
    held = weights.gate_up_proj.shape[0]
    if held == num_experts:
        return weights.gate_up_proj[mine.start:mine.stop], weights.down_proj[mine.start:mine.stop]
    if held == len(mine):
        return weights.gate_up_proj, weights.down_proj
    raise ValueError(f"weights.gate_up_proj holds {held} experts: expected this rank's "
                     f"{len(mine)} (experts {mine.start}..{mine.stop - 1}) or all {num_experts}")


def _all_gather_count(n: int, group, device) -> list[int]:
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [int(c.item()) for c in everyone]


def _exchange(t: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group) -> torch.Tensor:
    """all_to_all_single along dim 0: ``in_sizes[r]`` rows go to rank r, ``out_sizes[r]`` come
    from it."""
    out = t.new_empty((sum(out_sizes), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), out_sizes, in_sizes, group=group)
    return out


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``; (0, 1) when ``group`` is None."""
    if group is None:
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised: "
                           "call torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)
