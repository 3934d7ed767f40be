"""The kernel on the CPU: the device sources built with g++ under ``FLASHMOE_EMULATION``.

``flashmoe/device/emulation/simt.h`` supplies what ``ptx.cuh`` otherwise writes in inline PTX, and
``runtime.cpp`` runs cooperative launches as one fiber per CUDA thread on the calling thread (see
both files for what that checks and what it cannot). A machine without a GPU can so run the real
kernel source on small problems and compare it with ``flashmoe.reference``.

``EmulatedWorld`` runs several launches of one kernel under one scheduler and virtual clock: one
per rank, each on its own heap and started when its host says, as W processes would run them
(``flashmoe.host.emulated_group`` drives it from W host threads). A world's memory is sequentially
consistent, or weak (a weak seed): stores reach other blocks and ranks late and out of order but
where the PTX memory model orders them, and plain loads may return stale values
(``memory.cpp``). The NVSHMEM transport's device calls are emulated with the
ordering the NVSHMEM specification gives them (``device/emulation/nvshmem.h``).

Races. ``racecheck=True`` (or ``$FLASHMOE_EMULATOR_RACECHECK``) builds the kernel unit with g++'s
``-fsanitize=thread`` instrumentation feeding the emulator's own shared-memory race check
(``device/emulation/racecheck.cpp``): what compute-sanitizer's racecheck looks for on a GPU, as a
happens-before check over barriers, warp syncs and mbarriers. A launch that raced raises
EmulationError naming both accesses of each race by file and line.

Build. One shared library per kernel spec: a generated translation unit that includes
``flashmoe/device/flashmoe.cu`` and the ABI header (``abi.abi_header()``, so the emulated build
checks the ctypes mirror too) and exports the world functions (``flashmoe_emu_world_*``), linked with
the runtime objects (built once; they do not depend on the spec). Libraries are cached in
``$FLASHMOE_CACHE_DIR/emulator`` (default ``~/.cache/flashmoe/emulator``) under a key over the spec,
every file under ``flashmoe/device``, the ABI header, the compiler's version and the flags (the
runtime objects: their own sources only, so editing the kernel does not rebuild it); files
are written under a temporary name and renamed, so concurrent builders never see half a library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import abi
from . import compile as compile_mod
from .spec import KernelSpec

CXX_ENV = "FLASHMOE_EMULATOR_CXX"       # compiler override (default g++)
SEED_ENV = "FLASHMOE_EMULATOR_SEED"     # default schedule of EmulatedKernel launches (0: round robin)
WEAK_ENV = "FLASHMOE_EMULATOR_WEAK"     # default weak-memory seed of EmulatedKernel launches (0: off)
RACECHECK_ENV = "FLASHMOE_EMULATOR_RACECHECK"   # 1: EmulatedKernel checks shared-memory races by default
# The runtime: fibers, the scheduler and worlds; the thread operations; weak memory and the NVSHMEM
# proxy; the shared-memory race check.
RUNTIME_SOURCES = ("flashmoe/device/emulation/runtime.cpp", "flashmoe/device/emulation/threads.cpp",
                   "flashmoe/device/emulation/memory.cpp", "flashmoe/device/emulation/racecheck.cpp")
CXX_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-fvisibility=hidden",
             # The device code reinterprets bytes freely (vectors of elements, staged tiles), as
             # CUDA allows; g++ must not assume strict aliasing.
             "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-pthread",
             # Params is alignas(64): g++ notes that such by-value parameters changed ABI in 4.6.
             "-Wno-psabi")
# A race-checked build: g++ calls racecheck.cpp's hooks before every load and store of the kernel
# unit (its function entry and exit hooks off); -g1 gives the reports file and line; -z defs makes
# a hook racecheck.cpp lacks a build error, not a failed dlopen.
RACECHECK_FLAGS = ("-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-g1",
                   "-DFLASHMOE_EMU_RACECHECK=1")
RACECHECK_LINK = ("-Wl,-z,defs",)
_ERR_BYTES = 8192
_LOCK = threading.Lock()
_LIBRARIES: dict[str, ctypes.CDLL] = {}


class EmulationError(RuntimeError):
    """The emulated launch could not finish: a deadlock among the fibers, a collective used
    against its rules, a misaligned or out-of-bounds access the emulator checks. The message says
    which block and thread. (A bounded wait that expires is not this: the kernel records it in its
    error buffer and returns normally, as on a GPU.)"""


class EmulatorBuildError(RuntimeError):
    """g++ rejected the emulated build; ``log`` has the compiler output."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(f"{message}\n{log[-20000:]}" if log else message)
        self.log = log


