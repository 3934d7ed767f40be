"""KernelSpec -> cubin with NVRTC (and nvJitLink for NVSHMEM), a resource report and a disk cache.

Translation unit. The kernel is compiled from a generated two-line source::

    #include "flashmoe/device/flashmoe.cu"       // the kernel: extern "C" flashmoe_kernel(Params)
    #include "<root>/flashmoe_abi_check.h"       // abi.abi_header(): static_asserts on Params & co.

The ABI header is an in-memory NVRTC header, so ctypes/C++ drift fails the compile. The include
root is the directory holding the ``flashmoe`` package (a checkout or site-packages), so device
includes read ``"flashmoe/device/..."`` wherever the package lives; the program and the header are
named inside it so that the current directory never supplies a header (see ``_abi_header_name``).
The spec reaches the code only through ``-D`` macros (``KernelSpec.defines()``).

Why these choices (measured with NVRTC / nvJitLink 13.0 on a machine without a GPU):

- ``cuda.bindings.nvrtc`` directly, not cuda.core: cuda.core's ``Program.compile("ptx")`` needs
  libcuda, and cuda.core 0.5 needs it even for cubin; the raw bindings work on a machine without a
  GPU (CI), with cuda-bindings 13.0.3 to 13.5.0.
- A cubin, never PTX: PTX is JIT-compiled by the driver, and PTX from a newer NVRTC (13.5 emits ISA
  9.5) is rejected by the 13.0 driver (``Unsupported .version 9.5``). A cubin loads as is, and
  ``sm_90a`` code (wgmma) has no portable PTX fallback anyway.
- ``-default-device``: the NVSHMEM 3.4.5 headers under NVRTC fail without it (an unannotated
  function is a host function, which JIT mode forbids).
- One ``--ptxas-options=`` per flag: ``--ptxas-options=-v,--warn-on-spills`` is a ptxas fatal error.
- NVSHMEM transport: NVRTC ``-rdc=true -dlto`` to LTO-IR, then nvJitLink ``-lto`` against the
  wheel's ``libnvshmem_device.a`` (the only linkable form it ships: its ``.bc`` files are raw LLVM
  bitcode that nvJitLink rejects). The prelude ``flashmoe/device/common/nvshmem_prelude.cuh`` is
  pre-included (it says why). nvJitLink must be at least as new as NVRTC (older rejects the LTO-IR
  with ERROR_OUTDATED_LIBRARY), which is checked before linking.

Resources come from the ptxas ``-v`` log (nvJitLink ``-verbose`` for the NVSHMEM path; read by
``resources.py``). ptxas omits ``cmem[0]`` for sm_90a, so that one is read from the cubin
(``cubin.py``); nvJitLink's smem includes the sm_90 per-block reserve, which is taken off so both
paths report the kernel's own.

Cache. key = sha256 over the spec key, every file under ``flashmoe/device/``, the ABI header, the
translation unit, every compile and link option (include paths included), the arch, the NVRTC
version, the header wheels' versions, and for NVSHMEM the nvJitLink version and the device
library's hash. Entries live in ``$FLASHMOE_CACHE_DIR`` (default ``~/.cache/flashmoe``) as
``<key>.cubin`` plus ``<key>.json``; both are written to a temporary file in the same directory
and renamed, so a reader never sees half a file. The JSON is written last and records the cubin's
sha256: an entry whose JSON is missing, unreadable or disagrees with the cubin is a miss and is
rebuilt. ``FLASHMOE_ASSERT_NO_COMPILE=1`` turns any miss into ``CacheMissError`` (benchmarks,
steady-state tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import abi
from . import cubin as cubin_reader
from .resources import Resources, parse_resources
from .spec import KernelSpec

KERNEL_NAME = "flashmoe_kernel"
KERNEL_SOURCE = "flashmoe/device/flashmoe.cu"
# What compile_spec can build from a spec: the kernel, or the component probes (bring-up kit),
# as (device source, the kernel whose resources the report gives).
UNITS = {"kernel": (KERNEL_SOURCE, KERNEL_NAME),
         "probes": ("flashmoe/device/probes.cu", "flashmoe_probe_tile")}
DEVICE_DIR = "flashmoe/device"
ABI_HEADER = "flashmoe_abi_check.h"
PROGRAM_NAME = "flashmoe_kernel.cu"     # the generated translation unit (never written to disk)
NVSHMEM_PRELUDE = "flashmoe/device/common/nvshmem_prelude.cuh"
# The directory that holds the flashmoe package: the include root of every device source.
INCLUDE_ROOT = Path(__file__).resolve().parents[2]
# C++20: the device code is written against it (CCCL and the NVSHMEM headers compile as C++20).
CXX_STANDARD = "c++20"
CACHE_FORMAT = 1
CACHE_DIR_ENV = "FLASHMOE_CACHE_DIR"
ASSERT_NO_COMPILE_ENV = "FLASHMOE_ASSERT_NO_COMPILE"
HEADER_PACKAGES = ("nvidia-cuda-runtime", "nvidia-cuda-cccl")
NVSHMEM_PACKAGE = "nvidia-nvshmem-cu13"
_MESSAGE_LOG_CHARS = 20_000          # of the log shown in str(CompileError); .log has all of it


class CompileError(RuntimeError):
    """NVRTC or nvJitLink rejected the kernel, or the toolchain is incomplete.
    ``log`` holds the full compiler/linker log, ``spec_key`` the spec being built."""

    def __init__(self, message: str, log: str = "", spec_key: str = ""):
        self.message, self.log, self.spec_key = message, log, spec_key
        text = f"{message} [spec {spec_key}]" if spec_key else message
        if log.strip():
            text += "\n" + log[:_MESSAGE_LOG_CHARS]
            text += "\n[... see .log]" if len(log) > _MESSAGE_LOG_CHARS else ""
        super().__init__(text)

    def __reduce__(self):        # keep the log across processes (flashmoe.build --jobs)
        return type(self), (self.message, self.log, self.spec_key)


class CacheMissError(RuntimeError):
    """FLASHMOE_ASSERT_NO_COMPILE is set and the kernel is not in the cache."""


@dataclass(frozen=True)
class CompiledKernel:
    spec: KernelSpec
    cubin: bytes = field(repr=False)
    log: str = field(repr=False)     # ptxas -v (and nvJitLink -verbose) log
    resources: Resources
    key: str                         # cache key (sha256 hex)
    compile_seconds: float           # of the original compile, also for cache hits
    from_cache: bool                 # served from the in-process memo or the disk cache


@dataclass(frozen=True)
class _BuildInputs:
    source: str
    headers: dict
    options: tuple
    link_options: tuple              # empty unless the NVSHMEM path links
    toolchain: dict
    key: str


# ---------------------------------------------------------------- toolchain discovery

@functools.lru_cache(maxsize=None)
def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc
    err, major, minor = nvrtc.nvrtcVersion()
    _check_nvrtc(err, "nvrtcVersion")
    return major, minor


@functools.lru_cache(maxsize=None)
def nvjitlink_version() -> tuple[int, int]:
    from cuda.bindings import nvjitlink
    return tuple(nvjitlink.version())


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "flashmoe")


@functools.lru_cache(maxsize=None)
def _header_dir(name: str) -> str:
    from cuda.pathfinder import find_nvidia_header_directory
    path = find_nvidia_header_directory(name)
    if not path:
        wheel = {"cudart": "nvidia-cuda-runtime==13.0.*", "cccl": "nvidia-cuda-cccl==13.0.*",
                 "nvshmem": "nvidia-nvshmem-cu13"}[name]
        raise CompileError(f"the {name} headers were not found: pip install '{wheel}'")
    return path


def include_dirs(spec: KernelSpec) -> list[str]:
    dirs = [str(INCLUDE_ROOT), _header_dir("cudart"), _header_dir("cccl")]
    if spec.transport == "nvshmem":
        dirs.append(_header_dir("nvshmem"))
    return dirs


def _nvshmem_device_library() -> Path:
    """libnvshmem_device.a beside the NVSHMEM headers in use: device code and library must come
    from the same NVSHMEM version (the host library checks the module's version at init)."""
    path = Path(_header_dir("nvshmem")).parent / "lib" / "libnvshmem_device.a"
    if not path.is_file():
        raise CompileError(f"{path} does not exist: the NVSHMEM install has no device library")
    return path


@functools.lru_cache(maxsize=None)
def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"           # e.g. headers from a system CUDA toolkit: the -I paths differ


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- inputs and cache key

def source_fingerprint(include_root: Path | None = None) -> str:
    """sha256 over every file under flashmoe/device/ of ``include_root`` (default: this package's;
    relative path and bytes, sorted by path)."""
    root = (include_root or INCLUDE_ROOT) / DEVICE_DIR
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _abi_header_name() -> str:
    # NOTE: absolute on purpose. NVRTC resolves a quoted include inside an in-memory header (and
    # inside the program) against the *current directory* before any -I path, so under a relative
    # name the header's #include "flashmoe/device/common/params.cuh" picks up whatever checkout
    # the process runs in (measured: a params.cuh in the cwd wins over the -I root). Named inside
    # the include root, its includes resolve there. -no-source-include would fix it too, but it
    # also breaks sibling-relative includes ("../x.h") in third-party headers.
    return (INCLUDE_ROOT / ABI_HEADER).as_posix()


def translation_unit(unit: str = "kernel") -> str:
    return (f"// Generated by flashmoe/host/compile.py\n"
            f"#include \"{UNITS[unit][0]}\"\n#include \"{_abi_header_name()}\"\n")


def compile_options(spec: KernelSpec, extra_defines: dict | None = None) -> list[str]:
    options = [f"--gpu-architecture={spec.arch}", f"--std={CXX_STANDARD}", "-default-device",
               "-lineinfo"]
    if spec.transport == "nvshmem":
        # LTO-IR for nvJitLink; ptxas runs at link time, so -v goes to the linker (-verbose).
        options += ["-rdc=true", "-dlto", f"--pre-include={INCLUDE_ROOT / NVSHMEM_PRELUDE}",
                    # NVSHMEM's proxy_device.cuh does `volatile += 1`, deprecated in C++20: dozens
                    # of warnings per compile that would bury the log.
                    "--diag-suppress=3012",
                    # Its device asserts call __assertfail: a call anywhere in a kernel linked
                    # with -rdc serialises its wgmmas (ptx.cuh div_full). NVRTC's assert reads
                    # NDEBUG from the command line only. On the transfer paths they mark device
                    # transports this build leaves out (IBGDA: runtime.check_remote_transport).
                    "-DNDEBUG"]
    else:
        options += ["--ptxas-options=-v"]
    options += [f"-I{d}" for d in include_dirs(spec)]
    defines = spec.defines()
    for name, value in (extra_defines or {}).items():
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"extra_defines: {name!r} is not a macro name")
        if name in defines:
            raise ValueError(f"extra_defines: {name} is set by the spec; "
                             "change the KernelSpec instead")
    defines = {**defines, **(extra_defines or {})}
    options += [f"-D{name}={int(v) if isinstance(v, bool) else v}" for name, v in defines.items()]
    return options


