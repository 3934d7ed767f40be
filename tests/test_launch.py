"""The launch layer without a GPU: the driver calls around a launch (faked), the driver-version
check, and how the kernel's error records read."""

from __future__ import annotations

import pytest

from flashmoe.errors import FlashMoEError, KernelUnavailable
from flashmoe.host import abi, launch


@pytest.fixture
def driver(monkeypatch):
    """cuda.bindings.driver with the context and launch calls recorded instead of made; the
    thread's current context starts as another one than the module's."""
    from cuda.bindings import driver as cu
    ok = cu.CUresult.CUDA_SUCCESS
    state = {"current": cu.CUcontext(0x2000), "calls": [], "launch_result": ok}

    def push(ctx):
        state["calls"].append(("push", int(ctx)))
        state["saved"], state["current"] = state["current"], ctx
        return (ok,)

    def pop():
        state["calls"].append(("pop",))
        popped, state["current"] = state["current"], state.pop("saved")
        return ok, popped

    def launch_kernel(*args):
        state["calls"].append(("launch", int(state["current"])))
        return (state["launch_result"],)

    monkeypatch.setattr(cu, "cuCtxGetCurrent", lambda: (ok, state["current"]))
    monkeypatch.setattr(cu, "cuCtxPushCurrent", push)
    monkeypatch.setattr(cu, "cuCtxPopCurrent", pop)
    monkeypatch.setattr(cu, "cuLaunchCooperativeKernel", launch_kernel)
    monkeypatch.setattr(cu, "cuGetErrorName", lambda err: (ok, err.name.encode()))
    return cu, state


def _module(context: int):
    from cuda.bindings import driver as cu
    module = object.__new__(launch.CudaModule)          # as loaded on a device, without one
    module.context, module._context_id, module.device_index = cu.CUcontext(context), context, 0
    return module


def test_a_launch_runs_in_the_module_context_whatever_the_thread_has_current(driver):
    cu, state = driver
    _module(0x1000).launch("fn", abi.Params(), 2, 128, 0, 0)
    assert state["calls"] == [("push", 0x1000), ("launch", 0x1000), ("pop",)]
    assert int(state["current"]) == 0x2000               # the thread's own context is back


def test_no_context_switch_when_the_module_context_is_current(driver):
    cu, state = driver
    state["current"] = cu.CUcontext(0x1000)
    _module(0x1000).launch("fn", abi.Params(), 2, 128, 0, 0)
    assert state["calls"] == [("launch", 0x1000)]


def test_a_failed_launch_still_restores_the_thread_context(driver):
    cu, state = driver
    state["launch_result"] = cu.CUresult.CUDA_ERROR_INVALID_VALUE
    with pytest.raises(RuntimeError, match="CUDA_ERROR_INVALID_VALUE"):
        _module(0x1000).launch("fn", abi.Params(), 2, 128, 0, 0)
    assert state["calls"][-1] == ("pop",) and int(state["current"]) == 0x2000


def test_a_driver_older_than_nvrtc_is_refused_with_both_versions(monkeypatch):
    monkeypatch.setattr(launch, "driver_version", lambda: (12, 8))
    message = launch.driver_problem((13, 0))
    assert "CUDA 12.8" in message and "NVRTC 13.0" in message and "nvidia-cuda-nvrtc==12.8.*" in message
    assert launch.driver_problem((12, 9)) is None        # a newer minor release loads (minor-version compatibility)
    with pytest.raises(KernelUnavailable, match="older than NVRTC"):
        launch.CudaModule(b"not a cubin", 0)             # refused before anything is loaded


def _record(**fields) -> abi.ErrorRecord:
    rec = abi.ErrorRecord()
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec


def test_pipeline_and_alignment_records_read_as_sentences():
    full = _record(code=abi.ErrorCode.TIMEOUT, rank=1, block=7, role=abi.TaskKind.GEMM0, what=abi.WaitKind.PIPE_FULL,
                   index=2, expected=3, observed=14, waited_ns=500_000_000)
    text = launch.describe_record(full)
    assert text.startswith("rank 1 block 7 (gemm0) timed out after 0.500 s") and "stage 2" in text
    assert "k-tile 14" in text and "fill 3" in text
    empty = _record(code=abi.ErrorCode.ABORTED, what=abi.WaitKind.PIPE_EMPTY, role=abi.TaskKind.GEMM1, index=1,
                    observed=9)
    assert "release stage 1 for k-tile 9" in launch.describe_record(empty)
    turn = _record(code=abi.ErrorCode.TIMEOUT, what=abi.WaitKind.MATH_TURN, role=abi.TaskKind.GEMM0, index=1,
                   expected=4)
    assert "turn 4 of its GEMM consumer team 1" in launch.describe_record(turn)
    skew = _record(code=abi.ErrorCode.MISALIGNED, expected=1024, observed=0x410)
    assert "0x410" in launch.describe_record(skew) and "1024-byte boundary" in launch.describe_record(skew)


def test_the_timeout_comes_first_and_every_record_is_kept():
    control = abi.Control()
    control.errors[0] = _record(code=abi.ErrorCode.ABORTED, rank=0, what=abi.WaitKind.TILE_DONE)
    control.errors[1] = _record(code=abi.ErrorCode.TIMEOUT, rank=1, what=abi.WaitKind.DATA_FLAG, index=0)
    with pytest.raises(FlashMoEError) as raised:
        launch.check_control(bytes(control), 2)
    assert "rank 1 block 0" in str(raised.value).splitlines()[0] and len(raised.value.records) == 2
