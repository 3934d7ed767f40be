"""MoEConfig validation: every invalid value is refused with the field, the value and the rule."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from flashmoe import MoEConfig

BASE = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2)


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=0), r"hidden_size=0: must be an integer >= 1"),
    (dict(intermediate_size=2.5), r"intermediate_size=2.5: must be an integer"),
    (dict(num_experts=True), r"num_experts=True: must be an integer"),
    (dict(top_k=0), r"top_k=0: must be an integer >= 1"),
    (dict(top_k=9), r"top_k=9: must be at most num_experts=8"),
    (dict(n_group=0), r"n_group=0: must be an integer >= 1"),
    (dict(n_group=3), r"n_group=3: must divide num_experts=8"),
    (dict(topk_group=0), r"topk_group=0: must be an integer >= 1"),
    (dict(n_group=4, topk_group=5), r"topk_group=5: must be at most n_group=4"),
    (dict(n_group=4, topk_group=1, top_k=3), r"top_k=3: only topk_group \* num_experts / n_group = 2"),
    (dict(n_group=8, topk_group=2, group_score="top2_sum"), r"group_score='top2_sum' needs at least 2 experts per group; n_group=8"),
    (dict(num_shared_experts=-1), r"num_shared_experts=-1: must be an integer >= 0"),
    (dict(gated=1), r"gated=1: must be True or False"),
    (dict(norm_topk_prob="yes"), r"norm_topk_prob='yes': must be True or False"),
    (dict(selection_bias=None), r"selection_bias=None: must be True or False"),
    (dict(shared_expert_gate=0), r"shared_expert_gate=0: must be True or False"),
    (dict(activation="swish"), r"activation='swish': allowed are silu, gelu, gelu_tanh, relu"),
    (dict(scoring="softplus"), r"scoring='softplus': allowed are softmax, sigmoid"),
    (dict(group_score="mean"), r"group_score='mean': allowed are top2_sum, max"),
    (dict(routed_scaling_factor=0.0), r"routed_scaling_factor=0.0: must be a finite number > 0"),
    (dict(routed_scaling_factor=float("inf")), r"routed_scaling_factor=inf: must be a finite number > 0"),
    (dict(routed_scaling_factor=True), r"routed_scaling_factor=True: must be a finite number > 0"),
    (dict(num_shared_experts=1, shared_intermediate_size=0), r"shared_intermediate_size=0: must be an integer >= 1"),
    (dict(shared_intermediate_size=4), r"shared_intermediate_size=4: needs num_shared_experts >= 1"),
    (dict(shared_expert_gate=True), r"shared_expert_gate=True needs num_shared_experts >= 1"),
    (dict(capacity_factor=0), r"capacity_factor=0: must be None \(dropless\) or a finite number > 0"),
    (dict(capacity_factor=float("nan")), r"capacity_factor=nan: must be None"),
    (dict(capacity_factor=False), r"capacity_factor=False: must be None"),
    (dict(identity_experts=-1), r"identity_experts=-1: must be an integer >= 0"),
    (dict(identity_experts=2, top_k=11), r"top_k=11: must be at most num_experts=8 \+ identity_experts=2"),
    (dict(identity_experts=2, n_group=4), r"n_group=4: must divide num_experts=8 \+ identity_experts=2"),
    (dict(identity_experts=4, capacity_factor=1.0), r"capacity_factor=1.0 with identity_experts=4: .*use one"),
    (dict(identity_experts=4, scale_expert_input=True), r"identity_experts=4 with scale_expert_input=True"),
    (dict(dtype="int8"), r"dtype='int8': allowed are bfloat16, float16, float32"),
    (dict(dtype=torch.float64), r"dtype=torch.float64: allowed are bfloat16, float16, float32"),
])
def test_invalid_value_names_field_and_value(changes, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**BASE, **changes})


def test_identity_experts_are_chosen_among_with_the_routed_ones():
    """The router's experts are E + Z: top_k and the groups count the identity experts too."""
    config = MoEConfig(**{**BASE, "top_k": 9, "identity_experts": 4, "n_group": 4, "topk_group": 3})
    assert (config.num_experts, config.router_experts) == (8, 12)


@pytest.mark.parametrize("given, stored", [("bf16", "bfloat16"), (torch.float16, "float16"),
                                           ("torch.float32", "float32"), ("fp32", "float32")])
def test_dtype_is_stored_by_canonical_name(given, stored):
    config = MoEConfig(**BASE, dtype=given)
    assert config.dtype == stored
    assert config.torch_dtype == getattr(torch, stored)


def test_derived_sizes():
    config = MoEConfig(**BASE, num_shared_experts=2, shared_intermediate_size=6)
    assert config.up_rows == 16
    assert config.shared_intermediate_total == 12
    assert MoEConfig(**BASE, gated=False).up_rows == 8
    assert MoEConfig(**BASE, num_shared_experts=3).shared_intermediate_total == 24
    assert MoEConfig(**BASE).shared_intermediate_total == 0


def test_capacity_rounds_up_and_dropless_has_none():
    assert MoEConfig(**BASE).capacity(100) is None
    # ceil(1.25 * 10 * 2 / 8) = ceil(3.125) = 4
    assert MoEConfig(**BASE, capacity_factor=1.25).capacity(10) == 4
    assert MoEConfig(**BASE, capacity_factor=1).capacity(8) == 2
    assert MoEConfig(**BASE, capacity_factor=1).capacity(0) == 0


def test_capacity_is_the_exact_ceiling():
    """The kernel computes the least c with c * E >= cf * T * k (no division); the double quotient's
    ceiling must be that number, including where the product is an exact multiple of E."""
    rng = random.Random(0)
    for _ in range(20000):
        E = rng.randint(1, 512)
        k = rng.randint(1, min(E, 16))
        cf = rng.choice([rng.uniform(0.01, 4.0), 0.1, 1 / 3, 0.5, 1.0, 1.25, 1.5, 2.0])
        T = rng.randint(0, 1 << rng.randint(0, 20))
        config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=E, top_k=k, capacity_factor=cf)
        assert config.capacity(T) == math.ceil(Fraction(cf * T * k) / E), (cf, T, k, E)


def test_config_is_frozen_and_hashable():
    config = MoEConfig(**BASE)
    with pytest.raises(AttributeError):
        config.top_k = 3
    assert hash(config) == hash(MoEConfig(**BASE))
    assert config.replace(top_k=3).top_k == 3
