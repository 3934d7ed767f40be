// The one Params struct the host fills (flashmoe/host/abi.py mirrors it with ctypes) and the small
// POD types that cross the host/device boundary. At compile time the host prepends a generated
// header of static_asserts on every size and offset (abi.abi_header()), so drift fails the build.
#pragma once

namespace flashmoe {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

constexpr int kMaxLocalRanks = 8;    // ranks one launch can host (virtual ranks on one GPU)
constexpr int kMaxWorld = 64;        // ranks in the world (64-bit destination masks)
constexpr int kMaxExperts = 1024;    // routed experts (a token's selection: 32 per lane)
constexpr int kChunkTokens = 64;     // tokens per route task / dispatch chunk (one u64 mask)

// Heap regions, in the order of flashmoe/host/plan.py region_sizes(). Params holds each region's
// bank-0 offset and its bank stride (0 for unbanked regions).
enum RegionId : int {
  kRecvRows, kEntries, kCounts, kRetRows, kDropMarks, kSyncCounters, kSelectDone, kTileDone,
  kEpoch, kCountFlags, kDataFlags, kDoneFlags, kLogits, kTopkIds, kTopkWeights, kSharedGate,
  kChunkCounts, kChunkBase, kInterRows, kSharedInter, kKeptList, kXStage, kPutStage, kNumRegions
};

// The words of kSyncCounters.
enum SyncCounter : int {
  kBarrier = 0, kClaim = 1, kDispatched = 2, kFinished = 3, kExited = 4, kNumSyncCounters = 5
};

// What a block was doing: the role of an error record and the kind of a trace record.
enum TaskKind : u32 {
  kTaskRoute = 0, kTaskPrefix = 1, kTaskDispatch = 2, kTaskSelect = 3, kTaskGemm0 = 4,
  kTaskGemm1 = 5, kTaskCombine = 6, kTaskBarrier = 7, kTaskWait = 8, kNumTaskKinds = 9
};

// What a bounded wait waited for (ErrorRecord::what). The pipeline waits are the GEMM engine's
// mbarriers: a stage's data to land (full) or its consumers to release it (empty); the job waits
// are the wgmma task loop's (device/roles/tasks.cuh): a job posted (ready), a table slot free;
// a ping-pong team waits for its turn at the stage ring (gemm/wgmma.cuh).
enum WaitKind : u32 {
  kWaitNone = 0, kWaitBarrier = 1, kWaitCountFlag = 2, kWaitDataFlag = 3, kWaitDoneFlag = 4,
  kWaitTileDone = 5, kWaitSelectDone = 6, kWaitPipeFull = 7, kWaitPipeEmpty = 8, kWaitJobReady = 9,
  kWaitJobFree = 10, kWaitMathTurn = 11
};

// kErrMisaligned: the dynamic shared memory does not start on the boundary the GEMM engine's
// layout needs (ErrorRecord::expected the alignment, ::observed the shared-window address).
enum ErrorCode : u32 { kErrNone = 0, kErrTimeout = 1, kErrAborted = 2, kErrMisaligned = 3 };

// Test-only fault injection (Params::fault_kind): kFaultStall makes rank Params::fault_rank never
// signal that its dispatch is complete, as a dead or wedged peer would.
enum FaultKind : u32 { kFaultNone = 0, kFaultStall = 1 };

// One dispatched (token, expert) pair as the expert's rank sees it.
struct Entry {
  u32 recv_row;   // row in recv_rows[source] (the token index itself when source == this rank)
  u32 token;      // token index on the source rank
  u32 slot;       // j: the token's j-th expert
  float weight;   // routing weight (ranks pairs under a capacity limit)
};

// The first thing each hosted rank's blocks saw go wrong.
struct ErrorRecord {
  u32 code;       // ErrorCode
  u32 rank;       // global rank of the waiting block
  u32 block;      // block index within the launch
  u32 role;       // TaskKind the block was running
  u32 what;       // WaitKind
  u32 index;      // which source/expert rank, tile or expert it waited for
  u64 expected;   // value awaited (epoch, count)
  u64 observed;   // value last seen
  u64 waited_ns;  // how long it waited
};

struct Control {
  u32 abort;                           // abort_tag() of the launch that stopped: its waits poll it, later
                                       // launches (another tag) run on even before the host resets it
  u32 pad;
  ErrorRecord errors[kMaxLocalRanks];  // one per hosted rank, first error wins
};

// One 32-byte trace record (flashmoe/trace.py reads them).
struct TraceRecord {
  u64 start_ns;   // %globaltimer at the start
  u64 end_ns;     // %globaltimer at the end
  u32 task;       // task index (tile id, chunk, ...)
  u16 block;
  u8 kind;        // TaskKind
  u8 rank;
  u16 sm;         // %smid
  u16 pad;
  u32 extra;      // kind-specific: expert, source rank, ...
};

// A CUtensorMap (cuTensorMapEncodeTiled, flashmoe/host/tensormap.py): opaque to the device code,
// only cp.async.bulk.tensor reads it, from a 64-byte aligned address.
struct alignas(64) TensorMap {
  u64 opaque[16];
};

// Params::weight_maps: the expert weights as 4-D tensor maps (wgmma engine, TMA B operands).
enum WeightMap : int { kMapGateUp = 0, kMapDown = 1, kMapSharedGateUp = 2, kMapSharedDown = 3, kNumWeightMaps = 4 };

// One hosted rank's tensors.
struct LocalRank {
  const void* x;              // [num_tokens, H] dtype, contiguous
  void* out;                  // [num_tokens, H] dtype, contiguous
  i32 num_tokens;             // 0 .. max_tokens
  i32 pad;
  const i32* topk_ids;        // kRoutingGiven: [num_tokens, k]; an id outside 0..E-1 is "no expert"
  const float* topk_weights;  // kRoutingGiven: [num_tokens, k] combine weights
};

struct Params {
  // TMA descriptors of the weights (gemm="wgmma" specs; zeros otherwise). First, so that their
  // 64-byte alignment needs no padding; Params is 64-byte aligned and a multiple of 64 bytes.
  TensorMap weight_maps[kNumWeightMaps];
  u32 weight_maps_valid;    // 1: weight_maps are encoded; 0: the wgmma engine loads B with cp.async
  u32 pad_maps;
  // Shapes.
  i32 hidden;               // H
  i32 intermediate;         // I
  i32 shared_intermediate;  // I_s (0: no shared experts)
  i32 num_experts;          // E
  i32 router_experts;       // E + Z: the router's experts, the Z past E identity experts (no GEMM)
  i32 experts_per_rank;     // E_l
  i32 top_k;                // k
  i32 slots;                // S = k + has shared experts
  i32 world;                // W
  i32 num_local_ranks;      // L
  i32 first_local_rank;     // global rank of hosted rank 0
  i32 blocks_per_rank;
  i32 max_tokens;           // T
  i32 num_chunks;           // ceil(T / kChunkTokens)
  i32 max_row_tiles;        // entries of kTileDone
  // Routing and experts.
  i32 scoring;              // 0 softmax, 1 sigmoid, 2 sqrt(softplus)
  i32 norm_topk;
  i32 n_group;
  i32 topk_group;
  i32 group_score;          // 0 sum of the best two, 1 max
  i32 has_bias;
  i32 shared_gate;          // the shared expert output is scaled by sigmoid(x . w)
  i32 activation;           // 0 silu, 1 gelu, 2 gelu_tanh, 3 relu, clamped SwiGLUs: 4 GPT-OSS's,
                            //   5 silu(min(gate, limit)) * clamp(up, -limit, limit) (DeepSeek-V4)
  float routed_scaling_factor;
  i32 weights_first_expert; // global expert id of gate_up[0] / down[0]
  double capacity_factor;   // 0: dropless
  // Launch state. The launch counter (epoch) lives in the heap (kEpoch), so a captured CUDA graph
  // replays with a fresh epoch every time.
  u32 fault_kind;           // FaultKind (tests only)
  u32 fault_rank;
  u32 trace_capacity;       // records per block (0: no trace buffer)
  u32 smem_sched_offset;    // shared memory: the task map, after the GEMM/phase union
  u32 smem_scratch_offset;  // shared memory: block-wide scratch words
  float norm_topk_epsilon;  // added to the sum of the top-k weights before dividing
  float swiglu_alpha;       // activation 4: g * sigmoid(alpha g) with g = min(gate, limit),
  float swiglu_limit;       //   times clamp(up, -limit, limit) + 1; activation 5: the limit
  u64 timeout_ns;           // bound of every wait
  // Weights.
  const float* router_weight;   // [E + Z (+1 shared gate row), H] fp32
  const float* selection_bias;  // [E + Z] fp32
  const float* router_bias;     // [E + Z] fp32, added to the logits (nullptr: none)
  const void* gate_up;          // [experts, 2I or I, H]
  const void* down;             // [experts, H, I]
  const void* gate_up_bias;     // [experts, 2I or I] dtype, added before the activation (nullptr: none)
  const void* down_bias;        // [experts, H] dtype, added to each expert's output (nullptr: none)
  const void* shared_gate_up;   // [2 I_s or I_s, H]
  const void* shared_down;      // [H, I_s]
  // Heap: hosted rank v's slice is heap + v * rank_heap_bytes.
  u8* heap;
  const u64* peer_bases;        // [W] every rank's slice as this GPU addresses it; 0 (NVSHMEM
                                //     transport only): no load/store path, use NVSHMEM puts
  u64 rank_heap_bytes;
  u64 region_offset[kNumRegions];   // bank 0
  u64 region_stride[kNumRegions];   // bank stride (0: unbanked)
  Control* control;
  u8* trace;                        // trace_layout(): counts then records
  u64 trace_records_offset;
  LocalRank local[kMaxLocalRanks];
};
static_assert(alignof(Params) == 64 && sizeof(Params) % 64 == 0, "a TensorMap needs 64-byte alignment");

// The one argument of every component probe (flashmoe/device/probes.cu; host side:
// flashmoe/bringup/probes.py): a GEMM tile over gathered rows, a TMA box, the router, a bounded
// wait, trace records. Each probe reads the fields its comment names.
struct ProbeArgs {
  TensorMap b_map;        // tile (use_tma), tma_box: a 4-D map of b, (K, inter, nb, experts)
  const Params* params;   // every probe: timeout_ns and control of the bounded waits; router and
                          // trace: the launch's Params (heap, regions, trace buffer)
  const void* a;          // tile: A rows [*, K]
  const i32* a_rows;      // tile: [BM] the row of `a` each tile row reads (-1: zeros)
  const void* b;          // tile: B [experts, nb, inter, K]
  const u8* rows_valid;   // tile: [BM] rows the epilogue stores
  void* out;              // tile: [BM, BN / nb]; tma_box: the box, de-swizzled, row-major
  u32* flags;             // wait: the words waited on
  u32* result;            // wait: per block, 1 if its wait succeeded
  i32 k, inter, experts, expert, col0, nb, use_tma, valid_cols, act, mode;
  i32 coord[4];           // tma_box: the box's coordinates, innermost first
  i32 pad[2];
};

}  // namespace flashmoe
