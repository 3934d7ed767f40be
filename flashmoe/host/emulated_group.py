"""An expert-parallel group of W ranks in one process, on the CPU emulator: what W processes
with one GPU each would do, checked on a machine without GPUs.

Each rank is a host thread running the real host code (``GroupBackend`` given an
``EmulatedRank`` as its group); its kernel launches go to one ``emulator.EmulatedWorld`` shared
by all ranks, where every rank's launch has its own heap and runs alongside the others on the
double-banked plan of one process per rank. What stands in for the rest:

- the process group: ``EmulatedRank.agree`` / ``values`` / ``barrier`` are collectives among the
  rank threads;
- NVSHMEM: ``EmulatedRuntime.allocate_heap`` gives each rank a zeroed heap of the same size and
  every rank the same table of peer bases: a pointer for the ranks of its "node"
  (``ranks_per_node``), 0 (NVSHMEM calls, emulated with their ordering) for the others;
- the stream: a rank's launches run one after another in the order it made them; a copy the host
  queues before a launch (x into the NVSHMEM staging region) happens when that launch starts.

Time. The emulated device runs only while every rank's host thread is blocked (waiting for a
launch, in a collective, or finished), so host code takes no device time and a run is
reproducible: the same seeds and delays give the same schedule and the same bits. Skew is made
explicit instead: ``delays(rank, n)`` holds rank's n-th launch back by that many virtual
nanoseconds after the moment it could start.

A group where no rank can go on (a collective some rank never joins, a wait on a launch that
can never end) raises in every waiting rank instead of hanging.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from typing import Callable

import torch

from . import abi
from .heap import SymmetricHeap


class GroupStuck(RuntimeError):
    """No rank of an emulated group can go on."""


class _Launch:
    """One rank's queued or running launch: synchronize() waits for it; ``control`` is the
    rank's error buffer as the launch left it (the stream-ordered copy a GPU run takes)."""

    def __init__(self, rank: "EmulatedRank", kernel, params: abi.Params, grid: int, smem: int, keep, before,
                 control: torch.Tensor, index: int):
        self.rank, self.kernel, self.params, self.grid, self.smem = rank, kernel, params, grid, smem
        self.keep, self.before, self.control_src, self.index = keep, before, control, index
        self.control = torch.empty_like(control)
        self.done = False

    def synchronize(self) -> None:
        self.rank.group._block(self.rank.rank, lambda: self.done)


