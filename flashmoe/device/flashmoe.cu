// The flashmoe kernel: one cooperative, persistent launch per forward. Blocks are split by hosted
// rank (blockIdx.x / blocks_per_rank); every block of a rank runs the same phases:
//
//   route     its 64-token chunks: logits, top-k (or the caller's choice), counts per expert and
//             destination rank; with fewer chunks than blocks, every block's share of the logits
//             first, then a rank barrier
//   barrier   (rank)            prefix   positions of every token at every destination; counts out
//   barrier   (rank)            dispatch rows and entries to the owners of the experts; data signal
//   tasks     claim shared/routed GEMM tiles (and capacity selections) until none are left
//   combine   once every rank's results for this rank are in: weighted sum per token
//
// Phases only wait on co-resident blocks or on other ranks' earlier phases; every wait is bounded
// (device/common/wait.cuh) and a failed wait ends the block. docs/architecture.md has the protocol.
#include "flashmoe/device/common/params.cuh"
#include "flashmoe/device/common/spec.cuh"
#include "flashmoe/device/roles/router.cuh"
#include "flashmoe/device/roles/dispatch.cuh"
#include "flashmoe/device/roles/tasks.cuh"
#include "flashmoe/device/roles/combine.cuh"

namespace flashmoe {

// Launch n uses bank n % 2 of the counters; zero bank (n + 1) % 2 now, nobody touches it during
// launch n (the previous launch on this stream has ended).
__device__ void zero_next_bank(const Params& p, const Ctx& c) {
  if (c.block != 0) return;
  u32* counters = region<u32>(p, c.slice, kSyncCounters, c.bank ^ 1);
  u32* select_done = region<u32>(p, c.slice, kSelectDone, c.bank ^ 1);
  u32* tile_done = region<u32>(p, c.slice, kTileDone, c.bank ^ 1);
  for (int i = threadIdx.x; i < kNumSyncCounters; i += kThreads) counters[i] = 0;
  for (int i = threadIdx.x; i < p.experts_per_rank; i += kThreads) select_done[i] = 0;
  for (int i = threadIdx.x; i < p.max_row_tiles; i += kThreads) tile_done[i] = 0;
}

// Forced inline: in the NVSHMEM build the inliner left it out of line once record_error was
// inlined, and a call costs that build its wgmma overlap (common/ptx.cuh div_full).
__device__ __forceinline__ void run_rank(const Params& p, const Ctx& c) {
  volatile u32* scratch = reinterpret_cast<volatile u32*>(c.smem() + p.smem_scratch_offset);
  zero_next_bank(p, c);
  trace_begin(p);
  if (!pipe_aligned(p, c)) return;

  const int nchunks = ceil_div(c.num_tokens, kChunkTokens);
  u32 barriers = 0;   // rank barriers so far (their generations count from 1)
  const bool spread = !kRoutingGiven && logits_first(p, nchunks);
  if (spread) {
    spread_logits(p, c, nchunks);
    if (!rank_barrier(p, c, ++barriers, kTaskRoute, scratch)) return;
  }
  for (int ch = c.block; ch < nchunks; ch += p.blocks_per_rank) {
    if constexpr (kRoutingGiven) given_chunk(p, c, ch);
    else route_chunk(p, c, ch, spread);
  }
  if (!rank_barrier(p, c, ++barriers, kTaskRoute, scratch)) return;
  prefix_counts(p, c);
  if (!rank_barrier(p, c, ++barriers, kTaskPrefix, scratch)) return;
  signal_counts(p, c);
  for (int ch = c.block; ch < nchunks; ch += p.blocks_per_rank) dispatch_chunk(p, c, ch);
  finish_dispatch(p, c);
  if (!run_tasks(p, c, scratch)) return;
  combine(p, c, scratch);
}

// Every block passes here, also after a failed wait: the rank's last block advances the epoch.
__device__ void exit_rank(const Params& p, const Ctx& c) {
  __syncthreads();
  if (threadIdx.x != 0) return;
  fence_acq_rel_gpu();
  u32* exited = region<u32>(p, c.slice, kSyncCounters, c.bank) + kExited;
  if (atomic_add_relaxed_gpu(exited, 1) == static_cast<u32>(p.blocks_per_rank - 1))
    st_release_gpu(region<u32>(p, c.slice, kEpoch), c.epoch);
}

}  // namespace flashmoe

extern "C" __global__ void __launch_bounds__(flashmoe::kThreads, 1)
flashmoe_kernel(const __grid_constant__ flashmoe::Params p) {
  flashmoe::Ctx& c = flashmoe::block_ctx(p);
  if (threadIdx.x == 0) c = flashmoe::make_ctx(p);
  __syncthreads();
  flashmoe::run_rank(p, c);
  flashmoe::exit_rank(p, c);
}
