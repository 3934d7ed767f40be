"""Process-level NVSHMEM state: initialisation from torch.distributed, symmetric heaps, kernels.

One ``Runtime`` per process (NVSHMEM initialises once per process). ``from_process_group``
bootstraps NVSHMEM from an existing group: rank 0 makes a unique id, ``broadcast_object_list``
hands it to everyone, and each process calls ``nvshmem.core.init(uid=..., rank, nranks,
initializer_method="uid")`` with PE = its rank in the group. The runtime then owns

- the symmetric heaps it allocated (nvshmem4py tensors; ``heap.SymmetricHeap``), with each peer's
  transport chosen by ``heap.peer_bases`` from ``nvshmem_ptr``;
- the kernels it registered: launch.py loads cubins with cuModuleLoadData, a CUmodule, so the
  registration is ``nvshmemx_cumodule_init`` (the CUlibrary variant is for cuda.core ObjectCode).
  It is called through ``nvshmem.bindings``: nvshmem4py 0.4.1's ``core.module_init`` prints a line
  per call and its ``module_finalize`` reads an attribute ``module_init`` never sets.

``close()`` (or leaving ``with``) releases in the order NVSHMEM needs: modules, then tensors, then
``finalize`` (a tensor freed after finalize crashes the process at exit).

Several PEs on one GPU are NVSHMEM's "limited MPG" mode without MPS: P2P and ``barrier_all`` work,
team collectives abort, and kernels of different processes time-slice instead of running side by
side, so a persistent kernel waiting on another process progresses once per time slice at best.
The runtime uses only ``barrier_all`` and P2P, and says so in ``describe()``.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from pathlib import Path

from ..errors import KernelUnavailable
from . import heap as heap_mod

# Set before NVSHMEM initialises when no InfiniBand device is present (containers, one-node
# machines): no remote transport to probe, no NCCL inside NVSHMEM, and a bootstrap socket that
# exists. Values the user set win.
NO_IB_ENV = {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_DISABLE_NCCL": "1"}
ONE_HOST_ENV = {"NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo"}
HEAP_SIZE_ENV = "NVSHMEM_SYMMETRIC_SIZE"
IBGDA_ENV = "NVSHMEM_IB_ENABLE_IBGDA"
DEFAULT_HEAP_BYTES = 1 << 30          # NVSHMEM's default symmetric size

INSTALL_NVSHMEM4PY = ("pip install 'nvshmem4py-cu13>=0.4' (or pip install 'flashmoe[nvshmem]'); "
                      "on a machine without a package registry, bring the wheel and install it with "
                      "pip install --no-deps nvshmem4py_cu13-*.whl (it needs cuda-core>=0.5 and "
                      "cuda-pathfinder)")


class NvshmemUnavailable(KernelUnavailable):
    """nvshmem4py or the NVSHMEM libraries are missing, or their versions do not match."""


class HeapTooSmall(RuntimeError):
    """The symmetric heap cannot hold a plan's slices."""


def nvshmem_env_defaults(hosts: int, infiniband: bool, environ=None) -> dict:
    """The environment variables to set before init (those not already set)."""
    environ = os.environ if environ is None else environ
    wanted = {}
    if not infiniband:
        wanted.update(NO_IB_ENV)
        if hosts == 1:
            wanted.update(ONE_HOST_ENV)
    return {k: v for k, v in wanted.items() if k not in environ}


def check_remote_transport(environ=None) -> None:
    """The kernel is built without NVSHMEM's IBGDA path (nvshmem_prelude.cuh: NVRTC cannot see
    <infiniband/mlx5dv.h>) and with its device asserts off, so under IBGDA its puts to other
    nodes would do nothing: refuse it here, where the fix can be named."""
    environ = os.environ if environ is None else environ
    value = environ.get(IBGDA_ENV, "")
    if value.strip().lower() not in ("", "0", "n", "no", "f", "false", "off"):
        raise NvshmemUnavailable(f"{IBGDA_ENV}={value!r}: flashmoe's kernel is built without NVSHMEM's "
                                 f"IBGDA transport; unset {IBGDA_ENV} (peers on other nodes then go "
                                 "through NVSHMEM's proxy thread, NVSHMEM_REMOTE_TRANSPORT=ibrc)")


def infiniband_present() -> bool:
    path = Path("/sys/class/infiniband")
    return path.is_dir() and any(path.iterdir())


