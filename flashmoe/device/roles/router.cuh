// Route one 64-token chunk of this rank: router logits in fp32 (CUDA cores, fixed summation order),
// scores, the group limit, top-k and the combine weights, exactly as flashmoe/reference.py route()
// defines them; then the chunk's token counts per expert and per destination rank, which the
// prefix step turns into every token's position at its destinations.
//
// The logits are fp32 FMAs in a fixed order: tensor cores would round x W_router products in
// bf16/tf32 and move near-tie top-k decisions away from the fp32 contract. The order: K splits into
// 64-wide segments; each segment is one FMA chain from 0 over its k in order, and the logit is the
// segments' sum, added in segment order from 0. One chain over all of K would be as exact, but a
// token alone (decode) would then wait for H dependent FMAs (7168 x 4 cycles); segments let its
// chains run side by side, at one extra add per 64 FMAs in prefill.
//
// Three ways to share the logits out, by the number of chunks; all follow the order above, so
// they give the same bits and a token's routing never depends on how many tokens came with it.
// With at least as many chunks as the rank has blocks (prefill), each block computes its chunks
// (router_logits: a 64-token x 128-row tile per pass, one segment per step), then selects. With
// fewer, that would leave blocks idle while a few compute, so every block first takes a share
// (spread_logits), the rank meets at a barrier, and each chunk's block selects: shares are
// 128-row tiles of a chunk, or, for a few tokens, row slices of the chunk's real tokens
// (router_logits_rows: no padding rows; as many segments staged at a time as shared memory holds,
// every (token, row, segment) chain on a thread of its own).
#pragma once

#include "flashmoe/device/common/wait.cuh"
#include "flashmoe/device/common/trace.cuh"

