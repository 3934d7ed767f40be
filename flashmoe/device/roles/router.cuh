// Route one 64-token chunk of this rank: router logits in fp32 (CUDA cores, fixed summation order),
// scores, the group limit, top-k and the combine weights, exactly as flashmoe/reference.py route()
// defines them; then the chunk's token counts per expert and per destination rank, which the
// prefix step turns into every token's position at its destinations.
//
// The logits are fp32 FMAs over K in order: tensor cores would round x W_router products in
// bf16/tf32 and move near-tie top-k decisions away from the fp32 contract.
//
// Two ways to share the logits out, by the number of chunks. With at least as many chunks as the
// rank has blocks (prefill), each block computes whole chunks (router_logits: a 64-token x
// 128-row tile per pass). With fewer (decode) that would leave most blocks waiting while a few
// compute 64 token rows each, most of them padding; instead every block takes slices of a
// chunk's router rows for the chunk's real tokens (router_logits_rows), the rank meets at a
// barrier, and each chunk's block selects from the logits. Both run one FMA chain per (token, row)
// over K in the same order, so both give the same bits and a token's routing never depends on
// how many tokens came with it.
#pragma once

#include "flashmoe/device/common/wait.cuh"
#include "flashmoe/device/common/trace.cuh"

namespace flashmoe {

constexpr int kRouterExpertsPerPass = 128;   // W_router rows per shared-memory pass
constexpr int kRouterK = 32;                 // K slice per step
constexpr int kRouterPitch = kRouterK + 1;   // +1: consecutive rows fall in different banks

// Shared memory of route_chunk (flashmoe/host/plan.py phase_smem_bytes()).
struct RouterSmem {
  float x[kChunkTokens][kRouterPitch];
  float w[kRouterExpertsPerPass][kRouterPitch];
  i32 counts[1];   // [E + W]: tokens per expert, then per destination rank (the chunk's counts)
};

// NaN counts as the best value (as torch.sort(descending=True) orders it); ties go to the lower
// expert index. This is the one comparison every selection in routing uses.
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Arg-best over the warp of (value, index, payload); every lane gets the winner.
__device__ __forceinline__ void warp_best(float& v, int& i, float& payload) {
  for (int o = 16; o; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    const float op = __shfl_xor_sync(0xffffffffu, payload, o);
    if (better(ov, oi, v, i)) { v = ov; i = oi; payload = op; }
  }
}

// Router row e's logit of token t: a routed expert's into logits, the shared-expert gate's row
// (e = E) through its sigmoid into shared_gate; rows past those are padding.
__device__ __forceinline__ void store_logit(const Params& p, float* logits, float* shared_gate, int t, int e,
                                            float v) {
  if (e < p.num_experts) st_weak(logits + (u64)t * p.num_experts + e, v);
  else if (e == p.num_experts && p.shared_gate) st_weak(shared_gate + t, 1.0f / (1.0f + expf(-v)));
}

// logits[t][e] for the chunk's tokens and all E (+1 shared-gate) router rows.
__device__ void router_logits(const Params& p, const Ctx& c, int chunk, RouterSmem& sm, float* logits,
                              float* shared_gate) {
  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int rows = p.num_experts + (p.shared_gate ? 1 : 0);
  const int H = p.hidden;
  for (int e0 = 0; e0 < rows; e0 += kRouterExpertsPerPass) {
    // 256 virtual threads compute a 64 x 128 block: 4 tokens x 8 experts each.
    constexpr int kVirtual = 256;
    constexpr int kPerThread = (kVirtual + kThreads - 1) / kThreads;
    float acc[kPerThread][4][8];
#pragma unroll
    for (int vt = 0; vt < kPerThread; ++vt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[vt][i][j] = 0.0f;
    for (int k0 = 0; k0 < H; k0 += kRouterK) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < kChunkTokens * kRouterK; idx += kThreads) {
        const int t = idx / kRouterK, k = idx % kRouterK;
        sm.x[t][k] = (t < ntok && k0 + k < H) ? to_float(c.x[(u64)(t0 + t) * H + k0 + k]) : 0.0f;
      }
      for (int idx = threadIdx.x; idx < kRouterExpertsPerPass * kRouterK; idx += kThreads) {
        const int e = idx / kRouterK, k = idx % kRouterK;
        sm.w[e][k] = (e0 + e < rows && k0 + k < H) ? p.router_weight[(u64)(e0 + e) * H + k0 + k] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int vt = 0; vt < kPerThread; ++vt) {
        const int v = threadIdx.x + vt * kThreads;
        if (v >= kVirtual) break;
        const int ty = v / 16, tx = v % 16;
        for (int k = 0; k < kRouterK; ++k) {
          float xv[4], wv[8];
#pragma unroll
          for (int i = 0; i < 4; ++i) xv[i] = sm.x[ty * 4 + i][k];
#pragma unroll
          for (int j = 0; j < 8; ++j) wv[j] = sm.w[tx + 16 * j][k];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[vt][i][j] = fmaf(xv[i], wv[j], acc[vt][i][j]);
        }
      }
    }
#pragma unroll
    for (int vt = 0; vt < kPerThread; ++vt) {
      const int v = threadIdx.x + vt * kThreads;
      if (v >= kVirtual) break;
      const int ty = v / 16, tx = v % 16;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = ty * 4 + i;
        if (t >= ntok) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          store_logit(p, logits, shared_gate, t0 + t, e0 + tx + 16 * j, acc[vt][i][j]);
        }
      }
    }
  }
  __syncthreads();   // logits of the whole chunk are written before any warp reads a token's row
}

