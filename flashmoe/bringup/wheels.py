"""``python -m flashmoe.bringup.wheels``: fetch, on a machine with a package index, the wheels a
GPU machine without one lacks, into ``.whl/`` (ignored by git) for the bring-up session to carry.

The GPU image (Python 3.12, torch 2.11+cu130, cuda-bindings, NVRTC, nvJitLink, the CUDA headers,
nvidia-nvshmem-cu13 3.4.5, cupy, transformers) has everything the kit and the tests need except
nvshmem4py, the symmetric-memory host API of the process-group path and its tests. Fetched with
``--no-deps``: its requirements are on the image already. docs/gpu-session.md says how they are
installed there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

WHEELS = {"nvshmem4py-cu13": "0.4.1"}
PYTHON = "3.12"
# pip matches a manylinux tag exactly: the tags the GPU machine's pip accepts, newest first.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
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
