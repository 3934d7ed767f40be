// Router logits in fp32 (CUDA cores, fixed summation order), exactly as flashmoe/reference.py
// router_logits() defines them; selection (router.cuh) turns them into each token's experts.
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
// (router_tile: 64 tokens x 128 router rows a pass, 64 rows for the last 64 or fewer; one segment
// per step), then selects. With fewer, that would leave blocks idle while a few compute, so every
// block first takes a share (spread_logits), the rank meets at a barrier, and each chunk's block
// selects: shares are tiles of a chunk (64-row ones when that keeps more blocks busy), or, for a
// few tokens, row slices of the chunk's real tokens (router_logits_rows: no padding rows; as many
// segments staged at a time as shared memory holds, every (token, row, segment) chain on a thread
// of its own).
#pragma once

#include "flashmoe/device/common/wait.cuh"
#include "flashmoe/device/common/trace.cuh"

namespace flashmoe {

constexpr int kRouterTileRows = 128;                    // W_router rows of a prefill tile
constexpr int kRouterHalfRows = 64;                     // and of a half tile
constexpr int kRouterSegment = 64;                      // K per FMA chain (the summation order above)
constexpr int kSegmentPitch = kRouterSegment + 1;       // floats a segment takes in router_logits_rows:
                                                        // with the +1, the rows (and segments) threads
                                                        // read side by side start in different banks
constexpr int kXVecsPerSegment = kRouterSegment / kVecElems;   // 16-byte vectors of x
constexpr int kWVecsPerSegment = kRouterSegment / 4;           // and of W_router (fp32)

// Shared memory of route_chunk (flashmoe/host/plan.py phase_smem_bytes()): a tile's segment,
// k-major, so that a thread reads its 4 tokens and each 4 of its rows as one 16-byte vector.
// Decode staging (router_logits_rows) reuses it and whatever else of the phase area its segments
// need. Selection (router.cuh route_token) then holds each warp's E + Z selection values there.
struct RouterSmem {
  float x[kRouterSegment][kChunkTokens];
  float w[kRouterSegment][kRouterTileRows];
  i32 counts[1];   // [E + W]: tokens per expert, then per destination rank (the chunk's counts)
};
static_assert(kWarps * kMaxExperts <= kRouterSegment * (kChunkTokens + kRouterTileRows),
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
// A vector's values as floats, `stride` floats apart from dst (1: along the row; a tile's pitch:
// down a k-major column).
__device__ __forceinline__ void put_x_vec(float* dst, uint4 v, int stride = 1) {
  const elem_t* e = reinterpret_cast<const elem_t*>(&v);
#pragma unroll
  for (int j = 0; j < kVecElems; ++j) dst[j * stride] = to_float(e[j]);
}
__device__ __forceinline__ void put_w_vec(float* dst, uint4 v, int stride = 1) {
  dst[0] = __uint_as_float(v.x);
  dst[stride] = __uint_as_float(v.y);
  dst[2 * stride] = __uint_as_float(v.z);
  dst[3 * stride] = __uint_as_float(v.w);
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

// Router row e's logit of token t: a router expert's (routed or identity), plus its router bias,
// into the logits; the shared-expert gate's row (e = E + Z) through its sigmoid into the gates;
// rows past those are padding.
// (The regions' addresses are found here, not held by the callers across their K loops.)
__device__ __forceinline__ void store_logit(const Params& p, const Ctx& c, int t, int e, float v) {
  if (e < p.router_experts)
    st_weak(region<float>(p, c.slice, kLogits) + (u64)t * p.router_experts + e,
            p.router_bias ? v + p.router_bias[e] : v);
  else if (e == p.router_experts && p.shared_gate)
    st_weak(region<float>(p, c.slice, kSharedGate) + t, div_full(1.0f, 1.0f + expf(-v)));
}

// logits[t][e] of chunk `chunk`'s tokens for router rows [e0, e0 + 64 kHalves) (E + Z, then the
// shared-expert gate's row; rows past those are zeros and not stored). 256 virtual threads, 16 x 16,
// each 4 tokens (4 ty..) x 4 rows of each half (64 h + 4 tx..): per k a warp reads its two x
// vectors as one broadcast and each half's 16 W_router vectors as 2 wavefronts, so a full tile
// issues 5 wavefronts for 32 FMAs a lane and is bound by its FMAs (a row-major tile read scalars,
// 12 wavefronts, and was bound by them).
template <int kHalves>
__device__ void router_tile(const Params& p, const Ctx& c, int chunk, int e0) {
  constexpr int kRows = kRouterHalfRows * kHalves;
  static_assert(kRows <= kRouterTileRows, "a tile's rows fit RouterSmem::w");
  RouterSmem& sm = *reinterpret_cast<RouterSmem*>(c.smem());
  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int rows = p.router_experts + (p.shared_gate ? 1 : 0);
  constexpr int kVirtual = 256;
  constexpr int kPerThread = (kVirtual + kThreads - 1) / kThreads;
  constexpr int kCols = 4 * kHalves;
  float total[kPerThread][4][kCols];
#pragma unroll
  for (int vt = 0; vt < kPerThread; ++vt)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) total[vt][i][j] = 0.0f;
  for (int k0 = 0; k0 < p.hidden; k0 += kRouterSegment) {
    __syncthreads();   // the last segment's reads are done
    // The segment of x, then of W_router, into shared memory, in 16-byte vectors: consecutive
    // threads take consecutive tokens (rows), so each store of a column is conflict-free. (Holding
    // the next segment's vectors in registers while this one computes spilled in the 168-register
    // kernel.)
    constexpr int kXVecs = kChunkTokens * kXVecsPerSegment;
    stage_vectors(kXVecs + kRows * kWVecsPerSegment,
      [&](int u) {
        if (u < kXVecs) {
          const int t = u % kChunkTokens;
          return t < ntok ? x_vec(p, c, t0 + t, k0 + (u / kChunkTokens) * kVecElems) : make_uint4(0, 0, 0, 0);
        }
        u -= kXVecs;
        return w_vec(p, rows, e0 + u % kRows, k0 + (u / kRows) * 4);
      },
      [&](int u, uint4 v) {
        if (u < kXVecs) put_x_vec(&sm.x[(u / kChunkTokens) * kVecElems][u % kChunkTokens], v, kChunkTokens);
        else put_w_vec(&sm.w[((u - kXVecs) / kRows) * 4][(u - kXVecs) % kRows], v, kRouterTileRows);
      });
    __syncthreads();
#pragma unroll
    for (int vt = 0; vt < kPerThread; ++vt) {
      const int v = threadIdx.x + vt * kThreads;
      if (v >= kVirtual) break;
      const int ty = v / 16, tx = v % 16;
      float acc[4][kCols];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[i][j] = 0.0f;
      for (int k = 0; k < kRouterSegment; ++k) {
        const float4 x4 = *reinterpret_cast<const float4*>(&sm.x[k][ty * 4]);
        const float xv[4] = {x4.x, x4.y, x4.z, x4.w};
        float wv[kCols];
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
          const float4 w4 = *reinterpret_cast<const float4*>(&sm.w[k][h * kRouterHalfRows + tx * 4]);
          wv[4 * h] = w4.x;
          wv[4 * h + 1] = w4.y;
          wv[4 * h + 2] = w4.z;
          wv[4 * h + 3] = w4.w;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < kCols; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) total[vt][i][j] += acc[i][j];
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
      for (int j = 0; j < kCols; ++j)
        store_logit(p, c, t0 + t, e0 + (j / 4) * kRouterHalfRows + tx * 4 + j % 4, total[vt][i][j]);
    }
  }
}

// Router rows [e0, e0 + n), n <= 128, of chunk `chunk` as one tile: a half for 64 rows or fewer.
__device__ __forceinline__ void logits_tile(const Params& p, const Ctx& c, int chunk, int e0, int n) {
  if (n <= kRouterHalfRows) router_tile<1>(p, c, chunk, e0);
  else router_tile<2>(p, c, chunk, e0);
}

// Decode: router rows [e0, e0 + ne) for the `ntok` real tokens of chunk `chunk`. Thread i < ntok *
// ne sums pair (token i / ne, row i % ne). Each step stages as many segments of the tokens' x
// and the rows' W_router as the phase area holds (at least one: plan.py phase_smem_bytes()), every
// thread runs chains of (pair, segment), and each pair's thread adds its chains in segment order.
__device__ void router_logits_rows(const Params& p, const Ctx& c, int chunk, int e0, int ne) {
  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const int rows = p.router_experts + (p.shared_gate ? 1 : 0);
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
// selects. Three ways to cut them, and the one that costs the busiest block least per k runs:
//   tiles  (chunk, 128-row pass) items of router_tile: bound by their FMAs, 64 x 128 a k (a
//          pass of 64 rows or fewer runs as a half tile), but a whole 64-token tile however few
//          tokens the chunk has;
//   halves (chunk, 64-row pass) items: the same FMAs a row, twice the items, so more blocks busy
//          while the passes are fewer than the blocks;
//   slices (chunk, ne rows) items of router_logits_rows: bound by their shared-memory reads, 2 a
//          FMA, only the real tokens, ne as wide as one pair per thread and one staged segment in
//          the phase area allow and narrow enough that every block gets about one slice.
// Costs are in shared-memory reads (32 a cycle), a tile's FMA cycles (128 FMAs each) counted as
// the 32 reads the cycle would hold. A few tokens take slices (one token: ~E / blocks rows a
// block instead of a tile), more take tiles (E = 256 on 132 blocks: slices up to 192 tokens).
__device__ void spread_logits(const Params& p, const Ctx& c, int nchunks) {
  const int rows = p.router_experts + (p.shared_gate ? 1 : 0);
  const int ntok_max = min(kChunkTokens, c.num_tokens);
  const int wide = min(kRouterTileRows, kThreads / ntok_max);
  const int ne = max(1, min(wide, ceil_div(rows * nchunks, p.blocks_per_rank)));
  const int slices = ceil_div(rows, ne);
  const int slice_cost = ceil_div(nchunks * slices, p.blocks_per_rank) * ntok_max * ne * 2;
  auto tile_cost = [&](int width) {
    const int rows_run = min(width, ceil_div(rows, kRouterHalfRows) * kRouterHalfRows);
    return ceil_div(nchunks * ceil_div(rows, width), p.blocks_per_rank) * rows_run * 16;
  };
  const int cost_full = tile_cost(kRouterTileRows), cost_half = tile_cost(kRouterHalfRows);
  const bool by_slices = slice_cost <= min(cost_full, cost_half);
  const int width = by_slices ? ne : cost_half < cost_full ? kRouterHalfRows : kRouterTileRows;
  const int per_chunk = ceil_div(rows, width);
  for (int item = c.block; item < nchunks * per_chunk; item += p.blocks_per_rank) {
    TraceScope scope;
    const int chunk = item / per_chunk;
    const int e0 = (item % per_chunk) * width;
    if (by_slices) router_logits_rows(p, c, chunk, e0, min(ne, rows - e0));
    else logits_tile(p, c, chunk, e0, min(width, rows - e0));
    if (threadIdx.x == 0) trace_record(p, c, scope, kTaskRoute, chunk, e0);
  }
}

}  // namespace flashmoe