// Decode: router rows [e0, e0 + ne) for the `ntok` real tokens of chunk `chunk`, one chain per
// thread (ntok * ne <= kThreads), through the same shared-memory K slices as router_logits.
__device__ void router_logits_rows(const Params& p, const Ctx& c, int chunk, int e0, int ne, RouterSmem& sm,
                                   float* logits, float* shared_gate) {
  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int rows = p.num_experts + (p.shared_gate ? 1 : 0);
  const int H = p.hidden;
  const int t = threadIdx.x / ne, r = threadIdx.x % ne;
  const bool mine = t < ntok;
  float acc = 0.0f;
  for (int k0 = 0; k0 < H; k0 += kRouterK) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < ntok * kRouterK; idx += kThreads) {
      const int tt = idx / kRouterK, k = idx % kRouterK;
      sm.x[tt][k] = k0 + k < H ? to_float(c.x[(u64)(t0 + tt) * H + k0 + k]) : 0.0f;
    }
    for (int idx = threadIdx.x; idx < ne * kRouterK; idx += kThreads) {
      const int e = idx / kRouterK, k = idx % kRouterK;
      sm.w[e][k] = (e0 + e < rows && k0 + k < H) ? p.router_weight[(u64)(e0 + e) * H + k0 + k] : 0.0f;
    }
    __syncthreads();
    if (mine)
      for (int k = 0; k < kRouterK; ++k) acc = fmaf(sm.x[t][k], sm.w[r][k], acc);
  }
  if (mine) store_logit(p, logits, shared_gate, t0 + t, e0 + r, acc);
}

// Decode: this block's slices of every chunk's router rows. Slices are as wide as a chunk's tokens
// allow (one chain per thread) and narrow enough that every block gets about one.
__device__ void spread_logits(const Params& p, const Ctx& c, int nchunks) {
  RouterSmem& sm = *reinterpret_cast<RouterSmem*>(c.smem);
  float* logits = region<float>(p, c.slice, kLogits);
  float* shared_gate = region<float>(p, c.slice, kSharedGate);
  const int rows = p.num_experts + (p.shared_gate ? 1 : 0);
  const int ntok_max = min(kChunkTokens, c.num_tokens);
  const int wide = min(kRouterExpertsPerPass, kThreads / ntok_max);
  const int ne = max(1, min(wide, ceil_div(rows * nchunks, p.blocks_per_rank)));
  const int slices = ceil_div(rows, ne);
  for (int item = c.block; item < nchunks * slices; item += p.blocks_per_rank) {
    TraceScope scope;
    const int chunk = item / slices, e0 = (item % slices) * ne;
    router_logits_rows(p, c, chunk, e0, min(ne, rows - e0), sm, logits, shared_gate);
    if (threadIdx.x == 0) trace_record(p, c, scope, kTaskRoute, chunk, e0);
  }
}

// Lane j < k holds the token's j-th choice (id -1: none): store it and count the token once per
// expert and once per destination rank (lane j counts rank r unless an earlier slot did).
__device__ void record_choice(const Params& p, int my_id, float my_w, i32* ids_out, float* weights_out,
                              i32* counts, int lane) {
  const bool chosen = lane < p.top_k && my_id >= 0;
  if (lane < p.top_k) {
    st_weak(ids_out + lane, my_id);
    st_weak(weights_out + lane, my_w);
  }
  if (chosen) atomicAdd(&counts[my_id], 1);
  const int dst = chosen ? my_id / p.experts_per_rank : -1;
  bool first = chosen;
  for (int jj = 0; jj < p.top_k; ++jj) {
    const int other = __shfl_sync(0xffffffffu, dst, jj);
    if (jj < lane && other == dst) first = false;
  }
  if (first) atomicAdd(&counts[p.num_experts + dst], 1);
}

