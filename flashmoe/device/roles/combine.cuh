// Combine: once every rank has signalled that its results for this rank are written, each token's
// output is the sum of its slots' rows weighted by the routing weights (by 1 where they scaled
// the expert's input, kScaleInput), in slot order, in fp32 (a slot that chose an identity expert
// has the token's own row of x, which never left this rank),
// then the shared experts' row (scaled by its gate), rounded once to the dtype
// (flashmoe/reference.py moe_forward). A fixed order and no atomics: bitwise reproducible, and
// independent of how many ranks the experts are spread over.
#pragma once

#include "flashmoe/device/common/wait.cuh"
#include "flashmoe/device/common/trace.cuh"

namespace flashmoe {

__device__ __forceinline__ void unpack(uint4 v, float (&f)[kVecElems]) {
  const elem_t* e = reinterpret_cast<const elem_t*>(&v);
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) f[i] = to_float(e[i]);
}

// How many (output vector, slot) rows a thread loads before it uses any: they are independent, so
// a batch costs one round trip to memory instead of one per row. One row at a time, with 256 of
// the 384 threads busy at H = 2048, a block kept 4 KB in flight and the combine streamed about
// 1.1 TB/s (H200 at 446305b, Qwen3-30B-A3B at 4096 tokens: 131 us for 150 MB); six at a time on
// every thread it keeps 36 KB, which at the same latency is more than the copy bandwidth. A batch
// runs on across a thread's vectors, so k = 2 (Mixtral) keeps six in flight as well as k = 8.
// Six is a size ptxas keeps every shipped spec free of spills with (tests/test_kernel_build.py);
// when a batch held one vector's slots, 8, 2 and 4 made it spill elsewhere in the kernel (the
// 128 x 256 tile's epilogue).
constexpr int kCombineBatch = 6;

__device__ bool combine(const Params& p, const Ctx& c, volatile u32* scratch) {
  if (c.num_tokens == 0) return true;
  const u32* done = region<u32>(p, c.slice, kDoneFlags);
  for (int r = 0; r < p.world; ++r)
    if (!block_wait<true>(p, c, done + r, c.epoch, WaitSite{kTaskCombine, kWaitDoneFlag, (u32)r}, scratch))
      return false;
  const int k = p.top_k, H = p.hidden;
  const elem_t* ret = region<elem_t>(p, c.slice, kRetRows, c.bank);
  const float* weights = region<float>(p, c.slice, kTopkWeights);
  const i32* ids = region<i32>(p, c.slice, kTopkIds);   // -1: no expert (kRoutingGiven)
  const float* shared_gate = region<float>(p, c.slice, kSharedGate);
  const u32* drops = region<u32>(p, c.slice, kDropMarks, c.bank);
  const bool capacity = p.capacity_factor > 0.0;
  const bool identity = p.router_experts > p.num_experts;
  // Slot k (after the routed ones) holds the shared experts' row: ret_row_index's layout.
  const u32 slots = p.slots;
  // The block's tokens are c.block, c.block + blocks_per_rank, ...; its items (token, 16-byte
  // vector of the row) are spread over every thread, whatever H is: this thread's are
  // threadIdx.x + i * kThreads, and it walks their (item, slot) pairs in order.
  const u32 vecs = H / kVecElems;
  const u32 tokens = c.block < c.num_tokens ? (c.num_tokens - c.block - 1) / p.blocks_per_rank + 1 : 0;
  const u32 items = tokens * vecs;
  const u32 pairs = threadIdx.x < items ? ((items - threadIdx.x - 1) / kThreads + 1) * slots : 0;
  // Where a thread is in that walk, moved on without a division per row: kThreads items further
  // is step_tok tokens and step_vec vectors further.
  struct Cursor {
    u32 tok, vec, slot;   // the block's tok-th token, its vec-th vector, the slot
  };
  const u32 step_tok = kThreads / vecs, step_vec = kThreads % vecs;
  auto next = [&](Cursor& r) {
    if (++r.slot < slots) return;
    r.slot = 0;
    r.tok += step_tok;
    r.vec += step_vec;
    if (r.vec >= vecs) r.vec -= vecs, ++r.tok;
  };
  auto token = [&](const Cursor& r) { return c.block + r.tok * p.blocks_per_rank; };
  Cursor load{threadIdx.x / vecs, threadIdx.x % vecs, 0}, sum = load;
  TraceScope scope;
  float acc[kVecElems];
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) acc[i] = 0.0f;
  for (u32 q0 = 0; q0 < pairs; q0 += kCombineBatch) {
    // Every slot's row is read, also one that holds nothing this launch (no expert, dropped):
    // it is inside ret_rows, and deciding first would put its flags' round trip before the load.
    uint4 rows[kCombineBatch];
    float w[kCombineBatch];
    bool use[kCombineBatch];
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b) {
      use[b] = q0 + b < pairs;
      if (use[b]) {
        const u32 t = token(load), j = load.slot;
        const elem_t* row = ret + ret_row_index(p, t, j) * H;
        // Only a layer with identity experts reads the slot's id before its row.
        if (identity && j < (u32)k && ld_weak(ids + (u64)t * k + j) >= p.num_experts) row = c.x + (u64)t * H;
        rows[b] = ld_cg_v4(row + (u64)load.vec * kVecElems);
        if (j == (u32)k) {
          w[b] = p.shared_gate ? ld_weak(shared_gate + t) : 1.0f;
        } else {
          w[b] = kScaleInput ? 1.0f : ld_weak(weights + (u64)t * k + j);   // kScaleInput: applied in GEMM0
          if (kRoutingGiven) use[b] = ld_weak(ids + (u64)t * k + j) >= 0;
          if (capacity) use[b] = ld_cg_u32(drops + (u64)t * k + j) != c.epoch && use[b];
        }
        next(load);
      }
    }
    // In slot order, one item after the other: the sum is the same bits however the loads were
    // batched, and an item's output is stored after its last slot.
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b) {
      if (q0 + b >= pairs) break;
      if (use[b]) {
        float y[kVecElems];
        unpack(rows[b], y);
#pragma unroll
        for (int i = 0; i < kVecElems; ++i) acc[i] = fmaf(w[b], y[i], acc[i]);
      }
      if (sum.slot == slots - 1) {
        alignas(16) elem_t o[kVecElems];
#pragma unroll
        for (int i = 0; i < kVecElems; ++i) {
          o[i] = from_float(acc[i]);
          acc[i] = 0.0f;
        }
        st_v4(c.out + (u64)token(sum) * H + (u64)sum.vec * kVecElems, *reinterpret_cast<const uint4*>(o));
      }
      next(sum);
    }
  }
  if (threadIdx.x == 0) trace_record(p, c, scope, kTaskCombine, c.block, 0);
  return true;
}

}  // namespace flashmoe
