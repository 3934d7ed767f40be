"""Read a compiled cubin without a GPU: per-kernel resources from the ELF, and SASS text.

``kernels()`` is a small pure-Python ELF64 reader. It gives what the ptxas ``-v`` log reports, so
tests can cross-check ``compile.Resources`` without any binary tool:

- registers and frame size: ``EIATTR_REGCOUNT`` / ``EIATTR_FRAME_SIZE`` records of the ``.nv.info``
  sections, each a (symbol index, value) pair;
- static shared memory: the size of the ``.nv.shared.<kernel>`` section;
- constant bank 0 (kernel parameters plus driver constants): the size of ``.nv.constant0.<kernel>``.

NOTE: on sm_90 each kernel's shared section also holds the 1 KiB reserved per block, which ptxas
does not count. The cubin marks it with a ``.nv.shared.reserved.0`` section (NVRTC) or a
``.nv.reservedSmem.offset0`` symbol (after nvJitLink). Measured with NVRTC 13.0 for sm_90a: ptxas
0 / 16 / 1008 / 16400 B smem <-> section 1024 / 1040 / 2032 / 17424 B; a kernel without shared
memory has no section; sm_80 cubins have no reserve. ``cuobjdump --dump-resource-usage`` and the
nvJitLink ``-verbose`` log print the section size (reserve included).

``sass()`` runs ``cuobjdump -sass`` (or ``nvdisasm -c``) from the nvidia-cuda-cuobjdump /
nvidia-cuda-nvdisasm wheels; both read cubins made by NVRTC 13.0. ``opcode_counts()`` turns the
text into a Counter of base opcodes (HMMA, HGMMA, LDSM, LDGSTS, STL, LDL, MEMBAR, NANOSLEEP, ...).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass

SHT_SYMTAB = 2
STT_FUNC = 2
STO_CUDA_ENTRY = 0x10          # st_other bit of a __global__ function
EIFMT_SVAL = 0x04              # u16 size + payload; the other formats hold a u16 value inline
EIATTR_FRAME_SIZE = 0x11
EIATTR_REGCOUNT = 0x2F
RESERVED_SMEM_BYTES = 1024     # see the module docstring


@dataclass(frozen=True)
class KernelInfo:
    name: str
    entry: bool                    # a __global__ function (not a non-inlined device function)
    registers: int                 # per thread
    frame_bytes: int               # stack frame (local memory for spills and local arrays)
    static_smem_bytes: int         # static __shared__ bytes, as ptxas counts them
    reserved_smem_bytes: int       # the sm_90 per-block reserve inside the shared section
    shared_section_bytes: int      # .nv.shared.<name>: static plus reserved
    cmem0_bytes: int               # constant bank 0: parameters and driver constants


def _elf(data: bytes):
    """(sections as (name, type, offset, size)), (symbols as (name, info, other, shndx)))."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 cubin")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def cstr(offset: int) -> str:
        return data[offset:data.index(b"\0", offset)].decode()

    names_at = raw[shstrndx][4]
    sections = [(cstr(names_at + s[0]), s[1], s[4], s[5]) for s in raw]
    symbols = []
    for i, (_, sh_type, offset, size) in enumerate(sections):
        if sh_type != SHT_SYMTAB:
            continue
        strings_at = raw[raw[i][6]][4]            # sh_link: the symbol string table
        for k in range(size // 24):
            name, info, other, shndx, _, _ = struct.unpack_from("<IBBHQQ", data, offset + 24 * k)
            symbols.append((cstr(strings_at + name), info, other, shndx))
    return sections, symbols


def _nv_info(data: bytes, sections) -> dict[tuple[int, int], int]:
    """{(attribute, symbol index): value} for the per-function SVAL records of every .nv.info*."""
    records = {}
    for name, _, offset, size in sections:
        if not name.startswith(".nv.info"):
            continue
        pos, end = offset, offset + size
        while pos + 4 <= end:
            fmt, attr, length = data[pos], data[pos + 1], struct.unpack_from("<H", data, pos + 2)[0]
            if fmt != EIFMT_SVAL:
                pos += 4                                 # NVAL / BVAL / HVAL: value inline
                continue
            if attr in (EIATTR_REGCOUNT, EIATTR_FRAME_SIZE) and length == 8:
                sym, value = struct.unpack_from("<II", data, pos + 4)
                records[(attr, sym)] = value
            pos += 4 + length
    return records


def kernels(cubin: bytes) -> dict[str, KernelInfo]:
    """Every function of the cubin by name (entries and non-inlined device functions)."""
    sections, symbols = _elf(cubin)
    sizes = {name: size for name, _, _, size in sections}
    has_reserve = (any(n.startswith(".nv.shared.reserved.") for n in sizes)
                   or any(s[0].startswith(".nv.reservedSmem.") for s in symbols))
    info = _nv_info(cubin, sections)
    out = {}
    for index, (name, st_info, st_other, _) in enumerate(symbols):
        if st_info & 0xF != STT_FUNC or f".text.{name}" not in sizes:
            continue
        section = sizes.get(f".nv.shared.{name}", 0)
        reserved = RESERVED_SMEM_BYTES if has_reserve and section >= RESERVED_SMEM_BYTES else 0
        out[name] = KernelInfo(
            name=name, entry=bool(st_other & STO_CUDA_ENTRY),
            registers=info.get((EIATTR_REGCOUNT, index), 0),
            frame_bytes=info.get((EIATTR_FRAME_SIZE, index), 0),
            static_smem_bytes=section - reserved, reserved_smem_bytes=reserved,
            shared_section_bytes=section,
            cmem0_bytes=sizes.get(f".nv.constant0.{name}", 0))
    return out


def kernel_info(cubin: bytes, name: str) -> KernelInfo:
    found = kernels(cubin)
    if name not in found:
        raise KeyError(f"no function {name!r} in the cubin; it has {sorted(found)}")
    return found[name]


def _tool() -> list[str]:
    """The disassembler command, preferring the pip wheels (found by cuda.pathfinder)."""
    try:
        from cuda.pathfinder import find_nvidia_binary_utility
    except ImportError:                                   # older cuda-pathfinder
        find_nvidia_binary_utility = lambda name: None  # noqa: E731
    for name, args in (("cuobjdump", ["-sass"]), ("nvdisasm", ["-c"])):
        path = find_nvidia_binary_utility(name) or shutil.which(name)
        if path:
            return [path, *args]
    raise FileNotFoundError("neither cuobjdump nor nvdisasm was found: "
                            "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def sass(cubin: bytes) -> str:
    """SASS text of every function in the cubin."""
    command = _tool()
    with tempfile.TemporaryDirectory(prefix="flashmoe-sass-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([*command, path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


# "        /*01f0*/                   @!P0 HMMA.16816.F32.BF16 R4, R4, R2, RZ ;"
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*)",
                          re.M)


def opcode_counts(sass_text: str) -> Counter:
    """Instructions per base opcode: 'HMMA.16816.F32.BF16' counts as HMMA."""
    return Counter(_INSTRUCTION.findall(sass_text))
