"""flashmoe.diagnose: a failed check's wrong elements reported so that the bug's pattern shows."""

from __future__ import annotations

import torch

from flashmoe.diagnose import kernel_failure, mismatch, ranges
from flashmoe.reference import Routing


def test_ranges_compress_and_count():
    assert ranges([5, 0, 1, 2, 3, 9, 10], total=16) == "0-3,5,9-10 (7 of 16)"
    assert ranges([]) == "none"
    assert ranges(range(0, 100, 2)).endswith(",+38 more ranges")


def test_mismatch_shows_a_swizzle_pattern_and_survived_poison():
    want = torch.randn(64, 64)
    got = want.clone()
    got[8:16, 8:16] += 1.0                      # row group 1, the second 16-byte chunk (bf16: 8 elements)
    got[40] = float("nan")                      # a row nobody wrote
    report = mismatch(got.bfloat16(), want, 0.05)
    assert report["wrong_rows"] == "8-15,40 (9 of 64)"
    assert report["nan_elements"] == 64 and report["all_nan_rows"] == 1
    assert report["wrong_rows_mod8"] == "all"
    assert report["wrong_fraction"] == (64 + 64) / (64 * 64)
    exact = mismatch(want, want, 0.0)
    assert exact["wrong_elements"] == 0 and exact["wrong_rows"] == "none (0 of 64)"


def test_mismatch_accepts_per_element_bounds():
    want = torch.tensor([[1.0, 100.0]])
    got = torch.tensor([[1.5, 100.5]])
    report = mismatch(got, want, torch.tensor([[0.1, 1.0]]))
    assert report["wrong_cols"] == "0 (1 of 2)"


def test_kernel_failure_names_the_rank_expert_and_tiles():
    """Tokens 0..9 on rank 0, 10..19 on rank 1; expert 3's rows are wrong, in GEMM1 column tile 1."""
    T, H = 20, 256
    ideal = torch.randn(T, H)
    ids = torch.stack([torch.arange(T) % 4, (torch.arange(T) + 1) % 4 + 4], 1)     # experts 0-3, then 4-7
    routing = Routing(ids=ids, weights=torch.full((T, 2), 0.5), kept=torch.ones(T, 2, dtype=torch.bool))
    out = ideal.clone()
    bad = (ids == 3).any(1)
    out[bad, 130:140] += 1.0
    report = kernel_failure(out, ideal, 0.1, routing, [10, 10], block_m=2, block_n=128)
    assert report["wrong_by_expert"] == {3: "5/5", 4: "5/5"}       # expert 4 has exactly those tokens too
    assert report["wrong_by_rank"] == {0: "2/10", 1: "3/10"}          # tokens 3, 7 and 11, 15, 19
    assert report["wrong_col_tiles"] == "1 (1 of 2)"
    assert report["wrong_row_tiles"][:3] == ["e3:t0", "e3:t1", "e3:t2"]
