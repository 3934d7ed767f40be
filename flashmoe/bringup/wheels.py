"""``python -m flashmoe.bringup.wheels``: fetch, on a machine with a package index, the wheels a
GPU machine without one lacks, into ``.whl/`` (ignored by git) for the bring-up session to carry.

The GPU image (Python 3.12, torch 2.11+cu130, cuda-bindings, NVRTC, nvJitLink, the CUDA headers,
nvidia-nvshmem-cu13 3.4.5, cupy, transformers) has everything the kit and the tests need except
nvshmem4py, the symmetric-memory host API of the process-group path and its tests. Its
compute-sanitizer (2025.3.1, CUDA 13.0) predates racecheck's fixes of false hazards on mbarrier
handoffs and Hopper warpgroup synchronisation, so the newest one comes too: the
nvidia-cuda-sanitizer-api wheel holds the whole tool (2026.4, for drivers from 580), and the kit
runs the newest it finds (flashmoe/environment.py compute_sanitizers). Fetched with
``--no-deps``: their requirements are on the image already. docs/gpu-session.md says how they are
installed there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

WHEELS = {"nvshmem4py-cu13": "0.4.1", "nvidia-cuda-sanitizer-api": "13.5.25"}
PYTHON = "3.12"
# pip matches a manylinux tag exactly: every one from manylinux_2_39 (glibc 2.39) down, newest first.
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)) + ("manylinux2014_x86_64",
                                                                          "manylinux1_x86_64")


def download_command(name: str, version: str, dest: Path) -> list[str]:
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
            "--implementation", "cp", *platforms, "-d", str(dest), f"{name}=={version}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmoe.bringup.wheels", description=__doc__.split("\n")[0])
    ap.add_argument("--dest", type=Path, default=Path(".whl"))
    ap.add_argument("--dry-run", action="store_true", help="print the pip commands only")
    args = ap.parse_args(argv)
    for name, version in WHEELS.items():
        cmd = download_command(name, version, args.dest)
        print(" ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    if not args.dry_run:
        print("\n".join(sorted(p.name for p in args.dest.glob("*.whl"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
