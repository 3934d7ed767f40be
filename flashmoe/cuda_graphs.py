"""CUDA graphs of a layer's forward, replayed for any token count up to a bound.

A captured graph replays fixed launch parameters, the token count included, so one graph
serves one count. ``capture`` records one graph per size in ``sizes`` over a static input
buffer; a call with T tokens copies them into the buffer, pads with zero rows up to the
smallest captured size >= T and replays that graph. Each token's output depends on that token
alone (dropless routing), so padding changes nothing but the work done; with a capacity factor
the capacity depends on the token count, so such a layer replays exact sizes only.

    layer = FlashMoELayer(config, device="cuda", max_tokens=4096,
                          kernel_options={"error_check": "none"})
    graphed = flashmoe.cuda_graphs.capture(layer)     # sizes 1, 2, 4, ..., 4096
    y = graphed(x)                                    # x[..., H] with up to 4096 tokens
    layer.synchronize()                               # raises FlashMoEError if a replay stopped

The kernel's error check must be 'none' (its deferred check queries events, which a capture
cannot hold): a stopped replay is reported by ``layer.synchronize()``. Graphs hold the layer's
weights by address: after changing them in place the graphs stay valid, after replacing or
moving them capture again. On a CPU (no CUDA graphs exist there) the same object runs each
padded forward eagerly, so code and tests run alike on both.
"""

from __future__ import annotations

import bisect

import torch

from .backend_select import needs_autograd


def default_sizes(max_tokens: int) -> list[int]:
    """1, 2, 4, ... up to max_tokens, and max_tokens itself."""
    sizes, n = [], 1
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    return sizes + [max_tokens]


class GraphedLayer:
    """A FlashMoELayer's forward replayed from CUDA graphs (built by ``capture``)."""

    def __init__(self, layer, sizes):
        self.layer, self.config = layer, layer.config
        self.sizes = sorted(sizes)
        self.device = layer.router_weight.device
        self.exact = layer.config.capacity_factor is not None
        self.static_x = torch.zeros(self.sizes[-1], self.config.hidden_size,
                                    dtype=self.config.torch_dtype, device=self.device)
        self.graphs: dict[int, tuple] = {}

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def _size_for(self, t: int) -> int:
        if t > self.max_tokens:
            raise ValueError(f"{t} tokens: the graphs were captured for at most {self.max_tokens}; "
                             "capture with a larger max_tokens")
        if self.exact:
            if t not in self.graphs:
                raise ValueError(f"{t} tokens: this layer has a capacity factor, whose capacity "
                                 "depends on the token count, so only the captured sizes "
                                 f"{self.sizes} replay (padding would change the result)")
            return t
        return self.sizes[bisect.bisect_left(self.sizes, t)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x[..., H]`` (a new tensor, like the layer's forward)."""
        layer = self.layer
        if layer.config != self.config:
            raise RuntimeError(f"the layer is now {layer.config.dtype}, captured as "
                               f"{self.config.dtype}: capture again after casting it")
        if needs_autograd(x, layer.weights()):
            raise RuntimeError("a CUDA graph replays no autograd: call it under torch.no_grad() or "
                               "torch.inference_mode()")
        if x.dtype != self.config.torch_dtype or x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"x is {x.dtype} [..., {x.shape[-1]}]: the graphs take "
                             f"{self.config.torch_dtype} [..., {self.config.hidden_size}]")
        x2d = x.reshape(-1, self.config.hidden_size)
        t = x2d.shape[0]
        if t == 0:
            return torch.empty_like(x)
        n = self._size_for(t)
        self.static_x[:t].copy_(x2d)
        self.static_x[t:n].zero_()
        replay, out = self.graphs[n]
        replay()
        return out[:t].clone().reshape(x.shape)


def capture(layer, sizes=None, *, max_tokens: int | None = None) -> GraphedLayer:
    """Capture ``layer``'s forward once per size in ``sizes`` (default: powers of two up to
    ``max_tokens``, which defaults to ``layer.max_tokens``). Returns a ``GraphedLayer``."""
    if layer.world_size > 1:
        raise ValueError("capture covers a layer in one process (virtual_world is fine); a "
                         "process-group layer's launches are paired across processes")
    if sizes is None:
        max_tokens = max_tokens or layer.max_tokens
        if not max_tokens:
            raise ValueError("give sizes=[...] or max_tokens (or build the layer with max_tokens): "
                             "the graphs are captured up to a fixed bound")
        sizes = default_sizes(int(max_tokens))
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes={sizes}: token counts must be >= 1")
    graphed = GraphedLayer(layer, sizes)
    with torch.no_grad():
        if graphed.device.type != "cuda":
            for n in sizes:
                graphed.graphs[n] = _eager_replay(layer, graphed.static_x[:n])
            return graphed
        if layer.kernel_options.get("error_check") != "none":
            raise ValueError("build the layer with kernel_options={'error_check': 'none'} to "
                             "capture it: the deferred error check queries events, which a CUDA "
                             "graph cannot hold; check with layer.synchronize() after replays")
        layer(graphed.static_x)            # sizes the kernel's buffers for the largest count
        if layer.last_backend != "kernel":
            raise ValueError("a CUDA graph captures the kernel path only, and this layer ran the "
                             f"reference (backend={layer.backend!r}; build it with "
                             "backend='kernel' to see why the kernel cannot run)")
        side = torch.cuda.Stream(graphed.device)
        for n in sizes:
            side.wait_stream(torch.cuda.current_stream(graphed.device))
            with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch asks
                layer(graphed.static_x[:n])
            torch.cuda.current_stream(graphed.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(graphed.static_x[:n])
            graphed.graphs[n] = (graph.replay, out)
        layer.synchronize()
    return graphed


def _eager_replay(layer, x):
    """What a CPU 'graph' is: (replay, out), the forward on the static buffer into one output."""
    out = torch.empty_like(x)

    def replay():
        out.copy_(layer(x))
    return replay, out