class EmulatedGroup:
    """W emulated ranks (see the module docstring). ``seed``: the fiber schedule (0: round robin);
    ``weak_seed``: weak memory (0: sequentially consistent); ``ranks_per_node``: ranks that reach
    each other by pointer (default all; the others use NVSHMEM); ``delays(rank, n)``: virtual ns
    rank's n-th launch waits before it starts."""

    def __init__(self, world_size: int, *, seed: int = 0, weak_seed: int = 0, ranks_per_node: int | None = None,
                 delays: Callable[[int, int], int] | None = None):
        if world_size < 1:
            raise ValueError(f"world_size={world_size}: must be >= 1")
        self.size = world_size
        self.seed, self.weak_seed = seed, weak_seed
        self.ranks_per_node = ranks_per_node or world_size
        self.delays = delays or (lambda rank, n: 0)
        self._cv = threading.Condition()
        self._busy = set(range(world_size))      # ranks whose host code is running
        self._waiting: dict[int, Callable[[], bool]] = {}
        self._error: BaseException | None = None
        self._world = None                        # the emulated device, made at the first launch
        self._heaps: dict[int, tuple[int, int]] = {}
        self._queued = {r: deque() for r in range(world_size)}
        self._running: dict[int, _Launch] = {}
        self._by_id: dict[int, _Launch] = {}
        self._made = [0] * world_size             # launches each rank has made
        self._collective = _Collective()

    def rank(self, r: int) -> "EmulatedRank":
        return EmulatedRank(self, r)

    def run(self, fn: Callable[["EmulatedRank"], object]) -> list:
        """Call fn(rank) on every rank, each in its own thread; returns their results in rank
        order, or raises the first rank's exception (every rank ran to its end)."""
        results: list = [None] * self.size
        errors: list = [None] * self.size

        def body(r: int) -> None:
            try:
                results[r] = fn(self.rank(r))
            except BaseException as e:   # noqa: BLE001 - handed to the caller below
                errors[r] = e
            finally:
                with self._cv:
                    self._busy.discard(r)
                    self._wake()

        threads = [threading.Thread(target=body, args=(r,), name=f"flashmoe-emulated-rank-{r}") for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.close()
        for r, e in enumerate(errors):
            if e is not None:
                raise RankFailed(r, errors) from e
        return results

    def close(self) -> None:
        if self._world is not None:
            self._world.close()
            self._world = None

    # ---- blocking, and the device in the meantime

    def _block(self, rank: int, ready: Callable[[], bool]) -> None:
        """Hold rank's thread until ready(); while every rank is blocked, run the device."""
        with self._cv:
            if ready():
                return
            self._waiting[rank] = ready
            self._busy.discard(rank)
            try:
                while rank in self._waiting:
                    if self._error is not None:
                        raise self._error
                    if self._busy:
                        self._cv.wait()
                    else:
                        self._step()
            finally:
                self._waiting.pop(rank, None)
                self._busy.add(rank)

    def _wake(self) -> None:
        """Ranks whose wait is over become busy (before anyone runs the device again)."""
        for r, ready in list(self._waiting.items()):
            if ready():
                del self._waiting[r]
                self._busy.add(r)
        self._cv.notify_all()

    def _step(self) -> None:
        """Run the device until a launch ends, and finish it."""
        from .emulator import EmulationError
        try:
            launch = None if self._world is None else self._world.run()
            if launch is None:
                raise GroupStuck(f"no rank can go on: ranks {sorted(self._waiting)} wait in a collective or for "
                                 "a launch, and no launch is left to run (a rank left the group early, or the "
                                 "ranks called different collectives)")
        except (GroupStuck, EmulationError) as e:
            self._error = e
            self._cv.notify_all()
            raise
        done = self._by_id.pop(launch)
        done.control.copy_(done.control_src)
        done.done, done.keep = True, None
        del self._running[done.rank.rank]
        self._start_next(done.rank.rank)
        self._wake()

    # ---- launches (lock held)

    def _launch(self, rank: "EmulatedRank", kernel, params, grid: int, smem: int, keep, before,
                control: torch.Tensor) -> _Launch:
        with self._cv:
            if self._world is not None and kernel.path != self._world.kernel.path:
                raise ValueError("the ranks of an emulated group run one kernel spec "
                                 f"({self._world.kernel.spec.key()}), not {kernel.spec.key()}")
            handle = _Launch(rank, kernel, params, grid, smem, keep, before, control, self._made[rank.rank])
            self._made[rank.rank] += 1
            self._queued[rank.rank].append(handle)
            self._start_next(rank.rank)
            return handle

    def _start_next(self, r: int) -> None:
        if r in self._running or not self._queued[r]:
            return
        handle = self._queued[r].popleft()
        for dst, src, nbytes in handle.before:
            ctypes.memmove(dst, src, nbytes)
        if self._world is None:
            from .emulator import EmulatedWorld
            self._world = EmulatedWorld(handle.kernel, self.seed, self.weak_seed)
            for pe, (base, nbytes) in self._heaps.items():
                self._world.set_pe(pe, base, nbytes)
        launch = self._world.add(handle.params, handle.grid, handle.kernel.spec.threads, handle.smem,
                                 delay_ns=int(self.delays(r, handle.index)))
        self._running[r] = handle
        self._by_id[launch] = handle

    def _register_heap(self, pe: int, base: int, nbytes: int) -> None:
        with self._cv:
            self._heaps[pe] = (base, nbytes)
            if self._world is not None:
                self._world.set_pe(pe, base, nbytes)

    # ---- collectives

    def _gather(self, rank: int, kind: str, value) -> list:
        with self._cv:
            c = self._collective
            if c.kind is None:
                c.kind = kind
            elif c.kind != kind:
                self._error = GroupStuck(f"rank {rank} entered {kind} while other ranks are in {c.kind}")
                self._cv.notify_all()
                raise self._error
            c.values[rank] = value
            if len(c.values) == self.size:
                c.result = [c.values[r] for r in range(self.size)]
                self._collective = _Collective()
                self._wake()
            else:
                self._block(rank, lambda: c.result is not None)   # the lock is re-entrant
            return c.result


class _Collective:
    def __init__(self):
        self.kind = None
        self.values: dict[int, object] = {}
        self.result: list | None = None


class RankFailed(RuntimeError):
    """Some ranks of an emulated group raised; ``errors[r]`` is rank r's exception or None."""

    def __init__(self, rank: int, errors: list):
        failed = [r for r, e in enumerate(errors) if e is not None]
        super().__init__(f"ranks {failed} raised; rank {rank}: {type(errors[rank]).__name__}: {errors[rank]}")
        self.errors = errors


class EmulatedRank:
    """One rank of an EmulatedGroup: what GroupBackend needs of a process group, a runtime and a
    stream."""

    def __init__(self, group: EmulatedGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def agree(self, ok: bool) -> bool:
        """True when ok holds on every rank (the all-reduce of GroupBackend's error settlement)."""
        return all(self.group._gather(self.rank, "agree", bool(ok)))

    def values(self, value) -> list:
        return self.group._gather(self.rank, "values", value)

    def barrier(self) -> None:
        self.group._gather(self.rank, "barrier", None)

    def runtime(self) -> "EmulatedRuntime":
        return EmulatedRuntime(self)

    def launch(self, kernel, params: abi.Params, grid: int, smem: int, *, keep=(), before=(),
               control: torch.Tensor) -> _Launch:
        """Queue a launch on this rank's stream (``before``: (dst, src, bytes) copies made when it
        starts; ``keep``: tensors it reads, held until it ends)."""
        return self.group._launch(self, kernel, params, grid, smem, keep, tuple(before), control)

    def synchronize(self) -> None:
        """Wait until every launch this rank made has ended."""
        g = self.group
        g._block(self.rank, lambda: self.rank not in g._running and not g._queued[self.rank])


class EmulatedRuntime:
    """The part of runtime.Runtime GroupBackend uses, for an emulated rank."""

    def __init__(self, rank: EmulatedRank):
        self._rank = rank

    def allocate_heap(self, num_slices: int, rank_heap_bytes: int, world: int,
                      force_nvshmem: bool = False) -> SymmetricHeap:
        """A zeroed heap of the same size on every rank (collective). Peers of this rank's node get
        a pointer, the others 0 (NVSHMEM)."""
        me, group = self._rank.rank, self._rank.group
        tensor = torch.zeros(num_slices * rank_heap_bytes, dtype=torch.uint8)
        bases = self._rank.values(tensor.data_ptr())
        node = me // group.ranks_per_node
        peers = [0 if force_nvshmem or r // group.ranks_per_node != node else base for r, base in enumerate(bases)]
        group._register_heap(me, tensor.data_ptr(), tensor.numel())
        self._rank.barrier()      # no peer writes into this heap before every rank registered its own
        return SymmetricHeap(tensor, rank_heap_bytes, peers, lambda t: None)

    def barrier(self) -> None:
        self._rank.barrier()
