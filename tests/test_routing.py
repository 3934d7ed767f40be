"""Routing and capacity on hand-checkable cases.

The router weight is the identity (H = E), so a token's logits are its row: each case states
the logits directly and the expected ids and weights are worked out by hand below.
"""

from __future__ import annotations

import math

import pytest
import torch

from flashmoe import MoEConfig, MoEWeights
from flashmoe.reference import capacity_keep, moe_forward, route


def weights_for(config, bias=None):
    e = config.num_experts
    return MoEWeights(
        router_weight=torch.eye(e),
        gate_up_proj=torch.randn(e, config.up_rows, e),
        down_proj=torch.randn(e, e, config.intermediate_size),
        selection_bias=None if bias is None else torch.tensor(bias, dtype=torch.float32))


def make(num_experts=4, top_k=2, **kw):
    return MoEConfig(hidden_size=num_experts, intermediate_size=2, num_experts=num_experts,
                     top_k=top_k, dtype="float32", **kw)


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def softmax(row):
    total = sum(math.exp(v) for v in row)
    return [math.exp(v) / total for v in row]


def assert_route(routing, ids, weights):
    assert routing.ids.tolist() == ids
    torch.testing.assert_close(routing.weights, torch.tensor(weights, dtype=torch.float32),
                               rtol=1e-6, atol=1e-7)


def test_softmax_top2():
    config = make()
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    p = softmax([1, 3, 2, 0])
    assert_route(route(x, weights_for(config), config), [[1, 2]], [[p[1], p[2]]])


def test_softmax_top2_renormalised_and_scaled():
    config = make(norm_topk_prob=True, routed_scaling_factor=2.5)
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    # renormalised softmax over the two chosen = softmax of their logits
    a, b = softmax([3, 2])
    assert_route(route(x, weights_for(config), config), [[1, 2]], [[2.5 * a, 2.5 * b]])


def test_sigmoid_weights_are_the_scores():
    config = make(scoring="sigmoid", top_k=3)
    x = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    assert_route(route(x, weights_for(config), config), [[2, 1, 3]],
                 [[sigmoid(2.0), sigmoid(0.5), sigmoid(0.0)]])


def test_selection_bias_changes_choice_not_weights():
    config = make(scoring="sigmoid", selection_bias=True)
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    # bias +5 on expert 0 makes it first; its weight stays sigmoid(0) = 0.5
    routing = route(x, weights_for(config, bias=[5.0, 0.0, 0.0, 0.0]), config)
    assert_route(routing, [[0, 3]], [[0.5, sigmoid(3.0)]])
    # a bias pushing expert 3 down hands its place to expert 2
    routing = route(x, weights_for(config, bias=[0.0, 0.0, 0.0, -10.0]), config)
    assert_route(routing, [[2, 1]], [[sigmoid(2.0), sigmoid(1.0)]])


