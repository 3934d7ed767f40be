// The expert phase of a block: claim tasks until none are left, for its own rank and then for the
// other ranks the launch hosts; a rank's results are written when every block has passed it, and
// the last to pass tells every rank so.
//
// Work sharing. Virtual ranks (several hosted by one launch) have fixed blocks, and under skewed
// routing one rank's blocks would work on while the others' idle. So a block that has claimed the
// last task of its own rank goes on to claim the next hosted rank's, and so on around them all:
// each rank's tasks are claimed by every block of the launch, its own first. A rank's kFinished
// counter expects one arrival per block and consumer team of the launch (finish_arrivals()); the
// last sends the done signals. The NVSHMEM transport keeps to its own rank (its GEMM1 puts stage
// through the rank's per-block slots), as does a launch hosting one rank.
//
// With the wgmma engine the block runs it as thread groups at once (device/common/group.cuh).
// The producer warpgroup claims a task, waits for what it needs, writes its row tables, job and
// rank context into one of two table slots, tells the consumers (the slot's "ready" mbarrier) and
// loads the tile's stages; then it claims the next task while the consumers still multiply and
// store the current tile, and fills the stages they free. When a rank has no task left for it,
// it publishes a kJobRankDone job instead, on which each consumer team, having stored its tiles
// of that rank, counts itself in for the rank. The consumer teams take the jobs in order (one
// cooperative team all of them; two ping-pong teams every other one, each its own slot, in turn
// at the stage ring: gemm/wgmma.cuh), multiply, store, and hand the slot back ("free"); a rank's
// done and the end go to every team. The pipeline never drains between tiles and its barriers
// are set up once. Capacity selections run on the producer warpgroup alone, in the free slot's
// memory, while the consumers work on. With mma_sync the whole block does everything, one task
// after another.
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

// The hosted ranks a block claims tasks of (work sharing above), and so the arrivals each rank's
// kFinished counter expects: one per rank visit of each consumer team of each block.
#if FLASHMOE_GEMM_WGMMA
constexpr int kTeamsPerBlock = Gemm0::kTeams;
#else
constexpr int kTeamsPerBlock = 1;
#endif
__device__ __forceinline__ int ranks_to_visit(const Params& p) {
  return FLASHMOE_TRANSPORT_NVSHMEM ? 1 : p.num_local_ranks;
}
__device__ __forceinline__ u32 finish_arrivals(const Params& p) {
  return static_cast<u32>(ranks_to_visit(p) * p.blocks_per_rank * kTeamsPerBlock);
}

// The context the block's task loop works for (with wgmma, the producer's), in shared memory after
// the block's own (common/heap.cuh block_ctx()).
__device__ __forceinline__ Ctx& task_ctx(const Params& p) {
  return *reinterpret_cast<Ctx*>(dynamic_smem() + p.smem_scratch_offset + kScratchBytes + kCtxBytes);
}

// Group G makes the i-th rank it visits (its own first, then the next hosted ones, wrapping) the
// task loop's; it keeps the block's index and the launch's epoch.
template <class G>
__device__ __forceinline__ const Ctx& visit_rank(const Params& p, const Ctx& c, int i) {
  G::sync();   // the last rank's context is no longer read
  if (G::rank() == 0) task_ctx(p) = make_ctx(p, (c.local + i) % p.num_local_ranks, c.block, c.epoch);
  G::sync();
  return task_ctx(p);
}

// Group G (its writes published by its barrier first) counts itself in for rank c: the last
// arrival tells every rank its results are written.
template <class G>
__device__ void finish_rank(const Params& p, const Ctx& c) {
  G::sync();
  count_and_signal<G>(p, c, kFinished, kDoneFlags, c.epoch, false, finish_arrivals(p));
}

#if FLASHMOE_GEMM_WGMMA

// Group G's first thread waits for `bar` to complete phase `phase` (gemm/wgmma.cuh pipe_wait);
// the group agrees on the outcome. False: the wait failed (recorded).
template <class G>
__device__ __forceinline__ bool group_wait(u64* bar, const Params& p, const Ctx& c, WaitSite site, u32 phase) {
  bool ok = true;
  if (G::rank() == 0) ok = pipe_wait(bar, phase, p, c, site, 0);
  return !G::any(!ok);
}

