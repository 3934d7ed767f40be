// Route one 64-token chunk of this rank: from the router logits (logits.cuh) the scores, the
// group limit, top-k and the combine weights, exactly as flashmoe/reference.py route() defines
// them; then the chunk's token counts per expert and per destination rank, which the prefix step
// turns into every token's position at its destinations.
#pragma once

#include "flashmoe/device/roles/logits.cuh"

namespace flashmoe {

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
// Arg-best over the warp of (value, index); every lane gets the winner.
__device__ __forceinline__ void warp_best(float& v, int& i) {
  for (int o = 16; o; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) { v = ov; i = oi; }
  }
}

// Lane j < k holds the token's j-th choice (id -1: none): store it and count the token once per
// expert and once per destination rank (lane j counts rank r unless an earlier slot did). An
// identity expert (id >= E) is stored and counted nowhere: its row is the token's own, which the
// combine reads from x (combine.cuh).
__device__ void record_choice(const Params& p, int my_id, float my_w, i32* ids_out, float* weights_out,
                              i32* counts, int lane) {
  const bool chosen = lane < p.top_k && my_id >= 0 && my_id < p.num_experts;
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
// experts l, l + 32, ...; their selection values (score plus bias) go to the warp's `sel` in shared
// memory once, for the group pass and the k rounds of arg-best; lane j < k scores its choice again
// for its weight. (Scoring every expert in every round from global memory took 82-105 us a chunk
// at E = 128, k = 8 in the H200 traces of 446305b.) It chooses among the router's E + Z experts.
__device__ void route_token(const Params& p, const float* logits_row, float* sel, i32* ids_out,
                            float* weights_out, i32* counts, int lane) {
  const int E = p.router_experts;
  const int per_lane = ceil_div(E, 32);   // <= 32: one bit per entry in `taken`
  __syncwarp();   // the warp's last token is done with `sel` (its group pass reads other lanes' entries)
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
    if (p.scoring == 0) return div_full(expf(l - m), sum);
    if (p.scoring == 1) return div_full(1.0f, 1.0f + expf(-l));
    return sqrt_approx(l > 20.0f ? l : log1pf(expf(l)));   // sqrt(softplus), torch's threshold of 20
  };
  for (int i = 0; i < per_lane; ++i) {
    const int e = i * 32 + lane;
    if (e < E) sel[e] = score(e) + (p.has_bias ? p.selection_bias[e] : 0.0f);
  }
  __syncwarp();

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
        const float v = sel[e];
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
      warp_best(v, gi);
      eligible_groups |= 1u << gi;
    }
  }

  // k rounds of arg-best over the eligible experts; lane j keeps the j-th choice.
  u32 taken = 0;   // bit i: expert i * 32 + lane is chosen
  int my_id = -1;
  for (int j = 0; j < p.top_k; ++j) {
    float v = neg_inf();
    int id = 0x7fffffff;
    for (int i = 0; i < per_lane; ++i) {
      const int e = i * 32 + lane;
      if (e >= E || ((taken >> i) & 1u)) continue;
      const float se = ((eligible_groups >> (e / group_size)) & 1u) ? sel[e] : neg_inf();
      if (id == 0x7fffffff || better(se, e, v, id)) { v = se; id = e; }
    }
    warp_best(v, id);
    if ((id & 31) == lane) taken |= 1u << (id >> 5);
    if (lane == j) my_id = id;
  }
  float my_w = lane < p.top_k ? score(my_id) : 0.0f;
  if (p.norm_topk) {
    const float total = warp_sum(lane < p.top_k ? my_w : 0.0f);
    my_w = div_full(my_w, total + p.norm_topk_epsilon);
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
  RouterSmem& sm = *reinterpret_cast<RouterSmem*>(c.smem());
  // Each thread zeroes the counts it stored for the last chunk (store_chunk_counts); router_tile
  // stays clear of them.
  for (int i = threadIdx.x; i < p.num_experts + p.world; i += kThreads) sm.counts[i] = 0;
  const int rows = p.router_experts + (p.shared_gate ? 1 : 0);
  if (!logits_done)
    for (int e0 = 0; e0 < rows; e0 += kRouterTileRows) logits_tile(p, c, chunk, e0, min(kRouterTileRows, rows - e0));
  __syncthreads();   // the counts are zero and the chunk's logits in before any warp reads them

  const float* logits = region<float>(p, c.slice, kLogits);
  i32* ids = region<i32>(p, c.slice, kTopkIds);
  float* weights = region<float>(p, c.slice, kTopkWeights);

  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* sel = &sm.x[0][0] + warp * p.router_experts;
  for (int tl = warp; tl < ntok; tl += kWarps) {
    const u64 t = t0 + tl;
    route_token(p, logits + t * p.router_experts, sel, ids + t * p.top_k, weights + t * p.top_k, sm.counts, lane);
  }
  store_chunk_counts(p, c, chunk, sm.counts);
  if (threadIdx.x == 0) trace_record(p, c, scope, kTaskRoute, chunk, ntok);
}

// The same for a routing the caller gave (kRoutingGiven, a kernel without route_chunk): no
// logits; the ids and weights of LocalRank::topk_ids / topk_weights checked, merged, counted.
__device__ void given_chunk(const Params& p, const Ctx& c, int chunk) {
  TraceScope scope;
  i32* counts = reinterpret_cast<RouterSmem*>(c.smem())->counts;
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

