"""Expert parallelism over torch.distributed, on the reference path (gloo on CPU, nccl on GPU).

W ranks; rank r holds the weights of experts ``plan.rank_experts(r, E, W)`` only, the router and
shared-expert weights are replicated, and every rank brings its own tokens. One forward:

1. all-gather the token counts, so each rank knows where its tokens sit among all ranks' tokens
   (rank-major order) and the global token count the capacity is computed from;
2. route locally, then send each (token, slot) pair to the rank owning its expert (all-to-all);
   with config.scale_expert_input the pair's weight travels with it, to scale its expert's input;
3. the owner decides capacity over the pairs of *all* ranks (highest weight, ties to the lower
   global token index) and runs its experts (with their biases, config.expert_bias) on the kept
   rows;
4. the results travel back (all-to-all) and the home rank combines them with
   ``reference.combine``: the same slot order, shared experts last, as one process.

The result equals ``reference.moe_forward`` on the concatenation of all ranks' tokens. Each
expert sees its rows in global token order, as in one process, so the expert GEMMs have the same
operands in the same order.

Autograd: the gradients are those of one process computing the concatenated batch with the sum
of all ranks' losses. The rows' trip to the experts and back is one autograd function whose
backward makes the reverse trip (gradients to the owners, the owners' expert backward, input
gradients home), so an owner's expert gradients hold every rank's tokens; the replicated tensors
(router, shared experts, shared gate) pass through an identity whose backward sums their
gradients over the group, so every rank holds the same, full gradient. Every rank must call
backward (it is collective, also on a rank with no tokens); do not average these parameters'
gradients over the same group again (exclude them from DistributedDataParallel).
"""

from __future__ import annotations

import dataclasses

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

    ``weights.gate_up_proj`` / ``down_proj`` (and ``gate_up_bias`` / ``down_bias``) hold either
    this rank's E/W experts or all E (then this rank uses its slice). ``math`` is as in
    ``reference.moe_forward``. Returns the output (x's shape; fp32 for math='fp32', else x's
    dtype) and, if asked, this rank's ``Routing`` with ``kept`` as the experts' owners decided it.
    """
    if math not in reference.MATH_MODES:
        raise ValueError(f"math={math!r}: allowed are {', '.join(reference.MATH_MODES)}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ep_forward needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) on every rank")
    check_input(x_local, config)
    with reference.no_autocast(x_local.device):
        return _ep_forward(x_local, weights, config, group, math, return_routing,
                           needs_autograd(x_local, weights))


def _ep_forward(x_local, weights, config, group, math, return_routing, grad):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    e_all, hidden = config.num_experts, config.hidden_size
    per_rank = experts_per_rank(e_all, world)
    mine = rank_experts(rank, e_all, world)
    weights = rank_weights(weights, rank, world, e_all)
    biases = (weights.gate_up_bias, weights.down_bias) if config.expert_bias else (None, None)
    experts = (weights.gate_up_proj, weights.down_proj, *biases)
    if grad:
        # Created first, so its backward (an all-reduce) runs last on every rank, after every
        # all-to-all of the backward: the autograd engine runs ready nodes latest-created first.
        weights = _sum_replicated_gradients(weights, group)

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
    routed = routing.kept & (routing.ids < e_all)                  # identity experts stay home
    tok, slot = torch.nonzero(routed, as_tuple=True)               # token-major
    expert = routing.ids[tok, slot]
    order = torch.argsort(expert // per_rank, stable=True)         # by destination, token order kept
    tok, slot, expert = tok[order], slot[order], expert[order]
    send = torch.bincount(expert // per_rank, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    trip = _Trip(send.tolist(), recv.tolist(), group)

    meta = trip.there(torch.stack([token_index[tok], expert], dim=1))
    priority = trip.there(routing.weights[tok, slot].detach().float())
    src_token, src_expert = meta[:, 0], meta[:, 1]

    # 3. Capacity over all ranks' pairs for my experts, then the experts on the kept rows.
    # Rows arrive grouped by source rank in token order: global token order per expert.
    keep = reference.capacity_keep(src_expert[:, None], priority[:, None], config,
                                   src_token, total)[:, 0]
    owner = _Owner(keep, src_expert - mine.start, len(mine), config, math)
    rows, scale = x2d[tok], reference.expert_scale(tok, slot, routing, config)
    if grad:
        y_back = _RemoteExperts.apply(rows, scale, *experts, trip, owner)
    else:
        y_back = trip.back(owner.experts(trip.there(rows), trip.there(scale), *experts))

    # 4. Back to the home rank, in the order the pairs were sent; combine there.
    keep_back = trip.back(keep.to(torch.uint8)).bool()
    kept = routing.kept & ~routed
    kept[tok, slot] = keep_back
    routing.kept = kept
    shared = None
    if config.num_shared_experts:
        shared = reference.expert_mlp(x2d, weights.shared_gate_up_proj, weights.shared_down_proj,
                                      config, math)
    live = torch.nonzero(keep_back).squeeze(1)
    pairs = reference.with_identity(x2d, routing, config, tok[live], slot[live], y_back[live])
    out = reference.combine(*pairs, shared,
                            reference.combine_routing(routing, config), math,
                            x2d.dtype).reshape(*lead, hidden)
    return (out, routing) if return_routing else out


class _Trip:
    """The all-to-all routes of one forward: ``there`` sends ``send[r]`` rows to rank r and
    receives ``recv[r]`` from it; ``back`` is the reverse."""

    def __init__(self, send: list[int], recv: list[int], group):
        self.send, self.recv, self.group = send, recv, group

    def there(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else _exchange(t, self.recv, self.send, self.group)

    def back(self, t: torch.Tensor) -> torch.Tensor:
        return _exchange(t, self.send, self.recv, self.group)


class _Owner:
    """What an owner computes on the rows it received: its experts on the kept ones, each
    expert's rows in arrival (global token) order; dropped rows give zeros."""

    def __init__(self, keep, local_expert, num_local, config, math):
        kept = torch.nonzero(keep).squeeze(1)
        self.index = kept[torch.argsort(local_expert[kept], stable=True)]
        self.rows = torch.bincount(local_expert[kept], minlength=num_local).tolist()
        self.config, self.math = config, math

    def experts(self, rows, scale, gate_up, down, gate_up_bias, down_bias):
        y = reference.run_experts(rows[self.index], self.rows, gate_up, down, self.config, self.math,
                                  gate_up_bias, down_bias, None if scale is None else scale[self.index])
        return y.new_zeros(rows.shape[0], rows.shape[1]).index_put((self.index,), y)


