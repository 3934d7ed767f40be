"""Every shipped KernelSpec compiles flashmoe/device/flashmoe.cu to a cubin that can ship.

For each spec of ``shipped_specs()``, and the traced builds of the bf16 layouts: no spills,
no stack frame and no performance loss ptxas reports (serialised wgmma, setmaxnreg ignored),
static + dynamic shared memory within the arch's per-block limit (dynamic: the Plan of
flashmoe.build's representative layer), tensor-core instructions in the SASS (HMMA for mma_sync,
HGMMA for wgmma), and the pure-Python ELF reader agreeing with the ptxas log. CPU only.

The module fixture compiles all specs up front, in one process per core, into a disk cache under
the session's tmp dir; each test then loads its kernel from that cache. One real compile costs
4-7 s of CPU (NVRTC 13.0: frontend ~1 s, NVVM 1.3-1.9 s, ptxas 1.6-2.1 s), so the module takes
one to three minutes on two cores: marked slow.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from flashmoe.build import compile_many, plan_smem_bytes
from flashmoe.host import compile as C
from flashmoe.host import cubin
from flashmoe.host.plan import DeviceInfo
from flashmoe.host.resources import performance_losses
from flashmoe.host.spec import select_spec, shipped_specs

pytestmark = pytest.mark.slow
# The shipped specs, and the mma_sync engine forced on Hopper (kernel_options={'gemm': 'mma_sync'}).
FORCED_MMA_SYNC = [select_spec(dtype, gated, "sm_90a", 227 * 1024, bm, gemm="mma_sync")
                   for dtype, gated, bm in (("bfloat16", True, 128), ("bfloat16", True, 64), ("float32", False, 128))]
# The traced builds a trace (bench_layer.py --trace, flashmoe.trace; the kit's trace stage: gated
# layers and the plain paper layer) runs, at each Hopper tile and on sm_80: a record's state held
# through the wgmma consumers' loop spilled the wide tile once.
TRACED = [replace(s, trace=True) for s in shipped_specs()
          if (s.dtype, s.routing) == ("bfloat16", "router") and (s.arch == "sm_90a" or s.block_m == 128)]
SPECS = shipped_specs() + FORCED_MMA_SYNC + TRACED
by_spec = pytest.mark.parametrize("spec", SPECS, ids=[s.key() for s in SPECS])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    directory = tmp_path_factory.getbasetemp() / "kernel-cache"     # one per pytest session
    with pytest.MonkeyPatch.context() as m:
        m.setenv(C.CACHE_DIR_ENV, str(directory))
        m.delenv(C.ASSERT_NO_COMPILE_ENV, raising=False)
        compile_many(SPECS, jobs=os.cpu_count() or 1)    # failures resurface in ``kernel`` below
    return directory


@pytest.fixture
def kernel(spec, cache_dir, monkeypatch):
    """The spec's kernel from the shared cache. It is compiled again here when the fixture's build
    failed (so the test fails with the CompileError and its log) or when a device source changed
    since (the cache key covers every file under flashmoe/device/)."""
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(cache_dir))
    monkeypatch.setenv(C.ASSERT_NO_COMPILE_ENV, "1")
    try:
        return C.compile_spec(spec)
    except C.CacheMissError:
        monkeypatch.delenv(C.ASSERT_NO_COMPILE_ENV)
        return C.compile_spec(spec)


@by_spec
def test_no_spills_no_stack(kernel):
    res = kernel.resources
    assert res.spill_bytes == 0, (f"{res.spill_store_bytes} B spill stores, "
                                  f"{res.spill_load_bytes} B spill loads")
    assert res.stack_bytes == 0, f"{res.stack_bytes} B stack frame (local memory)"
    assert res.registers * kernel.spec.threads <= 64 * 1024, "the block exceeds the register file"
    assert not performance_losses(kernel.log), performance_losses(kernel.log)


@by_spec
def test_shared_memory_fits(kernel):
    dynamic = plan_smem_bytes(kernel.spec)
    limit = DeviceInfo.for_arch(kernel.spec.arch).max_smem_per_block
    total = kernel.resources.static_smem_bytes + dynamic
    assert total <= limit, (f"static {kernel.resources.static_smem_bytes} "
                            f"+ dynamic {dynamic} > {limit}")


@by_spec
def test_tensor_core_instructions_in_sass(kernel):
    counts = cubin.opcode_counts(cubin.sass(kernel.cubin))
    opcode = "HGMMA" if kernel.spec.gemm == "wgmma" else "HMMA"
    assert counts[opcode] > 0, f"no {opcode} in the SASS; most common: {counts.most_common(8)}"
    assert counts["STL"] == counts["LDL"] == 0          # no local-memory traffic at all


@by_spec
def test_elf_reader_agrees_with_log(kernel):
    elf = cubin.kernel_info(kernel.cubin, C.KERNEL_NAME)
    res = kernel.resources
    assert elf.entry
    assert (elf.registers, elf.static_smem_bytes, elf.frame_bytes, elf.cmem0_bytes) == \
        (res.registers, res.static_smem_bytes, res.stack_bytes, res.cmem0_bytes)
