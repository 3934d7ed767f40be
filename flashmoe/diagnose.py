"""What a failed check looked like: where the wrong elements are, so that a bug shows its pattern.

A swizzle or descriptor bug scrambles columns in 16-byte groups or rows in groups of 8; an
ordering bug hits whole tiles, one expert or the rows of one rank; a missed write leaves the
poison (NaN) the checks fill outputs with. These functions turn an output and the value it should
hold into that picture, as plain JSON-able dicts (the bring-up kit writes them to its JSONL).
"""

from __future__ import annotations

import torch

_MAX_RANGES = 12


def ranges(indices, total: int | None = None) -> str:
    """Sorted integers as '0-7,16,40-47' (the first ranges; '+N more ranges' past them), with
    '(n of total)' when ``total`` is given."""
    values = sorted({int(i) for i in indices})
    spans, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            spans.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    text = ",".join(spans[:_MAX_RANGES]) or "none"
    if len(spans) > _MAX_RANGES:
        text += f",+{len(spans) - _MAX_RANGES} more ranges"
    return f"{text} ({len(values)} of {total})" if total is not None else text


def _residues(indices: torch.Tensor, modulus: int) -> str:
    """Which residues mod ``modulus`` the indices fall on, e.g. '{0, 1} of 8' (all 8: 'all')."""
    seen = sorted(set((indices % modulus).tolist()))
    return "all" if len(seen) == modulus else f"{seen} of {modulus}"


def wrong_mask(got: torch.Tensor, want: torch.Tensor, tol) -> torch.Tensor:
    """Elements of ``got`` off ``want`` by more than ``tol`` (a number or per-element bounds), or
    NaN where ``want`` is not (poison that survived, or a NaN the kernel made). On the CPU."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    t = tol.detach().double().cpu() if isinstance(tol, torch.Tensor) else float(tol)
    nan = torch.isnan(g) & ~torch.isnan(w)
    return nan | ((g - w).abs() > t)


def mismatch(got: torch.Tensor, want: torch.Tensor, tol, vector_elems: int = 8) -> dict:
    """Where ``got`` [R, C] differs from ``want`` (``wrong_mask``): how much, how many, which rows
    and columns, how many NaNs. ``vector_elems``: elements per 16-byte chunk, for the
    column-chunk pattern a swizzle bug leaves."""
    wrong = wrong_mask(got, want, tol)
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    nan = torch.isnan(g) & ~torch.isnan(w)
    diff = (g - w).abs()
    finite = diff[~torch.isnan(diff)]
    rows = wrong.any(1).nonzero().flatten()
    cols = wrong.any(0).nonzero().flatten()
    out = {"max_err": float(finite.max()) if finite.numel() else 0.0,
           "wrong_elements": int(wrong.sum()), "elements": wrong.numel(),
           "wrong_fraction": float(wrong.float().mean()) if wrong.numel() else 0.0,
           "nan_elements": int(nan.sum()), "all_nan_rows": int(nan.all(1).sum()) if nan.numel() else 0,
           "wrong_rows": ranges(rows.tolist(), got.shape[0]), "wrong_cols": ranges(cols.tolist(), got.shape[1])}
    if rows.numel():
        out["wrong_rows_mod8"] = _residues(rows, 8)
        out["wrong_col_chunks_mod8"] = _residues(cols // vector_elems, 8)
    return out


def kernel_failure(out: torch.Tensor, ideal: torch.Tensor, tol: float, routing, tokens_per_rank: list[int],
                   block_m: int, block_n: int) -> dict:
    """``mismatch`` of a whole-kernel output [T, H], plus which ranks (the tokens each virtual rank
    brought), experts (the tokens routed to each) and GEMM tiles the wrong tokens belong to.
    Row tiles follow the kernel's dropless row order: an expert's rows in token order, tile q //
    block_m; column tiles are GEMM1's output tiles, column // block_n."""
    report = mismatch(out, ideal, tol, vector_elems=16 // out.element_size())
    wrong = wrong_mask(out, ideal, tol)
    wrong_token = wrong.any(1)
    if not bool(wrong_token.any()):
        return report
    rank_of = torch.repeat_interleave(torch.arange(len(tokens_per_rank)), torch.tensor(tokens_per_rank))
    report["wrong_by_rank"] = {int(r): f"{int(wrong_token[rank_of == r].sum())}/{int((rank_of == r).sum())}"
                               for r in range(len(tokens_per_rank)) if int((rank_of == r).sum())}
    ids = routing.ids.cpu()
    kept = routing.kept.cpu() if routing.kept is not None else torch.ones_like(ids, dtype=torch.bool)
    experts, tiles = {}, []
    for e in sorted(set(ids[kept].tolist())):
        tokens = (ids.eq(e) & kept).any(1).nonzero().flatten()       # the expert's rows, in token order
        bad = wrong_token[tokens]
        if bool(bad.any()):
            experts[e] = f"{int(bad.sum())}/{tokens.numel()}"
            tiles += [f"e{e}:t{t}" for t in sorted(set((bad.nonzero().flatten() // block_m).tolist()))]
    report["wrong_by_expert"] = experts
    report["wrong_row_tiles"] = tiles[:32] + ([f"+{len(tiles) - 32} more"] if len(tiles) > 32 else [])
    report["wrong_col_tiles"] = ranges((wrong.any(0).nonzero().flatten() // block_n).tolist(),
                                       -(-out.shape[1] // block_n))
    return report
