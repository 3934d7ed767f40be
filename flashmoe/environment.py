"""What a result was measured on: the machine, the GPU and driver, and every toolchain piece the
kernel is built with. Every results file (selftest, bring-up kit) records it, so a number can be
traced to the device, driver, commit and date that produced it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

PACKAGES = ("torch", "cuda-bindings", "cuda-core", "cuda-pathfinder", "nvidia-cuda-nvrtc", "nvidia-nvjitlink",
            "nvidia-cuda-runtime", "nvidia-cuda-cccl", "nvidia-nvshmem-cu13", "nvshmem4py-cu13", "cupy-cuda13x",
            "transformers")
TOOLS = ("nvidia-smi", "compute-sanitizer", "ncu", "nvcc", "cuobjdump", "g++")
COMMIT_ENV = "FLASHMOE_GIT_COMMIT"


def commit() -> str:
    """The checkout's commit (``FLASHMOE_GIT_COMMIT`` where there is no git repository, as on a
    machine that got a copy of the working tree), with '+dirty' when files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(COMMIT_ENV) or "unknown"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _guard(fn):
    try:
        return fn()
    except Exception as e:     # a missing piece is a fact to record, not a reason to stop
        return f"unavailable: {type(e).__name__}: {e}"


def describe(device: torch.device | None = None) -> dict:
    """The whole picture as a JSON-able dict (``device`` None or a CPU device: no GPU part)."""
    from .host import compile as compile_mod
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit(), "host": platform.node(), "python": sys.version.split()[0],
            "platform": platform.platform(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "packages": {p: _version(p) for p in PACKAGES},
            "nvrtc": _guard(lambda: ".".join(map(str, compile_mod.nvrtc_version()))),
            "nvjitlink": _guard(lambda: ".".join(map(str, compile_mod.nvjitlink_version()))),
            "headers": {h: _guard(lambda h=h: compile_mod._header_dir(h)) for h in ("cudart", "cccl", "nvshmem")},
            "tools": {t: shutil.which(t) for t in TOOLS},
            "cpus": os.cpu_count()}
    if device is None or torch.device(device).type != "cuda":
        info["device"] = "cpu (emulated kernel)"
        return info
    from .host.launch import driver_version
    device = torch.device(device)
    props = torch.cuda.get_device_properties(device)
    info.update({"device": props.name, "capability": f"{props.major}.{props.minor}",
                 "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                 "smem_per_block_optin": props.shared_memory_per_block_optin,
                 "l2_bytes": getattr(props, "L2_cache_size", None),
                 "driver_cuda": _guard(lambda: ".".join(map(str, driver_version())))})
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader",
                                f"--id={device.index or 0}"], capture_output=True, text=True)
        fields = [f.strip() for f in query.stdout.split(",")] if query.returncode == 0 else []
        if len(fields) == 3:
            info.update(driver=fields[0], sm_clock_max=fields[1], power_limit=fields[2])
    return info
