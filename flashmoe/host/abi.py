"""ctypes mirror of device/common/params.cuh, and the compile-time check that they agree.

``abi_header()`` renders a header of ``static_assert``s on every struct size, field offset, enum
value and constant; ``compile.py`` pre-includes it, so a field added on one side only fails the
build instead of corrupting a launch.
"""

from __future__ import annotations

import ctypes as C
import enum

from . import plan as plan_mod

MAX_LOCAL_RANKS = 8
MAX_WORLD = 64

# RegionId, in this order (plan.region_sizes() order).
REGION_NAMES = (
    "recv_rows", "entries", "counts", "ret_rows", "drop_marks", "sync_counters", "select_done",
    "tile_done", "epoch", "count_flags", "data_flags", "done_flags", "logits", "topk_ids", "topk_weights",
    "shared_gate", "chunk_counts", "chunk_base", "inter_rows", "shared_inter", "kept_list",
    "x_stage", "put_stage",
)
NUM_REGIONS = len(REGION_NAMES)

SYNC_COUNTERS = ("barrier", "claim", "dispatched", "finished", "exited")


class TaskKind(enum.IntEnum):
    ROUTE = 0
    PREFIX = 1
    DISPATCH = 2
    SELECT = 3
    GEMM0 = 4
    GEMM1 = 5
    COMBINE = 6
    BARRIER = 7
    WAIT = 8


class WaitKind(enum.IntEnum):
    NONE = 0
    BARRIER = 1
    COUNT_FLAG = 2
    DATA_FLAG = 3
    DONE_FLAG = 4
    TILE_DONE = 5
    SELECT_DONE = 6
    PIPE_FULL = 7
    PIPE_EMPTY = 8
    JOB_READY = 9
    JOB_FREE = 10
    MATH_TURN = 11


class ErrorCode(enum.IntEnum):
    NONE = 0
    TIMEOUT = 1
    ABORTED = 2
    MISALIGNED = 3


class FaultKind(enum.IntEnum):
    NONE = 0
    STALL = 1


ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_clamped": 4, "silu_clamped": 5}
SCORING_CODES = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}
GROUP_SCORE_CODES = {"top2_sum": 0, "max": 1}

u8, u16, u32, i32, u64, f32, f64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_int32, C.c_uint64, C.c_float, C.c_double
ptr = C.c_void_p   # a device pointer (set from an integer address)


class Entry(C.Structure):
    _fields_ = [("recv_row", u32), ("token", u32), ("slot", u32), ("weight", f32)]


class ErrorRecord(C.Structure):
    _fields_ = [("code", u32), ("rank", u32), ("block", u32), ("role", u32), ("what", u32),
                ("index", u32), ("expected", u64), ("observed", u64), ("waited_ns", u64)]


class Control(C.Structure):
    _fields_ = [("abort", u32), ("pad", u32), ("errors", ErrorRecord * MAX_LOCAL_RANKS)]


class TraceRecord(C.Structure):
    _fields_ = [("start_ns", u64), ("end_ns", u64), ("task", u32), ("block", u16), ("kind", u8),
                ("rank", u8), ("sm", u16), ("pad", u16), ("extra", u32)]


class TensorMap(C.Structure):
    """A CUtensorMap (128 opaque bytes; the device type is 64-byte aligned, see Params)."""
    _fields_ = [("opaque", u64 * 16)]


# Params.weight_maps, in WeightMap order (params.cuh): the four weight tensors as TMA tensor maps.
WEIGHT_MAPS = ("gate_up", "down", "shared_gate_up", "shared_down")
TENSOR_MAP_BYTES = 128
TENSOR_MAP_ALIGN = 64


class LocalRank(C.Structure):
    _fields_ = [("x", ptr), ("out", ptr), ("num_tokens", i32), ("pad", i32), ("topk_ids", ptr),
                ("topk_weights", ptr)]


