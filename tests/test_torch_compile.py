"""torch.compile (fullgraph, dynamic token counts), torch.export and torch.jit on the layer,
each backend in a fresh process (tests/compile_check.py): on the reference, and on the kernel
path through the CPU emulator (the same custom op a GPU runs); and the routing-given op
(flashmoe.experts_forward) behind a router of the caller's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_check.py")


@pytest.mark.parametrize("backend", ["reference", "emulated"])
def test_compile_export_and_jit_in_a_fresh_process(backend):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(SCRIPT), backend], capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(facts["compiled_equal"]), facts
    assert facts["graph_breaks"] == 0
    graphs = facts["graphs_after"]
    assert graphs["33"] == graphs["5"] and graphs["17"] == graphs["0"], graphs  # no recompiles
    assert facts["last_backend"] == backend
    if backend == "reference":
        assert facts["compiled_grads_equal"]
        # the routing-given op behind a caller's own router
        assert all(facts["experts_compiled_equal"]) and facts["experts_graphs"] == 1, facts
        assert facts["experts_grad_equal"] and facts["experts_exported_equal"]
        assert facts["experts_exported_ops"] == ["flashmoe.experts.default"]
    assert facts["exported_ops"] == ["flashmoe.moe.default"]
    assert all(facts["exported_equal"]), facts
    assert facts["jit_trace"].startswith("RuntimeError: torch.jit.trace would freeze") \
        and "torch.compile" in facts["jit_trace"]
    assert facts["jit_script"].startswith("RuntimeError: FlashMoELayer cannot be scripted") \
        and "torch.compile" in facts["jit_script"]
