// Tile GEMM on Hopper (sm_90a) with wgmma: C[BM, BN/NB] (x NB) = A . B^T with fp32 accumulators,
// the same contract and interface as MmaSyncTile (mma_sync.cuh): A rows gathered through one
// pointer each (null: zeros), B an expert's weight rows (gate rows then up rows for a gated GEMM0),
// NB accumulator sets with identical fragments so one thread holds gate and up of an element.
//
// Warp specialisation (kThreads = 128 x (1 + consumers), 384 for the shipped specs):
//   warpgroup 0, the producer: fills the kStages stages of the shared-memory ring. A rows are
//     gathered, so every producer thread copies 16-byte chunks with cp.async and then arms a
//     cp.async.mbarrier.arrive.noinc on the stage's "full" barrier; thread 0 also issues the B
//     tile as NB boxes of a 4-D weight tensor map (cp.async.bulk.tensor, TMA), counted on the same
//     barrier with arrive.expect_tx. Without an encoded tensor map (Params::weight_maps_valid = 0)
//     B rows come through cp.async like A rows.
//   warpgroups 1.., the consumers: each owns BM / consumers rows (whole m64 slabs). Per stage it
//     waits on "full", issues 4 wgmma k-steps (k16 bf16/fp16, k8 tf32: 32 bytes of K each) over
//     the whole BN (gate and up side by side, so d[b * BN/NB/2 + i] is operand b's fragment),
//     commits, and once the previous stage's wgmmas are done (wait_group 1) releases that stage
//     on its "empty" barrier (one arrive per consumer warp).
// The pipeline is persistent: its barriers are initialised once for the task loop (or once for a
// lone tile, mainloop()), and producer and consumers each count the stages they have gone through
// (`fill`, `used`), so the producer fills the next tile's stages while the consumers finish the
// current one and its epilogue, which has its own staging tile after the barriers.
// Every mbarrier wait is bounded (pipe_wait below, device/common/wait.cuh): a stage that never
// fills (a TMA box smaller than expect_tx, a copy that faulted) or is never released becomes an
// error record naming the stage and k-tile, and the tile reports failure instead of hanging.
//
// Shared memory: per stage BM A rows then BN B rows of 128 bytes, chunk c of row r at
// r * 128 + ((c ^ (r % 8)) * 16) -- the same layout as the mma_sync engine, and exactly the
// canonical K-major 128-byte-swizzle layout of the PTX ISA ("Shared Memory Matrix Layout",
// Swizzle<3,4,3> over ((8,m),(T,2k)):((8T,SBO),(1,T)), SBO = 1024 B) and the TMA 128B swizzle
// ("Tensors: Swizzling Modes"), provided every tile starts on a 1024-byte boundary: stages are
// (BM + BN) x 128 bytes from the 1024-byte aligned dynamic shared memory base. The barriers follow
// the stages (kBarrierBytes; flashmoe/host/spec.py WGMMA_BARRIER_BYTES), then the epilogue's
// staging tile (kStagingBytes).
//
// Memory ordering (PTX ISA "Proxies", "Async Proxy"): cp.async writes are generic-proxy writes and
// wgmma reads through the async proxy, so a consumer thread executes fence.proxy.async after its
// acquire on "full" and before its wgmmas. TMA writes are async-proxy writes, visible after the
// complete_tx phase. wgmma completion carries an implicit generic-async fence, so a stage released
// after wait_group can be refilled. Every thread fences at mainloop entry, so the generic writes of
// earlier phases to this memory are ordered before this tile's TMA writes.
//
// fp32 operands run as TF32. wgmma ignores the low 13 mantissa bits of a .tf32 input (truncation),
// while the contract (flashmoe/reference.py _tf32, mma_sync's to_tf32) rounds to nearest, ties
// away: the consumers round every stage in place with cvt.rna before issuing wgmma.
#pragma once

#include "flashmoe/device/common/spec.cuh"
#include "flashmoe/device/common/ptx_sm90.cuh"
#include "flashmoe/device/common/group.cuh"
#include "flashmoe/device/common/wait.cuh"

