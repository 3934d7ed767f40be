// Capacity selection for one local expert (capacity mode only). The expert keeps the C pairs with
// the highest routing weight, ties to the lower global token index (flashmoe/reference.py
// capacity_keep): a 64-bit key (weight, ~token) is unique per pair, so "keep" is exactly "key >=
// the C-th largest key", found by an 8-pass radix select over the expert's entries. Kept pairs are
// listed in (source, position) order for the GEMM tiles; every dropped pair is marked on the
// token's home rank with this launch's epoch so the combine skips its slot.
#pragma once

#include "flashmoe/device/common/transport.cuh"
#include "flashmoe/device/common/trace.cuh"
#include "flashmoe/device/roles/scheduler.cuh"

namespace flashmoe {

// Order-preserving map of a weight to u32 (larger weight, larger key); NaN ranks lowest.
__device__ __forceinline__ u32 weight_key(u32 bits) {
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

struct SelectSmem {
  u32 hist[256];
  u64 prefix, mask;
  u32 remaining;
  u32 warp_sums[kWarps];
  u32 running;
};

// Run by thread group G (device/common/group.cuh) with `sm` its shared memory.
template <class G>
__device__ bool select_expert(const Params& p, const Ctx& c, const TaskMap& tm, int e, volatile u32* scratch,
                              SelectSmem& sm) {
  TraceScope scope;
  const i32* s = tm.seg_of(p, e);
  const int total = s[p.world];            // rows the sources sent this expert
  const u32* flags = region<u32>(p, c.slice, kDataFlags);
  for (int src = 0; src < p.world; ++src) {
    if (s[src + 1] > s[src] &&
        !block_wait<true, G>(p, c, flags + src, c.epoch, WaitSite{kTaskSelect, kWaitDataFlag, (u32)src}, scratch))
      return false;
  }
  const Entry* entries = region<Entry>(p, c.slice, kEntries, c.bank);
  const int capacity = tm.h->capacity;
  auto key_of = [&](int q, int& src, uint4& entry) -> u64 {
    src = tm.source_of_row(p, e, q);
    entry = ld_cg_v4(entries + entry_index(p, e, src, q - s[src]));
    const u32 global_token = tm.tok_off[src] + entry.y;
    return ((u64)weight_key(entry.w) << 32) | (0xffffffffu - global_token);
  };

  // Radix select of the capacity-th largest key (skipped when everything fits).
  if (G::rank() == 0) {
    sm.prefix = 0;
    sm.mask = 0;
    sm.remaining = capacity;
  }
  if (total > capacity) {
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = G::rank(); i < 256; i += G::kSize) sm.hist[i] = 0;
      G::sync();
      for (int q = G::rank(); q < total; q += G::kSize) {
        int src;
        uint4 entry;
        const u64 key = key_of(q, src, entry);
        if ((key & sm.mask) == sm.prefix) atomicAdd(&sm.hist[(key >> shift) & 255], 1u);
      }
      G::sync();
      if (G::rank() == 0) {
        for (int d = 255; d >= 0; --d) {
          if (sm.remaining <= sm.hist[d]) { sm.prefix |= (u64)d << shift; break; }
          sm.remaining -= sm.hist[d];
        }
        sm.mask |= 255ull << shift;
      }
      G::sync();
    }
  }
  const u64 threshold = total > capacity ? sm.prefix : 0;   // keys are unique: key >= threshold keeps C

  // Stable compaction in (source, position) order, one scan over the group per G::kSize rows.
  u32* kept = region<u32>(p, c.slice, kKeptList) + tm.row_off[e];
  const u64 drop_off = region_off(p, kDropMarks, c.bank);
  const int warp = G::rank() >> 5, lane = G::rank() & 31;
  if (G::rank() == 0) sm.running = 0;
  G::sync();
  for (int q0 = 0; q0 < total; q0 += G::kSize) {
    const int q = q0 + G::rank();
    bool keep = false;
    int src = 0;
    uint4 entry = make_uint4(0, 0, 0, 0);
    if (q < total) keep = key_of(q, src, entry) >= threshold;
    const u32 ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) sm.warp_sums[warp] = __popc(ballot);
    G::sync();
    u32 before = sm.running;
    for (int w = 0; w < warp; ++w) before += sm.warp_sums[w];
    before += __popc(ballot & ((1u << lane) - 1));
    if (keep) st_weak(kept + before, (u32)src * p.max_tokens + (q - s[src]));
    else if (q < total)
      remote_store_u32(p, src, drop_off + ((u64)entry.y * p.top_k + entry.z) * 4, c.epoch);
    G::sync();
    if (G::rank() == 0)
      for (int w = 0; w < G::kSize / 32; ++w) sm.running += sm.warp_sums[w];
    G::sync();   // warp_sums are rewritten next round
  }
  G::sync();
  if (G::rank() == 0) {
    fence_world(p);        // kept list (read by this rank's tiles) and drop marks (home ranks)
    st_release_gpu(region<u32>(p, c.slice, kSelectDone, c.bank) + e, 1);
    trace_record(p, c, scope, kTaskSelect, e, total);
  }
  return true;
}

}  // namespace flashmoe