// One warp picks the experts of the token whose logits are `logits_row`. Lane l looks after
// experts l, l + 32, ...; scores are recomputed from the logits on every pass instead of being
// held in registers (a few expf per lane and pass, far less than the logits GEMM).
__device__ void route_token(const Params& p, const float* logits_row, i32* ids_out, float* weights_out,
                            i32* counts, int lane) {
  const int E = p.num_experts;
  const int per_lane = ceil_div(E, 32);   // <= 32: one bit per entry in `taken`
  float m = neg_inf(), sum = 0.0f;
  if (p.scoring == 0) {   // softmax over all E: max, then sum of exp
    for (int i = 0; i < per_lane; ++i) {
      const int e = i * 32 + lane;
      if (e < E) m = fmaxf(m, ld_weak(logits_row + e));
    }
    m = warp_max(m);
    for (int i = 0; i < per_lane; ++i) {
      const int e = i * 32 + lane;
      if (e < E) sum += expf(ld_weak(logits_row + e) - m);
    }
    sum = warp_sum(sum);
  }
  auto score = [&](int e) {
    const float l = ld_weak(logits_row + e);
    return p.scoring == 0 ? expf(l - m) / sum : 1.0f / (1.0f + expf(-l));
  };
  auto selection = [&](int e) { return score(e) + (p.has_bias ? p.selection_bias[e] : 0.0f); };

  u32 eligible_groups = 0xffffffffu;
  const int group_size = E / p.n_group;
  if (p.n_group > 1) {
    // Group scores from the selection values: the sum of each group's two best (top2_sum) or its
    // best (max). Lane g ends up holding group g's score.
    float my_group_score = neg_inf();
    for (int g = 0; g < p.n_group; ++g) {
      float b1 = neg_inf(), b2 = neg_inf();
      int i1 = 0x7fffffff;
      for (int e = g * group_size + lane; e < (g + 1) * group_size; e += 32) {
        const float v = selection(e);
        if (better(v, e, b1, i1)) { b2 = b1; b1 = v; i1 = e; }
        else if (better(v, e, b2, 0x7fffffff)) b2 = v;
      }
      // Merge the lanes' (best, second) pairs into the two best values of the group.
      for (int o = 16; o; o >>= 1) {
        const float o1 = __shfl_xor_sync(0xffffffffu, b1, o);
        const float o2 = __shfl_xor_sync(0xffffffffu, b2, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i1, o);
        if (better(o1, oi, b1, i1)) {
          b2 = better(b1, i1, o2, 0x7fffffff) ? b1 : o2;
          b1 = o1;
          i1 = oi;
        } else {
          b2 = better(o1, oi, b2, 0x7fffffff) ? o1 : b2;
        }
      }
      if (lane == g) my_group_score = p.group_score == 0 ? b1 + b2 : b1;
    }
    // The topk_group best groups (ties to the lower group index) stay eligible.
    eligible_groups = 0;
    for (int r = 0; r < p.topk_group; ++r) {
      const bool open = lane < p.n_group && !((eligible_groups >> lane) & 1u);
      float v = open ? my_group_score : neg_inf();
      int gi = open ? lane : 0x7fffffff;
      float unused = 0.0f;
      warp_best(v, gi, unused);
      eligible_groups |= 1u << gi;
    }
  }

  // k rounds of arg-best over the eligible experts; lane j keeps the j-th choice.
  u32 taken = 0;   // bit i: expert i * 32 + lane is chosen
  int my_id = -1;
  float my_w = 0.0f;
  for (int j = 0; j < p.top_k; ++j) {
    float v = neg_inf(), s = 0.0f;
    int id = 0x7fffffff;
    for (int i = 0; i < per_lane; ++i) {
      const int e = i * 32 + lane;
      if (e >= E || ((taken >> i) & 1u)) continue;
      const float sel = ((eligible_groups >> (e / group_size)) & 1u) ? selection(e) : neg_inf();
      if (id == 0x7fffffff || better(sel, e, v, id)) { v = sel; id = e; s = score(e); }
    }
    warp_best(v, id, s);
    if ((id & 31) == lane) taken |= 1u << (id >> 5);
    if (lane == j) { my_id = id; my_w = s; }
  }
  if (p.norm_topk) {
    const float total = warp_sum(lane < p.top_k ? my_w : 0.0f);
    my_w = my_w / (total + p.norm_topk_epsilon);
  }
  my_w *= p.routed_scaling_factor;
  record_choice(p, my_id, my_w, ids_out, weights_out, counts, lane);
}

