"""Expert parallelism over gloo (CPU processes) against the single-process reference on the
concatenation of all ranks' tokens. One group of processes per world size runs every case, to stay fast."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashmoe import FlashMoELayer, MoEConfig, MoEWeights, reference
from flashmoe.distributed import ep_forward
from flashmoe.host.plan import rank_experts

# Imported here, before the workers fork, so they inherit them instead of importing them each.
mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")

PER_EXPERT = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")   # a rank holds its E / W

# tokens each rank brings, per world size: one rank with none, uneven others
TOKENS = {2: [11, 0], 4: [5, 0, 9, 6]}

CASES = {
    "dropless": dict(config=dict(), math="contract"),
    "dropless_fp32_math": dict(config=dict(num_shared_experts=1), math="fp32"),
    "capacity_deepseek_like": dict(config=dict(
        scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, num_shared_experts=2, shared_intermediate_size=4,
        capacity_factor=0.5), math="contract"),
    "capacity_bf16_shared_gate": dict(config=dict(
        dtype="bfloat16", num_shared_experts=1, shared_expert_gate=True, capacity_factor=1.0,
        activation="gelu_tanh"), math="contract"),
    "plain_relu_native": dict(config=dict(gated=False, activation="relu", top_k=3), math="native"),
    # GPT-OSS: router and expert biases, the clamped SwiGLU (a small limit, so the clamps bind)
    "gpt_oss_like": dict(config=dict(router_bias=True, expert_bias=True, activation="swiglu_clamped",
                                     swiglu_limit=0.5, capacity_factor=1.0), math="contract"),
    # Llama4: the routing weight scales the expert's input, a sigmoid top-1, a shared expert
    "llama4_like": dict(config=dict(scale_expert_input=True, scoring="sigmoid", top_k=1,
                                    num_shared_experts=1, capacity_factor=1.0), math="contract"),
    # LongCat-Flash: identity experts, combined on the token's own rank
    "longcat_like": dict(config=dict(identity_experts=4, top_k=3, selection_bias=True,
                                     routed_scaling_factor=6.0), math="contract"),
    # experts 2 and 3 are never chosen: in a world of 4, rank 1 receives no rows at all
    "idle_experts": dict(config=dict(scoring="sigmoid", selection_bias=True), math="contract",
                         bias={2: -100.0, 3: -100.0}),
}


def make_config(fields):
    base = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2, dtype="float32")
    return MoEConfig(**{**base, **fields})


def make_weights(config, bias=None):
    """The same full weights on every rank (fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    e, h, i, dt = config.num_experts, config.hidden_size, config.intermediate_size, config.torch_dtype
    er = config.router_experts

    def rnd(*shape, fan_in, dtype=dt, std=1.0):
        return (torch.randn(*shape, generator=g) * std / fan_in ** 0.5).to(dtype)
    w = MoEWeights(router_weight=rnd(er, h, fan_in=h, dtype=torch.float32, std=3.0),
                   gate_up_proj=rnd(e, config.up_rows, h, fan_in=h),
                   down_proj=rnd(e, h, i, fan_in=i))
    if config.selection_bias:
        w.selection_bias = torch.randn(er, generator=g) * 0.1
        for expert, value in (bias or {}).items():
            w.selection_bias[expert] = value
    if config.num_shared_experts:
        s = config.shared_intermediate_total
        w.shared_gate_up_proj = rnd((2 if config.gated else 1) * s, h, fan_in=h)
        w.shared_down_proj = rnd(h, s, fan_in=s)
    if config.shared_expert_gate:
        w.shared_gate_weight = rnd(1, h, fan_in=h, dtype=torch.float32)
    if config.router_bias:
        w.router_bias = torch.randn(er, generator=g)
    if config.expert_bias:     # as large as the projections' outputs, so that a lost bias shows
        w.gate_up_bias, w.down_bias = rnd(e, config.up_rows, fan_in=1), rnd(e, h, fan_in=1)
    return w


def all_tokens(config, counts):
    g = torch.Generator().manual_seed(99)
    x = torch.randn(sum(counts), config.hidden_size, generator=g).to(config.torch_dtype)
    # exact duplicates on different ranks: their capacity ties are broken by global token index
    x[-1] = x[0]
    x[-2] = x[1]
    return x


def assert_close(out, expected, name, rtol=1e-5, atol=1e-6):
    # Not torch.testing.assert_close: with torch.distributed initialised it imports the DTensor
    # package, which alone takes seconds per process.
    assert out.shape == expected.shape and out.dtype == expected.dtype, name
    bad = (out.double() - expected.double()).abs() > atol + rtol * expected.double().abs()
    assert not bad.any(), f"{name}: {int(bad.sum())} elements differ, max abs diff " \
        f"{float((out.double() - expected.double()).abs().max()):.3g}"


def check_case(name, case, rank, world):
    config = make_config(case["config"])
    weights = make_weights(config, case.get("bias"))
    counts = TOKENS[world]
    x = all_tokens(config, counts)
    start = sum(counts[:rank])
    mine = x[start:start + counts[rank]]
    expected_routing = reference.route(x, weights, config)
    expected = reference.moe_forward(x, weights, config, math=case["math"])[start:start + counts[rank]]
    if "bias" in case:
        assert not torch.isin(expected_routing.ids, torch.tensor(list(case["bias"]))).any()
    if config.capacity_factor is not None:
        assert not expected_routing.kept.all(), f"{name}: the capacity should drop something"

    # with all experts' weights given, and with only this rank's share
    mine_only = reference.MoEWeights(**vars(weights))
    per = config.num_experts // world
    for name in PER_EXPERT:
        if getattr(weights, name) is not None:
            setattr(mine_only, name, getattr(weights, name)[rank * per:(rank + 1) * per].clone())
    for w in (weights, mine_only):
        out, routing = ep_forward(mine, w, config, math=case["math"], return_routing=True)
        assert out.shape == mine.shape, name
        assert out.dtype == (torch.float32 if case["math"] == "fp32" else config.torch_dtype), name
        sl = slice(start, start + counts[rank])
        assert torch.equal(routing.ids, expected_routing.ids[sl]), name
        assert torch.equal(routing.kept, expected_routing.kept[sl]), name
        assert_close(out, expected, name)


# FlashMoELayer configs over a group: GPT-OSS's biases, then Llama4's scaled input.
LAYERS = [dict(num_shared_experts=1, shared_expert_gate=True, capacity_factor=1.0, router_bias=True,
               expert_bias=True, activation="swiglu_clamped", swiglu_limit=0.5),
          dict(num_shared_experts=1, capacity_factor=1.0, scale_expert_input=True, scoring="sigmoid", top_k=1)]


def check_layer(rank, world, fields):
    """FlashMoELayer with a process group: the replicated weights agree after construction, and
    forward and backward equal a single-process layer holding all experts."""
    config = make_config(fields)
    torch.manual_seed(100 + rank)                 # different init on every rank ...
    layer = FlashMoELayer(config, process_group=dist.group.WORLD)
    router = [torch.empty_like(layer.router_weight) for _ in range(world)]
    dist.all_gather(router, layer.router_weight.detach())
    assert all(torch.equal(r, router[0]) for r in router)    # ... but one router after the broadcast
    assert len(layer.local_experts) == 8 // world and layer.gate_up_proj.shape[0] == 8 // world

    torch.manual_seed(7)
    full = FlashMoELayer(config)                   # the same on every rank
    with torch.no_grad():                          # biases start at zero: make them count
        for bias in (full.router_bias, full.gate_up_bias, full.down_bias):
            if bias is not None:
                bias.normal_()
    state = full.state_dict()
    mine = layer.local_experts
    for name in PER_EXPERT:
        if name in state:
            state[name] = state[name][mine.start:mine.stop]
    layer.load_state_dict(state)
    counts = TOKENS[world]
    x = all_tokens(config, counts)
    start = sum(counts[:rank])
    with torch.no_grad():
        out = layer(x[start:start + counts[rank]].reshape(1, -1, 16))
        expected = full(x)[start:start + counts[rank]]
    assert_close(out.reshape(-1, 16), expected, "layer")
    assert layer.last_backend == "reference"

    check_backward(layer, full, x, counts, rank)


# Blocks from_hf converts over a group (fp32, eager experts).
BLOCKS = {
    "mixtral": lambda: mixtral.MixtralSparseMoeBlock(mixtral.MixtralConfig(
        hidden_size=16, intermediate_size=8, num_local_experts=8, num_experts_per_tok=2,
        experts_implementation="eager")),
    "gpt_oss": lambda: gpt_oss.GptOssMLP(gpt_oss.GptOssConfig(
        hidden_size=16, intermediate_size=8, num_local_experts=8, num_experts_per_tok=2,
        swiglu_limit=0.5, experts_implementation="eager")),
    "llama4": lambda: llama4.Llama4TextMoe(llama4.Llama4TextConfig(
        hidden_size=16, intermediate_size=8, intermediate_size_mlp=16, num_local_experts=8,
        num_experts_per_tok=1, experts_implementation="eager")),
}


def check_from_hf(rank, world):
    """from_hf with a process group copies this rank's experts only (and their biases), and
    forward equals the block's on all ranks' tokens."""
    counts = TOKENS[world]
    x = all_tokens(make_config({}), counts)
    start, mine = sum(counts[:rank]), rank_experts(rank, 8, world)
    for name, make in BLOCKS.items():
        torch.manual_seed(11)
        block = make().eval()
        for p in block.parameters():
            torch.nn.init.normal_(p, std=2.0 / p.shape[-1] ** 0.5)
        layer = FlashMoELayer.from_hf(block, process_group=dist.group.WORLD)
        assert layer.local_experts == mine, name
        if name == "mixtral":
            assert torch.equal(layer.gate_up_proj, block.experts.gate_up_proj[mine.start:mine.stop])
        if name == "gpt_oss":
            assert torch.equal(layer.down_bias, block.experts.down_proj_bias[mine.start:mine.stop])
        with torch.no_grad():
            out = layer(x[start:start + counts[rank]])
            expected = block(x.reshape(1, -1, 16))
        if layer.returns_router_logits:
            out, expected = out[0], expected[0]
        expected = expected.reshape(-1, 16)[start:start + counts[rank]]
        assert_close(out, expected, f"from_hf {name}", rtol=1e-5, atol=1e-5)


def check_backward(layer, full, x, counts, rank):
    """Gradients of every parameter and of the input equal one process's on the concatenated
    batch with the sum of all ranks' losses (also on the rank with no tokens)."""
    start, mine = sum(counts[:rank]), layer.local_experts
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))   # d loss / d out
    x_all = x.clone().requires_grad_()
    (full(x_all) * g).sum().backward()
    x_mine = x[start:start + counts[rank]].clone().requires_grad_()
    for _ in range(2):                             # twice: gradients accumulate alike
        (layer(x_mine) * g[start:start + counts[rank]]).sum().backward()
    assert layer.last_backend == "reference"
    assert_close(x_mine.grad, 2 * x_all.grad[start:start + counts[rank]], "x.grad", atol=1e-5)
    for name, p in layer.named_parameters():
        expected = dict(full.named_parameters())[name].grad
        if name in PER_EXPERT:
            expected = expected[mine.start:mine.stop]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, 2 * expected, f"{name}.grad", rtol=1e-4, atol=1e-5)


def worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with torch.no_grad():
            for name, case in CASES.items():
                check_case(name, case, rank, world)
        for fields in LAYERS:
            check_layer(rank, world, fields)
        check_from_hf(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(TOKENS))
def test_expert_parallel_equals_single_process(world, tmp_path):
    # fork, not spawn: a spawned process imports torch again, which takes seconds per rank on
    # a small CI machine; the workers set one intra-op thread, so the forked OpenMP state is
    # never used.
    mp.start_processes(worker, args=(world, str(tmp_path / "rendezvous")), nprocs=world,
                       join=True, start_method="fork")


def test_ep_forward_needs_an_initialised_group():
    config = make_config({})
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        ep_forward(torch.randn(2, 16), make_weights(config), config)