def _compiler() -> str:
    return os.environ.get(CXX_ENV) or "g++"


def emulator_available() -> str | None:
    """Why the emulator cannot run here (None when it can)."""
    if not sys.platform.startswith("linux"):
        return f"the emulator needs Linux (fibers on mmap'ed stacks); this is {sys.platform}"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler: {_compiler()} is not on PATH (apt-get install g++, or set {CXX_ENV})"
    try:
        compile_mod._header_dir("cccl")
    except (compile_mod.CompileError, ImportError) as e:
        return f"the CCCL headers are missing: {e}"
    return None


@functools.lru_cache(maxsize=None)
def _compiler_identity() -> str:
    cxx = _compiler()
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    machine = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, check=True).stdout
    return f"{out.splitlines()[0] if out else cxx} {machine.strip()}"


def cache_dir() -> Path:
    return compile_mod.cache_dir() / "emulator"


def _include_flags(build_dir: Path, root: Path | None = None) -> list[str]:
    return [f"-I{root or compile_mod.INCLUDE_ROOT}", f"-I{compile_mod._header_dir('cccl')}", f"-I{build_dir}"]


def _runtime_fingerprint() -> str:
    """The runtime's own inputs: the emulation directory and params.cuh (its only other include)."""
    root = compile_mod.INCLUDE_ROOT
    files = sorted((root / RUNTIME_SOURCES[0]).parent.glob("*")) + [root / "flashmoe/device/common/params.cuh"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _key(kind: str, payload: dict) -> str:
    sources = _runtime_fingerprint() if kind == "runtime" else compile_mod.source_fingerprint()
    full = {"kind": kind, "sources": sources, "compiler": _compiler_identity(), "flags": CXX_FLAGS, **payload}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:32]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise EmulatorBuildError(f"{what} failed: {' '.join(cmd)}", proc.stdout + proc.stderr)


def _build(kind: str, suffix: str, payload: dict, make) -> Path:
    """The cached file for (kind, payload); ``make(build_dir, out)`` builds it on a miss."""
    key = _key(kind, payload)
    directory = cache_dir()
    target = directory / f"{kind}-{key}{suffix}"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=f".{kind}-") as tmp:
        out = Path(tmp) / f"out{suffix}"
        make(Path(tmp), out)
        os.replace(out, target)            # atomic: readers see no file or the whole file
    return target


def _runtime_objects() -> list[Path]:
    def make(source: str):
        def build(build_dir: Path, out: Path) -> None:
            _run([_compiler(), *CXX_FLAGS, "-DFLASHMOE_EMULATION", *_include_flags(build_dir), "-c",
                  str(compile_mod.INCLUDE_ROOT / source), "-o", str(out)], f"building the emulator runtime ({source})")
        return build
    return [_build("runtime", ".o", {"source": source}, make(source)) for source in RUNTIME_SOURCES]


