"""The bring-up kit: ``python -m flashmoe.bringup --out DIR [--budget-s 480] [--emulate]``.

One short run on a new GPU that tells which component of the kernel works: stages in order
(``stages.STAGES``: environment, component probes, the whole kernel with each GEMM engine, virtual
ranks and routing options, compute-sanitizer, determinism / faults / CUDA graphs, a few benchmark
rows), each in its own time-limited process (``runner.py``), every case written to
``DIR/bringup.jsonl`` as it ends, failures with their diagnosis (``flashmoe.diagnose``).
``--stages longer`` runs, the same way, what the hardware validation needs once the kit runs
clean: the selftest's whole grid, the soak, the GPU tests, the benchmark grid, a kernel trace, the
tile and virtual-rank sweeps, the sanitizers on larger cases; ``--then longer`` runs them after
the kit, in what is left of the budget, when every stage of the kit ran clean (a failed
sanitizer aside: its reports do not make the kernel's checked results wrong). With ``--emulate``
the stages run on the CPU emulator where they can (the benchmarks as dry runs) and say why not
where they cannot.
``docs/gpu-session.md`` has the command lines for a fresh GPU machine.
"""
