"""examples/quickstart.py runs, picks a backend, and passes its own accuracy check."""

from __future__ import annotations

import pathlib
import runpy
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_and_passes(monkeypatch, capsys):
    quickstart = runpy.run_path(str(EXAMPLE), run_name="quickstart")
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--tokens", "64", "--repeats", "1"])
    assert quickstart["main"]() == 0
    printed = capsys.readouterr().out
    assert "check           ok" in printed
    assert "backend         reference" in printed or "backend         kernel" in printed