def build_library(source: str, defines: dict[str, int], name: str = "lib", include_root: Path | None = None,
                  racecheck: bool = False) -> Path:
    """A shared library of the translation unit ``source`` (text; includes resolve against the
    flashmoe include root, the CCCL headers and a build directory holding the ABI header
    ``flashmoe_abi_check.h``), compiled with ``-DFLASHMOE_EMULATION`` and ``defines`` and linked with
    the emulator runtime. ``include_root``: another tree's device sources instead of this package's
    (tests build deliberately broken copies of the kernel). ``racecheck``: every launch checks its
    shared-memory accesses for races (``device/emulation/racecheck.cpp``) and fails with the races
    it found. Cached; returns its path."""
    runtime = _runtime_objects()
    header = abi.abi_header()
    payload = {"source": source, "defines": defines, "abi": header, "runtime": [o.name for o in runtime]}
    if include_root is not None:
        payload["tree"] = compile_mod.source_fingerprint(Path(include_root))
    if racecheck:
        payload["racecheck"] = (*RACECHECK_FLAGS, *RACECHECK_LINK)

    def make(build_dir: Path, out: Path) -> None:
        (build_dir / "flashmoe_abi_check.h").write_text(header)
        (build_dir / "tu.cpp").write_text(source)
        flags = [f"-D{k}={int(v)}" for k, v in sorted(defines.items())]
        unit = build_dir / "tu.o"   # compiled alone: -fsanitize=thread at the link would add its runtime
        _run([_compiler(), *CXX_FLAGS, *(RACECHECK_FLAGS if racecheck else ()), "-DFLASHMOE_EMULATION", *flags,
              *_include_flags(build_dir, include_root), "-c", str(build_dir / "tu.cpp"), "-o", str(unit)],
             f"building the emulated {name}")
        _run([_compiler(), *CXX_FLAGS, *(RACECHECK_LINK if racecheck else ()), "-shared", str(unit),
              *map(str, runtime), "-o", str(out)], f"linking the emulated {name}")
    return _build(name, ".so", payload, make)


def load_library(path: Path) -> ctypes.CDLL:
    with _LOCK:
        lib = _LIBRARIES.get(str(path))
        if lib is None:
            lib = ctypes.CDLL(str(path))
            lib.flashmoe_emu_stats.argtypes = [ctypes.POINTER(ctypes.c_ulonglong)]
            lib.flashmoe_emu_stats.restype = None
            _LIBRARIES[str(path)] = lib
        return lib


def last_stats(lib: ctypes.CDLL) -> dict[str, int]:
    """Of the library's last launch (world): fiber switches, virtual ns, fibers, wall-clock ns, and
    system-scope fences, releases and acquires."""
    out = (ctypes.c_ulonglong * 5)()
    lib.flashmoe_emu_stats(out)
    return dict(zip(("switches", "virtual_ns", "fibers", "wall_ns", "sys_scope"), (int(v) for v in out)))


def raise_on_error(rc: int, err: ctypes.Array, what: str) -> None:
    if rc:
        raise EmulationError(f"{what}: {err.value.decode(errors='replace')}")


def error_buffer() -> ctypes.Array:
    return ctypes.create_string_buffer(_ERR_BYTES)


KERNEL_TU = """// Generated by flashmoe/host/emulator.py
#include "flashmoe/device/flashmoe.cu"
#include "flashmoe_abi_check.h"
namespace {
using u64 = unsigned long long;
void flashmoe_emu_body(void* params) { flashmoe_kernel(*static_cast<const flashmoe::Params*>(params)); }
void flashmoe_emu_release(void* params) { delete static_cast<flashmoe::Params*>(params); }
}  // namespace
FLASHMOE_EMU_EXPORT void* flashmoe_emu_world_new(u64 seed, u64 weak_seed) {
  return flashmoe::emu::world_new(seed, weak_seed);
}
FLASHMOE_EMU_EXPORT int flashmoe_emu_world_set_pe(void* world, int pe, const void* heap, u64 bytes, char* err,
                                                  u64 err_len) {
  return flashmoe::emu::world_set_pe(world, pe, heap, bytes, err, err_len);
}
// A launch of the kernel on PE first_local_rank / num_local_ranks, whose heap is params.heap. Every
// fiber reads the launch's one Params copy made here: it is __grid_constant__ on the GPU too. The
// copy also gives it the struct's own alignment, which a ctypes buffer need not have.
FLASHMOE_EMU_EXPORT int flashmoe_emu_world_add(void* world, const void* params, int grid, int block, u64 smem_bytes,
                                               u64 delay_ns, char* err, u64 err_len) {
  auto* p = new flashmoe::Params;
  std::memcpy(static_cast<void*>(p), params, sizeof(*p));
  const int pe = p->first_local_rank / p->num_local_ranks;
  if (flashmoe::emu::world_set_pe(world, pe, p->heap, p->rank_heap_bytes * p->num_local_ranks, err, err_len)) {
    delete p;
    return -1;
  }
  return flashmoe::emu::world_add(world, flashmoe_emu_body, p, flashmoe_emu_release, grid, block, smem_bytes,
                                  delay_ns, pe, err, err_len);
}
FLASHMOE_EMU_EXPORT int flashmoe_emu_world_run(void* world, char* err, u64 err_len) {
  return flashmoe::emu::world_run(world, err, err_len);
}
FLASHMOE_EMU_EXPORT void flashmoe_emu_world_free(void* world) { flashmoe::emu::world_free(world); }
"""


