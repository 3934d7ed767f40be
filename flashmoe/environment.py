"""What a result was measured on: the machine, the GPU and driver, and every toolchain piece the
kernel is built with. Every results file (selftest, bring-up kit) records it, so a number can be
traced to the device, driver, commit and date that produced it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
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
    """The checkout's commit, with '+dirty' when files differ from it. ``FLASHMOE_GIT_COMMIT``,
    where set, is the answer: a machine that got a copy of the working tree may have no git
    repository, or a stale one (seen on a GPU machine: a .git naming an older commit)."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def compute_sanitizers() -> list[tuple[str, str]]:
    """Every compute-sanitizer of this machine as (version, path), newest first: the CUDA
    toolkit's on PATH and the one the nvidia-cuda-sanitizer-api wheel puts under a sys.path entry
    (nvidia/cu13/bin; ``python -m flashmoe.bringup.wheels`` fetches it for a GPU machine whose
    toolkit has an older one). Newer ones report fewer false hazards: racecheck's release notes list
    fixes for mbarrier handoffs (2025.4) and warpgroup-level synchronisation on Hopper (2026.1)."""
    paths = [shutil.which("compute-sanitizer")] + [str(Path(e) / "nvidia" / "cu13" / "bin" / "compute-sanitizer")
                                                   for e in sys.path if e]
    found = {}
    for path in paths:
        if path and os.access(path, os.X_OK) and os.path.realpath(path) not in found:
            version = _tool_version(path)
            if version:
                found[os.path.realpath(path)] = (version, path)
    return sorted(found.values(), key=lambda vp: tuple(int(n) for n in vp[0].split(".")), reverse=True)


def _tool_version(path: str) -> str | None:
    """The x.y.z... of a tool's ``--version`` output, or None when it does not run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"Version (\d+(?:\.\d+)+)", out)
    return match.group(1) if match else None


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
            "compute_sanitizers": [f"{v} {path}" for v, path in compute_sanitizers()],
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
    smi = smi_query(("driver_version", "clocks.max.sm", "power.limit"), device.index or 0)
    if smi:
        info.update(driver=smi["driver_version"], sm_clock_max=smi["clocks.max.sm"], power_limit=smi["power.limit"])
    return info


def smi_query(fields: tuple[str, ...], index: int = 0) -> dict:
    """nvidia-smi's values of ``fields`` for GPU ``index`` (no CUDA context needed); {} without it."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {}
    query = subprocess.run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader", f"--id={index}"],
                           capture_output=True, text=True)
    values = [v.strip() for v in query.stdout.split(",")] if query.returncode == 0 else []
    return dict(zip(fields, values)) if len(values) == len(fields) else {}
