"""KernelSpec: everything the code generation depends on, and nothing else.

A spec is the compile-cache key (together with the device sources' hash, the NVRTC version and
the options; see ``compile.py``). Only what changes the generated code belongs here: the dtype,
gated or plain experts (one or two B operands per GEMM0 tile), the tile shape and pipeline depth,
the block size, the GEMM engine, the transport and tracing. Shapes (H, I, E, k, tokens), the
activation, routing options and capacity are run-time values in ``Params``, so a new batch size or
model width never recompiles.

The activation is a run-time switch in the GEMM0 epilogue: it runs once per output element of a
tile that took a full K loop, so it is not measurable, and it divides the number of specs by four.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ARCHS = ("sm_80", "sm_90a")
DTYPE_CODES = {"bfloat16": 0, "float16": 1, "float32": 2}
GEMM_ENGINES = ("mma_sync", "wgmma")
TRANSPORTS = ("peer", "nvshmem")

# Bytes of K one pipeline stage holds per row: 64 bf16/fp16 or 32 fp32 elements. One 128-byte
# row is one swizzle atom (8 chunks of 16 bytes), for ldmatrix and for the wgmma 128B swizzle.
STAGE_K_BYTES = 128


@dataclass(frozen=True)
class KernelSpec:
    arch: str = "sm_90a"          # cubin target: sm_90a (Hopper) or sm_80 (portable to sm_8x)
    dtype: str = "bfloat16"       # operand dtype of the expert GEMMs and of x / out
    gated: bool = True            # GEMM0 computes gate and up tiles from one A tile (2 B operands)
    block_m: int = 128            # rows (tokens) per GEMM tile
    block_n: int = 128            # B rows per GEMM tile (gate + up together when gated)
    stages: int = 4               # cp.async / TMA pipeline depth
    threads: int = 256            # threads per block
    gemm: str = "mma_sync"        # mma_sync (sm_80+) or wgmma (sm_90a)
    transport: str = "peer"       # peer pointers (NVLink, same GPU) or the NVSHMEM device API
    trace: bool = False           # record per-task timestamps into the trace buffer

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: allowed are {', '.join(ARCHS)}")
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype={self.dtype!r}: allowed are {', '.join(DTYPE_CODES)}")
        if self.gemm not in GEMM_ENGINES:
            raise ValueError(f"gemm={self.gemm!r}: allowed are {', '.join(GEMM_ENGINES)}")
        if self.gemm == "wgmma" and self.arch != "sm_90a":
            raise ValueError("gemm='wgmma' needs arch='sm_90a'")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport={self.transport!r}: allowed are {', '.join(TRANSPORTS)}")
        if self.block_m % 16 or not 16 <= self.block_m <= 256:
            raise ValueError(f"block_m={self.block_m}: must be a multiple of 16 in [16, 256]")
        if self.block_n % 32 or not 32 <= self.block_n <= 256:
            raise ValueError(f"block_n={self.block_n}: must be a multiple of 32 in [32, 256]")
        if not 2 <= self.stages <= 8:
            raise ValueError(f"stages={self.stages}: must be in [2, 8]")
        if self.threads % 128 or not 128 <= self.threads <= 512:
            raise ValueError(f"threads={self.threads}: must be a multiple of 128 in [128, 512]")

    @property
    def element_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def block_k(self) -> int:
        """K elements per pipeline stage."""
        return STAGE_K_BYTES // self.element_bytes

    @property
    def num_b_operands(self) -> int:
        return 2 if self.gated else 1

    def gemm_smem_bytes(self) -> int:
        """Shared memory of the GEMM pipeline: every stage holds a BM x BK A tile and a BN x BK B tile."""
        return self.stages * (self.block_m + self.block_n) * STAGE_K_BYTES

    def defines(self) -> dict[str, int]:
        """The -D macros the device code is compiled with (the only channel from spec to code)."""
        return {
            "FLASHMOE_DTYPE": DTYPE_CODES[self.dtype],
            "FLASHMOE_GATED": int(self.gated),
            "FLASHMOE_BLOCK_M": self.block_m,
            "FLASHMOE_BLOCK_N": self.block_n,
            "FLASHMOE_STAGES": self.stages,
            "FLASHMOE_THREADS": self.threads,
            "FLASHMOE_GEMM_WGMMA": int(self.gemm == "wgmma"),
            "FLASHMOE_TRANSPORT_NVSHMEM": int(self.transport == "nvshmem"),
            "FLASHMOE_TRACE": int(self.trace),
        }

    def key(self) -> str:
        """A stable, readable name: also the cache file stem."""
        return "-".join(f"{k}={v}" for k, v in asdict(self).items())


def shipped_specs() -> list[KernelSpec]:
    """The specs every CPU CI run compiles and checks (resources, spills, SASS).

    One per arch x dtype x gated for the default tile; the decode tile and the NVSHMEM transport
    are added by the modules that introduce them.
    """
    specs = []
    for arch in ARCHS:
        for dtype in DTYPE_CODES:
            for gated in (True, False):
                specs.append(KernelSpec(arch=arch, dtype=dtype, gated=gated,
                                        stages=3 if arch == "sm_80" else 4))
    return specs
