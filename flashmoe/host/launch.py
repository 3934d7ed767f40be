"""Loading cubins and launching them: cooperative launch, occupancy check, error readback.

A persistent kernel whose blocks wait on each other must have every block resident, so the launch
is cooperative (cuLaunchCooperativeKernel refuses a grid that cannot be co-resident) and the grid
is checked against the occupancy first, with a message that says what to change.

Modules live in the primary context of their device (torch's), and every launch makes that
context current for its duration: a thread whose current device is another GPU (or none) would
otherwise launch into the wrong context and fail with an invalid handle. Loading checks the
driver first: cubins built by an NVRTC newer than the driver's CUDA version may not load, and the
error then says which two versions disagree and what to install.
"""

from __future__ import annotations

import ctypes
import functools

from ..errors import FlashMoEError, KernelUnavailable
from . import abi

_WAIT_NAMES = {
    abi.WaitKind.BARRIER: "the barrier of its rank's blocks (generation {index})",
    abi.WaitKind.COUNT_FLAG: "the token counts of rank {index}",
    abi.WaitKind.DATA_FLAG: "the dispatched rows of rank {index}",
    abi.WaitKind.DONE_FLAG: "the expert results of rank {index}",
    abi.WaitKind.TILE_DONE: "GEMM0 of its row tile {index}",
    abi.WaitKind.SELECT_DONE: "the capacity selection of its local expert {index}",
}
# The GEMM pipeline's mbarrier waits record the stage or table slot (index), the phase awaited
# (expected) and the k-tile (observed): "expected X, saw Y" would mean nothing there.
_PIPE_NAMES = {
    abi.WaitKind.PIPE_FULL: ("stage {index} of its GEMM pipeline to fill for k-tile {observed} (fill {expected}: "
                             "A rows by cp.async, B by TMA or cp.async; a TMA box smaller than the bytes "
                             "the stage expects never completes it)"),
    abi.WaitKind.PIPE_EMPTY: "its GEMM consumers to release stage {index} for k-tile {observed}",
    abi.WaitKind.JOB_READY: "its GEMM producer to post job {expected} of table slot {index}",
    abi.WaitKind.JOB_FREE: "its GEMM consumers to finish job {expected} of table slot {index}",
    abi.WaitKind.MATH_TURN: "turn {expected} of its GEMM consumer team {index} (the other team's mainloop to pass "
                            "its last stage)",
}


def describe_record(rec: abi.ErrorRecord) -> str:
    who = f"rank {rec.rank} block {rec.block}"
    if rec.code == abi.ErrorCode.MISALIGNED:
        return (f"{who}: the kernel's dynamic shared memory starts at shared address {rec.observed:#x}, not on "
                f"the {rec.expected}-byte boundary its GEMM engine's swizzled tiles need, so nothing was "
                f"computed. The kernel declares that alignment; something moved it (static shared "
                f"variables, or this driver places dynamic shared memory differently). The mma_sync engine "
                f"needs only 16 bytes: kernel_options={{'gemm': 'mma_sync'}}")
    role = abi.TaskKind(rec.role).name.lower()
    verb = "timed out after" if rec.code == abi.ErrorCode.TIMEOUT else "was aborted after"
    fields = dict(index=rec.index, what=rec.what, expected=rec.expected, observed=rec.observed)
    if rec.what in _PIPE_NAMES:
        return f"{who} ({role}) {verb} {rec.waited_ns / 1e9:.3f} s waiting for " + \
            _PIPE_NAMES[abi.WaitKind(rec.what)].format(**fields)
    what = _WAIT_NAMES.get(rec.what, "wait kind {what}").format(**fields)
    return (f"{who} ({role}) {verb} {rec.waited_ns / 1e9:.3f} s waiting for "
            f"{what}: expected {rec.expected}, saw {rec.observed}")


def check_control(control_bytes: bytes, num_local_ranks: int) -> None:
    """Raise FlashMoEError if the launch recorded any error (the Control block, read back)."""
    control = abi.Control.from_buffer_copy(control_bytes)
    records = [control.errors[v] for v in range(num_local_ranks) if control.errors[v].code]
    if not records:
        return
    # The timed-out waits first: they name who was missing; the aborted ones show where the
    # other ranks were at that moment.
    records.sort(key=lambda r: r.code == abi.ErrorCode.ABORTED)
    lines = [describe_record(r) for r in records]
    raise FlashMoEError("flashmoe kernel stopped: " + lines[0] +
                        ("\n  " + "\n  ".join(lines[1:]) if len(lines) > 1 else ""),
                        records=[{f: getattr(r, f) for f, _ in r._fields_} for r in records])


def _check(result, what: str):
    from cuda.bindings import driver as cu
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name.decode() if name else err}")
    return rest[0] if len(rest) == 1 else (rest or None)


