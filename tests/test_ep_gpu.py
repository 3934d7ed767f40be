"""The NVSHMEM transport on a GPU against the reference (skipped with the reason without one).

- one process, one PE, W virtual ranks, every write forced through NVSHMEM's device API: the
  transport's device code (mma_sync, and wgmma on Hopper), the symmetric heap and module
  registration, deterministically;
- two processes as NVSHMEM PEs on one GPU (limited MPG: P2P + barrier_all, kernels time-slice),
  each one rank of a FlashMoELayer(process_group=...) of Mixtral's, GPT-OSS's or Llama4's
  options, checked against ep_forward; skipped with the platform's own refusal when cross-process
  IPC / MPG is refused;
- N GPUs: examples/ep_torchrun.py under torchrun (marked multigpu).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashmoe import FlashMoELayer, MoEConfig
from flashmoe.accuracy import check

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def _nvshmem_reason():
    try:
        import nvshmem.core  # noqa: F401
    except ImportError as e:
        return f"nvshmem4py missing ({e}): pip install nvshmem4py-cu13"
    return None


def _child_env() -> dict:
    """The environment of a torchrun child: the checkout first on its path, then whatever path
    found nvshmem4py here (a --target install)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _weights(config):
    return FlashMoELayer(config, device="cuda").weights()


@pytest.mark.parametrize("gemm", ["mma_sync", "wgmma"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_forced_nvshmem_virtual_ranks_match_reference(world, gemm):
    """Both engines' NVSHMEM builds; the wgmma one is what a process-group layer runs on Hopper."""
    if reason := _nvshmem_reason():
        pytest.skip(reason)
    from flashmoe.host.backend import KernelBackend
    from flashmoe.host.runtime import Runtime
    from flashmoe.host.spec import KernelSpec, wgmma_spec
    hopper = torch.cuda.get_device_capability() == (9, 0)
    if gemm == "wgmma" and not hopper:
        pytest.skip("wgmma needs a Hopper GPU (sm_90a)")
    config = MoEConfig(hidden_size=256, intermediate_size=128, num_experts=8, top_k=2, dtype="bfloat16")
    runtime = Runtime.single_process(0)
    spec = (KernelSpec(arch="sm_90a" if hopper else "sm_80", stages=3) if gemm == "mma_sync"
            else wgmma_spec("bfloat16", True, schedule="cooperative"))
    spec = dataclasses.replace(spec, transport="nvshmem")
    backend = KernelBackend(config, "cuda:0", virtual_world=world, spec=spec, runtime=runtime,
                            force_nvshmem=True, error_check="sync", blocks_per_rank=4)
    w = _weights(config)
    for tokens in (1, 77, 300):
        x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            out, routing = backend.forward(x, w, return_routing=True)
            ok, err, tol = check(out, x, w, config, routing)
        assert ok, f"{gemm} W={world} T={tokens}: max error {err:.3g} above {tol:.3g}"


# GPT-OSS's and Llama4's options change what crosses ranks: each owner adds its own experts' biases
# (its slice of them), and each row travels with the weight that scales it. The other families'
# options (router, shared experts) stay on the rank that has the token.
@pytest.mark.parametrize("family", ["mixtral", "gpt-oss", "llama4"])
def test_two_processes_on_one_gpu_match_ep_forward(family):
    if reason := _nvshmem_reason():
        pytest.skip(reason)
    env = _child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "ep_torchrun.py"), "--steps", "3", "--same-gpu", "--timeout", "60",
           "--family", family]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    # The example exits 3 with this line when the platform refuses; torchrun then exits 1.
    refusal = next((line for line in text.splitlines() if "refused by the platform" in line), None)
    if done.returncode != 0 and refusal:
        pytest.skip(refusal)
    assert done.returncode == 0, text[-4000:]
    assert "match ep_forward: yes" in text


@pytest.mark.multigpu
def test_torchrun_across_gpus():
    if reason := _nvshmem_reason():
        pytest.skip(reason)
    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(ROOT / "examples" / "ep_torchrun.py"), "--steps", "3"]
    done = subprocess.run(cmd, env=_child_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "match ep_forward: yes" in done.stdout
