// Component probes: small kernels that run one part of flashmoe_kernel alone, from the same device
// headers, so a first run on a new GPU (python -m flashmoe.bringup) can tell which component is
// wrong before the whole kernel runs. Each takes one ProbeArgs (params.cuh); the host side, which
// builds the inputs and checks the outputs against torch, is flashmoe/bringup/probes.py.
//
//   flashmoe_probe_tile     one GEMM tile of the spec's engine over gathered A rows (null rows
//                           read zeros), B rows of a 4-D weight tensor through row pointers or, on
//                           the wgmma engine, TMA boxes; epilogue act(gate) * up or the plain sum
//   flashmoe_probe_tma_box  one TMA box of a 4-D tensor map into shared memory, copied out
//                           de-swizzled (wgmma specs); mode 1 expects more bytes than the box holds,
//                           so the bounded mbarrier wait must time out and say so
//   flashmoe_probe_router   the route phase of rank 0 (router logits, scores, top-k, weights)
//   flashmoe_probe_wait     bounded flag waits: mode 0 one times out, the other is aborted;
//                           mode 1 a flag another block sets in time
//   flashmoe_probe_trace    trace records (built with trace=True)
//
// Under FLASHMOE_EMULATION every probe also gets an exported <name>_emu launcher for the CPU
// emulator (flashmoe/host/emulator.py EmulatedModule).
#include "flashmoe/device/common/params.cuh"
#include "flashmoe/device/common/spec.cuh"
#include "flashmoe/device/roles/expert_gemm.cuh"
#include "flashmoe/device/roles/router.cuh"

namespace flashmoe {

// Probes act as hosted rank 0 (wait: one rank per block) of launch 1.
__device__ __forceinline__ Ctx probe_ctx(int local) {
  Ctx c{};
  c.local = local;
  c.rank = local;
  c.block = blockIdx.x;
  c.epoch = 1;
  return c;
}

#if FLASHMOE_GEMM_WGMMA
template <int NB>
using ProbeEngine = WgmmaTile<kBlockM, kBlockN, NB>;
#else
template <int NB>
using ProbeEngine = MmaSyncTile<kBlockM, kBlockN, NB>;
#endif

// Row tables after the pipeline, as expert_gemm.cuh's TileTables; out is [BM][BN / NB].
template <int NB>
__device__ void probe_tile(const ProbeArgs& a) {
  using T = ProbeEngine<NB>;
  constexpr int kOpRows = kBlockN / NB;
  const Ctx c = probe_ctx(0);
  const Params& p = *a.params;
  if (!pipe_aligned(p, c)) return;
  const u8** a_rows = reinterpret_cast<const u8**>(c.smem() + T::kPipeBytes);
  const u8** b_rows = a_rows + kBlockM;
  bool* valid = reinterpret_cast<bool*>(b_rows + kBlockN);
  const elem_t* A = static_cast<const elem_t*>(a.a);
  const elem_t* B = static_cast<const elem_t*>(a.b);
  for (int i = threadIdx.x; i < kBlockM; i += kThreads) {
    a_rows[i] = a.a_rows[i] < 0 ? nullptr : reinterpret_cast<const u8*>(A + (u64)a.a_rows[i] * a.k);
    valid[i] = a.rows_valid[i] != 0;
  }
  for (int r = threadIdx.x; r < kBlockN; r += kThreads) {
    const int op = r / kOpRows, col = a.col0 + r % kOpRows;
    b_rows[r] = col < a.inter
        ? reinterpret_cast<const u8*>(B + (((u64)a.expert * NB + op) * a.inter + col) * a.k) : nullptr;
  }
  __syncthreads();
  T g;
#if FLASHMOE_GEMM_WGMMA
  if (!g.mainloop(c.smem(), a_rows, b_rows, (u32)a.k * kElemBytes, a.a, a.use_tma ? &a.b_map : nullptr, a.col0,
                  a.expert, NB, p, c, kTaskGemm0))
    return;
#else
  g.mainloop(c.smem(), a_rows, b_rows, (u32)a.k * kElemBytes, a.a);
#endif
  const int act = a.act;
  auto f = [act](int, int, const float* v) { return NB == 2 ? activate(v[0], act) * v[NB - 1] : v[0]; };
  auto store = [&](int row, int byte, uint4 v) {
    st_v4(static_cast<u8*>(a.out) + ((u64)row * kOpRows) * kElemBytes + byte, v);
  };
#if FLASHMOE_GEMM_WGMMA
  // In passes, as the kernel's epilogue (expert_gemm.cuh), staged in the drained stages: only the
  // first team holds the tile.
#pragma unroll
  for (int pass = 0; pass < T::kPasses; ++pass) {
    if (T::team() == 0) g.stage_output(c.smem(), pass, f);
    __syncthreads();
    T::store_rows(c.smem(), pass, valid, a.valid_cols, store);
    __syncthreads();
  }
#else
  g.stage_output(c.smem(), f);
  __syncthreads();
  T::store_rows(c.smem(), valid, a.valid_cols, store);
#endif
}

}  // namespace flashmoe