class _RemoteExperts(torch.autograd.Function):
    """(rows, their scales) -> their experts' outputs, through the owners; backward makes the
    reverse trip. The scales (reference.expert_scale) may be None; the experts' tensors:
    gate_up, down, gate_up_bias, down_bias (the biases may be None)."""

    @staticmethod
    def forward(ctx, rows, scale, gate_up, down, gate_up_bias, down_bias, trip: _Trip, owner: _Owner):
        arrived = (trip.there(rows), trip.there(scale))
        ctx.save_for_backward(*arrived, gate_up, down, gate_up_bias, down_bias)
        ctx.trip, ctx.owner = trip, owner
        return trip.back(owner.experts(*arrived, gate_up, down, gate_up_bias, down_bias))

    @staticmethod
    def backward(ctx, grad_back):
        grad_arrived = ctx.trip.there(grad_back.contiguous())
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(n)
                      for t, n in zip(ctx.saved_tensors, ctx.needs_input_grad[:6])]
            y = ctx.owner.experts(*leaves)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            found = iter(torch.autograd.grad(y, wanted, grad_arrived, allow_unused=True)
                         if wanted and y.requires_grad else [None] * len(wanted))
        grads = [next(found) if t is not None and t.requires_grad else None for t in leaves]
        # Every rank sends the rows' (and scales') gradients home, needed or not: the collectives
        # must match.
        home = [None if t is None else ctx.trip.back(torch.zeros_like(t) if g is None else g)
                for t, g in zip(leaves[:2], grads[:2])]
        return *home, *grads[2:], None, None


class _SumGradients(torch.autograd.Function):
    """Identity; its backward all-reduces (sums) the gradients over the group, in fp32."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=ctx.group)
        out, start = [], 0
        for g in grads:
            out.append(flat[start:start + g.numel()].view_as(g).to(g.dtype))
            start += g.numel()
        return (None, *out)


_REPLICATED = ("router_weight", "router_bias", "shared_gate_up_proj", "shared_down_proj", "shared_gate_weight")


def _sum_replicated_gradients(weights: MoEWeights, group) -> MoEWeights:
    names = [n for n in _REPLICATED if getattr(weights, n) is not None
             and getattr(weights, n).requires_grad]
    if not names:
        return weights
    summed = _SumGradients.apply(group, *(getattr(weights, n) for n in names))
    return MoEWeights(**{**vars(weights), **dict(zip(names, summed))})


_PER_EXPERT = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


def rank_weights(weights: MoEWeights, rank: int, world: int, num_experts: int) -> MoEWeights:
    """``weights`` with rank's experts only: each per-expert tensor (the projections and their
    biases) holds either all E experts (then the view of rank's E / W is taken) or just those."""
    mine = rank_experts(rank, num_experts, world)
    local = {}
    for name in _PER_EXPERT:
        t = getattr(weights, name)
        if t is None or t.shape[0] == len(mine):
            continue
        if t.shape[0] != num_experts:
            raise ValueError(f"weights.{name} holds {t.shape[0]} experts: expected rank {rank}'s "
                             f"{len(mine)} (experts {mine.start}..{mine.stop - 1}) or all {num_experts}")
        local[name] = t[mine.start:mine.stop]
    return dataclasses.replace(weights, **local) if local else weights


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