def parse_size(text: str) -> int:
    """NVSHMEM's size syntax: bytes, or a number with a K/M/G/T suffix (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"{HEAP_SIZE_ENV}={text!r} is not a size (e.g. 4G, 512M, 1073741824)")
    return int(m[1]) << (10 * " KMGT".index(m[2].upper() or " "))


def headers_version() -> tuple[int, int, int]:
    """The NVSHMEM version of the headers and libnvshmem_device.a the kernel is compiled with."""
    from . import compile as C
    text = (Path(C._header_dir("nvshmem")) / "non_abi" / "nvshmem_version.h").read_text()
    parts = [re.search(rf"#define NVSHMEM_VENDOR_{p}_VERSION\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise NvshmemUnavailable("cannot read the NVSHMEM version from the headers' non_abi/nvshmem_version.h")
    return tuple(int(m[1]) for m in parts)


def check_versions(host: str, device: tuple[int, int, int], where: str = "") -> None:
    """The host library nvshmem4py loaded must be the version the device code was built with:
    nvshmemx_cumodule_init rejects other pairs, with a less helpful message."""
    try:
        host_v = tuple(int(x) for x in host.split(".")[:3])
    except ValueError:
        raise NvshmemUnavailable(f"cannot parse the NVSHMEM host library version {host!r}") from None
    if host_v != tuple(device):
        dev = ".".join(map(str, device))
        raise NvshmemUnavailable(
            f"NVSHMEM version mismatch: nvshmem4py loaded libnvshmem_host {host}, but the kernel is "
            f"compiled against NVSHMEM {dev} headers and libnvshmem_device.a{f' ({where})' if where else ''}. "
            f"Use one NVSHMEM for both: pip install 'nvidia-nvshmem-cu13=={dev}' (and no other "
            f"libnvshmem_host.so on LD_LIBRARY_PATH), or install the headers of {host}.")


def _import_nvshmem():
    """(nvshmem.core, nvshmem.bindings, cuda.core.Device), or NvshmemUnavailable saying what to
    install. Tests replace this function with fakes."""
    try:
        import nvshmem.bindings as bindings
        import nvshmem.core as core
        from cuda.core import Device
    except ImportError as e:
        raise NvshmemUnavailable(f"expert parallelism across processes needs nvshmem4py ({e}): "
                                 + INSTALL_NVSHMEM4PY) from e
    return core, bindings, Device


_ACTIVE: "Runtime | None" = None


class Runtime:
    """NVSHMEM initialised in this process, and what was allocated and registered with it."""

    def __init__(self, core, bindings, device_index: int, rank: int, world: int, hosts: int = 1,
                 group=None):
        self._core, self._bindings = core, bindings
        self.device_index, self.rank, self.world, self.hosts = device_index, rank, world, hosts
        self.group = group
        self._heaps: list[heap_mod.SymmetricHeap] = []
        self._modules: list[int] = []
        self._allocated = 0
        self.closed = False

    # ---- construction

    @classmethod
    def from_process_group(cls, group=None, device=None) -> "Runtime":
        """Initialise NVSHMEM with one PE per process of ``group`` (collective: every rank calls
        it). ``device``: this process's GPU (default: torch's current device). A process
        initialises NVSHMEM once; a second call with the same group returns the same runtime."""
        import torch
        import torch.distributed as dist
        global _ACTIVE
        if _ACTIVE is not None and not _ACTIVE.closed:
            if _ACTIVE.group is group:
                return _ACTIVE
            raise RuntimeError("NVSHMEM is already initialised in this process for another process "
                                "group; close that Runtime first")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Runtime.from_process_group needs torch.distributed initialised")
        core, bindings, Device = _import_nvshmem()
        index = _device_index(device)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        names = [None] * world
        dist.all_gather_object(names, socket.gethostname(), group=group)
        hosts = len(set(names))
        for key, value in nvshmem_env_defaults(hosts, infiniband_present()).items():
            os.environ[key] = value
        check_remote_transport()
        try:
            host_version = core.get_version().libnvshmem_version
        except Exception as e:    # the host library could not be loaded
            raise NvshmemUnavailable(f"the NVSHMEM host library could not be loaded ({e}): "
                                     "pip install nvidia-nvshmem-cu13") from e
        check_versions(host_version, headers_version(), "flashmoe/host/compile.py")
        holder = [core.get_unique_id(empty=rank != 0)]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
        torch.cuda.set_device(index)
        dev = Device(index)
        dev.set_current()
        core.init(device=dev, uid=holder[0], rank=rank, nranks=world, initializer_method="uid")
        _ACTIVE = cls(core, bindings, index, rank, world, hosts, group)
        return _ACTIVE

    @classmethod
    def single_process(cls, device=None) -> "Runtime":
        """One PE (no process group): NVSHMEM's device API on one GPU, for tests of the NVSHMEM
        transport with virtual ranks (every peer forced onto NVSHMEM puts to this PE)."""
        import torch
        global _ACTIVE
        if _ACTIVE is not None and not _ACTIVE.closed:
            if _ACTIVE.group is None and _ACTIVE.world == 1:
                return _ACTIVE
            raise RuntimeError("NVSHMEM is already initialised in this process for a process group")
        core, bindings, Device = _import_nvshmem()
        for key, value in nvshmem_env_defaults(1, infiniband_present()).items():
            os.environ[key] = value
        check_remote_transport()
        check_versions(core.get_version().libnvshmem_version, headers_version())
        index = _device_index(device)
        torch.cuda.set_device(index)
        dev = Device(index)
        dev.set_current()
        core.init(device=dev, uid=core.get_unique_id(), rank=0, nranks=1, initializer_method="uid")
        _ACTIVE = cls(core, bindings, index, 0, 1)
        return _ACTIVE

    # ---- what it owns

    def allocate_heap(self, num_slices: int, rank_heap_bytes: int, world: int,
                      force_nvshmem: bool = False) -> heap_mod.SymmetricHeap:
        """A zeroed symmetric allocation holding this PE's ``num_slices`` slices (collective:
        every PE asks for the same size). ``world`` ranks in all, ``num_slices`` per PE."""
        self._check_open()
        nbytes = num_slices * rank_heap_bytes
        try:
            tensor = self._core.bytetensor((nbytes,))
        except Exception as e:
            configured = os.environ.get(HEAP_SIZE_ENV)
            raise HeapTooSmall(
                f"the NVSHMEM symmetric heap cannot hold this layer: it needs {nbytes} bytes "
                f"({nbytes / 2**20:.1f} MiB) more, {self._allocated + nbytes} in all for this "
                f"process (NVSHMEM: {e}). Raise {HEAP_SIZE_ENV} (now "
                f"{configured or f'unset, default {DEFAULT_HEAP_BYTES >> 20} MiB'}) on every rank "
                f"before NVSHMEM initialises, e.g. {HEAP_SIZE_ENV}={_round_up_size(self._allocated + nbytes)}; "
                f"or lower max_tokens") from e
        tensor.zero_()
        ptr = lambda pe: self._bindings.ptr(tensor.data_ptr(), pe)   # noqa: E731
        bases = heap_mod.peer_bases(world, num_slices, rank_heap_bytes, ptr, force_nvshmem)
        heap = heap_mod.SymmetricHeap(tensor, rank_heap_bytes, bases, self._free)
        self._heaps.append(heap)
        self._allocated += nbytes
        self.barrier()      # no peer writes into this heap before every PE zeroed its copy
        return heap

    def _free(self, tensor) -> None:
        self._core.free_tensor(tensor)
        self._allocated -= tensor.numel()

    def register_kernel(self, module) -> None:
        """Register a loaded CUmodule (launch.CudaKernel.module) with NVSHMEM: fills the module's
        nvshmemi_device_state_d; without it the first NVSHMEM call faults."""
        self._check_open()
        handle = int(module)
        if handle in self._modules:
            return
        status = self._bindings.cumodule_init(handle)
        if status not in (None, 0):
            raise NvshmemUnavailable(f"nvshmemx_cumodule_init failed ({status}): the kernel's NVSHMEM "
                                     "device library and the loaded host library disagree")
        self._modules.append(handle)

    def barrier(self, stream=None) -> None:
        """Every PE reaches this point (barrier_all on the stream, then a host wait): the one
        NVSHMEM collective that also works with several PEs on one GPU."""
        import torch
        self._check_open()
        stream = stream or torch.cuda.current_stream(self.device_index)
        self._bindings.barrier_all_on_stream(int(stream.cuda_stream))
        stream.synchronize()

    def describe(self) -> str:
        mpg = " (several PEs per GPU: NVSHMEM limited MPG; kernels of different processes time-slice)" \
            if self.hosts == 1 and self.world > _gpu_count() else ""
        return (f"NVSHMEM PE {self.rank} of {self.world} on cuda:{self.device_index}, "
                f"{self.hosts} host{'s' if self.hosts > 1 else ''}{mpg}")

    # ---- teardown

    def close(self) -> None:
        """Unregister kernels, free heaps, finalize NVSHMEM (in that order). Idempotent."""
        global _ACTIVE
        if self.closed:
            return
        errors = []
        for handle in self._modules:
            try:
                self._bindings.cumodule_finalize(handle)
            except Exception as e:        # keep going: the heaps and finalize still matter
                errors.append(f"cumodule_finalize: {e}")
        self._modules.clear()
        for heap in list(self._heaps):
            try:
                heap.close()
            except Exception as e:
                errors.append(f"free_tensor: {e}")
        self._heaps.clear()
        self._core.finalize()
        self.closed = True
        if _ACTIVE is self:
            _ACTIVE = None
        if errors:
            warnings.warn("flashmoe: while closing NVSHMEM: " + "; ".join(errors), stacklevel=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self.closed:
            raise RuntimeError("this flashmoe Runtime is closed (NVSHMEM was finalized)")


def active_runtime() -> "Runtime | None":
    return _ACTIVE if _ACTIVE is not None and not _ACTIVE.closed else None


def _device_index(device) -> int:
    import torch
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda":
        raise ValueError(f"device={device}: NVSHMEM needs a CUDA device")
    return device.index if device.index is not None else torch.cuda.current_device()


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count()


def _round_up_size(nbytes: int) -> str:
    gib = -(-nbytes // 2**30)
    return f"{gib}G"