def _inputs(spec: KernelSpec, extra_defines: dict | None, unit: str = "kernel") -> _BuildInputs:
    header = abi.abi_header()
    options = tuple(compile_options(spec, extra_defines))
    toolchain = {"nvrtc": list(nvrtc_version()),
                 "packages": {p: _package_version(p) for p in HEADER_PACKAGES}}
    link_options = ()
    if spec.transport == "nvshmem":
        link_options = (f"-arch={spec.arch}", "-lto", "-verbose", "-lineinfo")
        library = _nvshmem_device_library()
        stat = library.stat()
        toolchain["nvjitlink"] = list(nvjitlink_version())
        toolchain["nvshmem_device_library"] = _file_sha256(str(library), stat.st_size,
                                                           stat.st_mtime_ns)
        toolchain["packages"][NVSHMEM_PACKAGE] = _package_version(NVSHMEM_PACKAGE)
    source = translation_unit(unit)
    payload = {"format": CACHE_FORMAT, "spec": spec.key(), "arch": spec.arch,
               "device_sources": source_fingerprint(),
               "abi_header": hashlib.sha256(header.encode()).hexdigest(),
               "translation_unit": source, "options": options, "link_options": link_options,
               "toolchain": toolchain}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return _BuildInputs(source, {_abi_header_name(): header}, options, link_options, toolchain, key)


