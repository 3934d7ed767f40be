"""FlashMoELayer: the Mixture-of-Experts layer as a torch module.

The module holds the parameters (named and laid out as transformers 5 stores them, so weights
copy over unchanged), checks its inputs, and picks the backend per forward: the GPU kernel
(``flashmoe.host.backend.KernelBackend``) or the reference (``flashmoe.reference``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import backend_select, ops, reference
from .config import DTYPES, MoEConfig, dtype_name
from .distributed import ep_forward, group_rank_and_size
from .host.plan import rank_experts
from .inputs import check_input, check_weights

# Parameters and buffers that stay fp32 through any cast of the layer: the router's, by contract.
FP32_TENSORS = ("router_weight", "selection_bias", "shared_gate_weight", "router_bias")


class FlashMoELayer(nn.Module):
    """A Mixture-of-Experts layer computing ``flashmoe.reference`` semantics.

    Args:
        config: what the layer computes (``MoEConfig``).
        backend: 'auto' uses the GPU kernel when the input is on a CUDA device, the kernel
            supports the config and autograd is not recording (the kernel is forward-only),
            else the reference; 'kernel' always uses the kernel and raises
            ``KernelUnavailable`` saying why when it cannot; 'reference' always uses the
            reference (plain torch, differentiable, any device); 'emulated' runs the kernel's
            own source on the CPU emulator (CPU tensors, slow: for debugging the kernel's logic
            without a GPU).
        virtual_world: W expert-parallel ranks the kernel hosts on one GPU (tokens split
            across them). The result does not depend on it.
        device: where the parameters are created.
        max_tokens: the most tokens one forward brings (sizes the kernel's buffers up front;
            None lets them grow on demand, an allocation but never a recompile).
        kernel_options: passed to the kernel backend: ``timeout_s`` (how long an in-kernel wait
            for another rank's signal may take, default 10; waits downstream of those get 2x and
            3x, so the error names the rank that stalled), ``error_check`` ('deferred' (default):
            a stopped launch raises ``FlashMoEError`` at the next forward or ``synchronize()``;
            'sync': at once, with a host synchronisation per forward; 'none': for CUDA-graph
            capture, call ``synchronize()`` yourself), ``gemm`` ('mma_sync' forces the portable engine on
            Hopper), ``blocks_per_rank``.
        process_group: with a group of W > 1 processes, this process holds only its E/W
            experts (``local_experts``) and forward is expert-parallel across the group; every
            process calls forward with its own tokens (a collective, also with 0 tokens). The
            kernel runs one launch per rank and forward over NVSHMEM
            (``flashmoe.host.group_backend``; needs nvshmem4py) when every rank can run it, else
            every rank runs ``flashmoe.distributed.ep_forward``. ``max_tokens`` is then a fixed
            bound per rank (default 1024) that every rank must share. The replicated parameters
            (router, bias, shared experts) are broadcast from the group's first rank at
            construction so every rank routes alike.

    Dtypes: the expert weights and biases (and the shared experts') are in ``config.dtype``; the
    router, its biases and the shared-expert gate are fp32 and stay fp32 through
    ``layer.to(dtype)`` / ``.half()`` / ``.bfloat16()`` / ``.float()``, which instead move the
    layer to the new expert dtype (``config`` follows; the kernel is rebuilt). Under
    ``torch.autocast`` with a bfloat16/float16 dtype the layer computes in that dtype like
    ``nn.Linear`` does (input and expert weights cast, differentiably; output in it), the
    router still in fp32; the expert weights are cast on every forward, so for inference cast
    the layer once instead.

    The forward is the custom op ``flashmoe::moe`` (``flashmoe.ops``): ``torch.compile``
    (also ``fullgraph=True`` with dynamic token counts) and ``torch.export`` take it whole.
    In eager mode under autograd it is the reference in plain torch, whose activations
    autograd keeps (the op's backward would compute the forward again).
    The reference backend runs torch's GEMMs in the dtype (fp32 accumulation) and the rest in
    fp32, rounded once (``reference`` math 'mixed'). The last backend used is in
    ``last_backend`` ('kernel', 'emulated' or 'reference').
    """

    def __init__(self, config: MoEConfig, *, backend: str = "auto", virtual_world: int = 1,
                 device=None, max_tokens: int | None = None, process_group=None,
                 kernel_options: dict | None = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config is a {type(config).__name__}: expected a flashmoe.MoEConfig")
        self.config = config
        self.backend = backend_select.check_backend(backend)
        if not _is_int(virtual_world) or virtual_world < 1:
            raise ValueError(f"virtual_world={virtual_world!r}: must be an integer >= 1")
        if config.num_experts % virtual_world:
            raise ValueError(f"virtual_world={virtual_world}: must divide num_experts="
                             f"{config.num_experts} (each virtual rank owns E / W experts)")
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise ValueError(f"max_tokens={max_tokens!r}: must be None or an integer >= 1")
        self.virtual_world = int(virtual_world)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.kernel_options = dict(kernel_options or {})
        self.process_group = process_group
        self.rank, self.world_size = group_rank_and_size(process_group)
        if self.world_size > 1 and virtual_world > 1:
            raise ValueError(f"virtual_world={virtual_world} with a process group of "
                             f"{self.world_size} ranks: each process is one expert-parallel rank; "
                             "use one or the other")
        if config.num_experts % self.world_size:
            raise ValueError(f"num_experts={config.num_experts} must be divisible by the process "
                             f"group's size {self.world_size}")
        self.local_experts: range = rank_experts(self.rank, config.num_experts, self.world_size)
        self.last_backend: str | None = None
        # from_hf sets it for blocks whose forward returns (hidden states, router output):
        # forward then returns (out, router logits [T, E] fp32) as they did.
        self.returns_router_logits = False
        # Router jitter (Mixtral's router_jitter_noise, set by from_hf): in training mode the
        # input is multiplied by noise uniform in [1 - j, 1 + j] before routing and experts.
        self.jitter_noise = 0.0
        self._kernels: dict = {}       # (device, dtype) -> KernelBackend, built on first use
        self._kernel_reasons: dict = {}
        self._config_text = ops.config_json(config)     # the op's config argument
        self._dtype_configs = {DTYPES[n]: config.replace(dtype=n) for n in DTYPES}
        self._owner = ops.register_owner(self)

        e, h, i = config.router_experts, config.hidden_size, config.intermediate_size   # e: router rows
        fp32 = dict(device=device, dtype=torch.float32)
        low = dict(device=device, dtype=config.torch_dtype)
        e_local = len(self.local_experts)
        self._cast_dtype = None
        self.router_weight = nn.Parameter(torch.empty(e, h, **fp32))
        self.gate_up_proj = nn.Parameter(torch.empty(e_local, config.up_rows, h, **low))
        self.down_proj = nn.Parameter(torch.empty(e_local, h, i, **low))
        # A selection bias is adjusted by load balancing, not by gradients: a buffer, as in
        # DeepSeek-V3. Absent features are registered as None so they stay out of state_dict.
        self.register_buffer("selection_bias", torch.zeros(e, **fp32) if config.selection_bias else None)
        shared = config.shared_intermediate_total
        if shared:
            rows = (2 if config.gated else 1) * shared
            self.shared_gate_up_proj = nn.Parameter(torch.empty(rows, h, **low))
            self.shared_down_proj = nn.Parameter(torch.empty(h, shared, **low))
        else:
            self.register_parameter("shared_gate_up_proj", None)
            self.register_parameter("shared_down_proj", None)
        if config.shared_expert_gate:
            self.shared_gate_weight = nn.Parameter(torch.empty(1, h, **fp32))
        else:
            self.register_parameter("shared_gate_weight", None)
        self.register_parameter("router_bias", nn.Parameter(torch.empty(e, **fp32))
                                if config.router_bias else None)
        if config.expert_bias:
            self.gate_up_bias = nn.Parameter(torch.empty(e_local, config.up_rows, **low))
            self.down_bias = nn.Parameter(torch.empty(e_local, h, **low))
        else:
            self.register_parameter("gate_up_bias", None)
            self.register_parameter("down_bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init with std 1/sqrt(fan_in): unit-scale inputs give unit-scale router logits
        (routing that is neither uniform nor one-hot) and expert outputs of the input's scale.
        The selection bias, router bias and expert biases start at zero (neutral)."""
        cfg = self.config
        for p, fan_in in ((self.router_weight, cfg.hidden_size),
                          (self.gate_up_proj, cfg.hidden_size),
                          (self.down_proj, cfg.intermediate_size),
                          (self.shared_gate_up_proj, cfg.hidden_size),
                          (self.shared_down_proj, cfg.shared_intermediate_total),
                          (self.shared_gate_weight, cfg.hidden_size)):
            if p is not None and p.device.type != "meta":
                nn.init.normal_(p, std=1.0 / math.sqrt(fan_in))
        for bias in (self.selection_bias, self.router_bias, self.gate_up_bias, self.down_bias):
            if bias is not None and bias.device.type != "meta":
                bias.zero_()
        if self.world_size > 1:
            self._broadcast_replicated()

    def _broadcast_replicated(self) -> None:
        import torch.distributed as dist
        src = dist.get_global_rank(self.process_group, 0)
        for t in (self.router_weight, self.selection_bias, self.shared_gate_up_proj,
                  self.shared_down_proj, self.shared_gate_weight, self.router_bias):
            if t is not None:
                dist.broadcast(t.data, src=src, group=self.process_group)

    def weights(self) -> reference.MoEWeights:
        """The parameters as ``reference.MoEWeights`` (views, no copies). With a process group,
        gate_up_proj / down_proj hold only this rank's experts ``local_experts``."""
        return reference.MoEWeights(
            router_weight=self.router_weight, gate_up_proj=self.gate_up_proj,
            down_proj=self.down_proj, selection_bias=self.selection_bias,
            shared_gate_up_proj=self.shared_gate_up_proj, shared_down_proj=self.shared_down_proj,
            shared_gate_weight=self.shared_gate_weight, router_bias=self.router_bias,
            gate_up_bias=self.gate_up_bias, down_bias=self.down_bias)

    def forward(self, x: torch.Tensor, return_routing: bool = False, input_ids: torch.Tensor | None = None):
        """``x[..., H]`` -> same shape and dtype; with ``return_routing`` also the ``Routing``
        (ids, weights, kept, shared gate, logits) of the flattened tokens. ``input_ids`` is
        taken and not read: DeepSeek-V4's decoder layers pass the token ids to their MoE block
        (for its hash-routed layers, which ``from_hf`` refuses), and this layer routes by its
        router."""
        if torch.jit.is_tracing():
            raise RuntimeError("torch.jit.trace would freeze this layer's routing (which experts "
                               "each token goes to) into the trace: use torch.compile or "
                               "torch.export instead")
        if self.training and self.jitter_noise and isinstance(x, torch.Tensor):
            # drawn as transformers draws it, so a seeded run matches the original block's
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x, config, weights = self._operands(x)
        check_input(x, config, self.router_weight.device)
        check_weights(weights, config, num_experts=len(self.local_experts))
        lead = x.shape[:-1]
        x2d = x.reshape(-1, config.hidden_size)
        if self.world_size > 1:
            grad = backend_select.needs_autograd(x, weights)
            which = backend_select.group_choose(self.backend, config, x, grad,
                                                self.process_group, self._kernel_reasons)
            if which == "kernel":
                result = self._kernel_for(x.device, config).forward(
                    x2d.contiguous(), weights, return_routing=return_routing)
                out, routing = result if return_routing else (result, None)
            else:
                out, routing = ep_forward(x2d, weights, config, self.process_group,
                                          math=backend_select.REFERENCE_MATH, return_routing=True)
                out = out.to(x.dtype)
            self.last_backend = which
        else:
            out, routing = ops.forward_2d(x2d, weights, config, backend=self.backend,
                                          virtual_world=self.virtual_world,
                                          return_routing=return_routing, owner=self._owner,
                                          config_text=self._config_text)
        out = out.reshape(*lead, config.hidden_size)
        if return_routing:
            return out, routing
        if self.returns_router_logits:
            # The transformers block this layer replaced returned (hidden, router output) and
            # its decoder layer unpacks the pair.
            with reference.no_autocast(x.device):
                logits = reference.router_logits(x2d, weights.router_weight,
                                                 weights.router_bias if config.router_bias else None)
            return out, logits
        return out

    def _operands(self, x):
        """(x, config, weights) this forward computes with: the layer's own, or under autocast
        with a bfloat16/float16 dtype, the input and expert weights cast to it (the router and
        the other fp32 tensors stay fp32)."""
        if self._cast_dtype is not None:
            raise TypeError(f"the layer's expert weights are {self._cast_dtype} (after a cast): "
                            f"flashmoe computes in {', '.join(DTYPES)}; cast the layer to one of "
                            "them, e.g. layer.to(torch.bfloat16)")
        weights = self.weights()
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x, self.config, weights
        device_type = x.device.type
        if (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
                and torch.get_autocast_dtype(device_type) in (torch.bfloat16, torch.float16)):
            dtype = torch.get_autocast_dtype(device_type)
            for name in ("gate_up_proj", "down_proj", "shared_gate_up_proj", "shared_down_proj",
                         "gate_up_bias", "down_bias"):
                t = getattr(weights, name)
                if t is not None:
                    setattr(weights, name, t.to(dtype))
            return x.to(dtype), self._dtype_configs[dtype], weights
        return x, self.config, weights

    def _kernel_for(self, device: torch.device, config: MoEConfig | None = None):
        """The KernelBackend for ``device`` and ``config``'s dtype (default the layer's), built
        once (it compiles and allocates heaps)."""
        config = config or self.config
        key = (device, config.dtype)
        if key not in self._kernels:
            group = self.process_group if self.world_size > 1 else None
            options = dict(self.kernel_options)
            if self.backend == "emulated":
                options["emulate"] = True
            self._kernels[key] = backend_select.new_kernel(config, device, self.virtual_world,
                                                           self.max_tokens, process_group=group,
                                                           options=options)
        return self._kernels[key]

    def synchronize(self) -> None:
        """Wait for this layer's kernel launches; raise ``FlashMoEError`` if one stopped (with
        the deferred error check, a stopped launch is otherwise reported at the next forward)."""
        for kernel in self._kernels.values():
            kernel.synchronize()

    @property
    def _kernel(self):
        """The kernel built for the layer's own dtype (None before the first kernel forward)."""
        return next((k for (_, dtype), k in reversed(self._kernels.items())
                     if dtype == self.config.dtype), None)

    def _apply(self, fn, recurse=True):
        # A cast of the layer (layer.half(), model.to(torch.bfloat16), ...) casts the experts;
        # the router-side tensors stay fp32 (the cast reaches them as a move only). Moving or
        # casting invalidates every kernel built for the old device or dtype.
        fp32 = [t for t in (getattr(self, n) for n in FP32_TENSORS) if t is not None]
        keep = {id(t) for t in fp32} | {id(t.grad) for t in fp32 if t.grad is not None}

        def keep_fp32(t):
            out = fn(t)
            if id(t) in keep and out.is_floating_point() and out.dtype != torch.float32:
                out = t.detach().to(device=out.device)
            return out

        result = super()._apply(keep_fp32, recurse)
        self._kernels, self._kernel_reasons = {}, {}
        self._follow_dtype()
        return result

    def _follow_dtype(self) -> None:
        """config.dtype follows the expert weights' dtype after a cast."""
        dtype = self.gate_up_proj.dtype
        try:
            name = dtype_name(dtype)
        except ValueError:
            self._cast_dtype = dtype       # forward says what to do
            return
        self._cast_dtype = None
        if name != self.config.dtype:
            self.config = self.config.replace(dtype=name)

    def __getstate__(self):
        # Kernels hold device memory and loaded modules: a copy or a pickle builds its own.
        return {**super().__getstate__(), "_kernels": {}, "_kernel_reasons": {}}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._owner = ops.register_owner(self)     # a copy is a layer of its own

    def __prepare_scriptable__(self):
        raise RuntimeError("FlashMoELayer cannot be scripted with torch.jit.script: its forward "
                           "routes tokens with data-dependent Python and runs a custom op; use "
                           "torch.compile (fullgraph=True works) or torch.export instead")

    @classmethod
    def from_hf(cls, block: nn.Module, backend: str = "auto", **kwargs) -> "FlashMoELayer":
        """A layer computing what a transformers 5 sparse-MoE block computes, with its weights
        copied (see ``flashmoe.hf`` for the supported blocks). ``kwargs`` go to the
        constructor (virtual_world, device, max_tokens, process_group). The block's router
        jitter (Mixtral's ``jitter_noise``, DBRX's ``moe_jitter_eps``) carries over as the
        layer's ``jitter_noise``. For a block whose forward returns (hidden states, router
        output) (GPT-OSS, Llama4) the layer's forward returns (out, router logits) likewise
        (``returns_router_logits``), so it takes the block's place in its decoder layer."""
        from .hf import from_hf
        return from_hf(cls, block, backend=backend, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"hidden={c.hidden_size}", f"intermediate={c.intermediate_size}",
                 f"experts={c.num_experts}", f"top_k={c.top_k}", f"dtype={c.dtype}",
                 f"backend={self.backend!r}"]
        if c.identity_experts:
            parts.insert(3, f"identity_experts={c.identity_experts}")
        if self.world_size > 1:
            parts.append(f"rank={self.rank}/{self.world_size} experts "
                         f"{self.local_experts.start}..{self.local_experts.stop - 1}")
        if self.virtual_world > 1:
            parts.append(f"virtual_world={self.virtual_world}")
        return ", ".join(parts)


def _is_int(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
