"""Benchmarks of the flashmoe layer against the baselines a user would otherwise pick.

    python bench/bench_layer.py   one GPU: flashmoe vs a torch loop vs transformers' grouped_mm
    python bench/sweep_ep.py      W virtual expert-parallel ranks on one GPU vs bulk-synchronous

Both take ``--dry-run`` (CPU, tiny shapes, reference backend: exercises every code path, times
nothing worth reading). Results go to ``bench/results/`` as CSV, JSON and PNG.
"""
