"""The accuracy rule every check of a flashmoe result uses, stated once.

A result is correct when its error against the fp32 reference (``math='fp32'``: the contract
computed with no intermediate rounding) is within twice the error torch itself makes computing
the same layer in the same low precision (``math='native'``), plus 1e-3. Errors are max-abs.

Anchoring the tolerance to torch's own error makes it scale with the dtype and with the layer's
shapes and magnitudes (bf16 over a wide hidden size errs more than fp16 over a narrow one) with
no per-dtype table to tune; the 1e-3 floor keeps cases where torch is nearly exact (fp32, tiny
layers) from demanding bit-exactness.
"""

from __future__ import annotations

import torch

from . import reference
from .config import MoEConfig
from .reference import MoEWeights, Routing


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp32 over all elements; 0.0 for empty tensors. Positions where both hold
    the same value count as 0 (so equal infinities agree); a NaN anywhere else is infinite error."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    a32, b32 = a.detach().float(), b.detach().to(a.device).float()
    diff = torch.where(a32 == b32, torch.zeros_like(a32), (a32 - b32).abs())
    diff = torch.nan_to_num(diff, nan=float("inf"), posinf=float("inf"))
    return float(diff.max())


def tolerance(err_native: float) -> float:
    """The allowed max-abs error of a result: the kernel's error against the fp32 reference is
    within 2x of the error torch itself makes computing the same layer in the same low
    precision, plus 1e-3."""
    return 2 * err_native + 1e-3


def check(out: torch.Tensor, x: torch.Tensor, weights: MoEWeights, config: MoEConfig,
          routing: Routing | None = None) -> tuple[bool, float, float]:
    """(ok, err, tol) for ``out``, the layer's output on ``x``. Pass the result's own
    ``routing`` to compare expert math only (a near-tie may route differently in another
    precision, which is not an error of the experts)."""
    with torch.no_grad():
        ideal = reference.moe_forward(x, weights, config, math="fp32", routing=routing)
        native = reference.moe_forward(x, weights, config, math="native", routing=routing)
    err = max_abs_error(out, ideal)
    tol = tolerance(max_abs_error(native, ideal))
    return err <= tol, err, tol


# One GEMM tile alone (the bring-up kit's component probes) has no layer to run torch on, so its
# rule is the rounding it is allowed: each output element rounded once to the dtype (half a unit
# in the last place of the value: 2^-8 relative for bf16, 2^-11 for fp16; fp32 tiles run TF32
# inputs exactly as the reference rounds them, so only the fp32 summation order remains, 1e-5),
# plus 1e-4 of the tile's largest value for the fp32 accumulation order over K.
TILE_ROUNDING = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 1e-5}


def tile_tolerance(expected: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per-element allowed |error| of a GEMM tile whose exact (float64) result is ``expected``."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return TILE_ROUNDING[dtype] * expected.abs() + 1e-4 * (1.0 + scale)
