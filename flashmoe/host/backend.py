"""KernelBackend: runs a layer's forward as one launch of the flashmoe kernel.

(Across processes, one rank per process: ``group_backend.GroupBackend``, a subclass.)

One backend serves one layer on one device with W virtual ranks (the tokens of a forward are split
across them; W = 1 is plain single-GPU use). It owns the plan, the heap (all W slices in one
allocation, so every "peer" is this GPU's own memory), the error buffer and the loaded kernel.
Per forward it only fills the Params struct and launches: no allocation but the output, no
compilation (the plan grows, and the heap with it, only when a forward brings more tokens per rank
than ever before), and no host synchronisation unless ``error_check="sync"``.

Shape-aware: by default the backend builds one kernel per GEMM tile (the decode 64 x 128, the
prefill 128 x 128 and, with wgmma and pointer transport, the wide 128 x 256 tile:
``plan.kernel_specs``), all compiled when the backend is made, over one heap whose row-tile
counters are sized for the smallest tile; each forward runs the one ``plan.choose_tile`` picks for
its token count. A batch size never compiles anything.

``emulate=True`` runs the same kernel source on the CPU through ``flashmoe.host.emulator`` (for
tests on machines without a GPU): the same plan, heap layout and Params, in CPU memory.

``trace_capacity=N`` compiles the kernels with per-task timeline records (N per block);
``last_trace()`` returns the last forward's, decoded (``flashmoe.trace``). ``gemm='mma_sync'``
runs the portable tensor-core engine on Hopper too (the default there is wgmma + TMA).

Errors. A stopped launch (a bounded wait expired) raises ``FlashMoEError`` in every error-check
mode: at once (``'sync'``), at the next forward or ``synchronize()`` (``'deferred'``), or at
``synchronize()`` (``'none'``, for CUDA-graph capture). Launches after a stopped one run normally
in the meantime: the kernel's abort flag is tagged with the launch it belongs to. The emulator
honours the same modes.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, replace

import torch

from ..config import MoEConfig
from ..errors import KernelUnavailable
from ..reference import MoEWeights, Routing
from . import abi
from .heap import LocalHeap
from .launch import check_control
from .plan import (DeviceInfo, Plan, choose_tile, kernel_specs, kernel_support, layer_specs, plan_tokens,
                   trace_layout, variant_plans)
from .spec import BLOCK_N, GEMM_ENGINES, KernelSpec, arch_for_capability, wgmma_spec
from .weights import KernelWeights


def _device_info(device: torch.device) -> DeviceInfo:
    props = torch.cuda.get_device_properties(device)
    return DeviceInfo(sm_count=props.multi_processor_count,
                      max_smem_per_block=props.shared_memory_per_block_optin,
                      arch=arch_for_capability(props.major, props.minor))


@dataclass
class Variant:
    """One compiled kernel of the backend: its spec, its plan (all variants share the heap layout)
    and the loaded kernel."""

    spec: KernelSpec
    plan: Plan | None = None
    kernel: object = None

    @property
    def tile(self) -> tuple[int, int]:
        """(block_m, block_n): the key of the backend's variants."""
        return self.spec.block_m, self.spec.block_n


def split_tokens(num_tokens: int, ranks: int) -> list[int]:
    """Tokens per virtual rank: as even as possible, the first ranks take the remainder."""
    base, extra = divmod(num_tokens, ranks)
    return [base + (1 if r < extra else 0) for r in range(ranks)]


