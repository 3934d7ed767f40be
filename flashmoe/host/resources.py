"""What a compiled kernel uses (registers, spills, stack, shared and constant memory), read from
the ptxas ``-v`` log or nvJitLink's ``-verbose`` info log. ``compile.py`` fills ``Resources``
from it and from the cubin (``cubin.py``) for what the log leaves out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    registers: int            # per thread
    spill_store_bytes: int    # summed over the kernel and every non-inlined function it calls
    spill_load_bytes: int
    stack_bytes: int          # the kernel's stack frame
    static_smem_bytes: int    # static __shared__ (dynamic shared memory comes from the Plan)
    cmem0_bytes: int          # constant bank 0: the Params struct plus driver constants

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes



# ptxas:     "Compiling entry function 'k' for 'sm_90a'" / "Function properties for k"
#            "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
#            "Used 19 registers, used 1 barriers, 4096 bytes smem, 1088 bytes cmem[0]"
# nvJitLink: "Function properties for 'k':"  (after linking, so it wins over ptxas' line)
#            "used 62 registers, used 1 barriers, 0 stack, 0 bytes smem, 568 bytes cmem[0], ..."
_FUNCTION = re.compile(r"(?:Compiling entry function|Function properties for) '?([^'\s:]+)'?")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"[Uu]sed (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM0 = re.compile(r"(\d+) bytes cmem\[0\]")
_LINK_STACK = re.compile(r"\b(\d+) stack\b")


def parse_resources(log: str, kernel: str = "flashmoe_kernel") -> dict:
    """Resources fields the log states for ``kernel`` (absent ones are missing from the dict);
    spills are summed over every function the log reports."""
    functions: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _FUNCTION.search(line):
            current = functions.setdefault(m[1], {})
        elif current is None:
            continue
        elif m := _FRAME.search(line):
            current.update(stack_bytes=int(m[1]), spill_store_bytes=int(m[2]),
                           spill_load_bytes=int(m[3]))
        elif m := _USED.search(line):
            current["registers"] = int(m[1])
            smem = _SMEM.search(line)                 # ptxas leaves out "0 bytes smem"
            current["static_smem_bytes"] = int(smem[1]) if smem else 0
            if c := _CMEM0.search(line):
                current["cmem0_bytes"] = int(c[1])
            if s := _LINK_STACK.search(line):
                current["stack_bytes"] = int(s[1])
    found = dict(functions.get(kernel, {}))
    if found:
        for spill in ("spill_store_bytes", "spill_load_bytes"):
            found[spill] = sum(f.get(spill, 0) for f in functions.values())
    return found


def performance_losses(log: str) -> list[str]:
    """The compile log's "Potential Performance Loss" reports: ptxas serialising wgmma (a call in
    the kernel, accumulators touched mid-pipeline) or ignoring setmaxnreg. Each costs speed with no
    other sign, so a kernel that has one does not ship (flashmoe.build.problems)."""
    return [line.split("ptxas info    : ", 1)[-1].strip() for line in log.splitlines()
            if "Potential Performance Loss" in line]