// Copy the caller's choice for one token (routing given): lane j < k reads slot j. An id outside
// 0..E-1 means "no expert": the slot is stored as -1 and neither dispatched nor combined. A token
// that names an expert twice gets it once, in its first slot, with the weights summed in slot
// order (an expert's rows are one per token; reference.experts_forward says the same).
__device__ void given_token(const Params& p, const i32* given_ids, const float* given_weights,
                            i32* ids_out, float* weights_out, i32* counts, int lane) {
  int my_id = -1;
  float my_w = 0.0f;
  if (lane < p.top_k) {
    const i32 id = given_ids[lane];
    if (id >= 0 && id < p.num_experts) {
      my_id = id;
      my_w = given_weights[lane];
    }
  }
  float merged = my_w;
  bool repeat = false;
  for (int jj = 0; jj < p.top_k; ++jj) {
    const int other = __shfl_sync(0xffffffffu, my_id, jj);
    const float other_w = __shfl_sync(0xffffffffu, my_w, jj);
    if (my_id < 0 || other != my_id) continue;
    if (jj < lane) repeat = true;
    else if (jj > lane) merged += other_w;
  }
  record_choice(p, repeat ? -1 : my_id, repeat ? 0.0f : merged, ids_out, weights_out, counts, lane);
}

// The chunk's counts per expert and per destination rank, from shared memory to chunk_counts.
__device__ void store_chunk_counts(const Params& p, const Ctx& c, int chunk, const i32* counts) {
  __syncthreads();
  const int columns = p.num_experts + p.world;
  i32* out = region<i32>(p, c.slice, kChunkCounts) + (u64)chunk * columns;
  for (int i = threadIdx.x; i < columns; i += kThreads) st_weak(out + i, counts[i]);
}

// Route chunk `chunk` of this rank and store its counts into chunk_counts[chunk]; with
// logits_done the rank has computed its logits already (spread_logits, then a rank barrier).
__device__ void route_chunk(const Params& p, const Ctx& c, int chunk, bool logits_done) {
  TraceScope scope;
  RouterSmem& sm = *reinterpret_cast<RouterSmem*>(c.smem);
  float* logits = region<float>(p, c.slice, kLogits);
  float* shared_gate = region<float>(p, c.slice, kSharedGate);
  i32* ids = region<i32>(p, c.slice, kTopkIds);
  float* weights = region<float>(p, c.slice, kTopkWeights);
  for (int i = threadIdx.x; i < p.num_experts + p.world; i += kThreads) sm.counts[i] = 0;
  if (logits_done) __syncthreads();   // the counts are zero before any warp counts a token
  else router_logits(p, c, chunk, sm, logits, shared_gate);

  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int tl = warp; tl < ntok; tl += kWarps) {
    const u64 t = t0 + tl;
    route_token(p, logits + t * p.num_experts, ids + t * p.top_k, weights + t * p.top_k, sm.counts, lane);
  }
  store_chunk_counts(p, c, chunk, sm.counts);
  if (threadIdx.x == 0) trace_record(p, c, scope, kTaskRoute, chunk, ntok);
}

// The same for a routing the caller gave (kRoutingGiven, a kernel without route_chunk): no
// logits; the ids and weights of LocalRank::topk_ids / topk_weights checked, merged, counted.
__device__ void given_chunk(const Params& p, const Ctx& c, int chunk) {
  TraceScope scope;
  i32* counts = reinterpret_cast<RouterSmem*>(c.smem)->counts;
  i32* ids = region<i32>(p, c.slice, kTopkIds);
  float* weights = region<float>(p, c.slice, kTopkWeights);
  for (int i = threadIdx.x; i < p.num_experts + p.world; i += kThreads) counts[i] = 0;
  __syncthreads();
  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i32* given_ids = p.local[c.local].topk_ids;
  const float* given_weights = p.local[c.local].topk_weights;
  for (int tl = warp; tl < ntok; tl += kWarps) {
    const u64 slots = (u64)(t0 + tl) * p.top_k;
    given_token(p, given_ids + slots, given_weights + slots, ids + slots, weights + slots, counts, lane);
  }
  store_chunk_counts(p, c, chunk, counts);
  if (threadIdx.x == 0) trace_record(p, c, scope, kTaskRoute, chunk, ntok);
}

}  // namespace flashmoe
