// Combine: once every rank has signalled that its results for this rank are written, each token's
// output is the sum of its slots' rows weighted by the routing weights, in slot order, in fp32,
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
  TraceScope scope;
  for (int t = c.block; t < c.num_tokens; t += p.blocks_per_rank) {
    for (int v = threadIdx.x; v * kVecElems < H; v += kThreads) {
      float acc[kVecElems];
#pragma unroll
      for (int i = 0; i < kVecElems; ++i) acc[i] = 0.0f;
      for (int j = 0; j < k; ++j) {
        if (kRoutingGiven && ld_weak(ids + (u64)t * k + j) < 0) continue;
        if (capacity && ld_cg_u32(drops + (u64)t * k + j) == c.epoch) continue;
        const float w = ld_weak(weights + (u64)t * k + j);
        float y[kVecElems];
        unpack(ld_cg_v4(ret + ret_row_index(p, t, j) * H + (u64)v * kVecElems), y);
#pragma unroll
        for (int i = 0; i < kVecElems; ++i) acc[i] = fmaf(w, y[i], acc[i]);
      }
      if (p.shared_intermediate) {
        const float g = p.shared_gate ? ld_weak(shared_gate + t) : 1.0f;
        float y[kVecElems];
        unpack(ld_cg_v4(ret + ret_row_index(p, t, k) * H + (u64)v * kVecElems), y);
#pragma unroll
        for (int i = 0; i < kVecElems; ++i) acc[i] = fmaf(g, y[i], acc[i]);
      }
      alignas(16) elem_t o[kVecElems];
#pragma unroll
      for (int i = 0; i < kVecElems; ++i) o[i] = from_float(acc[i]);
      st_v4(c.out + (u64)t * H + (u64)v * kVecElems, *reinterpret_cast<const uint4*>(o));
    }
  }
  if (threadIdx.x == 0) trace_record(p, c, scope, kTaskCombine, c.block, 0);
  return true;
}

}  // namespace flashmoe