def cuda_device_arch(device) -> tuple[str | None, str | None]:
    """(cubin arch of ``device``, None) when the kernel can run there, else (None, why not)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return None, "the kernel runs on CUDA devices; the input is not on one"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return None, f"the kernel needs compute capability 8.0 or newer; this GPU is {major}.{minor}"
    return arch_for_capability(major, minor), None


@functools.lru_cache(maxsize=256)
def shared_memory_problem(config: MoEConfig, world: int, info: DeviceInfo, gemm: str | None = None) -> str | None:
    """Why no kernel of this layer fits the device's shared memory (``plan.layer_specs``), or None.
    Cached: the functional ops ask it on every call, and the answer (~20 us to work out) never changes."""
    try:
        layer_specs(config, world, info, gemm)
    except ValueError as e:
        return str(e)
    return None


def emulated_setup(config: MoEConfig, ranks: int, blocks_per_rank: int | None, spec, gemm: str | None = None):
    """(DeviceInfo, spec) of a backend on the CPU emulator: 2 blocks per hosted rank unless told
    (enough to share out tasks, few enough to stay fast), shared memory as on an H100, and the
    sm_80 mma_sync spec with 3 stages unless a spec or gemm='wgmma' is given."""
    info = DeviceInfo(sm_count=(blocks_per_rank or 2) * ranks, max_smem_per_block=227 * 1024, arch="sm_80")
    if spec is None:
        spec = replace(wgmma_spec(config.dtype, config.gated, stages=3) if gemm == "wgmma" else
                       KernelSpec(arch="sm_80", dtype=config.dtype, gated=config.gated, stages=3),
                       scale_input=config.scale_expert_input)
    return info, spec


class KernelBackend:
    @staticmethod
    def unavailable_reason(config: MoEConfig, device, virtual_world: int = 1, emulate: bool = False) -> str | None:
        if emulate:
            from .emulator import emulator_available
            arch, reason = "sm_80", emulator_available()
        else:
            from .launch import driver_problem
            arch, reason = cuda_device_arch(device)
            reason = reason or driver_problem()
        if reason:
            return reason
        if virtual_world > 8:
            return f"virtual_world={virtual_world}: one launch hosts at most 8 ranks"
        reason = kernel_support(config, KernelSpec(arch=arch, dtype=config.dtype, gated=config.gated,
                                                   scale_input=config.scale_expert_input), virtual_world)
        return reason if reason or emulate else shared_memory_problem(config, virtual_world, _device_info(device))

    def __init__(self, config: MoEConfig, device, virtual_world: int = 1, max_tokens: int | None = None, *,
                 emulate: bool = False, spec: KernelSpec | list[KernelSpec] | None = None,
                 timeout_s: float = 10.0, error_check: str = "deferred", blocks_per_rank: int | None = None,
                 trace_capacity: int = 0, runtime=None, force_nvshmem: bool = False, gemm: str | None = None,
                 routing: str = "router"):
        if gemm not in (None, *GEMM_ENGINES):
            raise ValueError(f"gemm={gemm!r}: allowed are {', '.join(GEMM_ENGINES)} (None: the device's best)")
        reason = KernelBackend.unavailable_reason(config, device, virtual_world, emulate)
        if reason:
            raise KernelUnavailable(reason)
        self._setup_common(config, virtual_world, timeout_s, error_check, trace_capacity)
        self.emulate = emulate
        if emulate:
            self.device = torch.device("cpu")
            self.device_info, spec = emulated_setup(config, virtual_world, blocks_per_rank, spec, gemm)
        else:
            self.device = torch.device(device)
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            info = _device_info(self.device)
            sm_count = info.sm_count if blocks_per_rank is None else blocks_per_rank * virtual_world
            self.device_info = replace(info, sm_count=min(sm_count, info.sm_count))
        self._set_specs(spec, gemm=gemm, routing=routing)
        self._weights = KernelWeights(config, self.device, config.num_experts, routing, emulate)
        # spec.transport == "nvshmem" with virtual ranks: the heap is one NVSHMEM allocation of a
        # single PE (runtime.Runtime.single_process), and force_nvshmem sends every write through
        # NVSHMEM's device API: the NVSHMEM transport tested on one GPU, deterministically.
        self._runtime, self._force_nvshmem, self._symmetric = runtime, force_nvshmem, None
        if self.spec.transport == "nvshmem" and not emulate and runtime is None:
            from .runtime import Runtime
            self._runtime = Runtime.single_process(self.device)
        self.plan = None
        self._ensure_plan(max_tokens or 0)

    def _setup_common(self, config, world, timeout_s, error_check, trace_capacity) -> None:
        if error_check not in ("sync", "deferred", "none"):
            raise ValueError(f"error_check={error_check!r}: allowed are sync, deferred, none")
        if trace_capacity < 0:
            raise ValueError(f"trace_capacity={trace_capacity}: must be >= 0")
        self.config, self.world = config, world
        self.timeout_ns = int(timeout_s * 1e9)
        self.error_check = error_check
        self.trace_capacity = trace_capacity
        self._pending = []          # (event, control copy) of launches not yet checked
        self._free_checks = []      # (event, pinned copy) pairs to reuse
        self._last = None           # the variant of the last launch (its trace)

    def _set_specs(self, spec, transport: str = "peer", gemm: str | None = None, routing: str = "router") -> None:
        """The kernel variants: the given spec(s), or the layer's on this device with the ``gemm``
        engine, default the device's best (``plan.kernel_specs``); all route with ``routing``."""
        if spec is None:
            try:
                specs = kernel_specs(self.config, self.world, self.device_info, gemm, transport)
            except ValueError as e:
                raise KernelUnavailable(str(e)) from e
        else:
            specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        specs = [replace(s, trace=self.trace_capacity > 0, routing=routing,
                         transport=transport if transport != "peer" else s.transport) for s in specs]
        if any(s.transport == "nvshmem" and s.block_n > BLOCK_N for s in specs):
            raise ValueError(f"the NVSHMEM transport runs tiles of at most {BLOCK_N} columns (its build of a wider "
                             f"tile spills registers)")
        # Widest first: the heap and the defaults are the first variant's.
        self.variants = {v.tile: v for v in sorted(map(Variant, specs), key=lambda v: v.tile, reverse=True)}
        if len(self.variants) != len(specs):
            raise ValueError("the backend's specs must differ in their tile (one kernel per block_m x block_n)")
        self.spec = next(iter(self.variants.values())).spec

    # -- set-up (cold path) --

    def _plans(self, max_tokens: int, **placement) -> None:
        variants = list(self.variants.values())
        plans = variant_plans(self.config, [v.spec for v in variants], self.world, max_tokens,
                              self.device_info, **placement)
        for v, plan in zip(variants, plans):
            v.plan = plan
        self.plan = plans[0]
        if self.trace_capacity:
            self.trace_buffer = torch.zeros(trace_layout(self.plan.grid, self.trace_capacity)[2],
                                            dtype=torch.uint8, device=self.device)

    def _ensure_plan(self, tokens_per_rank: int) -> None:
        if self.plan is not None and tokens_per_rank <= self.plan.max_tokens:
            return
        self._plans(plan_tokens(tokens_per_rank))
        dev = self.device
        if self._runtime is not None:
            if self._symmetric is not None:
                self._symmetric.close()
            self._symmetric = self._runtime.allocate_heap(self.world, self.plan.rank_heap_bytes, self.world,
                                                          force_nvshmem=self._force_nvshmem)
            self.heap, self.peer_bases = self._symmetric.tensor, self._symmetric.peer_bases
        else:
            heap = LocalHeap(self.world, self.plan.rank_heap_bytes, dev)
            self.heap, self.peer_bases = heap.tensor, heap.peer_bases
        self.control = torch.zeros(ctypes.sizeof(abi.Control), dtype=torch.uint8, device=dev)
        self._load_kernels()

    def _load_kernels(self) -> None:
        """Compile (or load from the cache) and load every variant's kernel, once."""
        for v in self.variants.values():
            if v.kernel is not None:
                continue
            if self.emulate:
                from .emulator import EmulatedKernel
                v.kernel = EmulatedKernel(v.spec)
                continue
            from .compile import compile_spec
            from .launch import CudaKernel
            compiled = compile_spec(v.spec)
            if compiled.resources.static_smem_bytes % v.spec.pipe_align:
                # The dynamic shared memory (the GEMM pipeline) starts after the static variables.
                raise KernelUnavailable(
                    f"the kernel has {compiled.resources.static_smem_bytes} B of static shared memory, so "
                    f"its GEMM pipeline would not start on the {v.spec.pipe_align}-byte boundary the "
                    f"{v.spec.gemm} engine needs [spec {v.spec.key()}]")
            v.kernel = CudaKernel(compiled.cubin, v.plan.smem_bytes, v.spec.threads, self.device.index)
            v.kernel.check_grid(v.plan.grid, self.device_info.sm_count)
            if self._runtime is not None:
                self._runtime.register_kernel(v.kernel.module)

    def close(self) -> None:
        """Give the heap back now (a symmetric one to NVSHMEM, whose heap is a fixed size)
        instead of when the backend is collected; a later forward allocates it again."""
        self.synchronize()
        if self._symmetric is not None:
            self._symmetric.close()
        self._symmetric = self.heap = self.peer_bases = self.plan = None

    def last_tile(self) -> tuple[int, int] | None:
        """(block_m, block_n) of the kernel the last forward ran (None before the first)."""
        return self._last.tile if self._last is not None else None

    def variant_for(self, total_tokens: int) -> Variant:
        """The kernel a forward of ``total_tokens`` (all ranks) runs: plan.choose_tile's tile, or
        the nearest the backend has (the tallest no taller, then the widest no wider; else the
        smallest)."""
        if len(self.variants) == 1:
            return next(iter(self.variants.values()))
        bm, bn = choose_tile(self.config, total_tokens, self.world, self.plan.blocks_per_rank)
        fitting = [t for t in self.variants if t[0] <= bm and t[1] <= bn] or [min(self.variants)]
        return self.variants[max(fitting)]

    # -- forward (hot path) --

    def forward(self, x2d: torch.Tensor, weights: MoEWeights, return_routing: bool = False,
                out: torch.Tensor | None = None, fault_rank: int | None = None,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None):
        """out[T, H] for x2d[T, H] (and the Routing the kernel chose, if asked). ``out`` may be
        given (checks poison it first); ``fault_rank`` (tests only) makes that virtual rank stall
        so every wait on it times out. A backend built with ``routing='given'`` runs the kernel
        without a router and takes ``routing=(topk_ids, topk_weights)`` ([T, k], k the config's
        top_k): it dispatches, multiplies and combines as told (an id outside 0..E-1 is no
        expert), and ``weights.router_weight`` is not read."""
        if (routing is not None) != (self.spec.routing == "given"):
            raise ValueError("routing=(topk_ids, topk_weights) goes with a backend built with routing='given', "
                             f"and only there; this one has routing={self.spec.routing!r}")
        x2d = self._check_x(x2d)
        self._check_pending(block=False)
        counts = split_tokens(x2d.shape[0], self.world)
        self._ensure_plan(max(counts))
        self._weights.views(weights)
        given = None if routing is None else self._given_routing(x2d, *routing)
        out = self._check_out(out, x2d)
        row = self.config.hidden_size * x2d.element_size()
        k = self.config.top_k
        local, start = [], 0
        for n in counts:
            rank = (x2d.data_ptr() + start * row, out.data_ptr() + start * row, n)
            if given is not None:   # ids are int32, weights fp32: 4 bytes per slot
                rank += (given[0].data_ptr() + start * k * 4, given[1].data_ptr() + start * k * 4)
            local.append(rank)
            start += n
        variant = self.variant_for(x2d.shape[0])
        self._launch(variant, self._params(variant, local, fault_rank))
        if not return_routing:
            return out
        return out, self._routing(counts)

    def _given_routing(self, x2d: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        """The caller's routing as the kernel reads it: int32 ids (every id outside 0..E-1 the
        same "no expert", before the narrowing could wrap it into range) and fp32 weights."""
        shape = (x2d.shape[0], self.config.top_k)
        if tuple(ids.shape) != shape or tuple(weights.shape) != shape:
            raise ValueError(f"routing: topk_ids {tuple(ids.shape)} and topk_weights {tuple(weights.shape)} "
                             f"must both be {shape}")
        if ids.device != self.device or weights.device != self.device:
            raise ValueError(f"routing is on {ids.device} / {weights.device}, the kernel runs on {self.device}")
        ids = ids.clamp(-1, self.config.num_experts).to(torch.int32).contiguous()
        return ids, weights.to(torch.float32).contiguous()

    def _check_x(self, x2d: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x2d.dim() != 2 or x2d.shape[1] != cfg.hidden_size or x2d.dtype != cfg.torch_dtype:
            raise ValueError(f"expected x of shape [T, {cfg.hidden_size}] and dtype {cfg.dtype}, "
                             f"got {tuple(x2d.shape)} {x2d.dtype}")
        x2d = x2d.contiguous()
        return x2d.clone() if x2d.data_ptr() % 16 else x2d   # rows move as 16-byte vectors

    @staticmethod
    def _check_out(out: torch.Tensor | None, x2d: torch.Tensor) -> torch.Tensor:
        if out is None:
            return torch.empty_like(x2d)
        if out.shape != x2d.shape or out.dtype != x2d.dtype or not out.is_contiguous() or out.data_ptr() % 16:
            raise ValueError("out must be a contiguous, 16-byte aligned tensor like x")
        return out

    def _params(self, variant: Variant, local, fault_rank, weights_first_expert: int = 0):
        ptr = self._weights.pointer
        return abi.fill_params(
            variant.plan, heap=self.heap.data_ptr(), peer_bases=self.peer_bases.data_ptr(),
            control=self.control.data_ptr(), router_weight=ptr("router"), gate_up=ptr("gate_up"),
            down=ptr("down"), selection_bias=ptr("bias"), router_bias=ptr("router_bias"),
            gate_up_bias=ptr("gate_up_bias"), down_bias=ptr("down_bias"), shared_gate_up=ptr("shared_gate_up"),
            shared_down=ptr("shared_down"), weights_first_expert=weights_first_expert, local=local,
            timeout_ns=self.timeout_ns,
            fault_kind=abi.FaultKind.STALL if fault_rank is not None else abi.FaultKind.NONE,
            fault_rank=fault_rank or 0, weight_maps=self._weights.maps(variant.spec),
            trace=self.trace_buffer.data_ptr() if self.trace_capacity else 0,
            trace_capacity=self.trace_capacity)

    def _launch(self, variant: Variant, params: abi.Params) -> None:
        self._last = variant
        if self.emulate:      # runs to completion; the error modes work as on the GPU
            variant.kernel.launch(params, variant.plan.grid, variant.spec.threads, variant.plan.smem_bytes)
            stream = None
        else:
            stream = torch.cuda.current_stream(self.device)
            variant.kernel.launch(params, variant.plan.grid, stream.cuda_stream)
        if self.error_check == "sync":
            self._check(self.control.cpu().numpy().tobytes())
        elif self.error_check == "deferred":
            self._record_pending(stream)

    def _record_pending(self, stream) -> None:
        """Queue an asynchronous copy of the error buffer behind this launch (pinned buffers and
        events are reused once checked: nothing is allocated per forward in steady state). The
        emulator has no stream: its copy is taken now and needs no event."""
        if stream is None:
            self._pending.append((None, self.control.clone()))
            return
        event, copy = self._free_checks.pop() if self._free_checks else (
            torch.cuda.Event(), torch.empty(self.control.shape, dtype=torch.uint8, pin_memory=True))
        copy.copy_(self.control, non_blocking=True)
        event.record(stream)
        self._pending.append((event, copy))

    def last_trace(self):
        """The last forward's timeline (``flashmoe.trace.Trace``); needs ``trace_capacity > 0``."""
        if not self.trace_capacity or self._last is None:
            raise ValueError("no trace: build the backend with trace_capacity > 0 and run a forward")
        from ..trace import decode
        self.synchronize()
        return decode(self.trace_buffer.cpu().numpy(), self._last.plan.grid, self.trace_capacity)

    def _check(self, control_bytes: bytes) -> None:
        try:
            check_control(control_bytes, self.plan.num_local_ranks)
        except Exception:
            self._reset_after_error()
            raise

    def _check_pending(self, block: bool) -> None:
        while self._pending:
            event, copy = self._pending[0]
            if event is not None:
                if not block and not event.query():
                    return
                event.synchronize()
                self._free_checks.append((event, copy))
            self._pending.pop(0)
            self._check(copy.numpy().tobytes())

    def synchronize(self) -> None:
        """Wait for every launch and raise FlashMoEError if one of them stopped (in every
        error_check mode; with 'none' this is the only check there is)."""
        if self.error_check == "none" and self.plan is not None:
            self._record_pending(None if self.emulate else torch.cuda.current_stream(self.device))
        self._check_pending(block=True)

    def _reset_after_error(self) -> None:
        """A stopped launch leaves counters half-way: zero them (both banks) and the error buffer."""
        self._pending.clear()
        for name in ("sync_counters", "select_done", "tile_done"):
            region = self.plan.regions[name]
            for v in range(self.plan.num_local_ranks):
                start = v * self.plan.rank_heap_bytes + region.offset
                self.heap[start:start + region.total].zero_()
        self.control.zero_()

    def _routing(self, counts: list[int]) -> Routing:
        """The kernel's routing, read back from each rank's regions (device ops only, no sync)."""
        k, plan = self.config.top_k, self.plan

        def view(v, name, dtype, n, width, bank=0):
            off = v * plan.rank_heap_bytes + plan.regions[name].bank_offset(bank)
            return self.heap[off:off + n * width * 4].view(dtype).view(n, width)

        ids, weights, kept, gates = [], [], [], []
        for v, n in enumerate(counts):
            ids.append(view(v, "topk_ids", torch.int32, n, k).long())
            weights.append(view(v, "topk_weights", torch.float32, n, k).clone())
            if self.config.capacity_factor is not None:
                # A dropped (token, slot) holds the epoch of the launch that dropped it; the kernel
                # stored that epoch in the heap word on exit.
                # Banked (one process per rank): the launch used bank epoch % 2.
                epoch = view(v, "epoch", torch.int32, 1, 1)
                marks = torch.where(epoch % 2 == 1, view(v, "drop_marks", torch.int32, n, k, 1),
                                    view(v, "drop_marks", torch.int32, n, k, 0))
                kept.append(marks != epoch)
            else:
                kept.append(torch.ones(n, k, dtype=torch.bool, device=self.device))
            if self.config.shared_expert_gate:
                gates.append(view(v, "shared_gate", torch.float32, n, 1).squeeze(1).clone())
        return Routing(ids=torch.cat(ids), weights=torch.cat(weights), kept=torch.cat(kept),
                       shared_gate=torch.cat(gates) if gates else None)
