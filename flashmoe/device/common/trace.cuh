// Per-task timeline records (compiled in only when the spec has trace=True; no cost otherwise).
// Layout: flashmoe/host/plan.py trace_layout(); reader: flashmoe/trace.py.
#pragma once

#include "flashmoe/device/common/heap.cuh"

namespace flashmoe {

struct TraceScope {
  u64 start;
  __device__ __forceinline__ TraceScope() : start(kTrace ? globaltimer_ns() : 0) {}
};

// Each block starts its record count at 0 (so graph replays need no host reset).
__device__ __forceinline__ void trace_begin(const Params& p) {
  if (kTrace && p.trace != nullptr && threadIdx.x == 0) reinterpret_cast<u32*>(p.trace)[blockIdx.x] = 0;
}

// Called by one thread of a block when a task ends; two may record at once (the wgmma task loop's
// producer and consumers, device/roles/tasks.cuh), hence the atomic.
__device__ __forceinline__ void trace_record(const Params& p, const Ctx& c, u64 start_ns, u32 kind, u32 task,
                                             u32 extra) {
  if (!kTrace || p.trace == nullptr || p.trace_capacity == 0) return;
  const u32 block = block_id_here();
  u32* counts = reinterpret_cast<u32*>(p.trace);
  const u32 n = atomicAdd(counts + block, 1u);
  if (n >= p.trace_capacity) return;           // keeps counting: the reader reports truncation
  TraceRecord* rec = reinterpret_cast<TraceRecord*>(p.trace + p.trace_records_offset) +
                     (u64)block * p.trace_capacity + n;
  rec->start_ns = start_ns;
  rec->end_ns = globaltimer_ns();
  rec->task = task;
  rec->block = static_cast<u16>(block);
  rec->kind = static_cast<u8>(kind);
  rec->rank = static_cast<u8>(c.rank);
  rec->sm = static_cast<u16>(sm_id());
  rec->pad = 0;
  rec->extra = extra;
}

__device__ __forceinline__ void trace_record(const Params& p, const Ctx& c, const TraceScope& scope, u32 kind,
                                             u32 task, u32 extra) {
  trace_record(p, c, scope.start, kind, task, extra);
}

}  // namespace flashmoe
