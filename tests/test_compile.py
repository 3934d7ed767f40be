"""flashmoe.host.compile and flashmoe.host.cubin on a CPU: NVRTC, nvJitLink, cache, resources.

Every test builds a small stand-in kernel in a temporary copy of flashmoe/device/ (the include root
is redirected there), so they are fast and do not depend on the real kernel; it is checked in
test_kernel_build.py. No GPU is needed: NVRTC and nvJitLink run without a driver.
"""

from __future__ import annotations

import ctypes
import dataclasses
import shutil
from collections import Counter

import pytest

from flashmoe.host import abi, cubin
from flashmoe.host import compile as C
from flashmoe.host.resources import performance_losses
from flashmoe.host.spec import KernelSpec

REAL_ROOT = C.INCLUDE_ROOT
REAL_ABI_HEADER = abi.abi_header
STUB_ABI_HEADER = '#pragma once\n#include "flashmoe/device/common/params.cuh"\n'
SPEC = KernelSpec(arch="sm_80")

# The kernel's real entry signature, PROBE_SMEM_WORDS words of static shared memory and one bf16
# mma.sync, so the cubin has a known shape: HMMA in the SASS, a static smem size the -D sets.
PROBE = r"""
#include "flashmoe/device/common/params.cuh"
#ifndef PROBE_SMEM_WORDS
#define PROBE_SMEM_WORDS 1024
#endif
extern "C" __global__ void flashmoe_kernel(const __grid_constant__ flashmoe::Params p) {
  __shared__ unsigned tile[PROBE_SMEM_WORDS];
  const unsigned* src = static_cast<const unsigned*>(p.gate_up);
  for (int i = threadIdx.x; i < PROBE_SMEM_WORDS; i += blockDim.x) tile[i] = src[i];
  __syncthreads();
  unsigned a[4], b[2];
  for (int i = 0; i < 4; ++i) a[i] = tile[(threadIdx.x * 4 + i) % PROBE_SMEM_WORDS];
  for (int i = 0; i < 2; ++i) b[i] = tile[(threadIdx.x * 2 + i + 7) % PROBE_SMEM_WORDS];
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  float* out = static_cast<float*>(p.local[0].out);
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = c[i];
}
"""

