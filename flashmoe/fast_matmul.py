"""The torch GEMMs the reference's 'mixed' math runs its experts with (flashmoe/reference.py):
a matmul in the operands' own dtype where torch has a fast one, and torch's grouped GEMM for all
experts at once where it takes the operands."""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Rows above which a CPU float16 GEMM is slower than converting its operands to float32: torch's
# CPU float16 matmul is fast as a matrix-vector product only (measured: 8 rows break even with
# the conversion; a 2048 x 1024 x 1024 product is hundreds of times slower than in bfloat16).
CPU_FP16_ROWS = 8


def fast_matmul_dtype(dtype: torch.dtype, device: torch.device, rows: int) -> torch.dtype:
    """The dtype the 'mixed' math runs a GEMM of ``rows`` rows of ``dtype`` operands in: the
    dtype itself where torch has a fast matmul for it, else float32."""
    if dtype == torch.float16 and device.type == "cpu" and rows > CPU_FP16_ROWS:
        return torch.float32
    return dtype


def grouped_mm_serves(x: torch.Tensor, rows: list[int], gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """torch's grouped GEMM runs the 'mixed' experts of ``x`` on its device: a CPU or a CUDA GPU
    (on sm_90/sm_100 in bf16 one grouped kernel; elsewhere torch's loop of one matmul per expert,
    still without the reference's per-expert activation and copies), when every expert's GEMM runs
    in x's own low-precision dtype and torch takes the operands (``grouped_mm_operand``), in
    both projections and in their backward."""
    return (hasattr(F, "grouped_mm") and x.device.type in ("cpu", "cuda") and x.shape[0] > 0
            and x.dtype in (torch.bfloat16, torch.float16)
            and fast_matmul_dtype(x.dtype, x.device, max(rows)) == x.dtype
            and all(grouped_mm_operand(t) for t in (x, gate_up.transpose(1, 2), down.transpose(1, 2)))
            and down.shape[-1] * x.element_size() % 16 == 0)        # h [n, I], the second GEMM's rows


def grouped_mm_operand(t: torch.Tensor) -> bool:
    """``t`` is a matrix (or a stack) torch's grouped GEMM takes: one of its two last dims
    contiguous, the other's stride a multiple of 16 bytes, and on a GPU its address 16-byte
    aligned (torch refuses anything else; e.g. a hidden size that is not a multiple of 8 in bf16)."""
    (rows, cols), (row_stride, col_stride) = t.shape[-2:], t.stride()[-2:]
    if row_stride == 1 and col_stride >= max(1, rows):          # the order torch checks them in
        lead = col_stride
    elif col_stride == 1 and row_stride >= max(1, cols):
        lead = row_stride
    else:
        return False
    return lead * t.element_size() % 16 == 0 and (t.device.type == "cpu" or t.data_ptr() % 16 == 0)
