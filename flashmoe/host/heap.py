"""Symmetric heaps: where every hosted rank's slice (``plan.Plan.rank_heap_bytes``) lives, and
how this GPU reaches every rank's slice (``Params.peer_bases``).

- ``LocalHeap``: one process hosts all W ranks (virtual ranks on one GPU). One torch allocation
  holds the W slices; every "peer" is this GPU's own memory.
- ``SymmetricHeap``: one process per rank (or a few ranks per process). One allocation in the
  NVSHMEM symmetric heap of the same size on every PE (``runtime.Runtime.allocate_heap``); a
  peer's base is ``nvshmem_ptr`` of it, or 0 where this GPU has no load/store path to that PE
  (another node): the kernel then writes to it with NVSHMEM puts (KernelSpec.transport="nvshmem").

The per-peer choice is ``peer_bases()``, a pure function so it is tested without a GPU.
"""

from __future__ import annotations

from typing import Callable

import torch


def peer_bases(world: int, ranks_per_pe: int, rank_heap_bytes: int,
               peer_pointer: Callable[[int], int], force_nvshmem: bool = False) -> list[int]:
    """Base address of every rank's slice as this GPU addresses it, 0 for "use NVSHMEM".

    Rank r lives on PE ``r // ranks_per_pe`` in slice ``r % ranks_per_pe`` of that PE's heap
    (device/common/transport_nvshmem.cuh addresses it the same way). ``peer_pointer(pe)`` is
    ``nvshmem_ptr(heap, pe)``: the PE's heap mapped into this GPU, or 0. ``force_nvshmem`` gives
    every rank the NVSHMEM path, also this PE's own (tests of the device API on one GPU).
    """
    if world < 1 or ranks_per_pe < 1 or world % ranks_per_pe:
        raise ValueError(f"world={world} must be a positive multiple of ranks_per_pe={ranks_per_pe}")
    bases = []
    for r in range(world):
        base = 0 if force_nvshmem else int(peer_pointer(r // ranks_per_pe))
        bases.append(base + (r % ranks_per_pe) * rank_heap_bytes if base else 0)
    return bases


def describe_transports(bases: list[int]) -> str:
    """'peer pointers for ranks 0-3; NVSHMEM for ranks 4-7' (what the plan chose, for logs)."""
    groups = {"peer pointers": [r for r, b in enumerate(bases) if b],
              "NVSHMEM": [r for r, b in enumerate(bases) if not b]}
    parts = []
    for name, ranks in groups.items():
        if ranks:
            parts.append(f"{name} for rank{'s' if len(ranks) > 1 else ''} {_spans(ranks)}")
    return "; ".join(parts)


def _spans(ranks: list[int]) -> str:
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


class LocalHeap:
    """All hosted slices in one torch allocation (zeroed: flags and counters start at 0)."""

    def __init__(self, num_slices: int, rank_heap_bytes: int, device):
        self.tensor = torch.zeros(num_slices * rank_heap_bytes, dtype=torch.uint8, device=device)
        self.rank_heap_bytes = rank_heap_bytes
        base = self.tensor.data_ptr()
        self.bases = [base + r * rank_heap_bytes for r in range(num_slices)]
        self.peer_bases = torch.tensor(self.bases, dtype=torch.int64, device=device)

    @property
    def base(self) -> int:
        return self.tensor.data_ptr()

    @property
    def uses_nvshmem(self) -> bool:
        return False

    def close(self) -> None:
        self.tensor = self.peer_bases = None


class SymmetricHeap:
    """One NVSHMEM symmetric allocation of ``num_slices * rank_heap_bytes`` bytes (made by
    ``Runtime.allocate_heap``, which also frees it). ``bases``: every world rank's slice as this
    GPU addresses it (0: NVSHMEM puts)."""

    def __init__(self, tensor: torch.Tensor, rank_heap_bytes: int, bases: list[int], release):
        self.tensor = tensor
        self.rank_heap_bytes = rank_heap_bytes
        self.bases = bases
        self.peer_bases = torch.tensor(bases, dtype=torch.int64, device=tensor.device)
        self._release = release

    @property
    def base(self) -> int:
        return self.tensor.data_ptr()

    @property
    def uses_nvshmem(self) -> bool:
        """Some rank is reached with NVSHMEM puts (its sources must be symmetric)."""
        return not all(self.bases)

    def close(self) -> None:
        if self.tensor is not None:
            tensor, self.tensor, self.peer_bases = self.tensor, None, None
            self._release(tensor)