# ---------------------------------------------------------------- NVRTC and nvJitLink

def _check_nvrtc(err, what: str, log: str = "", spec_key: str = "") -> None:
    from cuda.bindings import nvrtc
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, name = nvrtc.nvrtcGetErrorString(err)
        raise CompileError(f"{what} failed: {name.decode()}", log=log, spec_key=spec_key)


def nvrtc_compile(source: str, *, options, headers: dict | None = None, name: str = "flashmoe.cu",
                  ltoir: bool = False, spec_key: str = "") -> tuple[bytes, str]:
    """Compile one translation unit; returns (cubin or LTO-IR, log). ``headers`` maps include
    names to in-memory header text."""
    from cuda.bindings import nvrtc
    headers = headers or {}
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), len(headers),
                                         [h.encode() for h in headers.values()],
                                         [n.encode() for n in headers])
    _check_nvrtc(err, "nvrtcCreateProgram", spec_key=spec_key)
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        log_err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check_nvrtc(log_err, "nvrtcGetProgramLogSize", spec_key=spec_key)
        log = bytearray(size)
        (log_err,) = nvrtc.nvrtcGetProgramLog(prog, log)
        _check_nvrtc(log_err, "nvrtcGetProgramLog", spec_key=spec_key)
        log = log.rstrip(b"\0").decode(errors="replace")
        _check_nvrtc(err, "NVRTC compile", log=log, spec_key=spec_key)
        get_size, get = ((nvrtc.nvrtcGetLTOIRSize, nvrtc.nvrtcGetLTOIR) if ltoir
                         else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN))
        err, size = get_size(prog)
        _check_nvrtc(err, get_size.__name__, spec_key=spec_key)
        image = bytearray(size)
        _check_nvrtc(get(prog, image)[0], get.__name__, spec_key=spec_key)
        return bytes(image), log
    finally:
        (err,) = nvrtc.nvrtcDestroyProgram(prog)
        _check_nvrtc(err, "nvrtcDestroyProgram", spec_key=spec_key)


