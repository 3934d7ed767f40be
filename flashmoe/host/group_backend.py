"""GroupBackend: the kernel expert-parallel across the processes of a torch.distributed group.

Each process is one rank of W (L = 1 hosted rank per launch, ``first_local_rank`` = its rank),
holds the weights of its E/W experts only (``weights_first_expert = rank * E / W``) and runs one
cooperative launch per forward on its own tokens. Ranks reach each other through the symmetric
heap of ``runtime.Runtime``: peer pointers where nvshmem_ptr gives one (NVLink, several PEs on
one GPU), NVSHMEM puts elsewhere (KernelSpec.transport="nvshmem"). The plan banks every region
peers write, since a rank can be one launch ahead of another.

What every rank must agree on, and how it is kept:
- ``max_tokens`` (T per rank) is fixed: the heap is symmetric, so it cannot grow on one rank
  alone. Checked across the group at construction; a forward that brings more tokens raises.
- Errors. A stopped launch on one rank makes its peers' waits stop too, at different times. Before
  the next launch (``error_check='deferred'``) or right after this one (``'sync'``), every rank
  waits for its own launch and the group all-reduces "did any launch stop"; then every rank zeroes
  its counters and raises, so no rank launches again while another still runs or holds stale
  counters. ``'none'`` skips it until ``synchronize()`` (a collective as well): ranks then run up
  to a launch apart, which the banked regions allow.

Without GPUs, ``group`` may be an ``emulated_group.EmulatedRank``: the same code runs each rank as
a thread of one process, its launches on the CPU emulator (the module says what stands in for
NVSHMEM, the process group and the stream).
"""

from __future__ import annotations

import ctypes

import torch

from ..config import MoEConfig
from ..distributed import rank_weights
from ..errors import FlashMoEError, KernelUnavailable
from ..reference import MoEWeights
from . import abi
from .backend import KernelBackend, _device_info, cuda_device_arch, emulated_setup, shared_memory_problem
from .launch import check_control
from .plan import experts_per_rank, kernel_support
from .spec import KernelSpec
from .weights import KernelWeights

DEFAULT_MAX_TOKENS = 1024


class TorchGroup:
    """The collectives GroupBackend needs, over a torch.distributed group (an
    ``emulated_group.EmulatedRank`` offers the same)."""

    def __init__(self, group, device=None):
        import torch.distributed as dist
        self.group, self.device = group, device
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def agree(self, ok: bool) -> bool:
        return group_agrees(ok, self.group, self.device)

    def values(self, value) -> list:
        return group_values(value, self.group)


def group_agrees(ok: bool, group, device=None) -> bool:
    """True when ``ok`` holds on every rank of ``group`` (an all-reduce of one integer)."""
    import torch.distributed as dist
    on_gpu = dist.get_backend(group) == "nccl"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32,
                        device=(device or torch.device("cuda", torch.cuda.current_device())) if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def group_values(value: int, group) -> list[int]:
    import torch.distributed as dist
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