namespace flashmoe {

// Waits for the phase of `bar` with this parity, bounded (device/common/wait.cuh): the first
// try_wait is the whole cost when the stage is ready. The record: index = stage, expected = the
// phase awaited (how many times the stage was filled before), observed = the k-tile.
__device__ __forceinline__ bool pipe_wait(u64* bar, u32 parity, const Params& p, const Ctx& c, WaitSite site,
                                          u32 phase, u32 kt) {
  return bounded_wait<false>(p, c, site, phase, [&](u32& seen) {
    seen = kt;
    return mbar_try_wait(bar, parity);
  });
}

template <int BM, int BN, int NB>
struct WgmmaTile {
  // NB (B operands per tile) only shapes the TMA boxes and the epilogue: the accumulators and the
  // main loop are the same for every NB, so one object (and one inlined main loop) can serve both
  // GEMMs of a spec; mainloop() takes the operand count at run time, the epilogue as a template
  // argument defaulting to NB.
  static constexpr int kBNop = BN / NB;                    // columns of C per B operand
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerWGs = kThreads / 128 - 1;
  static constexpr int kConsumerThreads = kConsumerWGs * 128;
  static constexpr int kWGRows = BM / (kConsumerWGs > 0 ? kConsumerWGs : 1);   // rows per consumer
  static constexpr int kMTiles = kWGRows / 64;             // m64 slabs per consumer
  static constexpr int kAcc = BN / 2;                      // fp32 accumulators per thread per slab
  static constexpr int kStageBytes = (BM + BN) * kStageKBytes;
  static constexpr int kBarrierBytes = 256;                // Barriers below
  // Epilogue staging tile: BM rows of BN / nb elements, padded by 16 bytes against bank conflicts.
  template <int kNB>
  static constexpr int stage_pitch() { return BN / kNB * kElemBytes + 16; }
  static constexpr int kStagingOffset = kStages * kStageBytes + kBarrierBytes;
  static constexpr int kStagingBytes = BM * stage_pitch<1>();   // the widest: GEMM1's BM x BN
  static constexpr int kPipeBytes = kStagingOffset + kStagingBytes;
  static constexpr int kBlockK = kStageKBytes / kElemBytes;  // K elements per stage (TMA box dim 0)
  static constexpr int kKSteps = kStageKBytes / 32;          // wgmma k-steps per stage
  static constexpr int kRowStep = kProducerThreads / 8;      // rows one producer pass covers
  static constexpr u32 kBBytes = BN * kStageKBytes;          // TMA bytes per stage
  static constexpr u32 kPipeAlign = 1024;                    // start of the 128-byte swizzle pattern

  static_assert(kConsumerWGs >= 1, "the wgmma engine needs a producer and at least one consumer warpgroup");
  static_assert(kWGRows * kConsumerWGs == BM && kWGRows % 64 == 0, "consumers take whole m64 slabs of BM");
  static_assert(BN % 32 == 0 && BN <= 256 && BN % NB == 0 && kBNop % 8 == 0, "wgmma N: multiples of 8, <= 256");
  static_assert(BM % kRowStep == 0 && BN % kRowStep == 0, "producer passes cover whole tiles");
  static_assert(kRowStep % 8 == 0, "a producer thread keeps its row's swizzle phase (row % 8) across passes");
  static_assert(BM % 8 == 0 && kStageBytes % kPipeAlign == 0, "A and B tiles start on 1024-byte boundaries");

  // A full and an empty barrier per stage; a ready and a free barrier per slot of the task loop's
  // double-buffered tile tables (device/roles/tasks.cuh).
  struct Barriers {
    u64 full[kStages];    // the producers' cp.async arrives + thread 0's expect_tx
    u64 empty[kStages];   // one arrive per consumer warp
    u64 ready[2];         // the producer's thread 0: the slot's tables and job are written
    u64 free[2];          // one arrive per consumer warp: the slot's job is finished
  };
  static_assert(sizeof(Barriers) <= kBarrierBytes, "the barriers fit their area");

  __device__ __forceinline__ static Barriers& barriers(u8* pipe) {
    return *reinterpret_cast<Barriers*>(pipe + kStages * kStageBytes);
  }
  __device__ __forceinline__ static u8* staging(u8* pipe) { return pipe + kStagingOffset; }

