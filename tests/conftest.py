"""Shared test set-up: GPU markers skip with a reason when the hardware is not there."""

from __future__ import annotations

import pytest
import torch


def gpu_available() -> bool:
    return torch.cuda.is_available()


def gpu_count() -> int:
    return torch.cuda.device_count() if gpu_available() else 0


requires_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU: torch.cuda.is_available() is False")


def pytest_collection_modifyitems(config, items):
    # A test marked gpu / multigpu is skipped, with the reason, where the GPUs are missing,
    # so each such test needs only its marker.
    no_gpu = pytest.mark.skip(reason="no CUDA GPU: torch.cuda.is_available() is False")
    few_gpus = pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs, found {gpu_count()}")
    for item in items:
        if "gpu" in item.keywords and not gpu_available():
            item.add_marker(no_gpu)
        if "multigpu" in item.keywords and gpu_count() < 2:
            item.add_marker(few_gpus)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)
