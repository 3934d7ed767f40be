"""TMA tensor maps of the expert weights: how the wgmma engine's producer reads B tiles.

The device loads every B operand of a tile as one box of a 4-D view of a weight tensor
(``cp.async.bulk.tensor.4d``, device/gemm/wgmma.cuh). The views put K innermost and give the
gate/up split its own dimension, so a box that runs past the intermediate width reads zeros (TMA
fills out-of-bounds elements with zeros) exactly where the mma_sync engine's null row pointers do:

    map             tensor                 dims (innermost first)   box
    gate_up         [X, NB * I, H]         (H, I, NB, X)            (BK, BN / NB, 1, 1)
    down            [X, H, I]              (I, H, 1, X)             (BK, BN, 1, 1)
    shared_gate_up  [NB * I_s, H]          (H, I_s, NB, 1)          (BK, BN / NB, 1, 1)
    shared_down     [H, I_s]               (I_s, H, 1, 1)           (BK, BN, 1, 1)

with X the experts the tensor holds, NB = 2 for gated experts (gate rows, then up rows), BK = 128
bytes of K (64 bf16/fp16, 32 fp32): one 128-byte swizzle row, so the box lands in shared memory in
the engine's layout (CU_TENSOR_MAP_SWIZZLE_128B: 16-byte chunk c of row r at c ^ (r % 8), from a
1024-byte aligned tile). fp32 weights are copied as FLOAT32; the consumers round them to TF32.

``weight_map_args`` builds and checks the arguments of ``cuTensorMapEncodeTiled`` (pure Python, so
CPU tests check it); ``encode`` calls the driver (GPU machines only) and returns the 128 bytes that
go into ``Params.weight_maps`` (``abi.fill_params(weight_maps=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DTYPES, MoEConfig
from .abi import TENSOR_MAP_BYTES, WEIGHT_MAPS
from .spec import STAGE_K_BYTES, KernelSpec

RANK = 4
SWIZZLE_BYTES = 128          # CU_TENSOR_MAP_SWIZZLE_128B: the box's inner dimension, in bytes
MAX_BOX = 256                # cuTensorMapEncodeTiled: every boxDim <= 256
_DTYPE_NAMES = {"bfloat16": "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16", "float16": "CU_TENSOR_MAP_DATA_TYPE_FLOAT16",
                "float32": "CU_TENSOR_MAP_DATA_TYPE_FLOAT32"}


@dataclass(frozen=True)
class TensorMapArgs:
    """The arguments of one cuTensorMapEncodeTiled call (element counts and byte strides)."""

    name: str
    dtype: str                                # config dtype name
    address: int                              # device address of element (0, 0, 0, 0)
    dims: tuple[int, int, int, int]           # globalDim, innermost first
    strides: tuple[int, int, int]             # globalStrides in bytes, of dims 1..3
    box: tuple[int, int, int, int]            # boxDim
    element_bytes: int

    @property
    def box_bytes(self) -> int:
        """Bytes one box puts in shared memory (and counts on the mbarrier, out-of-bounds included)."""
        n = self.element_bytes
        for b in self.box:
            n *= b
        return n

    def check(self) -> None:
        """The requirements cuTensorMapEncodeTiled states (and TMA's 128B swizzle), as ValueErrors."""
        where = f"tensor map {self.name}"
        if self.address % 16:
            raise ValueError(f"{where}: the tensor's address {self.address:#x} is not 16-byte aligned")
        if any(d < 1 or d > 2**32 for d in self.dims):
            raise ValueError(f"{where}: dims {self.dims} must be in [1, 2^32]")
        if any(s % 16 or s >= 2**40 for s in self.strides):
            raise ValueError(f"{where}: strides {self.strides} must be multiples of 16 bytes below 2^40")
        if any(b < 1 or b > MAX_BOX for b in self.box):
            raise ValueError(f"{where}: box {self.box} must be in [1, {MAX_BOX}]")
        if self.box[0] * self.element_bytes != SWIZZLE_BYTES:
            raise ValueError(f"{where}: the box's inner extent must be the {SWIZZLE_BYTES}-byte swizzle row")


def weight_map_args(spec: KernelSpec, config: MoEConfig, *, gate_up: int, down: int, num_experts: int,
                    shared_gate_up: int = 0, shared_down: int = 0) -> dict[str, TensorMapArgs]:
    """Arguments of the tensor maps of ``spec``'s wgmma engine, by ``abi.WEIGHT_MAPS`` name.
    Addresses are device pointers; ``num_experts``: the experts the gate_up/down tensors hold (X).
    The shared maps exist when the config has shared experts and their pointers are given."""
    if spec.gemm != "wgmma":
        raise ValueError(f"gemm={spec.gemm!r}: only the wgmma engine reads the weights through tensor maps")
    if spec.dtype != config.dtype or spec.gated != config.gated:
        raise ValueError("the spec's dtype/gated differ from the config's")
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts}: must be >= 1")
    b = spec.element_bytes
    nb = spec.num_b_operands
    bk = STAGE_K_BYTES // b
    H, I = config.hidden_size, config.intermediate_size
    box_g1 = (bk, spec.block_n, 1, 1)

    def gate_up_map(name, address, inter, experts):
        return expert_rows_map(name, config.dtype, address, H, inter, nb, experts, spec.block_n // nb)

    def down_map(name, address, inter, experts):
        # [experts, H, inter]: row r of expert x at (x * H + r) * inter.
        return TensorMapArgs(name, config.dtype, address, (inter, H, 1, experts),
                             (inter * b, H * inter * b, H * inter * b), box_g1, b)

    maps = {"gate_up": gate_up_map("gate_up", gate_up, I, num_experts),
            "down": down_map("down", down, I, num_experts)}
    Is = config.shared_intermediate_total
    if config.num_shared_experts and Is and shared_gate_up and shared_down:
        maps["shared_gate_up"] = gate_up_map("shared_gate_up", shared_gate_up, Is, 1)
        maps["shared_down"] = down_map("shared_down", shared_down, Is, 1)
    for args in maps.values():
        args.check()
    assert set(maps) <= set(WEIGHT_MAPS)
    return maps


def expert_rows_map(name: str, dtype: str, address: int, k: int, rows: int, nb: int, experts: int,
                    box_rows: int) -> TensorMapArgs:
    """The 4-D map (K, rows, nb, experts) of a tensor [experts, nb * rows, K] (gate rows then up
    rows per expert: row (op * rows + r) of expert x at ((x * nb + op) * rows + r) * K), boxes of
    one 128-byte K slice by ``box_rows`` rows of one operand of one expert."""
    b = DTYPES[dtype].itemsize
    return TensorMapArgs(name, dtype, address, (k, rows, nb, experts), (k * b, rows * k * b, nb * rows * k * b),
                         (STAGE_K_BYTES // b, box_rows, 1, 1), b)


def driver_call(args: TensorMapArgs) -> tuple:
    """(function, positional arguments) of the cuTensorMapEncodeTiled call for ``args``: the
    cuda.bindings types, built without touching the driver."""
    from cuda.bindings import driver as cu
    u64 = lambda xs: [cu.cuuint64_t(int(x)) for x in xs]   # noqa: E731
    u32 = lambda xs: [cu.cuuint32_t(int(x)) for x in xs]   # noqa: E731
    return cu.cuTensorMapEncodeTiled, (
        getattr(cu.CUtensorMapDataType, _DTYPE_NAMES[args.dtype]), RANK, args.address,
        u64(args.dims), u64(args.strides), u32(args.box), u32((1,) * RANK),
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)   # out of bounds: zeros


def encode(args: TensorMapArgs) -> bytes:
    """The 128-byte CUtensorMap of ``args`` (needs the CUDA driver)."""
    from cuda.bindings import driver as cu
    function, call_args = driver_call(args)
    err, tensor_map = function(*call_args)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise RuntimeError(f"cuTensorMapEncodeTiled({args}) failed: {name.decode() if name else err}")
    words = [int(w) for w in tensor_map.opaque]
    blob = b"".join(w.to_bytes(8, "little") for w in words)
    assert len(blob) == TENSOR_MAP_BYTES
    return blob


def weight_tensor_maps(spec: KernelSpec, config: MoEConfig, **pointers) -> dict[str, bytes]:
    """Encoded tensor maps for ``abi.fill_params(weight_maps=...)``; arguments as weight_map_args."""
    return {name: encode(args) for name, args in weight_map_args(spec, config, **pointers).items()}


# The CPU emulator's stand-in for a CUtensorMap (device/emulation/wgmma_emu.h make_emu_tensor_map):
# a magic word, then the address, dims, strides, box and element size of the encode call.
EMU_MAGIC = 0x50414D554D454D46


def emulated_map(args: TensorMapArgs) -> bytes:
    words = [EMU_MAGIC, args.address, *args.dims, *args.strides, *args.box, args.element_bytes]
    words += [0] * (TENSOR_MAP_BYTES // 8 - len(words))
    return b"".join(int(w).to_bytes(8, "little") for w in words)


def emulated_weight_tensor_maps(spec: KernelSpec, config: MoEConfig, **pointers) -> dict[str, bytes]:
    """weight_tensor_maps for the emulated kernel (host pointers, no driver)."""
    return {name: emulated_map(args) for name, args in weight_map_args(spec, config, **pointers).items()}