PROBES_TU = """// Generated by flashmoe/host/emulator.py
#include "flashmoe/device/probes.cu"
#include "flashmoe_abi_check.h"
"""


class _EmulatedUnit:
    """A device translation unit of one spec built for the CPU; its launchers all take (args
    address, grid, block, shared bytes, schedule seed, error buffer, its length)."""

    def __init__(self, spec: KernelSpec, source: str, name: str, include_root: Path | None = None,
                 racecheck: bool = False):
        reason = emulator_available()
        if reason:
            raise RuntimeError(f"the flashmoe emulator cannot run here: {reason}")
        self.spec = spec
        self.racecheck = racecheck
        self.path = build_library(source, spec.defines(), name=name, include_root=include_root, racecheck=racecheck)
        self._lib = load_library(self.path)

    def _entry(self, symbol: str):
        fn = getattr(self._lib, symbol)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong, ctypes.c_ulonglong,
                       ctypes.c_char_p, ctypes.c_ulonglong]
        fn.restype = ctypes.c_int
        return fn

    def _run(self, fn, args: ctypes.Structure, grid: int, block: int, smem_bytes: int, seed: int, what: str) -> None:
        if grid < 1:
            raise ValueError(f"grid={grid}: must be >= 1")
        if smem_bytes < 0:
            raise ValueError(f"smem_bytes={smem_bytes}: must be >= 0")
        err = error_buffer()
        rc = fn(ctypes.addressof(args), grid, block, smem_bytes, seed, err, len(err))
        raise_on_error(rc, err, f"{what} of {self.spec.key()} (grid {grid} x {block})")

    @property
    def stats(self) -> dict[str, int]:
        return last_stats(self._lib)


class EmulatedKernel(_EmulatedUnit):
    """``flashmoe_kernel`` of one spec, run on the CPU. Pointers in ``Params`` are host addresses
    (e.g. ``tensor.data_ptr()`` of CPU tensors). ``include_root``: build another tree's kernel
    source (a copy of ``flashmoe/device`` under that directory). ``racecheck`` (None:
    $FLASHMOE_EMULATOR_RACECHECK): a launch that made a shared-memory race raises EmulationError
    naming the accesses (``device/emulation/racecheck.cpp``); it runs several times slower."""

    def __init__(self, spec: KernelSpec, include_root: Path | None = None, racecheck: bool | None = None):
        if racecheck is None:
            racecheck = os.environ.get(RACECHECK_ENV, "0") not in ("", "0")
        super().__init__(spec, KERNEL_TU, "kernel", include_root, racecheck)
        self.seed = int(os.environ.get(SEED_ENV) or 0)
        self.weak_seed = int(os.environ.get(WEAK_ENV) or 0)
        lib = self._lib
        lib.flashmoe_emu_world_new.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong]
        lib.flashmoe_emu_world_new.restype = ctypes.c_void_p
        lib.flashmoe_emu_world_set_pe.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_ulonglong,
                                                  ctypes.c_char_p, ctypes.c_ulonglong]
        lib.flashmoe_emu_world_set_pe.restype = ctypes.c_int
        lib.flashmoe_emu_world_add.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                               ctypes.c_ulonglong, ctypes.c_ulonglong, ctypes.c_char_p,
                                               ctypes.c_ulonglong]
        lib.flashmoe_emu_world_add.restype = ctypes.c_int
        lib.flashmoe_emu_world_run.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulonglong]
        lib.flashmoe_emu_world_run.restype = ctypes.c_int
        lib.flashmoe_emu_world_free.argtypes = [ctypes.c_void_p]
        lib.flashmoe_emu_world_free.restype = None

    def launch(self, params: abi.Params, grid: int, block: int, smem_bytes: int, seed: int | None = None,
               weak_seed: int | None = None) -> None:
        """Run one cooperative launch to completion. ``seed`` 0 schedules fibers round robin;
        any other value picks the next fiber pseudo-randomly (same seed, same schedule), to try
        other interleavings; None uses ``self.seed`` ($FLASHMOE_EMULATOR_SEED, default 0).
        ``weak_seed`` (None: ``self.weak_seed``, $FLASHMOE_EMULATOR_WEAK) other than 0 runs it
        with weak memory. Raises EmulationError when the launch cannot finish."""
        with EmulatedWorld(self, self.seed if seed is None else seed,
                           self.weak_seed if weak_seed is None else weak_seed) as world:
            world.add(params, grid, block, smem_bytes)
            while world.run() is not None:
                pass