def nvjitlink_link(ltoir: bytes, *, options, library: Path,
                   spec_key: str = "") -> tuple[bytes, str]:
    """Link LTO-IR against a device library into a cubin; returns (cubin, info log)."""
    from cuda.bindings import nvjitlink

    def read_log(handle, size_of, get) -> str:
        buf = bytearray(size_of(handle))
        get(handle, buf)
        return buf.rstrip(b"\0").decode(errors="replace")

    if nvjitlink_version() < nvrtc_version():
        raise CompileError(f"nvJitLink {nvjitlink_version()} is older than NVRTC "
                           f"{nvrtc_version()} and cannot read its LTO-IR: install the same "
                           "CUDA minor version of both", spec_key=spec_key)
    try:
        handle = nvjitlink.create(len(options), list(options))
    except nvjitlink.nvJitLinkError as e:
        raise CompileError(f"nvJitLinkCreate{tuple(options)} failed: {e}", spec_key=spec_key) from e
    try:
        nvjitlink.add_data(handle, nvjitlink.InputType.LTOIR, ltoir, len(ltoir), "flashmoe")
        nvjitlink.add_file(handle, nvjitlink.InputType.LIBRARY, str(library))
        nvjitlink.complete(handle)
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin), read_log(handle, nvjitlink.get_info_log_size, nvjitlink.get_info_log)
    except nvjitlink.nvJitLinkError as e:
        log = (read_log(handle, nvjitlink.get_error_log_size, nvjitlink.get_error_log) + "\n"
               + read_log(handle, nvjitlink.get_info_log_size, nvjitlink.get_info_log))
        raise CompileError(f"nvJitLink failed: {e}", log=log, spec_key=spec_key) from e
    finally:
        nvjitlink.destroy(handle)


# ---------------------------------------------------------------- resource report

def _resources(image: bytes, log: str, spec_key: str, linked: bool, unit: str = "kernel") -> Resources:
    source, kernel = UNITS[unit]
    try:
        elf = cubin_reader.kernel_info(image, kernel)
    except KeyError as e:
        raise CompileError(f"the cubin has no kernel {kernel}: declare it "
                           f"extern \"C\" __global__ in {source}",
                           log=log, spec_key=spec_key) from e
    stated = parse_resources(log, kernel)
    if "registers" not in stated:
        raise CompileError(f"the compile log has no resource report for {kernel}",
                           log=log, spec_key=spec_key)
    if linked:      # nvJitLink reports the linked shared section: the sm_90 reserve included
        stated["static_smem_bytes"] -= elf.reserved_smem_bytes
    stated.setdefault("cmem0_bytes", elf.cmem0_bytes)       # ptxas omits cmem[0] for sm_90a
    stated.setdefault("stack_bytes", elf.frame_bytes)
    for name in ("spill_store_bytes", "spill_load_bytes"):
        stated.setdefault(name, 0)
    return Resources(**stated)