  // Before the pipeline's first use: every thread fences (the generic accesses of earlier phases to
  // this memory -> the TMA writes to come), thread 0 initialises; the caller synchronises the block.
  __device__ __forceinline__ static void init_barriers(u8* pipe) {
    fence_proxy_async_smem();
    if (threadIdx.x != 0) return;
    Barriers& b = barriers(pipe);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&b.full[s], kProducerThreads + 1);
      mbar_init(&b.empty[s], kConsumerThreads / 32);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      mbar_init(&b.ready[j], 1);
      mbar_init(&b.free[j], kConsumerThreads / 32);
    }
    fence_mbar_init();
  }
  // After the last use (the block synchronised: nothing in flight); the memory is reused.
  __device__ __forceinline__ static void inval_barriers(u8* pipe) {
    if (threadIdx.x != 0) return;
    u64* b = reinterpret_cast<u64*>(&barriers(pipe));
    for (int i = 0; i < static_cast<int>(sizeof(Barriers) / 8); ++i) mbar_inval(b + i);
  }

  float acc[kMTiles][kAcc];

  // ---- producer warpgroup ---------------------------------------------------------------------

  // One tile's ktiles stages, after the `fill` the pipeline has had so far (the caller adds ktiles).
  // False: a wait for a stage to be released failed (recorded); the producer stops filling.
  __device__ __forceinline__ static bool produce(u8* pipe, const u8* const* a_rows, const u8* const* b_rows,
                                                 u32 k_bytes, const void* dummy, const TensorMap* b_map, int b_row0,
                                                 int b_expert, int b_ops, int ktiles, u32 fill, const Params& p,
                                                 const Ctx& c, u32 role) {
    Barriers& bar = barriers(pipe);
    const int t = threadIdx.x;                   // 0 .. 127
    const int chunk = t & 7, row = t >> 3;       // this thread copies chunk `chunk` of rows row + i * kRowStep
    const u32 dst = row * kStageKBytes + ((chunk ^ (row & 7)) << 4);
    const bool tma = b_map != nullptr;
    const int box_rows = b_ops == 2 ? BN / 2 : BN;   // rows of each operand's TMA box
    if (t == 0 && tma) prefetch_tensor_map(b_map);
    for (int kt = 0; kt < ktiles; ++kt) {
      const u32 n = fill + kt, s = n % kStages, round = n / kStages;
      // Fill `round` of stage s needs phase round - 1 of its "empty" barrier complete.
      if (round > 0 && !pipe_wait(&bar.empty[s], (round + 1) & 1, p, c, WaitSite{role, kWaitPipeEmpty, s}, round - 1,
                                  kt)) {
        cp_async_commit();   // nothing of this block's may still be landing when it leaves
        cp_async_wait<0>();
        return false;
      }
      u8* stage = pipe + s * kStageBytes;
      if (t == 0) {
        if (tma) {
          mbar_arrive_expect_tx(&bar.full[s], kBBytes);
          for (int op = 0; op < b_ops; ++op)
            tma_load_4d(stage + (BM + op * box_rows) * kStageKBytes, b_map, &bar.full[s], kt * kBlockK, b_row0, op,
                        b_expert);
        } else {
          mbar_arrive(&bar.full[s]);
        }
      }
      const u32 kbyte = kt * kStageKBytes + chunk * 16;
      const bool in_k = kbyte < k_bytes;         // K tail: k_bytes is a multiple of 16
      // Row pointers are re-read from shared memory every stage (one 8-byte LDS per row) rather
      // than kept in registers: the persistent kernel's task loop keeps its own state live here.
#pragma unroll 4
      for (int i = 0; i < BM / kRowStep; ++i) {
        const u8* src = a_rows[row + i * kRowStep];
        const bool valid = in_k && src != nullptr;
        cp_async_16(stage + dst + i * kRowStep * kStageKBytes, valid ? src + kbyte : dummy, valid);
      }
      if (!tma) {
#pragma unroll 4
        for (int i = 0; i < BN / kRowStep; ++i) {
          const u8* src = b_rows[row + i * kRowStep];
          const bool valid = in_k && src != nullptr;
          cp_async_16(stage + (BM + i * kRowStep) * kStageKBytes + dst, valid ? src + kbyte : dummy, valid);
        }
      }
      cp_async_mbar_arrive_noinc(&bar.full[s]);
    }
    return true;
  }

  // ---- consumer warpgroups --------------------------------------------------------------------

  // wgmma over the whole BN in chunks of 256, 128, 64 and 32 columns (every multiple of 32): the
  // accumulator registers of consecutive chunks are consecutive n8 blocks, so the fragment layout
  // is the one of a single m64nBN instruction.
  template <int N0>
  __device__ __forceinline__ static void issue_n(float* d, u64 desc_a, u32 b_addr) {
    if constexpr (N0 < BN) {
      constexpr int n = BN - N0 >= 256 ? 256 : BN - N0 >= 128 ? 128 : BN - N0 >= 64 ? 64 : 32;
      wgmma_m64k<n>(d + N0 / 2, desc_a, wgmma_desc_sw128(b_addr + N0 * kStageKBytes));
      issue_n<N0 + n>(d, desc_a, b_addr);
    }
  }

  // fp32 -> tf32 (cvt.rna) of a whole stage, in place, by all consumer threads.
  __device__ __forceinline__ static void round_stage_tf32(u8* stage, int ct) {
    uint4* v = reinterpret_cast<uint4*>(stage);
#pragma unroll 4
    for (int i = ct; i < kStageBytes / 16; i += kConsumerThreads) {
      uint4 x = v[i];
      x.x = to_tf32(x.x);
      x.y = to_tf32(x.y);
      x.z = to_tf32(x.z);
      x.w = to_tf32(x.w);
      v[i] = x;
    }
  }

  // One tile's ktiles stages into acc, after the `used` stages the consumers went through so far
  // (the caller adds ktiles); every stage is released once its wgmmas are done. False: a wait for
  // a stage's data failed (recorded). The consumers then run the remaining k-tiles without
  // waiting, on whatever the stages hold: wgmma and the named barrier are collective over the
  // warpgroup / all consumers, so no thread may leave them early. The tile's result is discarded.
  __device__ __forceinline__ bool consume(u8* pipe, int ktiles, u32 used, const Params& p, const Ctx& c, u32 role) {
    Barriers& bar = barriers(pipe);
    const int ct = threadIdx.x - kProducerThreads;   // 0 .. kConsumerThreads - 1
    const int wg = ct >> 7;
    const u32 pipe_addr = smem_addr(pipe);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < kAcc; ++i) {
        acc[mt][i] = 0.0f;
        wgmma_pin(acc[mt][i]);
      }
    bool ok = true;
    for (int kt = 0; kt < ktiles; ++kt) {
      const u32 n = used + kt, s = n % kStages, round = n / kStages;
      ok = ok && pipe_wait(&bar.full[s], round & 1, p, c, WaitSite{role, kWaitPipeFull, s}, round, kt);
      if constexpr (kFp32) {
        round_stage_tf32(pipe + s * kStageBytes, ct);
        fence_proxy_async_smem();                     // these generic writes -> the wgmma reads
        Consumers::sync();                            // every consumer's part of the stage is rounded
      } else {
        fence_proxy_async_smem();                     // the producers' cp.async writes -> wgmma reads
      }
      const u32 a_addr = pipe_addr + s * kStageBytes + wg * kWGRows * kStageKBytes;
      const u32 b_addr = pipe_addr + s * kStageBytes + BM * kStageKBytes;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
          issue_n<0>(acc[mt], wgmma_desc_sw128(a_addr + mt * 64 * kStageKBytes + ks * 32), b_addr + ks * 32);
      }
      wgmma_commit();
      wgmma_wait<1>();                                // stage n - 1's wgmmas have completed
      if (kt > 0 && (ct & 31) == 0) mbar_arrive(&bar.empty[(n - 1) % kStages]);
    }
    wgmma_wait<0>();
    if (ktiles > 0 && (ct & 31) == 0) mbar_arrive(&bar.empty[(used + ktiles - 1) % kStages]);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < kAcc; ++i) wgmma_pin(acc[mt][i]);
    return ok;
  }

  __device__ __forceinline__ static int ktiles_of(u32 k_bytes) {
    return static_cast<int>((k_bytes + kStageKBytes - 1) / kStageKBytes);
  }

  // One lone tile (the component probes), its pipeline set up and taken down around it: acc =
  // A . B^T over k_bytes of K. Row tables live in shared memory; the caller synchronised after
  // writing them. b_map: the weight tensor map whose box (K, b_row0 .., op, b_expert) of BN / b_ops
  // rows is B operand op (b_ops: 1 or 2), or nullptr to read B through b_rows. The pipeline's
  // waits report as task `role` of block context c. Ends with the block synchronised; false (in
  // every thread) when a wait failed: acc is then garbage and the error is recorded. The caller
  // has checked that `pipe` starts on a kPipeAlign boundary (pipe_aligned()).
  __device__ bool mainloop(u8* pipe, const u8* const* a_rows, const u8* const* b_rows, u32 k_bytes,
                           const void* dummy, const TensorMap* b_map, int b_row0, int b_expert, int b_ops,
                           const Params& p, const Ctx& c, u32 role) {
    init_barriers(pipe);
    __syncthreads();
    const int ktiles = ktiles_of(k_bytes);
    const bool ok = threadIdx.x < kProducerThreads
        ? produce(pipe, a_rows, b_rows, k_bytes, dummy, b_map, b_row0, b_expert, b_ops, ktiles, 0, p, c, role)
        : consume(pipe, ktiles, 0, p, c, role);
    // Every stage consumed (or abandoned): no copy or wgmma of this tile is in flight.
    const bool failed = __syncthreads_or(!ok);
    inval_barriers(pipe);
    return !failed;
  }

  // Writes f(v) (v: the kNB accumulators of one output element) into the staging tile `out`
  // (staging()) as elem_t. Call after the tile's stages are consumed; synchronise before
  // store_rows(). Only the consumer warpgroups hold accumulators.
  template <int kNB = NB, class F>
  __device__ __forceinline__ void stage_output(u8* out, F f) const {
    constexpr int kCols = BN / kNB, kPitch = stage_pitch<kNB>();
    const int wg = static_cast<int>(threadIdx.x >> 7) - 1;
    if (wg < 0) return;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    // This thread's first element; every other one is a compile-time offset from it.
    u8* base = out + (wg * kWGRows + warp * 16 + (lane >> 2)) * kPitch + (lane & 3) * 2 * kElemBytes;
    struct alignas(2 * kElemBytes) Pair { elem_t e[2]; };   // the two adjacent columns c = 0, 1
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          Pair out;
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float v[kNB];
#pragma unroll
            for (int b = 0; b < kNB; ++b) v[b] = acc[mt][b * (kCols / 2) + 4 * j + 2 * h + c];
            out.e[c] = from_float(f(v));
          }
          *reinterpret_cast<Pair*>(base + (mt * 64 + h * 8) * kPitch + j * 8 * kElemBytes) = out;
        }
      }
    }
  }

  // Group G copies the staged tile out, 16 bytes at a time: store(row, byte offset in the row's
  // column range, value) for every row with rows_valid[row] and every 16-byte chunk below valid_cols.
  template <int kNB = NB, class G = Block, class Store>
  __device__ __forceinline__ static void store_rows(const u8* staged, const bool* rows_valid, int valid_cols,
                                                    Store store) {
    constexpr int kChunksPerRow = BN / kNB * kElemBytes / 16, kPitch = stage_pitch<kNB>();
    // Not unrolled for the 128 x 256 tile: unrolled, the compiler hoists every iteration's
    // addresses out of the task loop, and those registers are the ones its accumulators need.
    constexpr int kUnroll = BN > 128 ? 1 : (BM * kChunksPerRow + G::kSize - 1) / G::kSize;
#pragma unroll (kUnroll)
    for (int idx = G::rank(); idx < BM * kChunksPerRow; idx += G::kSize) {
      const int row = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
      if (!rows_valid[row] || chunk * kVecElems >= valid_cols) continue;
      store(row, chunk * 16, *reinterpret_cast<const uint4*>(staged + row * kPitch + chunk * 16));
    }
  }
};

}  // namespace flashmoe