class EmulatedWorld:
    """Launches of one EmulatedKernel under one scheduler and virtual clock (device/emulation/
    runtime.cpp): a launch starts ``delay_ns`` after the world's present time and runs alongside
    the others; ``run()`` returns each time one ends. Every PE a kernel addresses through NVSHMEM
    must have its heap registered (``set_pe``; a launch registers its own). ``seed`` picks the
    schedule (0: round robin); ``weak_seed`` other than 0 makes memory weak."""

    def __init__(self, kernel: EmulatedKernel, seed: int = 0, weak_seed: int = 0):
        self.kernel = kernel
        self._lib = kernel._lib
        self._world = self._lib.flashmoe_emu_world_new(seed, weak_seed)

    def set_pe(self, pe: int, heap: int, nbytes: int) -> None:
        err = error_buffer()
        raise_on_error(self._lib.flashmoe_emu_world_set_pe(self._world, pe, heap, nbytes, err, len(err)), err,
                       f"registering PE {pe}")

    def add(self, params: abi.Params, grid: int, block: int, smem_bytes: int, delay_ns: int = 0) -> int:
        """Queue a launch (a copy of ``params`` is taken now); returns its id."""
        if block != self.kernel.spec.threads:
            raise ValueError(f"block={block}: the kernel is compiled for {self.kernel.spec.threads} threads per block")
        if grid < 1 or smem_bytes < 0 or delay_ns < 0:
            raise ValueError(f"grid={grid}, smem_bytes={smem_bytes}, delay_ns={delay_ns}: grid must be >= 1, "
                             "the others >= 0")
        err = error_buffer()
        launch = self._lib.flashmoe_emu_world_add(self._world, ctypes.addressof(params), grid, block, smem_bytes,
                                                  delay_ns, err, len(err))
        if launch < 0:
            raise EmulationError(f"emulated launch of {self.kernel.spec.key()}: {err.value.decode(errors='replace')}")
        return launch

    def run(self) -> int | None:
        """Run until a launch ends (its id) or nothing is left to run (None). Raises
        EmulationError when the world cannot go on (deadlock, a checked misuse)."""
        err = error_buffer()
        launch = self._lib.flashmoe_emu_world_run(self._world, err, len(err))
        if launch == -2:
            raise EmulationError(f"emulated launch of {self.kernel.spec.key()}: {err.value.decode(errors='replace')}")
        return None if launch == -1 else launch

    def close(self) -> None:
        if self._world:
            self._lib.flashmoe_emu_world_free(self._world)
            self._world = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EmulatedProbes(_EmulatedUnit):
    """The component probes of one spec (``device/probes.cu``) on the CPU: each probe's exported
    ``<name>_emu`` launcher runs one emulated launch of it with an ``abi.ProbeArgs``."""

    def __init__(self, spec: KernelSpec):
        super().__init__(spec, PROBES_TU, "probes")

    def launch(self, name: str, args: abi.ProbeArgs, grid: int, smem_bytes: int, seed: int = 0) -> None:
        self._run(self._entry(f"{name}_emu"), args, grid, self.spec.threads, smem_bytes, seed, f"emulated {name}")


def build_library_parallel(builds, max_workers: int | None = None) -> list[Path]:
    """Run the callables ``builds`` (each calling build_library) on a thread pool: each g++ is
    a separate process, so they use every core. The runtime objects are built first, once."""
    _runtime_objects()
    with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda build: build(), builds))


def prebuild(specs, max_workers: int | None = None) -> None:
    """Build the kernel libraries of ``specs`` in parallel."""
    specs = list(dict.fromkeys(specs))
    build_library_parallel([lambda s=s: build_library(KERNEL_TU, s.defines(), name="kernel") for s in specs],
                           max_workers)
