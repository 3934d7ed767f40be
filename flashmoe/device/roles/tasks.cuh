// The expert phase of a block: claim tasks until none are left, then report the block finished;
// the rank's last block to finish tells every rank its results are written.
//
// With the wgmma engine the block runs it as two thread groups at once (device/common/group.cuh).
// The producer warpgroup claims a task, waits for what it needs, writes its row tables and job
// into one of two table slots, tells the consumers (the slot's "ready" mbarrier) and loads the
// tile's stages; then it claims the next task while the consumer warpgroups still multiply and
// store the current tile, and fills the stages they free. The consumers take the jobs in order,
// multiply, store, and hand the slot back ("free"). The pipeline never drains between tiles and
// its barriers are set up once. Capacity selections run on the producer warpgroup alone, in the
// free slot's memory, while the consumers work on. With mma_sync the whole block does everything,
// one task after another.
#pragma once

#include "flashmoe/device/roles/capacity.cuh"
#include "flashmoe/device/roles/expert_gemm.cuh"

namespace flashmoe {

// Decodes claimed task `task` for group G: a tile job with its tables in `tt` (prepare_*), a
// capacity selection (run here, with `select` its shared memory), or kJobEnd when none are left.
// False: a wait failed (recorded).
template <class G>
__device__ bool next_job(const Params& p, const Ctx& c, TaskMap& tm, u32 task, volatile u32* scratch, TileTables& tt,
                         SelectSmem& select, TileJob& job) {
  const TaskMapHeader& h = *tm.h;
  job.gemm = kJobEnd;
  if (task < (u32)h.n_shared_g0) {
    job = prepare_shared_gemm0<G>(p, c, tm, task, tt);
    return true;
  }
  if (task < (u32)h.n_shared) return prepare_shared_gemm1<G>(p, c, tm, task - h.n_shared_g0, scratch, tt, job);
  task -= h.n_shared;
  if (!h.routed_ready && !map_routed_part<G>(p, c, tm, scratch)) return false;
  if (task < (u32)h.n_select) {
    job.gemm = -1;   // not a tile: the caller claims again
    return select_expert<G>(p, c, tm, task, scratch, select);
  }
  if ((task -= h.n_select) < (u32)h.n_g0) return prepare_routed_gemm0<G>(p, c, tm, task, scratch, tt, job);
  if ((task -= h.n_g0) < (u32)h.n_g1) return prepare_routed_gemm1<G>(p, c, tm, task, scratch, tt, job);
  return true;
}

// Finished (after a block barrier): the rank's last block tells every rank its results are written.
__device__ void finish_tasks(const Params& p, const Ctx& c) {
  count_and_signal(p, c, kFinished, kDoneFlags, c.epoch, false);
}

#if FLASHMOE_GEMM_WGMMA

// Group G's first thread waits for the phase of `bar` with this parity; the group agrees on the
// outcome. False: the wait failed (recorded).
template <class G>
__device__ __forceinline__ bool group_wait(u64* bar, u32 parity, const Params& p, const Ctx& c, WaitSite site,
                                           u32 phase) {
  bool ok = true;
  if (G::rank() == 0) ok = pipe_wait(bar, parity, p, c, site, phase, 0);
  return !G::any(!ok);
}

static_assert(sizeof(SelectSmem) <= sizeof(TileTables), "a selection runs in a free table slot");

// With two consumer warpgroups the block runs at 168 registers a thread (65536 / 384); the
// producer needs far fewer than the consumers, whose accumulators (64, or 128 for a 128 x 256
// tile) and epilogue live beside the loop's state, so for the task loop the producer gives
// registers to the consumers (setmaxnreg) and takes them back after it, when the whole block runs
// the combine. The wide tile fits in 192 because nothing else stays live through the loop: the
// block's Ctx is in shared memory (common/heap.cuh block_ctx) and the store loop is not unrolled.
struct RegisterBudget {
  static constexpr u32 kBlock = 168, kProducer = 120, kConsumers = 192;
  static constexpr bool kOn = kThreads == 384;
  static_assert(!kOn || kProducer * 128 + kConsumers * 256 <= kBlock * 384, "the block's register pool");
  __device__ __forceinline__ static void producer() { if constexpr (kOn) setmaxnreg_dec<kProducer>(); }
  __device__ __forceinline__ static void producer_done() { if constexpr (kOn) setmaxnreg_inc<kBlock>(); }
  __device__ __forceinline__ static void consumers() { if constexpr (kOn) setmaxnreg_inc<kConsumers>(); }
  __device__ __forceinline__ static void consumers_done() { if constexpr (kOn) setmaxnreg_dec<kBlock>(); }
};

// The producer warpgroup: job n goes to table slot n % 2. False: a wait failed (recorded).
__device__ bool produce_tasks(const Params& p, const Ctx& c, volatile u32* scratch) {
  using G = Producers;
  auto& bar = Gemm0::barriers(c.smem());
  TaskMap tm(p, c);
  map_shared_part<G>(p, c, tm);
  u32 fill = 0;
  bool ok = true;
  for (u32 n = 0; ok;) {
    const u32 slot = n & 1;
    TileTables& tt = tile_tables(c, slot);
    // The slot's last job (n - 2) is done with its tables.
    if (n >= 2 && !group_wait<G>(&bar.free[slot], ((n >> 1) + 1) & 1, p, c, WaitSite{kTaskWait, kWaitJobFree, slot},
                                 (n >> 1) - 1))
      return false;
    TileJob job;
    ok = next_job<G>(p, c, tm, claim_task<G>(p, c, scratch + 1), scratch, tt,
                     *reinterpret_cast<SelectSmem*>(&tt), job);
    if (ok && job.gemm < 0) continue;   // a capacity selection: the slot is still free
    if (!ok) job.gemm = kJobEnd;        // the consumers stop too
    G::sync();                          // the tables are written
    if (G::rank() == 0) {
      tt.job = job;
      mbar_arrive(&bar.ready[slot]);
    }
    ++n;
    if (job.gemm == kJobEnd) break;
    ok = load_job(p, c, tt, job, fill);
  }
  cp_async_commit();   // nothing of this block's may still be landing when it leaves
  cp_async_wait<0>();
  return ok;
}

// The consumer warpgroups. False (in every consumer): a wait failed (recorded).
__device__ bool consume_tasks(const Params& p, const Ctx& c) {
  auto& bar = Gemm0::barriers(c.smem());
  u32 used = 0;
  for (u32 n = 0;; ++n) {
    const u32 slot = n & 1;
    TileTables& tt = tile_tables(c, slot);
    if (!group_wait<Consumers>(&bar.ready[slot], (n >> 1) & 1, p, c, WaitSite{kTaskWait, kWaitJobReady, slot},
                               n >> 1))
      return false;
    const TileJob job = tt.job;
    if (job.gemm == kJobEnd) return true;
    if (!compute_job(p, c, tt, job, used)) return false;
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(&bar.free[slot]);
  }
}

__device__ bool run_tasks(const Params& p, const Ctx& c, volatile u32* scratch) {
  Gemm0::init_barriers(c.smem());
  __syncthreads();
  bool ok;
  if (threadIdx.x < Gemm0::kProducerThreads) {
    RegisterBudget::producer();
    ok = produce_tasks(p, c, scratch);
    RegisterBudget::producer_done();
  } else {
    RegisterBudget::consumers();
    ok = consume_tasks(p, c);
    RegisterBudget::consumers_done();
  }
  const bool failed = __syncthreads_or(!ok);
  Gemm0::inval_barriers(c.smem());
  if (failed) return false;
  finish_tasks(p, c);
  return true;
}

#else

__device__ bool run_tasks(const Params& p, const Ctx& c, volatile u32* scratch) {
  TaskMap tm(p, c);
  map_shared_part<Block>(p, c, tm);
  TileTables& tt = tile_tables(c);
  for (;;) {
    TileJob job;
    if (!next_job<Block>(p, c, tm, claim_task<Block>(p, c, scratch + 1), scratch, tt,
                         *reinterpret_cast<SelectSmem*>(c.smem()), job))
      return false;
    if (job.gemm == kJobEnd) break;
    if (job.gemm >= 0) run_job(p, c, job);
  }
  __syncthreads();
  finish_tasks(p, c);
  return true;
}

#endif

}  // namespace flashmoe
