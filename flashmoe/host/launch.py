"""Loading the cubin and launching it: cooperative launch, occupancy check, error readback.

A persistent kernel whose blocks wait on each other must have every block resident, so the launch
is cooperative (cuLaunchCooperativeKernel refuses a grid that cannot be co-resident) and the grid
is checked against the occupancy first, with a message that says what to change.
"""

from __future__ import annotations

import ctypes

from ..errors import FlashMoEError
from . import abi

_WAIT_NAMES = {
    abi.WaitKind.BARRIER: "the barrier of its rank's blocks (generation {index})",
    abi.WaitKind.COUNT_FLAG: "the token counts of rank {index}",
    abi.WaitKind.DATA_FLAG: "the dispatched rows of rank {index}",
    abi.WaitKind.DONE_FLAG: "the expert results of rank {index}",
    abi.WaitKind.TILE_DONE: "GEMM0 of its row tile {index}",
    abi.WaitKind.SELECT_DONE: "the capacity selection of its local expert {index}",
}


def describe_record(rec: abi.ErrorRecord) -> str:
    what = _WAIT_NAMES.get(abi.WaitKind(rec.what), "wait kind {what}").format(index=rec.index, what=rec.what)
    role = abi.TaskKind(rec.role).name.lower()
    verb = "timed out after" if rec.code == abi.ErrorCode.TIMEOUT else "was aborted after"
    return (f"rank {rec.rank} block {rec.block} ({role}) {verb} {rec.waited_ns / 1e9:.3f} s waiting for "
            f"{what}: expected {rec.expected}, saw {rec.observed}")


def check_control(control_bytes: bytes, num_local_ranks: int) -> None:
    """Raise FlashMoEError if the launch recorded any error (the Control block, read back)."""
    control = abi.Control.from_buffer_copy(control_bytes)
    records = [control.errors[v] for v in range(num_local_ranks) if control.errors[v].code]
    if not records:
        return
    # The timed-out waits first: they name who was missing; the aborted ones show where the
    # other ranks were at that moment.
    records.sort(key=lambda r: r.code != abi.ErrorCode.TIMEOUT)
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
    return rest[0] if len(rest) == 1 else rest


class CudaKernel:
    """The compiled kernel loaded into the current CUDA context (torch's primary context)."""

    def __init__(self, cubin: bytes, smem_bytes: int, block: int, device_index: int):
        from cuda.bindings import driver as cu
        import torch
        torch.cuda.init()
        with torch.cuda.device(device_index):
            torch.empty(1, device=f"cuda:{device_index}")     # make torch's context current
            self.module = _check(cu.cuModuleLoadData(cubin), "cuModuleLoadData")
            self.function = _check(cu.cuModuleGetFunction(self.module, b"flashmoe_kernel"),
                                   "cuModuleGetFunction")
            _check(cu.cuFuncSetAttribute(
                self.function, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes), "setting the kernel's dynamic shared memory")
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
        from cuda.bindings import driver as cu
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        _check(cu.cuLaunchCooperativeKernel(self.function, grid, 1, 1, self.block, 1, 1, self.smem_bytes,
                                            cu.CUstream(stream_handle), ctypes.addressof(args)),
               "cuLaunchCooperativeKernel")
