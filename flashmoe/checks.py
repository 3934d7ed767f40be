"""Kernel-versus-reference checks, shared by ``python -m flashmoe.selftest``, the GPU tests and the
emulated CPU tests.

One check: fresh random inputs (never zeros), the output poisoned with NaN before the launch, the
kernel's routing compared with the reference router, then the kernel's output compared with the
reference computed on the kernel's own routing under the project's tolerance (flashmoe.accuracy).

Why the routing is split off: the kernel and torch compute the fp32 logits in different orders,
so a token whose k-th and (k+1)-th scores are within rounding of each other may pick a different
expert in either. Such a token is a near tie, not an error; any other routing difference is. The
capacity mask must match the reference rule applied to the kernel's routing exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from . import accuracy, reference
from .config import MoEConfig
from .host.backend import split_tokens
from .reference import MoEWeights, Routing

# Two selection scores closer than this (in score units, ~1) may be ordered either way: fp32
# logits over H <= 8192 products differ between summation orders by well under 1e-5.
NEAR_TIE = 1e-4
# Kernel and reference combine weights of the same expert agree to fp32 rounding: the logits'
# rounding (relative 1e-6 of their magnitude) moves a softmax/sigmoid weight by about that much
# times the logit, then the scaling factor multiplies it. weight_tolerance() scales accordingly.
WEIGHT_TOL = 1e-5


def weight_tolerance(x, weights, config) -> float:
    logit_scale = float(reference.router_logits(x, weights.router_weight).abs().max()) if x.numel() else 0.0
    return WEIGHT_TOL * max(1.0, logit_scale) * config.routed_scaling_factor
ROUTINGS = ("uniform", "skewed", "single")


@dataclass(frozen=True)
class Case:
    name: str
    config: MoEConfig
    world: int = 1            # virtual ranks
    tokens: int = 256         # all ranks together (split as evenly as possible)
    routing: str = "uniform"  # uniform, skewed (a few popular experts) or single (all on the same k)
    seed: int = 0

    def describe(self) -> dict:
        c = self.config
        return {"name": self.name, "dtype": c.dtype, "H": c.hidden_size, "I": c.intermediate_size,
                "E": c.num_experts, "k": c.top_k, "act": c.activation, "gated": c.gated,
                "scoring": c.scoring, "shared": c.num_shared_experts, "capacity": c.capacity_factor,
                "W": self.world, "tokens": self.tokens, "routing": self.routing}


@dataclass
class CaseResult:
    case: dict
    passed: bool | None              # None: not run, ``detail`` says why (this GPU cannot run it)
    err: float = float("nan")
    tol: float = float("nan")
    routing_mismatches: int = 0      # tokens routed differently that are not near ties
    near_ties: int = 0
    weight_err: float = 0.0
    ms: float | None = None          # median kernel time, when timed
    detail: str = ""
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        d = asdict(self)
        d.update(d.pop("case"))
        return d


def routing_shift(routing: str, config, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What shapes a routing of ``ROUTINGS`` (CPU, fp32): ``(x_shift [H], router_shift [E, H])``
    to add to every token and to the router rows, or None for 'uniform'. Both follow one random
    direction every token shares: 'skewed' makes the first E / 8 experts favour it (a few popular
    experts, all on the first ranks), 'single' makes k experts favour it so strongly that every
    token picks them."""
    if routing == "uniform":
        return None
    E = config.router_experts
    d = torch.randn(config.hidden_size, generator=generator)
    d = d / d.norm()
    strength = torch.zeros(E)
    if routing == "single":
        strength[:config.top_k] = 20.0
    else:
        strength[:max(1, E // 8)] = 3.0
    return 2.0 * d, strength[:, None] * d


def make_inputs(case: Case, device) -> tuple[torch.Tensor, MoEWeights]:
    """Random x and weights with O(1) outputs, routed as ``case.routing`` asks (routing_shift)."""
    cfg = case.config
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    E, H, I, dt = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.torch_dtype
    randn = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale
    x = randn(case.tokens, H)
    Er = cfg.router_experts
    router = randn(Er, H, scale=H ** -0.5)
    shift = routing_shift(case.routing, cfg, g)
    if shift is not None:
        x, router = x + shift[0], router + shift[1]
    Iu = cfg.up_rows
    w = MoEWeights(router_weight=router,
                   gate_up_proj=randn(E, Iu, H, scale=H ** -0.5),
                   down_proj=randn(E, H, I, scale=I ** -0.5))
    if cfg.selection_bias:
        w.selection_bias = randn(Er, scale=0.05)
    if cfg.num_shared_experts:
        Is = cfg.shared_intermediate_total
        w.shared_gate_up_proj = randn((2 if cfg.gated else 1) * Is, H, scale=H ** -0.5)
        w.shared_down_proj = randn(H, Is, scale=Is ** -0.5)
    if cfg.shared_expert_gate:
        w.shared_gate_weight = randn(1, H, scale=H ** -0.5)
    if cfg.router_bias:
        w.router_bias = randn(Er, scale=0.5)
    if cfg.expert_bias:     # as large as the projections' outputs, so that a lost bias shows
        w.gate_up_bias, w.down_bias = randn(E, Iu), randn(E, H)
    to = lambda t, dtype: None if t is None else t.to(device=device, dtype=dtype).contiguous()
    fp32 = torch.float32
    weights = MoEWeights(router_weight=to(w.router_weight, fp32), gate_up_proj=to(w.gate_up_proj, dt),
                         down_proj=to(w.down_proj, dt), selection_bias=to(w.selection_bias, fp32),
                         shared_gate_up_proj=to(w.shared_gate_up_proj, dt),
                         shared_down_proj=to(w.shared_down_proj, dt),
                         shared_gate_weight=to(w.shared_gate_weight, fp32), router_bias=to(w.router_bias, fp32),
                         gate_up_bias=to(w.gate_up_bias, dt), down_bias=to(w.down_bias, dt))
    return to(x, dt), weights


def selection_gaps(x: torch.Tensor, weights: MoEWeights, config: MoEConfig) -> torch.Tensor:
    """Per token, the smallest margin of any routing decision: between the k-th and (k+1)-th
    eligible selection score, and between the topk_group-th and next group score."""
    logits = reference.router_logits(x, weights.router_weight,
                                     weights.router_bias if config.router_bias else None)
    select = reference.router_scores(logits, config.scoring)
    if config.selection_bias:
        select = select + weights.selection_bias.float()
    gap = torch.full((x.shape[0],), float("inf"), device=x.device)
    if config.n_group > 1:
        grouped = select.view(x.shape[0], config.n_group, config.router_experts // config.n_group)
        gs = (grouped.topk(2, -1).values.sum(-1) if config.group_score == "top2_sum"
              else grouped.max(-1).values)
        top = gs.sort(-1, descending=True).values
        if config.topk_group < config.n_group:
            gap = torch.minimum(gap, top[:, config.topk_group - 1] - top[:, config.topk_group])
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(config.topk_group, -1).indices, True)
        select = select.masked_fill(~keep.repeat_interleave(config.router_experts // config.n_group, 1), -1e30)
    if config.top_k < config.router_experts:
        top = select.sort(-1, descending=True).values
        gap = torch.minimum(gap, top[:, config.top_k - 1] - top[:, config.top_k])
    return gap


def compare_routing(x, weights, config, got: Routing) -> tuple[int, int, float]:
    """(tokens routed differently without a near tie, near-tie tokens, max weight error)."""
    want = reference.route(x, weights, config)
    same = (got.ids.sort(-1).values == want.ids.sort(-1).values).all(-1)
    near = selection_gaps(x, weights, config) < NEAR_TIE
    mismatches = int((~same & ~near).sum())
    weight_err = 0.0
    if bool(same.any()):
        order_got, order_want = got.ids.argsort(-1), want.ids.argsort(-1)
        wg = got.weights.gather(1, order_got)[same]
        ww = want.weights.gather(1, order_want)[same]
        weight_err = float((wg - ww).abs().max()) if wg.numel() else 0.0
    return mismatches, int((~same & near).sum()), weight_err


def run_case(backend, case: Case, device, time_it: bool = False) -> CaseResult:
    """Run one case on a KernelBackend built for case.config / case.world."""
    x, weights = make_inputs(case, device)
    out = torch.full_like(x, float("nan"))
    try:
        out, routing = backend.forward(x, weights, return_routing=True, out=out)
        backend.synchronize()
    except Exception as exc:   # a kernel error is a failed case, with its message and records
        return CaseResult(case.describe(), False, detail=f"{type(exc).__name__}: {exc}",
                          extra={"records": getattr(exc, "records", [])})
    result = judge(backend, case.describe(), x, weights, out, routing)
    result.extra["tile"] = "{}x{}".format(*backend.last_tile())     # which of the backend's kernels ran
    if time_it and x.is_cuda:
        result.ms = time_forward(backend, x, weights, out)
    return result


def judge(backend, described: dict, x, weights, out, routing: Routing) -> CaseResult:
    """The verdict on one kernel output ``out`` for ``x`` and the routing it chose: routing
    against the reference router (near ties allowed), the capacity mask against the reference
    rule, no poison left, the output within the accuracy rule of the reference computed on the
    kernel's routing; a failure carries its diagnosis."""
    cfg = backend.config
    mismatches, near, weight_err = compare_routing(x, weights, cfg, routing)
    T_total = x.shape[0]
    want_kept = reference.capacity_keep(routing.ids, routing.weights, cfg,
                                        torch.arange(T_total, device=x.device), T_total)
    kept_ok = bool((want_kept == routing.kept).all())
    routing.kept = want_kept
    unwritten = int(torch.isnan(out).any(-1).sum())
    ok, err, tol = accuracy.check(out, x, weights, cfg, routing=routing)
    weight_tol = weight_tolerance(x, weights, cfg)
    passed = ok and mismatches == 0 and kept_ok and unwritten == 0 and weight_err <= weight_tol
    detail = []
    if mismatches:
        detail.append(f"{mismatches} tokens routed differently (not near ties)")
    if not kept_ok:
        detail.append("capacity mask differs from the reference rule")
    if unwritten:
        detail.append(f"{unwritten} output rows still poisoned")
    if weight_err > weight_tol:
        detail.append(f"routing weights off by {weight_err:.2e}")
    if not ok:
        detail.append(f"error {err:.3e} above tolerance {tol:.3e}")
    result = CaseResult(described, passed, err, tol, mismatches, near, weight_err, detail="; ".join(detail))
    if not passed:
        result.extra["diagnosis"] = diagnose_case(backend, out, x, weights, routing, tol)
    return result


def diagnose_case(backend, out, x, weights, routing, tol) -> dict:
    """Where a failed case's output is wrong (flashmoe.diagnose.kernel_failure), against the fp32
    reference on the kernel's own routing."""
    from .diagnose import kernel_failure
    ideal = reference.moe_forward(x, weights, backend.config, math="fp32", routing=routing)
    spec = backend.variant_for(x.shape[0]).spec
    return kernel_failure(out, ideal, tol, routing, split_tokens(x.shape[0], backend.world),
                          spec.block_m, spec.block_n)


def time_forward(backend, x, weights, out, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of one forward (CUDA events)."""
    for _ in range(warmup):
        backend.forward(x, weights, out=out)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        backend.forward(x, weights, out=out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    backend.synchronize()
    return sorted(times)[len(times) // 2]


def check_determinism(make_backend, case: Case, device, worlds=(1, 2, 4, 8)) -> tuple[bool, str]:
    """The same inputs give bitwise-identical outputs on repeated runs and for every W."""
    x, weights = make_inputs(case, device)
    reference_out = None
    for w in worlds:
        backend = make_backend(case.config, w)
        outs = [backend.forward(x, weights).clone() for _ in range(2)]
        backend.synchronize()
        if not torch.equal(outs[0], outs[1]):
            return False, f"W={w}: two runs differ"
        if reference_out is None:
            reference_out = outs[0]
        elif not torch.equal(reference_out, outs[0]):
            diff = (reference_out.float() - outs[0].float()).abs().max()
            return False, f"W={w} differs from W={worlds[0]} (max diff {float(diff):.3e})"
    return True, "bitwise identical across runs and W in " + ",".join(map(str, worlds))


def _one_line(message: str) -> str:
    """A FlashMoEError's message (a line per hosted rank's record) on one line."""
    return " | ".join(line.strip() for line in message.splitlines())


def check_fault(make_backend, case: Case, device, stalled_rank: int) -> tuple[bool, str]:
    """A stalled rank gives a FlashMoEError that names it; the next forward works again."""
    from .errors import FlashMoEError
    backend = make_backend(case.config, case.world, timeout_s=0.5)
    x, weights = make_inputs(case, device)
    t0 = time.time()
    try:
        backend.forward(x, weights, fault_rank=stalled_rank)
        backend.synchronize()
        return False, "the stalled launch raised nothing"
    except FlashMoEError as exc:
        message = str(exc)
    # The first wait to expire is one on the stalled rank's counts or rows (wait.cuh patience_ns);
    # the message starts with its record.
    named = f"of rank {stalled_rank}" in message.splitlines()[0]
    result = run_case(backend, case, device)
    ok = named and result.passed
    return ok, (f"raised after {time.time() - t0:.1f} s: {_one_line(message)}; "
                f"next forward {'passed' if result.passed else 'FAILED: ' + result.detail}")


def check_fault_unchecked(make_backend, case: Case, device, stalled_rank: int) -> tuple[bool, str]:
    """error_check='none' (no check per forward, as under CUDA-graph capture): a launch that
    stops on a stalled rank must not spoil the next forward, and synchronize() must still raise
    its error, naming the rank."""
    from .errors import FlashMoEError
    backend = make_backend(case.config, case.world, timeout_s=0.5, error_check="none")
    x, weights = make_inputs(case, device)
    backend.forward(x, weights, fault_rank=stalled_rank)
    out = torch.full_like(x, float("nan"))
    out, routing = backend.forward(x, weights, return_routing=True, out=out)
    after = judge(backend, case.describe(), x, weights, out, routing)
    try:
        backend.synchronize()
        raised = ""
    except FlashMoEError as exc:
        raised = str(exc)
    named = f"of rank {stalled_rank}" in raised.splitlines()[0] if raised else False
    raised = _one_line(raised)
    return after.passed and named, (f"next forward {'passed' if after.passed else 'FAILED: ' + after.detail}; "
                                    f"synchronize() {'raised: ' + raised if raised else 'raised nothing'}")


def check_graph(make_backend, config: MoEConfig, device, world: int = 2, token_counts=(1, 37, 256),
                order=(37, 1, 256, 1, 37, 256)) -> tuple[bool, str]:
    """One CUDA graph captured per token count over one static input buffer, replayed in
    ``order`` with fresh random rows copied in before each replay (the epoch in the heap advances
    with every replay, the prefill and decode kernels alternate); every replay is judged
    against the reference on the routing it chose."""
    backend = make_backend(config, world, timeout_s=5.0, error_check="none")
    top = max(token_counts)
    x_static, weights = make_inputs(Case("graph", config, world=world, tokens=top), device)
    backend.forward(x_static, weights)             # plans the heap for the largest count
    backend.synchronize()
    graphs = {}
    side = torch.cuda.Stream(device)
    for n in token_counts:
        out = torch.empty(n, config.hidden_size, dtype=config.torch_dtype, device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):               # warm-up off the capturing stream, as torch asks
            backend.forward(x_static[:n], weights, out=out)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            backend.forward(x_static[:n], weights, out=out)
        graphs[n] = (graph, out)
    failures = []
    for i, n in enumerate(order):
        graph, out = graphs[n]
        fresh, _ = make_inputs(Case("graph", config, world=world, tokens=n, seed=100 + i), device)
        x_static[:n].copy_(fresh)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize(device)
        verdict = judge(backend, {"tokens": n}, x_static[:n].clone(), weights, out,
                        backend._routing(split_tokens(n, world)))
        if not verdict.passed:
            failures.append(f"replay {i} ({n} tokens): {verdict.detail}")
    backend.synchronize()
    return not failures, ("; ".join(failures) if failures else
                          f"{len(order)} replays of {len(graphs)} graphs ({', '.join(map(str, token_counts))} "
                          f"tokens, W={world}) all correct")


def check_layer_graphs(config: MoEConfig, device, sizes=(1, 8, 64, 256),
                       counts=(1, 3, 64, 100, 256, 7)) -> tuple[bool, str]:
    """``flashmoe.cuda_graphs`` on a FlashMoELayer: graphs captured for ``sizes``, replayed for
    ``counts`` tokens (padded to the next size) with fresh random inputs, each judged against the
    reference with the accuracy rule."""
    from . import cuda_graphs
    from .layer import FlashMoELayer
    layer = FlashMoELayer(config, device=device, max_tokens=max(sizes), virtual_world=2,
                          kernel_options={"error_check": "none"})
    graphed = cuda_graphs.capture(layer, sizes=sizes)
    failures = []
    with torch.no_grad():
        for t in counts:
            x = torch.randn(t, config.hidden_size, device=device).to(config.torch_dtype)
            ok, err, tol = accuracy.check(graphed(x), x, layer.weights(), config)
            if not ok:
                failures.append(f"{t} tokens: error {err:.3g} > tolerance {tol:.3g}")
    layer.synchronize()
    return not failures, ("; ".join(failures) if failures else
                          f"{len(counts)} replays ({', '.join(map(str, counts))} tokens) of graphs "
                          f"for {', '.join(map(str, sizes))} tokens all correct")


def given_routing_inputs(config: MoEConfig, tokens: int, device, seed: int = 0):
    """(x, weights, topk_ids, topk_weights) for the routing-given kernel: random x and experts
    (with biases when the config has them), and a routing with every kind of slot: distinct
    experts, "no expert" ids of each kind (negative, E, beyond int32), an expert named twice
    (token 4), a token with no expert at all (token 7), and weights of either sign."""
    g = torch.Generator().manual_seed(seed)
    E, H, I, dt = config.num_experts, config.hidden_size, config.intermediate_size, config.torch_dtype
    x = torch.randn(tokens, H, generator=g).to(dt)
    weights = MoEWeights(router_weight=None,
                         gate_up_proj=(torch.randn(E, config.up_rows, H, generator=g) * H ** -0.5).to(dt),
                         down_proj=(torch.randn(E, H, I, generator=g) * I ** -0.5).to(dt))
    k = config.top_k
    ids = torch.zeros(tokens, k, dtype=torch.int64)
    for t in range(tokens):
        ids[t] = torch.randperm(E, generator=g)[:k]
    special = torch.tensor([-1, E, 2 ** 32 + 1, -(2 ** 40)])
    for t in range(0, tokens, 3):
        ids[t, t % k] = special[t % len(special)]
    if tokens > 4 and k > 1:
        ids[4, 1] = ids[4, 0] if 0 <= ids[4, 0] < E else 0
    if tokens > 7:
        ids[7] = -1
    topk_weights = torch.randn(tokens, k, generator=g)
    if config.expert_bias:
        weights.gate_up_bias = torch.randn(E, config.up_rows, generator=g).to(dt)
        weights.down_bias = torch.randn(E, H, generator=g).to(dt)
    to = lambda t: None if t is None else t.to(device)     # noqa: E731
    weights = MoEWeights(router_weight=None, gate_up_proj=to(weights.gate_up_proj), down_proj=to(weights.down_proj),
                         gate_up_bias=to(weights.gate_up_bias), down_bias=to(weights.down_bias))
    return to(x), weights, to(ids), to(topk_weights)


def check_routing_given(backend, tokens: int, device, seed: int = 0) -> tuple[bool, str]:
    """A backend built with routing='given' on ``given_routing_inputs``, output poisoned first:
    within the accuracy rule of the reference on the same routing, every row written, the
    token with no expert exactly 0."""
    config = backend.config
    x, weights, ids, topk_weights = given_routing_inputs(config, tokens, device, seed)
    # Nothing writes the result row of a skipped slot: poison every result row (NaN bytes), so
    # a combine that read one would show.
    region, plan = backend.plan.regions["ret_rows"], backend.plan
    for rank in range(plan.num_local_ranks):
        start = rank * plan.rank_heap_bytes + region.offset
        backend.heap[start:start + region.total].fill_(0xFF)
    out = torch.full_like(x, float("nan"))
    try:
        backend.forward(x, weights, out=out, routing=(ids, topk_weights))
        backend.synchronize()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {_one_line(str(exc))}"
    routing = reference.given_routing(ids, topk_weights, config.num_experts)
    ok, err, tol = accuracy.check(out, x, weights, config, routing=routing)
    problems = [] if ok else [f"error {err:.3g} above tolerance {tol:.3g}"]
    if tokens > 7 and not bool((out[7] == 0).all()):
        problems.append("the token with no expert is not 0")
    return not problems, "; ".join(problems) or f"error {err:.3g} (tolerance {tol:.3g})"