using flashmoe::ProbeArgs;

#if defined(FLASHMOE_EMULATION)
#define FLASHMOE_PROBE_ENTRY(name)                                                                            \
  FLASHMOE_EMU_EXPORT int name##_emu(const void* args, int grid, int block, unsigned long long smem,        \
                                     unsigned long long seed, char* err, unsigned long long err_len) {     \
    ProbeArgs copy;                                                                                         \
    std::memcpy(static_cast<void*>(&copy), args, sizeof(copy));                                             \
    return flashmoe::emu::launch(grid, block, smem, seed,                                                   \
                                 [](void* a) { name(*static_cast<const ProbeArgs*>(a)); }, &copy, err,      \
                                 err_len);                                                                  \
  }
#else
#define FLASHMOE_PROBE_ENTRY(name)
#endif

extern "C" __global__ void __launch_bounds__(flashmoe::kThreads, 1)
flashmoe_probe_tile(const __grid_constant__ ProbeArgs a) {
  if (a.nb == 2) flashmoe::probe_tile<2>(a);
  else flashmoe::probe_tile<1>(a);
}
FLASHMOE_PROBE_ENTRY(flashmoe_probe_tile)

#if FLASHMOE_GEMM_WGMMA
// The box lands at the (1024-byte aligned) start of shared memory, its mbarrier after it; a.k is
// the byte count the barrier expects, a.inter the box's rows of 128 bytes.
extern "C" __global__ void __launch_bounds__(flashmoe::kThreads, 1)
flashmoe_probe_tma_box(const __grid_constant__ ProbeArgs a) {
  using namespace flashmoe;
  const Ctx c = probe_ctx(0);
  const Params& p = *a.params;
  if (!pipe_aligned(p, c)) return;
  const u32 box_bytes = static_cast<u32>(a.inter) * kStageKBytes;
  u64* bar = reinterpret_cast<u64*>(c.smem() + box_bytes);
  if (threadIdx.x == 0) {
    mbar_init(bar, 1);
    fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_proxy_async_smem();
    mbar_arrive_expect_tx(bar, static_cast<u32>(a.k));
    tma_load_4d(c.smem(), &a.b_map, bar, a.coord[0], a.coord[1], a.coord[2], a.coord[3]);
  }
  const bool ok = pipe_wait(bar, 0, p, c, WaitSite{kTaskGemm0, kWaitPipeFull, 0}, 0);
  if (ok) {
    // Undo the 128-byte swizzle: chunk j of row r sits at chunk j ^ (r % 8).
    for (u32 i = threadIdx.x; i < box_bytes / 16; i += kThreads) {
      const u32 r = i / 8, j = i % 8;
      st_v4(static_cast<u8*>(a.out) + i * 16, *reinterpret_cast<const uint4*>(c.smem() + r * kStageKBytes +
                                                                             ((j ^ (r & 7)) << 4)));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) mbar_inval(bar);
}
FLASHMOE_PROBE_ENTRY(flashmoe_probe_tma_box)
#endif

// The route phase of hosted rank 0 as the kernel runs it (flashmoe.cu): with fewer chunks than
// blocks, every block's share of the logits and a rank barrier first; then every block routes the
// chunks c.block, c.block + grid, ...
extern "C" __global__ void __launch_bounds__(flashmoe::kThreads, 1)
flashmoe_probe_router(const __grid_constant__ ProbeArgs a) {
  using namespace flashmoe;
  const Params& p = *a.params;
  const Ctx c = make_ctx(p);
  volatile u32* scratch = reinterpret_cast<volatile u32*>(c.smem() + p.smem_scratch_offset);
  const int nchunks = ceil_div(c.num_tokens, kChunkTokens);
  const bool spread = logits_first(p, nchunks);
  if (spread) {
    spread_logits(p, c, nchunks);
    if (!rank_barrier(p, c, 1, kTaskRoute, scratch)) return;
  }
  for (int ch = c.block; ch < nchunks; ch += p.blocks_per_rank) route_chunk(p, c, ch, spread);
}
FLASHMOE_PROBE_ENTRY(flashmoe_probe_router)

// Two blocks, one hosted rank each; thread 0 of each waits. mode 0: block 0 waits for flags[0]
// to reach 1 (nobody sets it: times out); block 1 starts half a timeout later on flags[1] and
// leaves through the abort. mode 1: block 1 sets flags[0] = 7 after 5 us; block 0 waits for 5.
extern "C" __global__ void __launch_bounds__(flashmoe::kThreads, 1)
flashmoe_probe_wait(const __grid_constant__ ProbeArgs a) {
  using namespace flashmoe;
  const Params& p = *a.params;
  const Ctx c = probe_ctx(blockIdx.x);
  if (threadIdx.x != 0) return;
  const WaitSite site{kTaskWait, kWaitDataFlag, blockIdx.x};
  const u64 t0 = globaltimer_ns();
  if (a.mode == 0) {
    // Block 1 waits as a combine does, from the start; block 0 for a peer's rows, half a timeout
    // later. Block 0 must still expire first (wait.cuh patience_ns) and block 1 leave by the abort.
    if (blockIdx.x == 0)
      while (globaltimer_ns() - t0 < p.timeout_ns / 2) sleep_ns(1000);
    const WaitSite waits = blockIdx.x == 0 ? site : WaitSite{kTaskCombine, kWaitDoneFlag, blockIdx.x};
    a.result[blockIdx.x] = wait_reached<false>(p, c, &a.flags[blockIdx.x], 1, waits) ? 1 : 0;
  } else if (blockIdx.x == 1) {
    while (globaltimer_ns() - t0 < 5000) sleep_ns(1000);
    st_release_gpu(&a.flags[0], 7);
  } else {
    a.result[0] = wait_reached<true>(p, c, &a.flags[0], 5, site) ? 1 : 0;
  }
}
FLASHMOE_PROBE_ENTRY(flashmoe_probe_wait)

#if FLASHMOE_TRACE
// Each block writes a.k records: kind i % kNumTaskKinds, task i, extra 1000 * block + i, each
// around a short sleep; rank = block.
extern "C" __global__ void __launch_bounds__(flashmoe::kThreads, 1)
flashmoe_probe_trace(const __grid_constant__ ProbeArgs a) {
  using namespace flashmoe;
  const Params& p = *a.params;
  const Ctx c = probe_ctx(blockIdx.x);
  trace_begin(p);
  if (threadIdx.x != 0) return;
  for (int i = 0; i < a.k; ++i) {
    TraceScope scope;
    sleep_ns(200);
    trace_record(p, c, scope, static_cast<u32>(i % kNumTaskKinds), static_cast<u32>(i), blockIdx.x * 1000u + i);
  }
}
FLASHMOE_PROBE_ENTRY(flashmoe_probe_trace)
#endif
