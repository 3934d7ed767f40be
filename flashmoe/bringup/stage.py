"""One stage of the bring-up kit as it runs: where its cases are written, its device, the time it
has left, and the one-line JSONL records (``stages.py`` holds what each stage runs)."""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checks
from ..host.plan import DeviceInfo
from ..host.spec import arch_for_capability


@dataclass
class Stage:
    """What a stage's cases share: where to write, the device, how much time is left."""

    name: str
    out: Path                       # where bringup.jsonl, bringup.log and the stages' own files go
    device: torch.device
    emulate: bool
    quick: bool
    deadline: float                 # time.monotonic() by which the stage must have ended
    counts: dict = field(default_factory=lambda: {"passed": 0, "failed": 0, "skipped": 0})
    started: float = field(default_factory=time.monotonic)

    @property
    def jsonl(self) -> Path:
        return self.out / "bringup.jsonl"

    def write(self, record: dict) -> None:
        append(self.jsonl, record)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def arch(self) -> str:
        if self.emulate:
            return "sm_90a"           # the emulator runs both engines
        major, minor = torch.cuda.get_device_capability(self.device)
        return arch_for_capability(major, minor)

    @property
    def smem(self) -> int:
        """Shared memory per block the backend plans with (select_spec picks stages by it)."""
        if self.emulate:
            return DeviceInfo.for_arch(self.arch).max_smem_per_block
        return torch.cuda.get_device_properties(self.device).shared_memory_per_block_optin

    def case(self, name: str, run, min_s: float = 2.0) -> dict:
        """Run ``run()`` (a dict with 'passed', or a CaseResult) as case ``name`` and record it."""
        row = {"type": "case", "stage": self.name, "case": name}
        lost = None
        if self.left() < min_s:
            row.update(passed=None, skipped=f"{self.left():.0f} s left of the stage's time")
        else:
            t0 = time.monotonic()
            try:
                got = run()
                row.update(got.row() if isinstance(got, checks.CaseResult) else got)
            except Exception as exc:
                row.update(passed=False, error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc()[-3000:], records=getattr(exc, "records", []))
                lost = context_lost(self.device, exc)
            row["wall_s"] = round(time.monotonic() - t0, 3)
        key = "skipped" if row.get("passed") is None else ("passed" if row["passed"] else "failed")
        self.counts[key] += 1
        self.write(row)
        mark = {"passed": "PASS", "failed": "FAIL", "skipped": "skip"}[key]
        print(f"  {mark} {name} {row.get('detail') or row.get('error') or row.get('skipped') or ''}"[:300], flush=True)
        if lost:
            raise ContextLost(lost)
        return row

    def finish(self, reason: str = "") -> int:
        status = "failed" if self.counts["failed"] else "passed" if self.counts["passed"] else "skipped"
        self.write({"type": "stage", "stage": self.name, "status": status, "reason": reason, **self.counts,
                    "seconds": round(time.monotonic() - self.started, 1)})
        return 1 if status == "failed" else 0


class ContextLost(RuntimeError):
    """The CUDA context stopped working (a fault in a kernel): the stage cannot go on."""


def context_lost(device: torch.device, exc: Exception) -> str | None:
    """Why nothing more can run on ``device`` after ``exc`` (None while the context works)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as sticky:
        return f"the CUDA context is lost ({sticky}) after: {exc}"
    return None


def append(path: Path, record: dict) -> None:
    """One JSON line, written and flushed to disk at once (a run killed later keeps it)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