_PARAMS_FIELDS = [
        ("weight_maps", TensorMap * len(WEIGHT_MAPS)), ("weight_maps_valid", u32), ("pad_maps", u32),
        ("hidden", i32), ("intermediate", i32), ("shared_intermediate", i32), ("num_experts", i32),
        ("router_experts", i32),
        ("experts_per_rank", i32), ("top_k", i32), ("slots", i32), ("world", i32),
        ("num_local_ranks", i32), ("first_local_rank", i32), ("blocks_per_rank", i32),
        ("max_tokens", i32), ("num_chunks", i32), ("max_row_tiles", i32),
        ("scoring", i32), ("norm_topk", i32), ("n_group", i32), ("topk_group", i32),
        ("group_score", i32), ("has_bias", i32), ("shared_gate", i32), ("activation", i32),
        ("routed_scaling_factor", f32), ("weights_first_expert", i32), ("capacity_factor", f64),
        ("fault_kind", u32), ("fault_rank", u32), ("trace_capacity", u32),
        ("smem_sched_offset", u32), ("smem_scratch_offset", u32), ("norm_topk_epsilon", f32),
        ("swiglu_alpha", f32), ("swiglu_limit", f32), ("timeout_ns", u64),
        ("router_weight", ptr), ("selection_bias", ptr), ("router_bias", ptr), ("gate_up", ptr), ("down", ptr),
        ("gate_up_bias", ptr), ("down_bias", ptr), ("shared_gate_up", ptr), ("shared_down", ptr),
        ("heap", ptr), ("peer_bases", ptr), ("rank_heap_bytes", u64),
        ("region_offset", u64 * NUM_REGIONS), ("region_stride", u64 * NUM_REGIONS),
        ("control", ptr), ("trace", ptr), ("trace_records_offset", u64),
        ("local", LocalRank * MAX_LOCAL_RANKS),
]


class _UnpaddedParams(C.Structure):
    _fields_ = _PARAMS_FIELDS


class Params(C.Structure):
    # The device struct is alignas(64) (it holds TensorMaps), so its size is rounded up to 64
    # bytes; ctypes knows no such alignment, so the tail padding is spelled out here. Fields whose
    # name starts with "_" exist on this side only (abi_header() skips them).
    _fields_ = _PARAMS_FIELDS + ([("_tail_pad", u8 * (-C.sizeof(_UnpaddedParams) % TENSOR_MAP_ALIGN))]
                                 if C.sizeof(_UnpaddedParams) % TENSOR_MAP_ALIGN else [])


class ProbeArgs(C.Structure):
    """The component probes' one argument (device/probes.cu; flashmoe/bringup/probes.py)."""
    _fields_ = [("b_map", TensorMap), ("params", ptr), ("a", ptr), ("a_rows", ptr), ("b", ptr),
                ("rows_valid", ptr), ("out", ptr), ("flags", ptr), ("result", ptr),
                ("k", i32), ("inter", i32), ("experts", i32), ("expert", i32), ("col0", i32), ("nb", i32),
                ("use_tma", i32), ("valid_cols", i32), ("act", i32), ("mode", i32), ("coord", i32 * 4),
                ("pad", i32 * 2)]


_STRUCTS = (Entry, ErrorRecord, Control, TraceRecord, TensorMap, LocalRank, Params, ProbeArgs)


# ctypes scalar -> the device typedef it must be (params.cuh); pointers are checked as pointers.
_DEVICE_TYPES = {C.c_uint8: "u8", C.c_uint16: "u16", C.c_uint32: "u32", C.c_int32: "i32",
                 C.c_uint64: "u64", C.c_float: "float", C.c_double: "double"}


