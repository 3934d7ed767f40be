// The expert phase of a block: claim tasks until none are left, then report the block finished;
// the rank's last block to finish tells every rank its results are written.
#pragma once

#include "flashmoe/device/roles/capacity.cuh"
#include "flashmoe/device/roles/expert_gemm.cuh"

namespace flashmoe {

__device__ bool run_tasks(const Params& p, const Ctx& c, volatile u32* scratch) {
  TaskMap tm(p, c);
  map_shared_part(p, c, tm);
  for (;;) {
    u32 task = claim_task(p, c, scratch + 1);
    const TaskMapHeader& h = *tm.h;
    TileJob job;
    bool ok = true;
    if (task < (u32)h.n_shared_g0) {
      job = prepare_shared_gemm0(p, c, tm, task);
    } else if (task < (u32)h.n_shared) {
      ok = prepare_shared_gemm1(p, c, tm, task - h.n_shared_g0, scratch, job);
    } else {
      task -= h.n_shared;
      if (!h.routed_ready && !map_routed_part(p, c, tm, scratch)) return false;
      if (task < (u32)h.n_select) {
        if (!select_expert(p, c, tm, task, scratch)) return false;
        continue;
      }
      if ((task -= h.n_select) < (u32)h.n_g0) ok = prepare_routed_gemm0(p, c, tm, task, scratch, job);
      else if ((task -= h.n_g0) < (u32)h.n_g1) ok = prepare_routed_gemm1(p, c, tm, task, scratch, job);
      else break;
    }
    if (!ok || !run_job(p, c, job)) return false;
  }
  // Finished: publish this block's writes, count it; the last block signals every rank.
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_acq_rel_sys();
    u32* counter = region<u32>(p, c.slice, kSyncCounters, c.bank) + kFinished;
    if (atomic_add_relaxed_gpu(counter, 1) == static_cast<u32>(p.blocks_per_rank - 1)) {
      fence_acq_rel_sys();
      remote_complete(p);   // every block's result rows have left their staging tiles
      const u64 off = region_off(p, kDoneFlags) + (u64)c.rank * 4;
      for (int dst = 0; dst < p.world; ++dst) remote_signal(p, dst, off, c.epoch);
    }
  }
  return true;
}

}  // namespace flashmoe