static_assert(sizeof(SelectSmem) <= sizeof(TileTables), "a selection runs in a free table slot");

// With two consumer warpgroups the block runs at 168 registers a thread (65536 / 384); the
// producer needs far fewer than the consumers, whose accumulators (64, or 128 for a 128 x 256
// tile) and epilogue live beside the loop's state, so for the task loop the producer gives
// registers to the consumers (setmaxnreg) and takes them back after it, when the whole block runs
// the combine. The wide tile fits in 192 because nothing else stays live through the loop: the
// block's Ctx is in shared memory (common/heap.cuh block_ctx) and its store loop is not unrolled.
// Not in an NVSHMEM build: linked with -rdc, ptxas ignores setmaxnreg, so every warp keeps 168.
struct RegisterBudget {
  static constexpr u32 kBlock = 168, kProducer = 120, kConsumers = 192;
  static constexpr bool kOn = kThreads == 384 && !FLASHMOE_TRANSPORT_NVSHMEM;
  static_assert(!kOn || kProducer * 128 + kConsumers * 256 <= kBlock * 384, "the block's register pool");
  __device__ __forceinline__ static void producer() { if constexpr (kOn) setmaxnreg_dec<kProducer>(); }
  __device__ __forceinline__ static void producer_done() { if constexpr (kOn) setmaxnreg_inc<kBlock>(); }
  __device__ __forceinline__ static void consumers() { if constexpr (kOn) setmaxnreg_inc<kConsumers>(); }
  __device__ __forceinline__ static void consumers_done() { if constexpr (kOn) setmaxnreg_dec<kBlock>(); }
};

// The producer warpgroup: job n goes to table slot n % 2 (ping-pong: to team n % 2, whose slot it
// is). False: a wait failed (recorded).
__device__ bool produce_tasks(const Params& p, const Ctx& c, volatile u32* scratch) {
  using G = Producers;
  auto& bar = Gemm0::barriers(c.smem());
  TaskMap tm(p, c);
  const int visits = ranks_to_visit(p);
  int visit = 0;
  const Ctx* cr = &visit_rank<G>(p, c, visit);
  map_shared_part<G>(p, *cr, tm);
  u32 fill = 0, n = 0;
  // Job n's slot is free once job n - 2 is done with it.
  auto slot_free = [&] {
    return n < 2 || group_wait<G>(&bar.free[n & 1], p, c, WaitSite{kTaskWait, kWaitJobFree, n & 1}, (n >> 1) - 1);
  };
  // Posts job n, its tables written, for the rank it works for. Every write of the slot (the
  // tables, then the job and the context) comes before G's barrier and the arrive after it, so one
  // point orders the whole slot before "ready". In a standalone kernel, compute-sanitizer's
  // racecheck reports the consumers' reads of a slot its arriving thread wrote after the barrier,
  // and none once the barrier is between (bench/results/racecheck-model-*, flags 0 and 4).
  auto post = [&](const TileJob& job) {
    if (G::rank() == 0) {
      TileTables& tt = tile_tables(c, n & 1);
      tt.job = job;
      tt.ctx = *cr;
    }
    G::sync();
    if (G::rank() == 0) mbar_arrive(&bar.ready[n & 1]);
    ++n;
  };
  bool ok = true;
  while (ok) {
    TileTables& tt = tile_tables(c, n & 1);
    if (!slot_free()) return false;
    TileJob job;
    if (visit == visits) {
      job.gemm = kJobEnd;               // every hosted rank passed
    } else {
      ok = next_job<G>(p, *cr, tm, claim_task<G>(p, *cr, scratch + 1), scratch, tt,
                       *reinterpret_cast<SelectSmem*>(&tt), job);
      if (ok && job.gemm < 0) continue; // a capacity selection: the slot is still free
      if (!ok) job.gemm = kJobEnd;      // the consumers stop too
      else if (job.gemm == kJobEnd) job.gemm = kJobRankDone;
    }
    job.stage0 = fill;
    post(job);
    if (job.gemm == kJobEnd || job.gemm == kJobRankDone) {
      for (int team = 1; team < Gemm0::kTeams; ++team) {   // every team takes these
        if (!slot_free()) return false;
        post(job);
      }
      if (job.gemm == kJobEnd) break;
      if (++visit < visits) {
        cr = &visit_rank<G>(p, c, visit);
        map_shared_part<G>(p, *cr, tm);
      }
      continue;
    }
    ok = load_job(p, *cr, tt, job, fill);
  }
  cp_async_commit();   // nothing of this block's may still be landing when it leaves
  cp_async_wait<0>();
  return ok;
}