class GroupBackend(KernelBackend):
    """One rank of an expert-parallel kernel across processes (see the module docstring)."""

    @staticmethod
    def unavailable_reason(config: MoEConfig, device, group=None) -> str | None:
        import torch.distributed as dist
        arch, reason = cuda_device_arch(device)
        if reason:
            return reason
        try:
            from .runtime import _import_nvshmem
            _import_nvshmem()
        except KernelUnavailable as e:
            return str(e)
        world = dist.get_world_size(group)
        return (kernel_support(config, KernelSpec(arch=arch, dtype=config.dtype, gated=config.gated,
                                                  scale_input=config.scale_expert_input), world)
                or shared_memory_problem(config, world, _device_info(device)))

    def __init__(self, config: MoEConfig, device, group, max_tokens: int | None = None, *,
                 timeout_s: float = 10.0, error_check: str = "deferred",
                 blocks_per_rank: int | None = None, trace_capacity: int = 0, runtime=None,
                 force_nvshmem: bool = False, spec: KernelSpec | None = None):
        from dataclasses import replace
        from .emulated_group import EmulatedRank
        self.group = group
        self.emulate = isinstance(group, EmulatedRank)
        if self.emulate:
            self._comm, self.device = group, torch.device("cpu")
            self.device_info, spec = emulated_setup(config, 1, blocks_per_rank, spec)
        else:
            self.device = torch.device(device)
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._comm = TorchGroup(group, self.device)
            info = _device_info(self.device)
            sm_count = info.sm_count if blocks_per_rank is None else min(blocks_per_rank, info.sm_count)
            self.device_info = replace(info, sm_count=sm_count)
        self.rank, world = self._comm.rank, self._comm.size
        self._setup_common(config, world, timeout_s, error_check, trace_capacity)
        T = max_tokens or DEFAULT_MAX_TOKENS
        bounds = self._comm.values(T)
        if len(set(bounds)) != 1:
            raise ValueError(f"max_tokens differs across the group's ranks ({bounds}): the symmetric "
                             "heap has one layout, so every rank must build the layer with the same "
                             "max_tokens")
        self._set_specs(spec, transport="nvshmem")
        # This rank's E / W experts (or all E, of which it reads its own: rank_weights).
        self._weights = KernelWeights(config, self.device, experts_per_rank(config.num_experts, world), "router",
                                      self.emulate)
        if runtime is None:
            from .runtime import Runtime
            runtime = group.runtime() if self.emulate else Runtime.from_process_group(group, self.device)
        self._runtime = self.runtime = runtime
        self._plans(T, num_local_ranks=1, first_local_rank=self.rank)
        self.symmetric = self.runtime.allocate_heap(1, self.plan.rank_heap_bytes, self.world,
                                                    force_nvshmem=force_nvshmem)
        self.heap, self.peer_bases = self.symmetric.tensor, self.symmetric.peer_bases
        self.control = torch.zeros(ctypes.sizeof(abi.Control), dtype=torch.uint8, device=self.device)
        self._load_kernels()

    @property
    def transports(self) -> str:
        from .heap import describe_transports
        return describe_transports(self.symmetric.bases)

    def _ensure_plan(self, tokens: int) -> None:
        if tokens > self.plan.max_tokens:
            raise ValueError(f"this forward brings {tokens} tokens to rank {self.rank}; the layer was "
                             f"built for at most {self.plan.max_tokens} per rank (its symmetric heap "
                             f"cannot grow on one rank alone): build it with max_tokens>={tokens} on "
                             "every rank")

    # ---- forward

    def forward(self, x2d: torch.Tensor, weights: MoEWeights, return_routing: bool = False,
                out: torch.Tensor | None = None, fault_rank: int | None = None):
        """This rank's out[T, H] for its x2d[T, H] (a collective: every rank calls it, also with
        0 tokens). ``weights`` hold this rank's E/W experts (or all E: this rank's are used)."""
        x2d = self._check_x(x2d)
        n = x2d.shape[0]
        self._ensure_plan(n)
        self._settle(block=self.error_check != "none")
        views = self._weights.views(rank_weights(weights, self.rank, self.world, self.config.num_experts))
        out = self._check_out(out, x2d)
        x_ptr = x2d.data_ptr()
        before = []
        if self.symmetric.uses_nvshmem:
            # A NIC reads the rows this rank puts: they must be in the symmetric heap.
            region = self.plan.regions["x_stage"]
            stage = self.heap[region.offset:region.offset + n * x2d.shape[1] * x2d.element_size()]
            if self.emulate:    # stream order: copied when the launch starts
                before.append((stage.data_ptr(), x2d.data_ptr(), stage.numel()))
            else:
                stage.view(x2d.dtype).view(n, x2d.shape[1]).copy_(x2d)
            x_ptr = stage.data_ptr()
        # Variants share the heap layout and the protocol, so ranks may run different tiles; each
        # estimates the forward's size from its own tokens (ranks bring similar counts).
        variant = self.variant_for(n * self.world)
        params = self._params(variant, [(x_ptr, out.data_ptr(), n)], fault_rank,
                              weights_first_expert=self.rank * self._weights.num_experts)
        self._last = variant
        if self.emulate:
            # Every launch is checked at the next settle (with 'none': at synchronize()).
            launch = self._comm.launch(variant.kernel, params, variant.plan.grid, variant.plan.smem_bytes,
                                       keep=(x2d, out, views), before=before, control=self.control)
            self._pending.append((launch, launch.control))
            if self.error_check == "sync":
                self._settle(block=True)
            if not return_routing:
                return out
            launch.synchronize()     # the routing is read back from the heap once the launch ends
            return out, self._routing([n])
        stream = torch.cuda.current_stream(self.device)
        variant.kernel.launch(params, variant.plan.grid, stream.cuda_stream)
        if self.error_check != "none":
            self._record_pending(stream)
        if self.error_check == "sync":
            self._settle(block=True)
        return (out, self._routing([n])) if return_routing else out

    # ---- errors, consistently across ranks

    def _settle(self, block: bool) -> None:
        """Wait for this rank's launches, agree across the group whether any stopped, and if one
        did, reset the counters on every rank and raise there."""
        if not self._pending or not block:
            return
        records = None
        for event, copy in self._pending:
            event.synchronize()
            try:
                check_control(copy.numpy().tobytes(), 1)
            except FlashMoEError as e:
                records = records or e
        if not self.emulate:      # events and pinned copies are reused; emulated launches are not
            self._free_checks += self._pending
        self._pending.clear()
        if self._comm.agree(records is None):
            return
        self._reset_after_error()
        if not self.emulate:      # emulated: every launch of this rank has ended (waited for above)
            torch.cuda.synchronize(self.device)
        self._comm.agree(True)     # every rank reset before anyone launches
        if records is not None:
            raise records
        raise FlashMoEError(f"flashmoe kernel stopped on another rank of the group (this is rank "
                            f"{self.rank}); its FlashMoEError names who waited for what. Counters "
                            "are reset on every rank: the next forward runs normally")

    def synchronize(self) -> None:
        """Wait for this rank's launches and raise if any rank's stopped (a collective; with
        error_check='none' the only check there is)."""
        if self.error_check == "none" and not self.emulate:
            self._record_pending(torch.cuda.current_stream(self.device))
        self._settle(block=True)

    def _check_pending(self, block: bool) -> None:
        self._settle(block)

    def close(self) -> None:
        """Give the heap back (collective: every rank closes its layers in the same order)."""
        if self.symmetric is not None:
            self.synchronize()
            self.runtime.barrier()
            self.symmetric.close()
            self.symmetric = self.heap = self.peer_bases = None