def abi_header() -> str:
    """static_asserts that the device structs match these ctypes mirrors: every struct's size,
    every field's offset, size and type, and the shared constants and enums.

    NVRTC has no constant-expression ``offsetof`` (CCCL's is a reinterpret_cast), but its
    ``__INTADDR__`` makes the classic null-pointer member address a constant; host compilers (the
    CPU emulator) use ``offsetof``.
    """
    lines = ["// Generated by flashmoe/host/abi.py: host/device ABI checks.", "#pragma once",
             "#include <cuda/std/type_traits>",
             "#include \"flashmoe/device/common/params.cuh\"",
             "#if defined(__CUDACC_RTC__)",
             "#define FLASHMOE_ABI_OFFSET(T, m) __INTADDR__(&((T*)0)->m)",
             "#else",
             "#include <cstddef>",
             "#define FLASHMOE_ABI_OFFSET(T, m) offsetof(T, m)",
             "#endif",
             "namespace flashmoe {"]
    src = "differs from flashmoe/host/abi.py"
    for s in _STRUCTS:
        name = s.__name__
        lines.append(f"static_assert(sizeof({name}) == {C.sizeof(s)}, \"{name}: size {src}\");")
        fields = [(f, t) for f, t in s._fields_ if not f.startswith("_")]   # "_": host-side padding
        for field_name, ctype in fields:
            member = f"{name}::{field_name}"
            offset = getattr(s, field_name).offset
            lines.append(f"static_assert(FLASHMOE_ABI_OFFSET({name}, {field_name}) == {offset}, "
                         f"\"{member}: offset {src}\");")
            lines.append(f"static_assert(sizeof({member}) == {C.sizeof(ctype)}, \"{member}: size {src}\");")
            element = getattr(ctype, "_type_", None) if issubclass(ctype, C.Array) else ctype
            if element is C.c_void_p:
                check = f"cuda::std::is_pointer_v<decltype({member})>"
            elif element in _DEVICE_TYPES:
                base = f"cuda::std::remove_all_extents_t<decltype({member})>"
                check = f"cuda::std::is_same_v<{base}, {_DEVICE_TYPES[element]}>"
            else:
                continue   # nested structs are checked on their own
            lines.append(f"static_assert({check}, \"{member}: type {src}\");")
    consts = {"kMaxLocalRanks": MAX_LOCAL_RANKS, "kMaxWorld": MAX_WORLD,
              "kChunkTokens": plan_mod.CHUNK_TOKENS, "kMaxExperts": plan_mod.MAX_EXPERTS, "kNumRegions": NUM_REGIONS,
              "(int)sizeof(Entry)": plan_mod.ENTRY_BYTES,
              "(int)sizeof(TraceRecord)": plan_mod.TRACE_RECORD_BYTES}
    for i, name in enumerate(REGION_NAMES):
        consts["k" + "".join(w.capitalize() for w in name.split("_"))] = i
    for i, name in enumerate(SYNC_COUNTERS):
        consts["k" + name.capitalize()] = i
    consts["kNumSyncCounters"] = plan_mod.NUM_SYNC_COUNTERS
    for enum_cls, prefix in ((TaskKind, "kTask"), (WaitKind, "kWait"), (ErrorCode, "kErr"),
                             (FaultKind, "kFault")):
        for member in enum_cls:
            consts[prefix + "".join(w.capitalize() for w in member.name.split("_"))] = int(member)
    consts["kNumTaskKinds"] = len(TaskKind)
    for i, name in enumerate(WEIGHT_MAPS):
        consts["kMap" + "".join(w.capitalize() for w in name.split("_"))] = i
    consts["kNumWeightMaps"] = len(WEIGHT_MAPS)
    consts["(int)alignof(Params)"] = TENSOR_MAP_ALIGN
    consts["(int)sizeof(TensorMap)"] = TENSOR_MAP_BYTES
    for expr, value in consts.items():
        lines.append(f"static_assert({expr} == {value}, \"{expr} {src}\");")
    lines.append("}  // namespace flashmoe")
    return "\n".join(lines) + "\n"