@functools.lru_cache(maxsize=None)
def driver_version() -> tuple[int, int]:
    """The CUDA version the installed driver supports, (major, minor)."""
    from cuda.bindings import driver as cu
    version = _check(cu.cuDriverGetVersion(), "cuDriverGetVersion")
    return version // 1000, version % 1000 // 10


def driver_problem(nvrtc: tuple[int, int] | None = None) -> str | None:
    """Why this driver cannot load the cubins the installed NVRTC builds (None when it can).
    CUDA's minor-version compatibility covers cubins of a newer minor release; a newer major
    release is out of reach."""
    if nvrtc is None:
        from .compile import nvrtc_version
        nvrtc = nvrtc_version()
    driver = driver_version()
    if driver[0] >= nvrtc[0]:
        return None
    return (f"the CUDA driver supports CUDA {driver[0]}.{driver[1]}, older than NVRTC {nvrtc[0]}.{nvrtc[1]} "
            f"that builds the kernel, so it cannot load its cubins: install nvidia-cuda-nvrtc=="
            f"{driver[0]}.{driver[1]}.* and nvidia-nvjitlink=={driver[0]}.{driver[1]}.* (or update the driver)")


class CudaModule:
    """A cubin loaded into the primary context of one device, with its kernels by name."""

    def __init__(self, cubin: bytes, device_index: int):
        problem = driver_problem()
        if problem:
            raise KernelUnavailable(problem)
        from cuda.bindings import driver as cu
        import torch
        torch.cuda.init()
        with torch.cuda.device(device_index):
            torch.empty(1, device=f"cuda:{device_index}")     # make torch's context current
            self.context = _check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
            try:
                self.module = _check(cu.cuModuleLoadData(cubin), "cuModuleLoadData")
            except RuntimeError as e:
                from .compile import nvrtc_version
                driver, nvrtc = driver_version(), nvrtc_version()
                hint = (f" (the driver supports CUDA {driver[0]}.{driver[1]}, older than NVRTC "
                        f"{nvrtc[0]}.{nvrtc[1]} that built the cubin: install nvidia-cuda-nvrtc=="
                        f"{driver[0]}.{driver[1]}.*, or update the driver)") if driver < nvrtc else ""
                raise RuntimeError(f"{e}{hint}") from e
        self.device_index = device_index
        self._context_id = int(self.context)

    def function(self, name: str, smem_bytes: int = 0):
        from cuda.bindings import driver as cu
        function = _check(cu.cuModuleGetFunction(self.module, name.encode()), f"cuModuleGetFunction({name})")
        if smem_bytes:
            _check(cu.cuFuncSetAttribute(
                function, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes), f"setting {name}'s dynamic shared memory to {smem_bytes} B")
        return function

    def launch(self, function, args: ctypes.Structure, grid: int, block: int, smem_bytes: int,
               stream_handle: int, cooperative: bool = True) -> None:
        """Launch ``function(args)`` (one by-value struct argument) with this module's context
        current for the call."""
        from cuda.bindings import driver as cu
        pointers = (ctypes.c_void_p * 1)(ctypes.addressof(args))
        current = _check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
        pushed = int(current) != self._context_id
        if pushed:
            _check(cu.cuCtxPushCurrent(self.context), "cuCtxPushCurrent")
        try:
            start = cu.cuLaunchCooperativeKernel if cooperative else cu.cuLaunchKernel
            call = (function, grid, 1, 1, block, 1, 1, smem_bytes, cu.CUstream(stream_handle),
                    ctypes.addressof(pointers))
            _check(start(*call) if cooperative else start(*call, 0), start.__name__)
        finally:
            if pushed:
                _check(cu.cuCtxPopCurrent(), "cuCtxPopCurrent")


class CudaKernel:
    """The compiled flashmoe kernel loaded into its device's primary context (torch's)."""

    def __init__(self, cubin: bytes, smem_bytes: int, block: int, device_index: int):
        from cuda.bindings import driver as cu
        self.cuda = CudaModule(cubin, device_index)
        self.module = self.cuda.module
        self.function = self.cuda.function("flashmoe_kernel", smem_bytes)
        self.blocks_per_sm = _check(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            self.function, block, smem_bytes), "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        self.smem_bytes, self.block, self.device_index = smem_bytes, block, device_index

    def check_grid(self, grid: int, sm_count: int) -> None:
        limit = self.blocks_per_sm * sm_count
        if grid > limit:
            raise ValueError(f"the persistent kernel needs all {grid} blocks resident, but only {limit} fit "
                             f"({self.blocks_per_sm} per SM x {sm_count} SMs with {self.smem_bytes} B of shared "
                             f"memory and {self.block} threads per block): use fewer blocks per rank")

    def launch(self, params: abi.Params, grid: int, stream_handle: int) -> None:
        self.cuda.launch(self.function, params, grid, self.block, self.smem_bytes, stream_handle)