def _compile(spec: KernelSpec, inputs: _BuildInputs, unit: str = "kernel") -> CompiledKernel:
    if not (INCLUDE_ROOT / UNITS[unit][0]).is_file():
        raise CompileError(f"{INCLUDE_ROOT / UNITS[unit][0]} does not exist", spec_key=spec.key())
    start = time.perf_counter()
    image, log = nvrtc_compile(inputs.source, options=inputs.options, headers=inputs.headers,
                               name=(INCLUDE_ROOT / PROGRAM_NAME).as_posix(),  # _abi_header_name
                               ltoir=bool(inputs.link_options),
                               spec_key=spec.key())
    if inputs.link_options:
        image, link_log = nvjitlink_link(image, options=inputs.link_options,
                                         library=_nvshmem_device_library(), spec_key=spec.key())
        log = f"{log}\n{link_log}".strip()
    seconds = time.perf_counter() - start
    return CompiledKernel(spec=spec, cubin=image, log=log,
                          resources=_resources(image, log, spec.key(), bool(inputs.link_options), unit),
                          key=inputs.key,
                          compile_seconds=seconds, from_cache=False)


# ---------------------------------------------------------------- cache

_MEMO: dict[str, CompiledKernel] = {}


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename over ``path`` (atomic on
    POSIX and Windows), so no reader ever sees a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _store(kernel: CompiledKernel, inputs: _BuildInputs) -> None:
    directory = cache_dir()
    meta = {"format": CACHE_FORMAT, "key": kernel.key, "spec": dataclasses.asdict(kernel.spec),
            "spec_key": kernel.spec.key(), "options": list(inputs.options),
            "link_options": list(inputs.link_options), "toolchain": inputs.toolchain,
            "resources": dataclasses.asdict(kernel.resources),
            "compile_seconds": kernel.compile_seconds,
            "cubin_sha256": hashlib.sha256(kernel.cubin).hexdigest(), "log": kernel.log}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / f"{kernel.key}.cubin", kernel.cubin)
        # Last: the sidecar commits the entry (it carries the cubin's hash).
        _atomic_write(directory / f"{kernel.key}.json", json.dumps(meta, indent=1).encode())
    except OSError as e:
        warnings.warn(f"flashmoe: could not write the kernel cache in {directory}: {e}",
                      stacklevel=3)


def _load(spec: KernelSpec, key: str) -> CompiledKernel | None:
    directory = cache_dir()
    try:
        meta = json.loads((directory / f"{key}.json").read_text())
        image = (directory / f"{key}.cubin").read_bytes()
        if (meta["format"], meta["key"]) != (CACHE_FORMAT, key) \
                or meta["cubin_sha256"] != hashlib.sha256(image).hexdigest():
            return None
        return CompiledKernel(spec=spec, cubin=image, log=meta["log"],
                              resources=Resources(**meta["resources"]), key=key,
                              compile_seconds=float(meta["compile_seconds"]), from_cache=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None          # missing, partial or from another format: rebuild and overwrite


def compile_spec(spec: KernelSpec, *, use_cache: bool = True,
                 extra_defines: dict | None = None, unit: str = "kernel") -> CompiledKernel:
    """The cubin of ``spec``: from the in-process memo, the disk cache, or a fresh compile.
    ``use_cache=False`` neither reads nor writes either cache. ``unit``: the kernel, or the
    component probes built with the same spec (``UNITS``)."""
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}: allowed are {', '.join(UNITS)}")
    inputs = _inputs(spec, extra_defines, unit)
    if use_cache:
        if (hit := _MEMO.get(inputs.key)) is not None:
            return dataclasses.replace(hit, from_cache=True)
        if (hit := _load(spec, inputs.key)) is not None:
            _MEMO[inputs.key] = hit
            return hit
    if os.environ.get(ASSERT_NO_COMPILE_ENV, "") not in ("", "0"):
        raise CacheMissError(f"{ASSERT_NO_COMPILE_ENV} is set and {spec.key()} is not in the cache "
                             f"{cache_dir()} (key {inputs.key[:16]}): build it first, e.g. "
                             f"python -m flashmoe.build --arch {spec.arch} --all")
    kernel = _compile(spec, inputs, unit)
    if use_cache:
        _store(kernel, inputs)
        _MEMO[inputs.key] = kernel
    return kernel