def fill_params(plan, *, heap: int, peer_bases: int, control: int,
                router_weight: int, gate_up: int, down: int, selection_bias: int = 0,
                router_bias: int = 0, gate_up_bias: int = 0, down_bias: int = 0,
                shared_gate_up: int = 0, shared_down: int = 0, weights_first_expert: int = 0,
                local: list[tuple[int, ...]] = (), timeout_ns: int = 10**10,
                trace: int = 0, trace_capacity: int = 0,
                fault_kind: FaultKind = FaultKind.NONE, fault_rank: int = 0,
                weight_maps: dict[str, bytes] | None = None) -> Params:
    """Params for one launch of ``plan``. ``local`` is one (x, out, num_tokens) per hosted rank,
    or (x, out, num_tokens, topk_ids, topk_weights) for a spec with routing='given' (the
    caller's int32 ids and fp32 weights [num_tokens, k]); pointers are device addresses as
    integers. ``weight_maps`` (gemm="wgmma" specs): the encoded
    tensor maps by WEIGHT_MAPS name (``tensormap.weight_tensor_maps``); without them the wgmma
    engine loads the weights with cp.async instead of TMA."""
    cfg = plan.config
    if len(local) != plan.num_local_ranks:
        raise ValueError(f"{len(local)} local ranks given, the plan hosts {plan.num_local_ranks}")
    p = Params()
    p.hidden, p.intermediate = cfg.hidden_size, cfg.intermediate_size
    p.shared_intermediate = cfg.shared_intermediate_total
    p.num_experts, p.router_experts, p.experts_per_rank = cfg.num_experts, cfg.router_experts, plan.experts_per_rank
    p.top_k, p.slots, p.world = cfg.top_k, plan.slots, plan.world
    p.num_local_ranks, p.first_local_rank = plan.num_local_ranks, plan.first_local_rank
    p.blocks_per_rank, p.max_tokens = plan.blocks_per_rank, plan.max_tokens
    p.num_chunks, p.max_row_tiles = plan.num_chunks, plan.max_row_tiles
    p.scoring = SCORING_CODES[cfg.scoring]
    p.norm_topk = int(cfg.norm_topk_prob)
    p.n_group, p.topk_group = cfg.n_group, cfg.topk_group
    p.group_score = GROUP_SCORE_CODES[cfg.group_score]
    p.has_bias = int(cfg.selection_bias)
    p.shared_gate = int(cfg.shared_expert_gate)
    p.activation = ACTIVATION_CODES[cfg.activation]
    p.routed_scaling_factor = cfg.routed_scaling_factor
    p.norm_topk_epsilon = cfg.norm_topk_epsilon
    p.swiglu_alpha, p.swiglu_limit = cfg.swiglu_alpha, cfg.swiglu_limit
    p.weights_first_expert = weights_first_expert
    p.capacity_factor = cfg.capacity_factor or 0.0
    p.fault_kind, p.fault_rank = int(fault_kind), fault_rank
    p.trace_capacity = trace_capacity
    p.smem_sched_offset, p.smem_scratch_offset = plan.smem_sched_offset, plan.smem_scratch_offset
    p.timeout_ns = timeout_ns
    p.router_weight, p.selection_bias, p.router_bias = router_weight, selection_bias, router_bias
    p.gate_up, p.down, p.gate_up_bias, p.down_bias = gate_up, down, gate_up_bias, down_bias
    p.shared_gate_up, p.shared_down = shared_gate_up, shared_down
    p.heap, p.peer_bases, p.rank_heap_bytes = heap, peer_bases, plan.rank_heap_bytes
    for i, name in enumerate(REGION_NAMES):
        region = plan.regions[name]
        p.region_offset[i] = region.offset
        p.region_stride[i] = region.bank_stride
    p.control = control
    if weight_maps:
        for i, name in enumerate(WEIGHT_MAPS):
            blob = weight_maps.get(name)
            if blob is None:
                continue
            if len(blob) != TENSOR_MAP_BYTES:
                raise ValueError(f"weight map {name}: {len(blob)} bytes, a CUtensorMap has {TENSOR_MAP_BYTES}")
            C.memmove(C.addressof(p.weight_maps[i]), blob, TENSOR_MAP_BYTES)
        p.weight_maps_valid = 1
    p.trace = trace
    p.trace_records_offset = plan_mod.trace_layout(plan.grid, trace_capacity)[1] if trace else 0
    routing_given = plan.spec.routing == "given"
    for v, (x, out, n, *given) in enumerate(local):
        if not 0 <= n <= plan.max_tokens:
            raise ValueError(f"local rank {v}: {n} tokens, the plan holds 0..{plan.max_tokens}")
        if len(given) != (2 if routing_given else 0):
            raise ValueError(f"local rank {v}: (x, out, num_tokens{', topk_ids, topk_weights' if routing_given else ''}) "
                             f"expected for a spec with routing={plan.spec.routing!r}, got {len(given) + 3} values")
        p.local[v].x, p.local[v].out, p.local[v].num_tokens = x, out, n
        if routing_given:
            p.local[v].topk_ids, p.local[v].topk_weights = given
    return p