// A consumer team: jobs team, team + kTeams, ... False (in every thread of the team): a wait
// failed (recorded).
__device__ bool consume_tasks(const Params& p, const Ctx& c) {
  auto& bar = Gemm0::barriers(c.smem());
  for (u32 n = Gemm0::team();; n += Gemm0::kTeams) {
    const u32 slot = n & 1;
    TileTables& tt = tile_tables(c, slot);
    if (!group_wait<Team>(&bar.ready[slot], p, c, WaitSite{kTaskWait, kWaitJobReady, slot}, n >> 1))
      return false;
    const TileJob job = tt.job;
    if (job.gemm == kJobEnd || job.gemm == kJobRankDone) {
      // No stages, but a turn all the same: a team that passed turns without waiting for them
      // could run the other's turn barrier two phases ahead of it.
      const bool turn = Gemm0::wait_turn(c.smem(), n, p, c, kTaskWait);
      __syncwarp();
      Gemm0::pass_turn(c.smem());
      if (Team::any(!turn)) return false;
      if (job.gemm == kJobEnd) return true;
      finish_rank<Team>(p, tt.ctx);     // the team stored its tiles of that rank
    } else if (!compute_job(p, tt.ctx, tt, job, n)) {
      return false;
    } else if (kTrace && Team::rank() == 0) {
      // From shared memory (the slot is the team's until it frees it), after the tile: a start
      // time and a task held in registers through the tile spill the wide tile's consumers.
      trace_record(p, tt.ctx, Gemm0::barriers(c.smem()).trace_start[Gemm0::team()],
                   tt.job.gemm ? kTaskGemm1 : kTaskGemm0, tt.job.trace_task, tt.job.trace_extra);
    }
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(&bar.free[slot]);
  }
}

__device__ bool run_tasks(const Params& p, const Ctx& c, volatile u32* scratch) {
  Gemm0::init_barriers(c.smem());
  // A failure is noted in shared memory, not carried in a register: a value live across the
  // register budget's changes is kept on the stack. Atomically: the failing threads write it
  // together, and it is read only after the block's barrier (a plain store, read by others before
  // that barrier, would race).
  volatile u32& failed = Gemm0::barriers(c.smem()).failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  if (threadIdx.x < Gemm0::kProducerThreads) {
    RegisterBudget::producer();
    if (!produce_tasks(p, c, scratch)) atomicOr(const_cast<u32*>(&failed), 1u);
    RegisterBudget::producer_done();
  } else {
    RegisterBudget::consumers();
    if (!consume_tasks(p, c)) atomicOr(const_cast<u32*>(&failed), 1u);
    RegisterBudget::consumers_done();
  }
  __syncthreads();   // every note is in
  // No thread reads the note after this barrier, so the memory is free for what comes next.
  const bool ok = !__syncthreads_or(failed != 0);
  Gemm0::inval_barriers(c.smem());
  return ok;
}

#else

__device__ bool run_tasks(const Params& p, const Ctx& c, volatile u32* scratch) {
  TaskMap tm(p, c);
  TileTables& tt = tile_tables(c);
  for (int visit = 0; visit < ranks_to_visit(p); ++visit) {
    const Ctx& cr = visit_rank<Block>(p, c, visit);
    map_shared_part<Block>(p, cr, tm);
    for (;;) {
      TileJob job;
      if (!next_job<Block>(p, cr, tm, claim_task<Block>(p, cr, scratch + 1), scratch, tt,
                           *reinterpret_cast<SelectSmem*>(c.smem()), job))
        return false;
      if (job.gemm == kJobEnd) break;
      if (job.gemm >= 0) run_job(p, cr, job);
    }
    finish_rank<Block>(p, cr);
  }
  return true;
}

#endif

}  // namespace flashmoe