def test_ties_go_to_the_lower_expert_index():
    config = make(top_k=2)
    x = torch.tensor([[1.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    routing = route(x, weights_for(config), config)
    assert routing.ids.tolist() == [[1, 2], [0, 1]]
    config1 = make(top_k=1)
    assert route(x, weights_for(config1), config1).ids.tolist() == [[1], [0]]


def _logit(p):
    return math.log(p / (1.0 - p))


# Eight experts in four groups of two; sigmoid scores chosen so that the two group scores
# disagree:   group       0           1            2            3
#             scores      (.8, .0)    (.45, .45)   (.5, .05)    (.1, .05)
#             top2_sum    .8          .9           .55          .15      -> groups 1, 0
#             max         .8          .45          .5           .1       -> groups 0, 2
GROUP_SCORES = [0.8, 1e-6, 0.45, 0.45, 0.5, 0.05, 0.1, 0.05]


@pytest.mark.parametrize("group_score, ids", [
    ("top2_sum", [[0, 2]]),     # eligible 0..3; experts 2 and 3 tie at .45: the lower wins
    ("max", [[0, 4]]),          # eligible 0, 1, 4, 5
])
def test_group_limited_topk(group_score, ids):
    config = make(num_experts=8, scoring="sigmoid", n_group=4, topk_group=2, group_score=group_score)
    x = torch.tensor([[_logit(p) for p in GROUP_SCORES]])
    routing = route(x, weights_for(config), config)
    assert routing.ids.tolist() == ids
    expected = [GROUP_SCORES[i] for i in ids[0]]
    torch.testing.assert_close(routing.weights, torch.tensor([expected]), rtol=1e-6, atol=1e-7)


def test_group_ties_go_to_the_lower_group():
    # groups 0 and 1 score the same; with topk_group=1 only group 0 is eligible
    config = make(num_experts=4, scoring="sigmoid", n_group=2, topk_group=1, top_k=1)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert route(x, weights_for(config), config).ids.tolist() == [[0]]


def test_group_limit_uses_the_biased_scores():
    # the bias lifts group 1 (experts 2, 3) above group 0 for the choice; weights stay unbiased
    config = make(num_experts=4, scoring="sigmoid", n_group=2, topk_group=1, top_k=1,
                  selection_bias=True)
    x = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    routing = route(x, weights_for(config, bias=[0.0, 0.0, 1.0, 1.0]), config)
    assert_route(routing, [[2]], [[0.5]])


def test_shared_gate_is_sigmoid_of_x_dot_w():
    config = MoEConfig(hidden_size=4, intermediate_size=2, num_experts=4, top_k=1, dtype="float32",
                       num_shared_experts=1, shared_expert_gate=True)
    w = weights_for(config)
    w.shared_gate_weight = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    w.shared_gate_up_proj = torch.zeros(4, 4)
    w.shared_down_proj = torch.zeros(4, 2)
    routing = route(torch.tensor([[2.0, 1.0, 2.0, 7.0]]), w, config)
    torch.testing.assert_close(routing.shared_gate, torch.tensor([sigmoid(2.0)]))


# Capacity: k=1, four tokens, four experts.

def test_capacity_keeps_highest_weight():
    config = make(top_k=1, capacity_factor=2.0)      # C = ceil(2 * 4 * 1 / 4) = 2
    x = torch.tensor([[2.0, 0, 0, 0], [3.0, 0, 0, 0], [4.0, 0, 0, 0], [0, 1.0, 0, 0]])
    routing = route(x, weights_for(config), config)
    assert routing.ids.tolist() == [[0], [0], [0], [1]]
    # expert 0 has three candidates, room for two: token 0 (lowest weight) is dropped
    assert routing.kept.tolist() == [[False], [True], [True], [True]]


def test_capacity_ties_go_to_the_lower_token_index():
    config = make(top_k=1, capacity_factor=1.0)      # C = 1
    x = torch.tensor([[0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [2.0, 0, 0, 0]])
    routing = route(x, weights_for(config), config)
    assert routing.ids.tolist() == [[2], [0], [1], [0]]
    # tokens 1 and 3 tie on expert 0: token 1 stays
    assert routing.kept.tolist() == [[True], [True], [True], [False]]


def test_capacity_token_index_is_global():
    # the same two tied tokens, placed as tokens 7 and 5 of a larger batch: 5 wins
    config = make(top_k=1, capacity_factor=1.0)
    ids = torch.tensor([[0], [0]])
    w = torch.tensor([[0.5], [0.5]])
    kept = capacity_keep(ids, w, config, token_index=torch.tensor([7, 5]), num_tokens_total=4)
    assert kept.tolist() == [[False], [True]]


def test_capacity_nan_ranks_lowest():
    config = make(top_k=1, capacity_factor=2.0)      # C = ceil(2 * 3 / 4) = 2
    ids = torch.tensor([[0], [0], [0]])
    w = torch.tensor([[float("nan")], [0.1], [0.2]])
    kept = capacity_keep(ids, w, config, token_index=torch.arange(3), num_tokens_total=3)
    assert kept.tolist() == [[False], [True], [True]]


def test_dropped_pair_contributes_nothing():
    config = make(top_k=1, capacity_factor=1.0)
    x = torch.tensor([[0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [2.0, 0, 0, 0]])
    w = weights_for(config)
    out = moe_forward(x, w, config, math="fp32")
    assert torch.equal(out[3], torch.zeros(4))
    assert out[1].abs().sum() > 0


def test_capacity_counts_slots_of_all_k():
    # k=2: C = ceil(1 * 2 * 2 / 4) = 1 per expert; both tokens pick experts 0 and 1
    config = make(top_k=2, capacity_factor=1.0)
    x = torch.tensor([[3.0, 2.0, 0, 0], [2.0, 3.0, 0, 0]])
    routing = route(x, weights_for(config), config)
    assert routing.ids.tolist() == [[0, 1], [1, 0]]
    # expert 0: token 0 weighs more, expert 1: token 1 weighs more
    assert routing.kept.tolist() == [[True, False], [True, False]]
