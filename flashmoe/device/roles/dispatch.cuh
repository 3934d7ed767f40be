// Dispatch: every token travels once to each rank that owns one of its experts (not once per
// expert), together with one Entry per (token, expert) telling that rank where the row is, which
// token and slot it answers, and its routing weight.
//
// Positions are deterministic: a source's rows for rank r are numbered in token order (prefix of
// the per-chunk counts), and so are its entries for each expert, so the expert side sees its rows
// in (source rank, token) order whatever the timing.
#pragma once

#include "flashmoe/device/common/transport.cuh"
#include "flashmoe/device/common/trace.cuh"

namespace flashmoe {

// Column prefix of chunk_counts over this rank's chunks -> chunk_base, and the totals to every
// destination: counts[source][e_l] (rows per local expert), [E_l] (rows sent), [E_l + 1] (tokens).
__device__ void prefix_counts(const Params& p, const Ctx& c) {
  TraceScope scope;
  const int columns = p.num_experts + p.world;
  const int nchunks = ceil_div(c.num_tokens, kChunkTokens);
  const i32* counts = region<i32>(p, c.slice, kChunkCounts);
  i32* base = region<i32>(p, c.slice, kChunkBase);
  const u64 counts_off = region_off(p, kCounts, c.bank);
  for (int q = c.block * kThreads + threadIdx.x; q < columns; q += p.blocks_per_rank * kThreads) {
    i32 running = 0;
    for (int ch = 0; ch < nchunks; ++ch) {
      st_weak(base + (u64)ch * columns + q, running);
      running += ld_weak(counts + (u64)ch * columns + q);
    }
    if (q < p.num_experts) {
      const int dst = expert_owner(p, q);
      remote_store_u32(p, dst, counts_off + count_index(p, c.rank, q % p.experts_per_rank) * 4, running);
    } else {
      const int dst = q - p.num_experts;
      remote_store_u32(p, dst, counts_off + count_index(p, c.rank, p.experts_per_rank) * 4, running);
      remote_store_u32(p, dst, counts_off + count_index(p, c.rank, p.experts_per_rank + 1) * 4, c.num_tokens);
    }
  }
  if (threadIdx.x == 0) trace_record(p, c, scope, kTaskPrefix, c.block, 0);
}

// After the barrier that follows prefix_counts: tell every rank our counts are there.
__device__ void signal_counts(const Params& p, const Ctx& c) {
  if (threadIdx.x != 0) return;
  const u64 off = region_off(p, kCountFlags) + (u64)c.rank * 4;
  for (int dst = c.block; dst < p.world; dst += p.blocks_per_rank) remote_signal(p, dst, off, c.epoch);
}

// Whether a slot's id names an expert whose rank gets the row: not "no expert" (-1, a caller's
// routing) nor an identity expert (E and above, whose output is the row itself).
__device__ __forceinline__ bool dispatched(const Params& p, int e) {
  return static_cast<u32>(e) < static_cast<u32>(p.num_experts);
}

struct DispatchSmem {
  u64 masks[1];   // [E + W]: bit t set when chunk token t goes to that expert / destination rank
};

__device__ void dispatch_chunk(const Params& p, const Ctx& c, int chunk) {
  TraceScope scope;
  DispatchSmem& sm = *reinterpret_cast<DispatchSmem*>(c.smem());
  const int E = p.num_experts, k = p.top_k;
  const int t0 = chunk * kChunkTokens;
  const int ntok = min(kChunkTokens, c.num_tokens - t0);
  const i32* ids = region<i32>(p, c.slice, kTopkIds) + (u64)t0 * k;
  const float* weights = region<float>(p, c.slice, kTopkWeights) + (u64)t0 * k;
  const i32* base = region<i32>(p, c.slice, kChunkBase) + (u64)chunk * (E + p.world);
  u64* expert_mask = sm.masks;
  u64* rank_mask = sm.masks + E;

  __syncthreads();   // the previous chunk is done with the masks
  for (int i = threadIdx.x; i < E + p.world; i += kThreads) sm.masks[i] = 0;
  __syncthreads();
  for (int pair = threadIdx.x; pair < ntok * k; pair += kThreads) {
    const int e = ld_weak(ids + pair);
    if (!dispatched(p, e)) continue;
    const u64 bit = 1ull << (pair / k);
    atomicOr(&expert_mask[e], bit);
    atomicOr(&rank_mask[e / p.experts_per_rank], bit);
  }
  __syncthreads();

  // Entries: one 16-byte store per (token, expert) into the owner's entries[e_l][source][pos].
  const u64 entries_off = region_off(p, kEntries, c.bank);
  for (int pair = threadIdx.x; pair < ntok * k; pair += kThreads) {
    const int tl = pair / k, j = pair % k;
    const int e = ld_weak(ids + pair);
    if (!dispatched(p, e)) continue;
    const int dst = e / p.experts_per_rank;
    const u64 below = (1ull << tl) - 1;
    // Entry {recv_row, token, slot, weight} as one vector.
    const u32 recv_row = dst == c.rank ? t0 + tl : ld_weak(base + E + dst) + __popcll(rank_mask[dst] & below);
    const uint4 entry = make_uint4(recv_row, t0 + tl, j, __float_as_uint(ld_weak(weights + pair)));
    const u32 pos = ld_weak(base + e) + __popcll(expert_mask[e] & below);
    remote_store_v4(p, dst, entries_off + entry_index(p, e % p.experts_per_rank, c.rank, pos) * sizeof(Entry),
                    entry);
  }

  // Rows: a warp per (token, destination); the rank's own tokens stay in x.
  const u64 recv_off = region_off(p, kRecvRows, c.bank);
  const u32 row_bytes = p.hidden * kElemBytes;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int dst = 0; dst < p.world; ++dst) {
    if (dst == c.rank) continue;
    const u64 mask = rank_mask[dst];
    for (int tl = warp; tl < ntok; tl += kWarps) {
      if (!((mask >> tl) & 1ull)) continue;
      const u32 row = ld_weak(base + E + dst) + __popcll(mask & ((1ull << tl) - 1));
      remote_copy_warp(p, dst, recv_off + recv_row_index(p, c.rank, row) * row_bytes,
                       c.x + (u64)(t0 + tl) * p.hidden, row_bytes, lane);
    }
  }
  if (threadIdx.x == 0) trace_record(p, c, scope, kTaskDispatch, chunk, ntok);
}

// Called by every block of the rank after its chunks: the last one to arrive tells every rank
// that this rank's rows and entries are all written.
__device__ void finish_dispatch(const Params& p, const Ctx& c) {
  __syncthreads();
  const bool stalled = p.fault_kind == kFaultStall && static_cast<u32>(c.rank) == p.fault_rank;   // tests only
  count_and_signal(p, c, kDispatched, kDataFlags, c.epoch, stalled);
}

}  // namespace flashmoe
