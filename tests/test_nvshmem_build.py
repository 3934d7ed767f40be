"""The real kernel with the NVSHMEM transport (KernelSpec(transport="nvshmem")) compiles with
NVRTC (-rdc -dlto) and links with nvJitLink against the installed wheel's libnvshmem_device.a,
for sm_90a and sm_80, with no spills and no performance loss ptxas reports (and on sm_90a no call
in the SASS); the linked module
carries the state nvshmemx_cumodule_init fills. CPU only (about 10 s per spec)."""

from __future__ import annotations

import dataclasses

import pytest

from flashmoe.host import compile as C
from flashmoe.host import cubin
from flashmoe.host.resources import performance_losses
from flashmoe.host.spec import KernelSpec, wgmma_spec


def _nvshmem_installed() -> bool:
    from cuda.pathfinder import find_nvidia_header_directory
    return find_nvidia_header_directory("nvshmem") is not None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _nvshmem_installed(),
                                 reason="NVSHMEM headers missing: pip install .[nvshmem]")]

NVSHMEM_SPECS = [KernelSpec(arch="sm_90a", transport="nvshmem"),
                 KernelSpec(arch="sm_80", stages=3, transport="nvshmem"),
                 dataclasses.replace(wgmma_spec("bfloat16", True, schedule="cooperative"), transport="nvshmem")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nvshmem-cache")


@pytest.mark.parametrize("spec", NVSHMEM_SPECS, ids=[s.key() for s in NVSHMEM_SPECS])
def test_nvshmem_transport_compiles_links_without_spills(spec, cache_dir, monkeypatch):
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(cache_dir))
    kernel = C.compile_spec(spec)
    res = kernel.resources
    assert res.spill_bytes == 0, (f"{res.spill_store_bytes} B spill stores, "
                                  f"{res.spill_load_bytes} B spill loads")
    # Linked with -rdc, any call in the kernel serialises its wgmmas and setmaxnreg is ignored.
    assert not performance_losses(kernel.log), performance_losses(kernel.log)
    if spec.arch == "sm_90a":   # nor is there one ptxas does not report (sqrtf's slow path was one)
        calls = cubin.opcode_counts(cubin.sass(kernel.cubin))["CALL"]
        assert calls == 0, f"{calls} CALL instructions in the SASS"
    elf = cubin.kernel_info(kernel.cubin, C.KERNEL_NAME)
    assert elf.entry and elf.registers == res.registers > 0
    assert b"nvshmemi_device_state_d" in kernel.cubin
    assert "-lto" in C._inputs(spec, None).link_options