# Every NVSHMEM device call the transport needs. putmem_signal_nbi is the one that fails to link
# without the prelude's inlining (uint64_t mangles differently under NVRTC than in the archive).
NVSHMEM_PROBE = r"""
#include <nvshmem.h>
#include <nvshmemx.h>
#include "flashmoe/device/common/params.cuh"
extern "C" __global__ void flashmoe_kernel(const __grid_constant__ flashmoe::Params p) {
  __shared__ int peers[64];
  char* heap = reinterpret_cast<char*>(p.heap);
  uint64_t* signal = reinterpret_cast<uint64_t*>(heap);
  peers[threadIdx.x % 64] = (p.first_local_rank + threadIdx.x) % p.world;
  __syncthreads();
  const size_t bytes = 1 << 20;
  const int peer = peers[(threadIdx.x + 1) % 64];
  char* direct = static_cast<char*>(nvshmem_ptr(heap, peer));
  if (direct != nullptr && threadIdx.x == 0) direct[4 * bytes] = 1;
  nvshmemx_putmem_nbi_block(heap + bytes, heap + 3 * bytes, bytes, peer);
  nvshmem_fence();
  nvshmemx_putmem_signal_nbi_block(heap + 2 * bytes, heap + 3 * bytes, bytes, signal, 1,
                                   NVSHMEM_SIGNAL_ADD, peer);
  if (threadIdx.x == 0) {
    nvshmemx_signal_op(signal, 1, NVSHMEM_SIGNAL_ADD, peer);
    nvshmem_signal_wait_until(signal, NVSHMEM_CMP_GE, 2);
    nvshmem_quiet();
  }
}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty disk cache and in-process memo, compiles allowed."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(directory))
    monkeypatch.delenv(C.ASSERT_NO_COMPILE_ENV, raising=False)
    monkeypatch.setattr(C, "_MEMO", {})
    return directory


@pytest.fixture
def root(tmp_path, monkeypatch, cache):
    """A copy of flashmoe/device/ whose flashmoe.cu is the probe; the include root points at it.
    The ABI header is a stub here (the real one costs 1.5 s of CPU per compile); ``real_abi``
    restores it for the tests of the ABI check itself."""
    root = tmp_path / "root"
    shutil.copytree(REAL_ROOT / C.DEVICE_DIR, root / C.DEVICE_DIR)
    (root / C.KERNEL_SOURCE).write_text(PROBE)
    monkeypatch.setattr(C, "INCLUDE_ROOT", root)
    monkeypatch.setattr(abi, "abi_header", lambda: STUB_ABI_HEADER)
    return root


@pytest.fixture
def real_abi(root, monkeypatch):
    monkeypatch.setattr(abi, "abi_header", REAL_ABI_HEADER)


def entries(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------- ABI header and errors

def test_abi_header_compiles_with_params(root, real_abi):
    kernel = C.compile_spec(SPEC)
    assert kernel.cubin[:4] == b"\x7fELF"
    assert not kernel.from_cache and kernel.compile_seconds > 0


def test_drifted_ctypes_mirror_fails_the_compile(root, real_abi, monkeypatch):
    class Entry(ctypes.Structure):          # the host grew a field the device struct lacks
        _fields_ = [*abi.Entry._fields_, ("expert", ctypes.c_uint32)]

    drifted = tuple(Entry if s is abi.Entry else s for s in abi._STRUCTS)
    monkeypatch.setattr(abi, "_STRUCTS", drifted)
    with pytest.raises(C.CompileError) as info:
        C.compile_spec(SPEC)
    assert "Entry" in info.value.log and "expert" in info.value.log
    assert "differs from flashmoe/host/abi.py" in info.value.log
    assert info.value.spec_key == SPEC.key()


def test_nvrtc_error_carries_the_log(root):
    (root / C.KERNEL_SOURCE).write_text(PROBE + "\nint broken = undeclared_name;\n")
    with pytest.raises(C.CompileError, match="NVRTC_ERROR_COMPILATION") as info:
        C.compile_spec(SPEC)
    assert 'identifier "undeclared_name" is undefined' in info.value.log
    assert "flashmoe/device/flashmoe.cu" in info.value.log
    assert info.value.spec_key == SPEC.key() and SPEC.key() in str(info.value)
    assert entries(C.cache_dir()) == []          # nothing cached for a failed compile


def test_missing_kernel_source_is_named(root):
    (root / C.KERNEL_SOURCE).unlink()
    with pytest.raises(C.CompileError, match="flashmoe.cu does not exist"):
        C.compile_spec(SPEC)


def test_include_dirs(root):
    dirs = C.include_dirs(SPEC)
    assert dirs[0] == str(root)
    assert any(d.endswith("include") for d in dirs[1:3])                    # cudart, then cccl
    assert any(d.endswith("cccl") for d in dirs)
    assert not any("nvshmem" in d for d in dirs)
    assert any("nvshmem" in d for d in C.include_dirs(KernelSpec(transport="nvshmem")))


def test_options_one_ptxas_flag_each_and_no_shadowed_defines():
    options = C.compile_options(SPEC, {"PROBE_SMEM_WORDS": 8})
    assert "--ptxas-options=-v" in options and "-default-device" in options
    assert "-DFLASHMOE_BLOCK_M=128" in options and "-DPROBE_SMEM_WORDS=8" in options
    with pytest.raises(ValueError, match="set by the spec"):
        C.compile_options(SPEC, {"FLASHMOE_BLOCK_M": 64})
    with pytest.raises(ValueError, match="not a macro name"):
        C.compile_options(SPEC, {"A B": 1})


# ---------------------------------------------------------------- cache

def test_second_compile_is_a_cache_hit(root, cache):
    first = C.compile_spec(SPEC)
    assert entries(cache) == [f"{first.key}.cubin", f"{first.key}.json"]
    memo = C.compile_spec(SPEC)
    C._MEMO.clear()
    disk = C.compile_spec(SPEC)
    assert (first.from_cache, memo.from_cache, disk.from_cache) == (False, True, True)
    assert first.cubin == memo.cubin == disk.cubin and first.key == disk.key
    assert disk.resources == first.resources and disk.log == first.log


def test_key_follows_device_sources(root):
    before, fingerprint = C.compile_spec(SPEC), C.source_fingerprint()
    params = root / C.DEVICE_DIR / "common" / "params.cuh"
    params.write_bytes(params.read_bytes() + b"\n// one more byte\n")
    assert C.source_fingerprint() != fingerprint
    after = C.compile_spec(SPEC)
    assert after.key != before.key and not after.from_cache


def test_key_follows_defines_and_spec(root):
    base = C.compile_spec(SPEC)
    smaller = C.compile_spec(SPEC, extra_defines={"PROBE_SMEM_WORDS": 512})
    other_spec = C.compile_spec(KernelSpec(arch="sm_80", stages=3))
    assert len({base.key, smaller.key, other_spec.key}) == 3
    assert not smaller.from_cache and not other_spec.from_cache
    assert (base.resources.static_smem_bytes, smaller.resources.static_smem_bytes) == (4096, 2048)


def test_crash_between_write_and_rename_leaves_no_file(root, cache, monkeypatch):
    def killed(src, dst):
        raise KeyboardInterrupt("process killed between write and rename")

    with monkeypatch.context() as m:
        m.setattr(C.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            C.compile_spec(SPEC)
    assert entries(cache) == []                   # neither a final name nor a temporary file
    C._MEMO.clear()
    assert not C.compile_spec(SPEC).from_cache    # nothing half-written was taken for a hit
    C._MEMO.clear()
    assert C.compile_spec(SPEC).from_cache


def test_partial_or_corrupt_entries_are_rebuilt(root, cache):
    good = C.compile_spec(SPEC)
    cubin_path, json_path = cache / f"{good.key}.cubin", cache / f"{good.key}.json"
    (cache / f".{good.key}.cubin.x1.tmp").write_bytes(good.cubin[:100])      # a killed writer's
    for damage in (lambda: cubin_path.write_bytes(good.cubin[: len(good.cubin) // 2]),
                   lambda: json_path.write_text('{"format": 1, "key"'),
                   lambda: json_path.unlink()):
        damage()
        C._MEMO.clear()
        rebuilt = C.compile_spec(SPEC)
        assert not rebuilt.from_cache and rebuilt.cubin == good.cubin
        C._MEMO.clear()
        assert C.compile_spec(SPEC).from_cache     # the rebuild rewrote a whole entry


def test_unwritable_cache_warns_and_still_compiles(root, cache, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "read-only cache")

    with monkeypatch.context() as m:
        m.setattr(C.os, "replace", refuse)
        with pytest.warns(UserWarning, match="could not write the kernel cache"):
            kernel = C.compile_spec(SPEC)
    assert kernel.cubin[:4] == b"\x7fELF" and entries(cache) == []


def test_assert_no_compile_raises_on_a_miss(root, monkeypatch):
    monkeypatch.setenv(C.ASSERT_NO_COMPILE_ENV, "1")
    with pytest.raises(C.CacheMissError, match="FLASHMOE_ASSERT_NO_COMPILE"):
        C.compile_spec(SPEC)
    monkeypatch.delenv(C.ASSERT_NO_COMPILE_ENV)
    C.compile_spec(SPEC)
    C._MEMO.clear()
    monkeypatch.setenv(C.ASSERT_NO_COMPILE_ENV, "1")
    assert C.compile_spec(SPEC).from_cache                       # a disk hit is fine
    with pytest.raises(C.CacheMissError):
        C.compile_spec(SPEC, use_cache=False)                    # a forced compile is not


# ---------------------------------------------------------------- resources, ELF and SASS

@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("words", [1024, 251])
def test_elf_reader_agrees_with_ptxas_log(root, arch, words):
    kernel = C.compile_spec(KernelSpec(arch=arch), extra_defines={"PROBE_SMEM_WORDS": words})
    res, elf = kernel.resources, cubin.kernel_info(kernel.cubin, C.KERNEL_NAME)
    assert elf.entry and elf.registers == res.registers > 0
    assert elf.static_smem_bytes == res.static_smem_bytes
    assert 4 * words <= res.static_smem_bytes < 4 * words + 16
    assert elf.frame_bytes == res.stack_bytes == 0 and res.spill_bytes == 0
    assert elf.cmem0_bytes == res.cmem0_bytes >= ctypes.sizeof(abi.Params)
    # sm_90 cubins count the driver's 1 KiB reserve inside the kernel's shared section.
    assert elf.reserved_smem_bytes == (1024 if arch == "sm_90a" else 0)
    assert elf.shared_section_bytes == elf.static_smem_bytes + elf.reserved_smem_bytes


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_sass_shows_the_tensor_core_instruction(root, arch):
    counts = cubin.opcode_counts(cubin.sass(C.compile_spec(KernelSpec(arch=arch)).cubin))
    assert counts["HMMA"] == 1 and counts["HGMMA"] == 0
    assert counts["STL"] == counts["LDL"] == 0 and counts["BAR"] >= 1


def test_opcode_counts_reads_predicates_and_suffixes():
    text = ("        /*0040*/                   HMMA.16816.F32.BF16 R4, R4, R2, RZ ;  /* 0x0 */\n"
            "        /*0050*/              @!P0 BRA 0x70 ;\n"
            "        /*0060*/              @UP1 HGMMA.64x64x16.F32.BF16 gdesc[UR4], RZ, !UPT ;\n"
            "        .headerflags @\"EF_CUDA_SM90\"\n")
    assert cubin.opcode_counts(text) == {"HMMA": 1, "BRA": 1, "HGMMA": 1}


PTXAS_LOG = """ptxas info    : 12 bytes gmem
ptxas info    : Function properties for helper
ptxas         .     8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'flashmoe_kernel' for 'sm_80'
ptxas info    : Function properties for flashmoe_kernel
ptxas         .     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers, used 1 barriers, 4096 bytes smem, 1088 bytes cmem[0]
"""
LINK_LOG = """ptxas info    : Compiling entry function 'flashmoe_kernel' for 'sm_90a'
ptxas info    : Function properties for flashmoe_kernel
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers
info    : 3602 bytes gmem, 11500 bytes cmem[3]
info    : Function properties for 'flashmoe_kernel':
info    : used 62 registers, used 1 barriers, 0 stack, 0 bytes smem, 568 bytes cmem[0], 0 bytes lmem
"""


def test_parse_resources_of_ptxas_and_nvjitlink_logs():
    assert C.parse_resources(PTXAS_LOG) == dict(
        registers=20, stack_bytes=16, spill_store_bytes=8, spill_load_bytes=4,  # helper's too
        static_smem_bytes=4096, cmem0_bytes=1088)
    assert C.parse_resources(LINK_LOG) == dict(                 # the linker's line wins
        registers=62, stack_bytes=0, spill_store_bytes=0, spill_load_bytes=0,
        static_smem_bytes=0, cmem0_bytes=568)
    assert C.parse_resources(PTXAS_LOG, kernel="other") == {}


# What ptxas says when a kernel linked with -rdc makes a call (measured, NVRTC/nvJitLink 13.0).
LOSS_LOG = """ptxas info    : (C7504) Potential Performance Loss: 'setmaxnreg' ignored to maintain compatibility across compilation units.
ptxas info    : (C7509) Potential Performance Loss: wgmma.mma_async instructions are serialized due to the presence of Extern calls in the function 'flashmoe_kernel'
ptxas info    : Function properties for flashmoe_kernel
"""


def test_performance_losses_are_read_from_the_log():
    assert [line[:7] for line in performance_losses(LOSS_LOG)] == ["(C7504)", "(C7509)"]
    assert performance_losses(PTXAS_LOG) == [] and performance_losses(LINK_LOG) == []


# ---------------------------------------------------------------- NVSHMEM: NVRTC LTO + nvJitLink

def _nvshmem_installed() -> bool:
    from cuda.pathfinder import find_nvidia_header_directory
    return find_nvidia_header_directory("nvshmem") is not None


@pytest.mark.skipif(not _nvshmem_installed(),
                    reason="NVSHMEM headers missing: pip install .[nvshmem]")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_nvshmem_probe_compiles_and_links(root, arch):
    (root / C.KERNEL_SOURCE).write_text(NVSHMEM_PROBE)
    kernel = C.compile_spec(KernelSpec(arch=arch, transport="nvshmem"))
    elf = cubin.kernel_info(kernel.cubin, C.KERNEL_NAME)
    assert elf.entry and elf.registers == kernel.resources.registers > 0
    # nvJitLink counts the sm_90 reserve as smem; the report gives the kernel's own 256 B.
    assert elf.static_smem_bytes == kernel.resources.static_smem_bytes == 256
    assert elf.reserved_smem_bytes == (1024 if arch == "sm_90a" else 0)
    # The linked module carries the state the host fills in at nvshmemx_culibrary_init.
    assert b"nvshmemi_device_state_d" in kernel.cubin
    # Inlined transfers: no calls into the archive's ABI functions, so no stack (measured 480 B
    # of stack for the same kernel without the prelude).
    assert kernel.resources.stack_bytes == 0 and kernel.resources.spill_bytes == 0
    assert "used" in kernel.log and "registers" in kernel.log          # nvJitLink -verbose


# ---------------------------------------------------------------- flashmoe.build verdicts

def test_build_fails_on_spills_and_oversized_shared_memory(monkeypatch, capsys):
    from flashmoe import build

    spec = KernelSpec(arch="sm_80", stages=3)
    bad = C.Resources(registers=255, spill_store_bytes=8, spill_load_bytes=4, stack_bytes=16,
                      static_smem_bytes=160 * 1024, cmem0_bytes=1088)
    kernel = C.CompiledKernel(spec, b"", LOSS_LOG, bad, "0" * 64, 1.0, False)
    found = build.problems(kernel)
    assert [p.split()[0] for p in found] == ["spills", "ptxas:", "ptxas:", "needs"]
    assert found[1].startswith("ptxas: (C7504)") and found[2].startswith("ptxas: (C7509)")
    good = dataclasses.replace(bad, spill_store_bytes=0, spill_load_bytes=0, static_smem_bytes=0)
    assert build.problems(dataclasses.replace(kernel, resources=good, log=PTXAS_LOG)) == []

    monkeypatch.setattr(build, "compile_many",
                        lambda specs, **_: [(kernel, Counter(HMMA=128))] * len(specs))
    assert build.main(["--arch", "sm_80", "--spec", "stages=3"]) == 1
    out, err = capsys.readouterr()
    assert "sm_80 bfloat16 gated mma_sync 128x128 s3 t256" in out
    assert "spills 8 B stored / 4 B loaded" in err and "limit is 166912 B" in err