namespace flashmoe {

constexpr int kRouterExpertsPerPass = 128;              // W_router rows per prefill pass
constexpr int kRouterSegment = 64;                      // K per FMA chain (the summation order above)
constexpr int kSegmentPitch = kRouterSegment + 1;       // floats a staged segment takes: with the +1,
                                                        // the rows (and segments) threads read side
                                                        // by side start in different banks
constexpr int kXVecsPerSegment = kRouterSegment / kVecElems;   // 16-byte vectors of x
constexpr int kWVecsPerSegment = kRouterSegment / 4;           // and of W_router (fp32)

// Shared memory of route_chunk (flashmoe/host/plan.py phase_smem_bytes()). Decode staging
// (router_logits_rows) reuses it and whatever else of the phase area its segments need.
// Selection (route_token) then holds each warp's E selection values where x and W_router were.
struct RouterSmem {
  float x[kChunkTokens][kSegmentPitch];
  float w[kRouterExpertsPerPass][kSegmentPitch];
  i32 counts[1];   // [E + W]: tokens per expert, then per destination rank (the chunk's counts)
};
static_assert(kWarps * kMaxExperts <= (kChunkTokens + kRouterExpertsPerPass) * kSegmentPitch,
              "every warp's selection values fit before RouterSmem::counts");

// The 16-byte vectors the router reads: x of token t and W_router row e from column k (H is a
// multiple of a vector, plan.py unsupported(), so a vector is wholly inside or outside the row);
// zeros past the row or the router rows, so every segment is a chain of 64 FMAs.
__device__ __forceinline__ uint4 x_vec(const Params& p, const Ctx& c, int t, int k) {
  return k < p.hidden ? ld_nc_v4(c.x + (u64)t * p.hidden + k) : make_uint4(0, 0, 0, 0);
}
__device__ __forceinline__ uint4 w_vec(const Params& p, int rows, int e, int k) {
  return e < rows && k < p.hidden ? ld_nc_v4(p.router_weight + (u64)e * p.hidden + k) : make_uint4(0, 0, 0, 0);
}
__device__ __forceinline__ void put_x_vec(float* dst, uint4 v) {
  const elem_t* e = reinterpret_cast<const elem_t*>(&v);
#pragma unroll
  for (int j = 0; j < kVecElems; ++j) dst[j] = to_float(e[j]);
}
__device__ __forceinline__ void put_w_vec(float* dst, uint4 v) {
  dst[0] = __uint_as_float(v.x);
  dst[1] = __uint_as_float(v.y);
  dst[2] = __uint_as_float(v.z);
  dst[3] = __uint_as_float(v.w);
}

// n 16-byte vectors from global into shared memory, load(u) -> store(u, v), kStageBatch loads in
// flight per thread. One at a time, a block streamed x at ~6 GB/s (H200 traces of 446305b).
constexpr int kStageBatch = 8;
template <class Load, class Store>
__device__ __forceinline__ void stage_vectors(int n, const Load& load, const Store& store) {
  for (int u0 = threadIdx.x; u0 < n; u0 += kStageBatch * kThreads) {
    uint4 v[kStageBatch];
#pragma unroll
    for (int b = 0; b < kStageBatch; ++b) {
      const int u = u0 + b * kThreads;
      v[b] = u < n ? load(u) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int b = 0; b < kStageBatch; ++b) {
      const int u = u0 + b * kThreads;
      if (u < n) store(u, v[b]);
    }
  }
}

// One segment's chain.
__device__ __forceinline__ float segment_dot(const float* x, const float* w) {
  float acc = 0.0f;
#pragma unroll 16
  for (int k = 0; k < kRouterSegment; ++k) acc = fmaf(x[k], w[k], acc);
  return acc;
}

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

// Router row e's logit of token t: a routed expert's into the logits, the shared-expert gate's row
// (e = E) through its sigmoid into the gates; rows past those are padding. (The regions' addresses
// are found here, not held by the callers across their K loops.)
__device__ __forceinline__ void store_logit(const Params& p, const Ctx& c, int t, int e, float v) {
  if (e < p.num_experts) st_weak(region<float>(p, c.slice, kLogits) + (u64)t * p.num_experts + e, v);
  else if (e == p.num_experts && p.shared_gate)
    st_weak(region<float>(p, c.slice, kSharedGate) + t, div_full(1.0f, 1.0f + expf(-v)));
}

// logits[t][e] of chunk `chunk`'s tokens for router rows [e0, e0 + 128) (E, then the shared-expert
// gate's row; rows past those are zeros and not stored).
__device__ void router_logits(const Params& p, const Ctx& c, int chunk, int e0) {
  RouterSmem& sm = *reinterpret_cast<RouterSmem*>(c.smem());
  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int rows = p.num_experts + (p.shared_gate ? 1 : 0);
  const int H = p.hidden;
  // 256 virtual threads compute the 64 x 128 tile: 4 tokens x 8 rows each.
  constexpr int kVirtual = 256;
  constexpr int kPerThread = (kVirtual + kThreads - 1) / kThreads;
  float total[kPerThread][4][8];
#pragma unroll
  for (int vt = 0; vt < kPerThread; ++vt)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) total[vt][i][j] = 0.0f;
  for (int k0 = 0; k0 < H; k0 += kRouterSegment) {
    __syncthreads();   // the last segment's reads are done
    // The segment of x, then of W_router, into shared memory, in 16-byte vectors. (Holding the
    // next segment's vectors in registers while this one computes spilled in the 168-register kernel.)
    constexpr int kXVecs = kChunkTokens * kXVecsPerSegment;
    stage_vectors(kXVecs + kRouterExpertsPerPass * kWVecsPerSegment,
      [&](int u) {
        if (u < kXVecs) {
          const int t = u / kXVecsPerSegment;
          return t < ntok ? x_vec(p, c, t0 + t, k0 + (u % kXVecsPerSegment) * kVecElems) : make_uint4(0, 0, 0, 0);
        }
        u -= kXVecs;
        return w_vec(p, rows, e0 + u / kWVecsPerSegment, k0 + (u % kWVecsPerSegment) * 4);
      },
      [&](int u, uint4 v) {
        if (u < kXVecs) put_x_vec(&sm.x[u / kXVecsPerSegment][(u % kXVecsPerSegment) * kVecElems], v);
        else put_w_vec(&sm.w[(u - kXVecs) / kWVecsPerSegment][((u - kXVecs) % kWVecsPerSegment) * 4], v);
      });
    __syncthreads();
#pragma unroll
    for (int vt = 0; vt < kPerThread; ++vt) {
      const int v = threadIdx.x + vt * kThreads;
      if (v >= kVirtual) break;
      const int ty = v / 16, tx = v % 16;
      float acc[4][8];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
      for (int k = 0; k < kRouterSegment; ++k) {
        float xv[4], wv[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = sm.x[ty * 4 + i][k];
#pragma unroll
        for (int j = 0; j < 8; ++j) wv[j] = sm.w[tx + 16 * j][k];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) total[vt][i][j] += acc[i][j];
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
      for (int j = 0; j < 8; ++j) store_logit(p, c, t0 + t, e0 + tx + 16 * j, total[vt][i][j]);
    }
  }
}

// Decode: router rows [e0, e0 + ne) for the `ntok` real tokens of chunk `chunk`. Thread i < ntok *
// ne sums pair (token i / ne, row i % ne). Each step stages as many segments of the tokens' x
// and the rows' W_router as the phase area holds (at least one: plan.py phase_smem_bytes()), every
// thread runs chains of (pair, segment), and each pair's thread adds its chains in segment order.
__device__ void router_logits_rows(const Params& p, const Ctx& c, int chunk, int e0, int ne) {
  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int rows = p.num_experts + (p.shared_gate ? 1 : 0);
  const int pairs = ntok * ne;
  const int nseg = ceil_div(p.hidden, kRouterSegment);
  const int per_segment = (ntok + ne) * kSegmentPitch + pairs;   // floats: x, W_router, chain sums
  const int step = max(1, min(nseg, static_cast<int>(p.smem_sched_offset / 4) / per_segment));
  float* xs = reinterpret_cast<float*>(c.smem());   // [ntok][segments][kSegmentPitch]
  float* ws = xs + ntok * step * kSegmentPitch;   // [ne][segments][kSegmentPitch]
  float* sums = ws + ne * step * kSegmentPitch;   // [pairs][segments]
  float total = 0.0f;
  for (int s0 = 0; s0 < nseg; s0 += step) {
    const int segs = min(step, nseg - s0);
    const int nx = ntok * segs * kXVecsPerSegment, nw = ne * segs * kWVecsPerSegment;
    __syncthreads();   // the last step's reads are done
    // A staged row is (token or router row) * segs + segment: x's rows, then W_router's.
    stage_vectors(nx + nw,
      [&](int u) {
        if (u < nx) {
          const int row = u / kXVecsPerSegment, k = (u % kXVecsPerSegment) * kVecElems;
          return x_vec(p, c, t0 + row / segs, (s0 + row % segs) * kRouterSegment + k);
        }
        u -= nx;
        const int row = u / kWVecsPerSegment, k = (u % kWVecsPerSegment) * 4;
        return w_vec(p, rows, e0 + row / segs, (s0 + row % segs) * kRouterSegment + k);
      },
      [&](int u, uint4 v) {
        if (u < nx) put_x_vec(xs + (u / kXVecsPerSegment) * kSegmentPitch + (u % kXVecsPerSegment) * kVecElems, v);
        else put_w_vec(ws + ((u - nx) / kWVecsPerSegment) * kSegmentPitch + ((u - nx) % kWVecsPerSegment) * 4, v);
      });
    __syncthreads();
    for (int q = threadIdx.x; q < pairs * segs; q += kThreads) {
      const int pair = q / segs, s = q % segs;
      const float* x = xs + ((pair / ne) * segs + s) * kSegmentPitch;
      sums[q] = segment_dot(x, ws + ((pair % ne) * segs + s) * kSegmentPitch);
    }
    __syncthreads();
    if (threadIdx.x < pairs)
      for (int s = 0; s < segs; ++s) total += sums[threadIdx.x * segs + s];
  }
  if (threadIdx.x < pairs)
    store_logit(p, c, t0 + threadIdx.x / ne, e0 + threadIdx.x % ne, total);
}

// Whether the rank computes its logits first, every block a share (spread_logits, then a rank
// barrier), rather than each block its own chunks inside route_chunk: with fewer chunks than blocks.
__device__ __forceinline__ bool logits_first(const Params& p, int nchunks) {
  return nchunks > 0 && nchunks < p.blocks_per_rank;
}

// With fewer chunks than blocks: the rank's logits, shared out over every block before any chunk
// selects. Two ways to cut them, and the one with fewer shared-memory reads on the busiest block
// runs (both are bound by those reads, not by their FMAs):
//   tiles  (chunk, 128-row pass) items of router_logits: 12 reads per 32 FMAs (4 x, 8 W_router per
//          k), but a whole 64-token tile however few tokens the chunk has;
//   slices (chunk, ne rows) items of router_logits_rows: 2 reads per FMA, only the real tokens,
//          ne as wide as one pair per thread and one staged segment in RouterSmem allow and
//          narrow enough that every block gets about one slice.
// A few tokens take slices (one token: ~E / blocks rows a block instead of a 64 x 128 tile), more
// take tiles (E = 256 on 132 blocks: slices up to 768 tokens).
__device__ void spread_logits(const Params& p, const Ctx& c, int nchunks) {
  const int rows = p.num_experts + (p.shared_gate ? 1 : 0);
  const int ntok_max = min(kChunkTokens, c.num_tokens);
  const int wide = min(kRouterExpertsPerPass, kThreads / ntok_max);
  const int ne = max(1, min(wide, ceil_div(rows * nchunks, p.blocks_per_rank)));
  const int slices = ceil_div(rows, ne), passes = ceil_div(rows, kRouterExpertsPerPass);
  // Shared-memory reads per k of the busiest block.
  const int slice_reads = ceil_div(nchunks * slices, p.blocks_per_rank) * ntok_max * ne * 2;
  constexpr int kTileReads = kChunkTokens * kRouterExpertsPerPass / 32 * 12;
  const int tile_reads = ceil_div(nchunks * passes, p.blocks_per_rank) * kTileReads;
  const bool by_slices = slice_reads <= tile_reads;
  const int per_chunk = by_slices ? slices : passes;
  for (int item = c.block; item < nchunks * per_chunk; item += p.blocks_per_rank) {
    TraceScope scope;
    const int chunk = item / per_chunk;
    const int e0 = (item % per_chunk) * (by_slices ? ne : kRouterExpertsPerPass);
    if (by_slices) router_logits_rows(p, c, chunk, e0, min(ne, rows - e0));
    else router_logits(p, c, chunk, e0);
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
// experts l, l + 32, ...; their selection values (score plus bias) go to the warp's `sel` in shared
// memory once, for the group pass and the k rounds of arg-best; lane j < k scores its choice again
// for its weight. (Scoring every expert in every round from global memory took 82-105 us a chunk
// at E = 128, k = 8 in the H200 traces of 446305b.)
__device__ void route_token(const Params& p, const float* logits_row, float* sel, i32* ids_out,
                            float* weights_out, i32* counts, int lane) {
  const int E = p.num_experts;
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
    return p.scoring == 0 ? div_full(expf(l - m), sum) : div_full(1.0f, 1.0f + expf(-l));
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
  // Each thread zeroes the counts it stored for the last chunk (store_chunk_counts); router_logits
  // stays clear of them.
  for (int i = threadIdx.x; i < p.num_experts + p.world; i += kThreads) sm.counts[i] = 0;
  if (!logits_done)
    for (int e0 = 0; e0 < p.num_experts + (p.shared_gate ? 1 : 0); e0 += kRouterExpertsPerPass)
      router_logits(p, c, chunk, e0);
  __syncthreads();   // the counts are zero and the chunk's logits in before any warp reads them

  const float* logits = region<float>(p, c.slice, kLogits);
  i32* ids = region<i32>(p, c.slice, kTopkIds);
  float* weights = region<float>(p, c.slice, kTopkWeights);

  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* sel = &sm.x[0][0] + warp * p.num_experts;
  for (int tl = warp; tl < ntok; tl += kWarps) {
    const u64 t = t0 + tl;
    route_token(p, logits + t * p.num_experts, sel, ids + t * p.top_k, weights + t * p.top_k, sm.counts, lane);
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
