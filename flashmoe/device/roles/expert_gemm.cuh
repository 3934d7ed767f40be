// Expert tiles. GEMM0 (x W_gate_up^T (+ bias), activation, gate * up, rounded to the dtype) writes
// the intermediate rows of this rank; GEMM1 (h W_down^T (+ bias), rounded to the dtype) writes each
// row straight into the result slot (token, slot) on the token's home rank. The shared experts are
// the same two GEMMs over this rank's own tokens, with their results in the last slot of each token.
#pragma once

#include "flashmoe/device/common/transport.cuh"
#include "flashmoe/device/common/trace.cuh"
#if FLASHMOE_GEMM_WGMMA
#include "flashmoe/device/gemm/wgmma.cuh"
#else
#include "flashmoe/device/gemm/mma_sync.cuh"
#endif
#include "flashmoe/device/roles/scheduler.cuh"

namespace flashmoe {

#if FLASHMOE_GEMM_WGMMA
// One object serves both GEMMs (run_gemm below); Gemm1, the NB = 1 instance, only pins the sizes.
using Gemm0 = WgmmaTile<kBlockM, kBlockN, kNumB>;
using Gemm1 = WgmmaTile<kBlockM, kBlockN, 1>;
#else
using Gemm0 = MmaSyncTile<kBlockM, kBlockN, kNumB>;
using Gemm1 = MmaSyncTile<kBlockM, kBlockN, 1>;
#endif
static_assert(Gemm0::kPipeBytes == Gemm1::kPipeBytes, "both GEMMs share one pipeline area");

// The engine's layout needs the pipeline (the dynamic shared memory base) on a kPipeAlign
// boundary: wgmma descriptors and the TMA 128-byte swizzle count from 1024-byte boundaries. The
// kernel declares that alignment; should the shared window place the memory elsewhere (static
// __shared__ variables before it, say), every tile would be silently scrambled, so the launch
// stops with a record the host turns into an error instead (no trap: that would take torch's
// CUDA context down with it). Uniform over the block.
__device__ bool pipe_aligned(const Params& p, const Ctx& c) {
  const u32 address = smem_addr(c.smem());
  if (address % Gemm0::kPipeAlign == 0) return true;
  if (threadIdx.x == 0)
    record_error(p, c.local, abort_tag(c), kErrMisaligned, WaitSite{kTaskRoute, kWaitNone, 0}, Gemm0::kPipeAlign,
                 address, 0);
  return false;
}

// A tile's B operands as a box of a weight tensor map (Params::weight_maps), for the engines that
// load B with TMA; map == nullptr when no map is encoded (B then comes from the row pointers). And
// the bias of the tile's output columns, added in its epilogue.
struct WeightTile {
  const TensorMap* map;
  i32 row0;        // first row of each operand: intermediate column (GEMM0) or output column (GEMM1)
  i32 expert;      // the expert's index in the weight tensor
  const elem_t* bias;   // tile column col's bias at bias[col] (gated GEMM0: its up column's at
                        // bias[I + col]); nullptr: none
};

// What a prepared tile runs: which GEMM over which K, how many output columns are real, and (for
// GEMM0) the row tile whose done-counter it bumps.
constexpr i32 kJobEnd = 2;
constexpr i32 kJobRankDone = 3;
struct TileJob {
  i32 gemm;        // 0 or 1; kJobEnd: no task is left; kJobRankDone: none of the job's rank (its
                   // results are stored; device/roles/tasks.cuh); -1: no tile (a selection ran)
  i32 k;           // K elements
  i32 valid_cols;  // output columns this tile writes
  i32 row_tile;    // tile_done index (GEMM0)
  u32 trace_task, trace_extra;
  u32 stage0;      // wgmma: the stages the ring went through before this tile's (its first stage)
};

// Per-tile row tables, after the pipeline (flashmoe/host/plan.py gemm_tables_bytes()); the wgmma
// task loop keeps two (tasks.cuh), the producer writing one while a consumer team reads the other
// (ping-pong: each team reads its own).
struct TileTables {
  Ctx ctx;                  // the rank the job works for (wgmma: written with the job)
  const u8* a[kBlockM];     // A row starts (nullptr: zeros)
  const u8* b[kBlockN];     // B row starts (nullptr: zeros)
  WeightTile wt;            // the same B rows as a tensor-map box
  TileJob job;
  u64 out_off[kBlockM];     // where the row's output starts in rank out_rank's heap slice
  i32 out_rank[kBlockM];
  bool valid[kBlockM];      // the row exists (rows past the expert's count are padding)
  float scale[kScaleInput ? kBlockM : 1];   // kScaleInput: the row's routing weight (GEMM0)
};
static_assert(sizeof(TileTables) <= (kCtxBytes + (kBlockM + kBlockN) * 8 + 24 + 28 + kBlockM * 13 +
                                     sizeof(TileTables::scale) + 15) / 16 * 16,
              "flashmoe/host/plan.py gemm_tables_bytes() counts the tables");

__device__ __forceinline__ TileTables& tile_tables(const Ctx& c, int slot = 0) {
  return reinterpret_cast<TileTables*>(c.smem() + Gemm0::kPipeBytes)[slot];
}

// Local expert e of `rank` as an index into the weight tensors (which start at weights_first_expert).
__device__ __forceinline__ int expert_index(const Params& p, int rank, int e) {
  return rank * p.experts_per_rank + e - p.weights_first_expert;
}

__device__ __forceinline__ const elem_t* expert_weights(const Params& p, const void* base, int rank, int e,
                                                        u64 rows, u64 cols) {
  return static_cast<const elem_t*>(base) + (u64)expert_index(p, rank, e) * rows * cols;
}

// Local expert e's row of a [experts, cols] bias tensor (nullptr: the layer has none).
__device__ __forceinline__ const elem_t* expert_bias(const Params& p, const void* base, int rank, int e, int cols) {
  return base ? static_cast<const elem_t*>(base) + (u64)expert_index(p, rank, e) * cols : nullptr;
}

__device__ __forceinline__ const TensorMap* weight_map(const Params& p, int which) {
  return p.weight_maps_valid ? &p.weight_maps[which] : nullptr;
}

// B rows of a GEMM0 tile: columns [col0, col0 + kGemm0Cols) of an intermediate of width `inter`;
// gated weights hold the gate rows then the up rows, each row K = H long. As a box of the 4-D map
// (H, inter, kNumB, experts): (0.., col0.., op, expert), rows past `inter` zero-filled by TMA.
// `bias`: the expert's [kNumB * inter] biases, in the same order (nullptr: none).
template <class G>
__device__ __forceinline__ void gemm0_b_rows(TileTables& tt, const elem_t* w, int inter, int col0, int H,
                                             const TensorMap* map, int expert, const elem_t* bias) {
  for (int r = G::rank(); r < kBlockN; r += G::kSize) {
    const int op = r / kGemm0Cols, col = col0 + r % kGemm0Cols;
    tt.b[r] = col < inter ? reinterpret_cast<const u8*>(w + (u64)(op * inter + col) * H) : nullptr;
  }
  if (G::rank() == 0) tt.wt = WeightTile{map, col0, expert, bias ? bias + col0 : nullptr};
}

// B rows of a GEMM1 tile: output columns [row0, row0 + kBlockN) of H; down has rows of K = inter.
// As a box of the 4-D map (inter, H, 1, experts): (0.., row0.., 0, expert). `bias`: the expert's
// [H] biases (nullptr: none).
template <class G>
__device__ __forceinline__ void gemm1_b_rows(TileTables& tt, const elem_t* w, int H, int row0, int inter,
                                             const TensorMap* map, int expert, const elem_t* bias) {
  for (int r = G::rank(); r < kBlockN; r += G::kSize)
    tt.b[r] = row0 + r < H ? reinterpret_cast<const u8*>(w + (u64)(row0 + r) * inter) : nullptr;
  if (G::rank() == 0) tt.wt = WeightTile{map, row0, expert, bias ? bias + row0 : nullptr};
}

// One GEMM0 output element for activation code kAct: with kScaleInput the row's routing weight
// times the products (x w) W = w (x W), one rounding fewer than scaling x, then the tile's biases
// added (for the columns below valid_cols, the stored ones: the others' biases lie past the
// tensor), then act(gate) * up, act, or a clamped SwiGLU (codes 4 and 5, gated only; spec.cuh).
template <int kAct>
struct Gemm0Epilogue {
  const float* scale;   // TileTables::scale
  const elem_t* bias;   // WeightTile::bias
  int inter;            // the up biases' offset
  int valid_cols;
  float alpha, limit;   // the clamped SwiGLUs' constants
  __device__ __forceinline__ float operator()(int row, int col, const float* v) const {
    float gate = v[0], up = v[kNumB - 1];
    if constexpr (kScaleInput) {
      gate *= scale[row];
      up *= scale[row];
    }
    if (bias && col < valid_cols) {
      gate += to_float(bias[col]);
      if (kGated) up += to_float(bias[inter + col]);
    }
    if constexpr (kAct == 4 || kAct == 5) return swiglu_clamped<kAct>(gate, up, alpha, limit);
    return kGated ? activate(gate, kAct) * up : activate(gate, kAct);
  }
};

// One GEMM1 output element: the expert's output, plus its bias (as Gemm0Epilogue's).
struct Gemm1Epilogue {
  const elem_t* bias;
  int valid_cols;
  __device__ __forceinline__ float operator()(int, int col, const float* v) const {
    return bias && col < valid_cols ? v[0] + to_float(bias[col]) : v[0];
  }
};

// stage_output / store_rows of engine E for pass `pass` of an epilogue of kNB operands, stored by
// thread group G: the wgmma engine serves both GEMMs with one object and takes kNB explicitly,
// and stages a tile in kPasses passes (a warpgroup's m64 slabs, one at a time); mma_sync has one
// type per GEMM, stages the whole tile at once and stores with the whole block.
#if FLASHMOE_GEMM_WGMMA
constexpr int kEpiloguePasses = Gemm0::kPasses;
#else
constexpr int kEpiloguePasses = 1;
#endif
template <int kNB, class E, class F>
__device__ __forceinline__ void stage_tile(const E& g, u8* out, int pass, F f) {
#if FLASHMOE_GEMM_WGMMA
  g.template stage_output<kNB>(out, pass, f);
#else
  g.stage_output(out, f);
#endif
}
template <int kNB, class E, class G, class Store>
__device__ __forceinline__ void store_tile(const u8* staged, int pass, const bool* rows_valid, int valid_cols,
                                           Store store) {
#if FLASHMOE_GEMM_WGMMA
  E::template store_rows<kNB, G>(staged, pass, rows_valid, valid_cols, store);
#else
  static_assert(G::kSize == kThreads, "the mma_sync engine stores with the whole block");
  E::store_rows(staged, rows_valid, valid_cols, store);
#endif
}

// GEMM0's epilogue (thread group G, every thread holding accumulators among them): act(gate) * up
// (or act) into the staging tile, then into this rank's slice. One staging pass per activation: a
// run-time switch inside the per-element function is inlined into every element, and that code
// (all cases, interleaved) costs as many registers as the tile. The clamped SwiGLUs are gated only.
template <class G, class E>
__device__ __forceinline__ void finish_gemm0(const Params& p, const Ctx& c, TileTables& tt, const E& g,
                                             int valid_cols) {
  u8* staged = E::staging(c.smem());
  const float* scale = tt.scale;
  const elem_t* bias = tt.wt.bias;
  const int inter = p.intermediate;
  const float alpha = p.swiglu_alpha, limit = p.swiglu_limit;
#pragma unroll
  for (int pass = 0; pass < kEpiloguePasses; ++pass) {
    if (pass > 0) G::sync();   // the last pass is stored: its staging rows may be rewritten
    switch (p.activation) {
      case 0: stage_tile<kNumB>(g, staged, pass, Gemm0Epilogue<0>{scale, bias, inter, valid_cols}); break;
      case 1: stage_tile<kNumB>(g, staged, pass, Gemm0Epilogue<1>{scale, bias, inter, valid_cols}); break;
      case 2: stage_tile<kNumB>(g, staged, pass, Gemm0Epilogue<2>{scale, bias, inter, valid_cols}); break;
      case 4:   // gated only (MoEConfig refuses them for plain experts): a plain spec compiles no copy
        if constexpr (kGated) {
          stage_tile<kNumB>(g, staged, pass, Gemm0Epilogue<4>{scale, bias, inter, valid_cols, alpha, limit});
          break;
        }
        [[fallthrough]];
      case 5:
        if constexpr (kGated) {
          stage_tile<kNumB>(g, staged, pass, Gemm0Epilogue<5>{scale, bias, inter, valid_cols, alpha, limit});
          break;
        }
        [[fallthrough]];
      default: stage_tile<kNumB>(g, staged, pass, Gemm0Epilogue<3>{scale, bias, inter, valid_cols}); break;
    }
    G::sync();
    store_tile<kNumB, E, G>(staged, pass, tt.valid, valid_cols,
                            [&](int row, int byte, uint4 v) { st_v4(c.slice + tt.out_off[row] + byte, v); });
  }
}

// GEMM1's epilogue: each row into its owner's slice.
template <class G, class E>
__device__ __forceinline__ void finish_gemm1(const Params& p, const Ctx& c, TileTables& tt, const E& g,
                                             int valid_cols) {
  u8* staged = E::staging(c.smem());
  remote_tile_begin<G>(p, c);
#pragma unroll
  for (int pass = 0; pass < kEpiloguePasses; ++pass) {
    if (pass > 0) G::sync();   // the last pass is stored: its staging rows may be rewritten
    stage_tile<1>(g, staged, pass, Gemm1Epilogue{tt.wt.bias, valid_cols});
    G::sync();
    store_tile<1, E, G>(staged, pass, tt.valid, valid_cols, [&](int row, int byte, uint4 v) {
      remote_tile_store(p, c, tt.out_rank[row], tt.out_off[row], row, byte, v);
    });
  }
  remote_tile_end<G>(p, c, tt.out_rank, tt.out_off, tt.valid, (u32)min(valid_cols, kBlockN) * kElemBytes);
}

// A GEMM0 tile's rows are stored (by group G): count them for this rank's GEMM1 tiles.
template <class G>
__device__ __forceinline__ void publish_rows(const Params& p, const Ctx& c, int row_tile) {
  G::sync();
  if (G::rank() == 0) {
    fence_acq_rel_gpu();
    atomic_add_relaxed_gpu(region<u32>(p, c.slice, kTileDone, c.bank) + row_tile, 1);
  }
}

#if FLASHMOE_GEMM_WGMMA
// The wgmma engine runs a tile in two halves at once (device/roles/tasks.cuh): the producer
// warpgroup loads its stages, a consumer team multiplies them and stores the result. Both GEMMs
// go through one inlined copy of each half (NB only changes the B boxes and the epilogue): two
// copies, one per GEMM, would each pin a contiguous accumulator block.

// The producer's half: the tile's stages after the `fill` the pipeline has had. False: a wait for
// a free stage failed (recorded).
__device__ __forceinline__ bool load_job(const Params& p, const Ctx& c, const TileTables& tt, const TileJob& job,
                                         u32& fill) {
  const u32 k_bytes = (u32)job.k * kElemBytes;
  const int ktiles = Gemm0::ktiles_of(k_bytes);
  const bool ok = Gemm0::produce(c.smem(), tt.a, tt.b, k_bytes, p.router_weight, tt.wt.map, tt.wt.row0, tt.wt.expert,
                                 job.gemm == 0 ? kNumB : 1, ktiles, fill, p, c, job.gemm ? kTaskGemm1 : kTaskGemm0);
  fill += ktiles;
  return ok;
}

// A consumer team's half of job n: (ping-pong: its turn,) multiply the tile's stages, store the
// tile, publish a GEMM0 tile's rows. False (in every thread of the team): a wait failed
// (recorded); nothing was stored. The tile's trace record starts once the team's turn has come;
// the start waits in shared memory and consume_tasks writes the record (tasks.cuh).
__device__ __forceinline__ bool compute_job(const Params& p, const Ctx& c, TileTables& tt, const TileJob& job,
                                            u32 n) {
  const u32 role = job.gemm ? kTaskGemm1 : kTaskGemm0;
  const bool turn = Gemm0::wait_turn(c.smem(), n, p, c, role);
  if (kTrace && Team::rank() == 0) Gemm0::barriers(c.smem()).trace_start[Gemm0::team()] = globaltimer_ns();
  Gemm0 g;
  const bool ok = g.consume(c.smem(), Gemm0::ktiles_of((u32)job.k * kElemBytes), job.stage0, p, c, role, turn);
  // Also the barrier before the staging area is rewritten: the team has stored the last tile.
  if (Team::any(!ok)) return false;
  if (job.gemm == 0) {
    finish_gemm0<Team>(p, c, tt, g, job.valid_cols);
    publish_rows<Team>(p, c, job.row_tile);
  } else {
    finish_gemm1<Team>(p, c, tt, g, job.valid_cols);
  }
  return true;
}
#else
// Runs GEMM0 on the tables and stores act(gate) * up (or act) into this rank's slice.
__device__ void run_gemm0(const Params& p, const Ctx& c, TileTables& tt, int K, int valid_cols) {
  __syncthreads();
  Gemm0 g;
  g.mainloop(c.smem(), tt.a, tt.b, (u32)K * kElemBytes, p.router_weight);
  finish_gemm0<Block>(p, c, tt, g, valid_cols);
}

// Runs GEMM1 on the tables and stores each row into its owner's slice.
__device__ void run_gemm1(const Params& p, const Ctx& c, TileTables& tt, int K, int valid_cols) {
  __syncthreads();
  Gemm1 g;
  g.mainloop(c.smem(), tt.a, tt.b, (u32)K * kElemBytes, p.router_weight);
  finish_gemm1<Block>(p, c, tt, g, valid_cols);
}

// The whole block runs a prepared tile (one call site per GEMM keeps one copy of each).
__device__ void run_job(const Params& p, const Ctx& c, const TileJob& job) {
  TraceScope scope;
  TileTables& tt = tile_tables(c);
  if (job.gemm == 0) {
    run_gemm0(p, c, tt, job.k, job.valid_cols);
    publish_rows<Block>(p, c, job.row_tile);
  } else {
    run_gemm1(p, c, tt, job.k, job.valid_cols);
  }
  if (threadIdx.x == 0) trace_record(p, c, scope, job.gemm ? kTaskGemm1 : kTaskGemm0, job.trace_task, job.trace_extra);
}
#endif

// ---- shared experts: rows are this rank's tokens ----------------------------------------------

// The prepare_* functions below run on the thread group G that claims tasks: they wait for what the
// tile needs and fill its tables `tt` (G synchronises before anyone reads them).

template <class G>
__device__ TileJob prepare_shared_gemm0(const Params& p, const Ctx& c, const TaskMap& tm, int task, TileTables& tt) {
  const int m = task / tm.h->shared_g0_cols, n = task % tm.h->shared_g0_cols;
  const int Is = p.shared_intermediate, H = p.hidden;
  const u64 inter_off = region_off(p, kSharedInter);
  for (int i = G::rank(); i < kBlockM; i += G::kSize) {
    const int q = m * kBlockM + i;
    const bool ok = q < c.num_tokens;
    tt.a[i] = ok ? reinterpret_cast<const u8*>(c.x + (u64)q * H) : nullptr;
    tt.valid[i] = ok;
    if constexpr (kScaleInput) tt.scale[i] = 1.0f;   // the shared experts see the tokens as they are
    tt.out_off[i] = inter_off + ((u64)q * Is + (u64)n * kGemm0Cols) * kElemBytes;
  }
  gemm0_b_rows<G>(tt, static_cast<const elem_t*>(p.shared_gate_up), Is, n * kGemm0Cols, H,
                  weight_map(p, kMapSharedGateUp), 0, nullptr);
  return TileJob{0, H, Is - n * kGemm0Cols, m, (u32)task, 0xffffffffu};
}

template <class G>
__device__ bool prepare_shared_gemm1(const Params& p, const Ctx& c, const TaskMap& tm, int task,
                                     volatile u32* scratch, TileTables& tt, TileJob& job) {
  const int m = task / tm.h->g1_cols, n = task % tm.h->g1_cols;
  const int Is = p.shared_intermediate, H = p.hidden;
  if (!block_wait<false, G>(p, c, region<u32>(p, c.slice, kTileDone, c.bank) + m, tm.h->shared_g0_cols,
                            WaitSite{kTaskGemm1, kWaitTileDone, (u32)m}, scratch))
    return false;
  const elem_t* inter = region<elem_t>(p, c.slice, kSharedInter);
  const u64 ret_off = region_off(p, kRetRows, c.bank);
  for (int i = G::rank(); i < kBlockM; i += G::kSize) {
    const int q = m * kBlockM + i;
    const bool ok = q < c.num_tokens;
    tt.a[i] = ok ? reinterpret_cast<const u8*>(inter + (u64)q * Is) : nullptr;
    tt.valid[i] = ok;
    tt.out_rank[i] = c.rank;
    tt.out_off[i] = ret_off + (ret_row_index(p, q, p.top_k) * H + (u64)n * kBlockN) * kElemBytes;
  }
  gemm1_b_rows<G>(tt, static_cast<const elem_t*>(p.shared_down), H, n * kBlockN, Is, weight_map(p, kMapSharedDown), 0,
                  nullptr);
  job = TileJob{1, Is, H - n * kBlockN, 0, (u32)task, 0xffffffffu};
  return true;
}

// ---- routed experts ---------------------------------------------------------------------------

// Where kept row q of local expert e came from: (source rank, position in its entries segment).
__device__ __forceinline__ void row_source(const Params& p, const Ctx& c, const TaskMap& tm, int e, int q,
                                           int& src, u32& pos) {
  if (tm.h->capacity >= 0) {
    const u32 packed = ld_cg_u32(region<u32>(p, c.slice, kKeptList) + tm.row_off[e] + q);
    src = packed / p.max_tokens;
    pos = packed % p.max_tokens;
  } else {
    src = tm.source_of_row(p, e, q);
    pos = q - tm.seg_of(p, e)[src];
  }
}

// Kept row q of local expert e: its Entry {recv_row, token, slot, weight} and source rank.
__device__ __forceinline__ uint4 routed_row(const Params& p, const Ctx& c, const TaskMap& tm, int e, int q,
                                            int& src) {
  u32 pos;
  row_source(p, c, tm, e, q, src, pos);
  return ld_cg_v4(region<Entry>(p, c.slice, kEntries, c.bank) + entry_index(p, e, src, pos));
}

// Waits until every source with rows in [q0, q1) of expert e has delivered them (dropless), or
// until the expert's capacity selection is done.
template <class G>
__device__ bool wait_rows(const Params& p, const Ctx& c, const TaskMap& tm, int e, int q0, int q1,
                          volatile u32* scratch) {
  if (tm.h->capacity >= 0)
    return block_wait<false, G>(p, c, region<u32>(p, c.slice, kSelectDone, c.bank) + e, 1,
                                WaitSite{kTaskGemm0, kWaitSelectDone, (u32)e}, scratch);
  const i32* s = tm.seg_of(p, e);
  const u32* flags = region<u32>(p, c.slice, kDataFlags);
  for (int src = 0; src < p.world; ++src) {
    if (s[src] < q1 && s[src + 1] > q0 &&
        !block_wait<true, G>(p, c, flags + src, c.epoch, WaitSite{kTaskGemm0, kWaitDataFlag, (u32)src}, scratch))
      return false;
  }
  return true;
}

template <class G>
__device__ bool prepare_routed_gemm0(const Params& p, const Ctx& c, const TaskMap& tm, int task,
                                     volatile u32* scratch, TileTables& tt, TileJob& job) {
  const auto [tile, n, e, q0, nrows] = routed_tile(p, tm, task, tm.h->g0_cols);
  const int H = p.hidden, I = p.intermediate;
  if (!wait_rows<G>(p, c, tm, e, q0, q0 + nrows, scratch)) return false;
  const u8* recv = c.slice + region_off(p, kRecvRows, c.bank);
  const u64 inter_off = region_off(p, kInterRows);
  for (int i = G::rank(); i < kBlockM; i += G::kSize) {
    tt.valid[i] = i < nrows;
    tt.a[i] = nullptr;
    if constexpr (kScaleInput) tt.scale[i] = 0.0f;
    if (i >= nrows) continue;
    int src;
    const uint4 entry = routed_row(p, c, tm, e, q0 + i, src);
    if constexpr (kScaleInput) tt.scale[i] = __uint_as_float(entry.w);
    tt.a[i] = src == c.rank ? reinterpret_cast<const u8*>(c.x + (u64)entry.x * H)
                            : recv + recv_row_index(p, src, entry.x) * H * kElemBytes;
    tt.out_off[i] = inter_off + ((u64)(tm.row_off[e] + q0 + i) * I + (u64)n * kGemm0Cols) * kElemBytes;
  }
  gemm0_b_rows<G>(tt, expert_weights(p, p.gate_up, c.rank, e, (u64)kNumB * I, H), I, n * kGemm0Cols, H,
                  weight_map(p, kMapGateUp), expert_index(p, c.rank, e),
                  expert_bias(p, p.gate_up_bias, c.rank, e, kNumB * I));
  job = TileJob{0, H, I - n * kGemm0Cols, tm.h->shared_row_tiles + tile, (u32)task, (u32)e};
  return true;
}

template <class G>
__device__ bool prepare_routed_gemm1(const Params& p, const Ctx& c, const TaskMap& tm, int task,
                                     volatile u32* scratch, TileTables& tt, TileJob& job) {
  const auto [tile, n, e, q0, nrows] = routed_tile(p, tm, task, tm.h->g1_cols);
  const int H = p.hidden, I = p.intermediate;
  if (!block_wait<false, G>(p, c, region<u32>(p, c.slice, kTileDone, c.bank) + tm.h->shared_row_tiles + tile,
                            tm.h->g0_cols, WaitSite{kTaskGemm1, kWaitTileDone, (u32)tile}, scratch))
    return false;
  const elem_t* inter = region<elem_t>(p, c.slice, kInterRows);
  const u64 ret_off = region_off(p, kRetRows, c.bank);
  for (int i = G::rank(); i < kBlockM; i += G::kSize) {
    tt.valid[i] = i < nrows;
    tt.a[i] = nullptr;
    if (i >= nrows) continue;
    int src;
    const uint4 entry = routed_row(p, c, tm, e, q0 + i, src);
    tt.a[i] = reinterpret_cast<const u8*>(inter + (u64)(tm.row_off[e] + q0 + i) * I);
    tt.out_rank[i] = src;
    tt.out_off[i] = ret_off + (ret_row_index(p, entry.y, entry.z) * H + (u64)n * kBlockN) * kElemBytes;
  }
  gemm1_b_rows<G>(tt, expert_weights(p, p.down, c.rank, e, H, I), H, n * kBlockN, I, weight_map(p, kMapDown),
                  expert_index(p, c.rank, e), expert_bias(p, p.down_bias, c.rank, e, H));
  job = TileJob{1, I, H - n * kBlockN, 0, (u32)task, (u32)e};
  return true;
}

}  // namespace flashmoe
