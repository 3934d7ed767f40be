"""torch.compile, torch.export and torch.jit on a FlashMoELayer, in a fresh process (run by
tests/test_torch_compile.py; dynamo's caches and counters are per process). Prints one JSON
line of facts; the test asserts on them.

    python tests/compile_check.py reference|emulated
"""

from __future__ import annotations

import json
import sys

import torch
from torch._dynamo.utils import counters

from flashmoe import FlashMoELayer, MoEConfig, experts_forward, reference

TOKENS = (1, 5, 33, 0, 17)


def main(backend: str) -> dict:
    facts = {}
    if backend == "reference":
        config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2,
                           dtype="float32", scoring="sigmoid", selection_bias=True, n_group=4,
                           topk_group=2, norm_topk_prob=True, num_shared_experts=1,
                           shared_expert_gate=True, capacity_factor=1.5)
        layer = FlashMoELayer(config)
        with torch.no_grad():
            layer.selection_bias.normal_()
    else:
        config = MoEConfig(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2,
                           dtype="bfloat16")
        layer = FlashMoELayer(config, backend="emulated", virtual_world=2,
                              kernel_options={"timeout_s": 2.0})
    dtype = config.torch_dtype

    # torch.compile, one graph for every token count, equal to eager
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    equal, graphs = [], []
    with torch.no_grad():
        for t in TOKENS:
            x = torch.randn(2, t, config.hidden_size).to(dtype)
            out = compiled(x)
            eager = layer(x)
            equal.append(bool(torch.equal(out, eager)) and out.shape == x.shape)
            out, routing = compiled(x, return_routing=True)
            equal.append(bool(torch.equal(routing.ids, reference.route(
                x.reshape(-1, config.hidden_size), layer.weights(), config).ids)))
            graphs.append(counters["stats"]["unique_graphs"])
    facts["compiled_equal"] = equal
    # graphs compiled so far after each token count (0 and 1 get their own, as torch
    # specialises those sizes; with and without return_routing are two graphs)
    facts["graphs_after"] = dict(zip(map(str, TOKENS), graphs))
    facts["graph_breaks"] = sum(counters["graph_break"].values())
    facts["last_backend"] = layer.last_backend

    # autograd through the compiled reference: the same gradients as eager
    if backend == "reference":
        x = torch.randn(9, config.hidden_size, requires_grad=True)
        compiled(x).square().sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        x_grad = x.grad.clone()
        layer.zero_grad()
        x2 = x.detach().clone().requires_grad_()
        layer(x2).square().sum().backward()
        facts["compiled_grads_equal"] = (
            all(torch.allclose(grads[n], p.grad, rtol=1e-5, atol=1e-6)
                for n, p in layer.named_parameters())
            and torch.allclose(x_grad, x2.grad, rtol=1e-5, atol=1e-6))

    # torch.export with a dynamic token count, run at other counts
    example = torch.randn(4, config.hidden_size).to(dtype)
    with torch.set_grad_enabled(backend == "reference"):    # the kernel is for inference
        exported = torch.export.export(layer, (example,),
                                       dynamic_shapes=({0: torch.export.Dim("tokens")},))
    facts["exported_ops"] = sorted({str(n.target) for n in exported.graph.nodes
                                    if n.op == "call_function" and "flashmoe" in str(n.target)})
    run = exported.module()
    with torch.no_grad():
        facts["exported_equal"] = [bool(torch.equal(run(x), layer(x))) for x in
                                   (torch.randn(t, config.hidden_size).to(dtype) for t in (1, 23))]

    if backend == "reference":
        facts.update(routing_given(layer))

    # torch.jit: a clear refusal pointing to torch.compile
    for name, call in (("trace", lambda: torch.jit.trace(layer, example)),
                       ("script", lambda: torch.jit.script(layer))):
        try:
            call()
            facts[f"jit_{name}"] = "accepted"
        except Exception as exc:            # noqa: BLE001 - the message is the fact under test
            facts[f"jit_{name}"] = f"{type(exc).__name__}: {exc}"
    return facts


class RoutedBlock(torch.nn.Module):
    """A caller's own router in front of flashmoe.experts_forward (the fused_experts form), its
    global ids mapped to the experts held (all of them, in reverse order) by an expert_map."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.register_buffer("expert_map", torch.arange(layer.gate_up_proj.shape[0]).flip(0))

    def forward(self, x):
        w, ids = torch.softmax(x.float() @ self.layer.router_weight.t(), dim=-1).topk(2)
        return experts_forward(x, ids, w, self.layer.gate_up_proj.flip(0), self.layer.down_proj.flip(0),
                               expert_map=self.expert_map)


def routing_given(layer) -> dict:
    block = RoutedBlock(layer)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():     # inductor's softmax may round the weights differently: close
        equal = [bool(torch.allclose(compiled(x), block(x), rtol=1e-5, atol=1e-6))
                 for x in (torch.randn(t, 16) for t in (3, 40, 7))]
    graphs = counters["stats"]["unique_graphs"] - before
    x = torch.randn(6, 16, requires_grad=True)
    compiled(x).square().sum().backward()
    compiled_grad = x.grad.clone()
    x.grad = None
    block(x).square().sum().backward()
    grad_equal = bool(torch.allclose(compiled_grad, x.grad, rtol=1e-5, atol=1e-6))
    exported = torch.export.export(block, (torch.randn(5, 16),),
                                   dynamic_shapes=({0: torch.export.Dim("tokens")},))
    ops = sorted({str(n.target) for n in exported.graph.nodes
                  if n.op == "call_function" and "flashmoe" in str(n.target)})
    with torch.no_grad():
        x = torch.randn(11, 16)
        exported_equal = bool(torch.equal(exported.module()(x), block(x)))
    return {"experts_compiled_equal": equal,
            "experts_graphs": graphs,
            "experts_grad_equal": grad_equal,
            "experts_exported_ops": ops, "experts_exported_equal": exported_equal}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
