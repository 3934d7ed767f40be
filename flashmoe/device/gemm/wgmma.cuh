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
//   warpgroups 1.., the consumers, in teams (common/group.cuh Team) that each run whole tiles:
//     cooperative, one team of every consumer warpgroup, each owning BM / consumers rows of the
//     tile; ping-pong, a team per warpgroup, owning all BM rows (two m64 slabs for BM = 128), the
//     teams taking tiles in turn so one team's epilogue runs while the other's wgmmas keep the
//     tensor cores busy. Per stage a warpgroup waits on "full", issues 4 wgmma k-steps (k16
//     bf16/fp16, k8 tf32: 32 bytes of K each) per slab over the whole BN (gate and up side by
//     side, so d[b * BN/NB/2 + i] is operand b's fragment), commits, and once the previous
//     stage's wgmmas are done (wait_group 1) releases that stage on its "empty" barrier (one
//     arrive per warp of the team).
// The pipeline is persistent: its barriers are initialised once for the task loop (or once for a
// lone tile, mainloop()), and the producer counts the stages it has filled and tells the
// consumers where each tile starts in the ring (roles/expert_gemm.cuh TileJob::stage0), so it
// fills the next tile's stages while the consumers finish the current one and its epilogue, which
// has its own staging area after the barriers.
//
// Ping-pong turns. The teams take the ring's stages in job order, and a stage's "full" barrier
// tells its phases apart by parity only: a team that started waiting on its job's stages before
// the previous job's team had seen the earlier fill of the same stage land could take that
// phase for its own. So job n's team starts its mainloop only once job n - 1's team has passed
// its last wait (the "turn" barriers); that also runs the two mainloops one after the other.
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
// staging area (kStagingBytes), one part per team.
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

// Waits for `bar` to complete its phase number `phase` (counted from 0), bounded
// (device/common/wait.cuh): the first try_wait is the whole cost when the stage is ready. The
// hardware tells phases apart by parity only, so the protocol must never wait on a phase before
// the one ahead of it completed, nor after the one behind it did; the emulator checks it on every
// wait. The record: index = stage (or slot, team), expected = the phase, observed = the k-tile.
__device__ __forceinline__ bool pipe_wait(u64* bar, u32 phase, const Params& p, const Ctx& c, WaitSite site,
                                          u32 kt) {
#if defined(FLASHMOE_EMULATION)
  mbar_check_phase(bar, phase);
#endif
  return bounded_wait<false>(p, c, site, phase, [&](u32& seen) {
    seen = kt;
    return mbar_try_wait(bar, phase & 1);
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
  static constexpr int kTeams = kPingPong && kConsumerWGs > 1 ? kConsumerWGs : 1;
  static constexpr int kTeamWGs = kConsumerWGs / kTeams;
  static constexpr int kTeamWarps = kTeamWGs * 4;          // arrivals of a team on a barrier
  static constexpr int kWGRows = BM / (kTeamWGs > 0 ? kTeamWGs : 1);   // tile rows per warpgroup
  static constexpr int kMTiles = kWGRows / 64;             // m64 slabs per warpgroup
  static constexpr int kAcc = BN / 2;                      // fp32 accumulators per thread per slab
  static constexpr int kStageBytes = (BM + BN) * kStageKBytes;
  static constexpr int kBarrierBytes = 256;                // Barriers below
  // Epilogue staging: a team stages one slab of each of its warpgroups at a time (kPasses), in
  // its own kStageRows rows of BN / nb elements, padded by 16 bytes against bank conflicts.
  template <int kNB>
  static constexpr int stage_pitch() { return BN / kNB * kElemBytes + 16; }
  static constexpr int kPasses = kMTiles;
  static constexpr int kStageRows = kTeamWGs * 64;
  static constexpr int kStagingOffset = kStages * kStageBytes + kBarrierBytes;
  static constexpr int kStagingBytes = kTeams * kStageRows * stage_pitch<1>();   // pitch<1>: the widest
  static constexpr int kPipeBytes = kStagingOffset + kStagingBytes;
  static constexpr int kBlockK = kStageKBytes / kElemBytes;  // K elements per stage (TMA box dim 0)
  static constexpr int kKSteps = kStageKBytes / 32;          // wgmma k-steps per stage
  static constexpr int kRowStep = kProducerThreads / 8;      // rows one producer pass covers
  static constexpr u32 kBBytes = BN * kStageKBytes;          // TMA bytes per stage
  static constexpr u32 kPipeAlign = 1024;                    // start of the 128-byte swizzle pattern

  static_assert(kConsumerWGs >= 1, "the wgmma engine needs a producer and at least one consumer warpgroup");
  static_assert(kWGRows * kTeamWGs == BM && kWGRows % 64 == 0, "a team's warpgroups take whole m64 slabs of BM");
  static_assert(!kPingPong || kConsumerWGs == 2, "ping-pong: two teams, one per table slot (tasks.cuh)");
  static_assert(BN % 32 == 0 && BN <= 256 && BN % NB == 0 && kBNop % 8 == 0, "wgmma N: multiples of 8, <= 256");
  static_assert(BM % kRowStep == 0 && BN % kRowStep == 0, "producer passes cover whole tiles");
  static_assert(kRowStep % 8 == 0, "a producer thread keeps its row's swizzle phase (row % 8) across passes");
  static_assert(BM % 8 == 0 && kStageBytes % kPipeAlign == 0, "A and B tiles start on 1024-byte boundaries");

  // A full and an empty barrier per stage; a ready and a free barrier per slot of the task loop's
  // double-buffered tile tables (device/roles/tasks.cuh); a turn barrier per ping-pong team.
  struct Barriers {
    u64 full[kStages];    // the producers' cp.async arrives + thread 0's expect_tx
    u64 empty[kStages];   // one arrive per warp of the team that consumed the stage
    u64 ready[2];         // the producer's thread 0: the slot's tables and job are written
    u64 free[2];          // one arrive per warp of the team: the slot's job is finished
    u64 turn[2];          // one arrive per warp of the other team: its mainloop passed its waits
    u32 failed;           // the task loop's: a wait of some thread failed (tasks.cuh run_tasks)
    u64 trace_start[2];   // a traced build's: when each team's tile began (tasks.cuh consume_tasks)
  };
  static_assert(sizeof(Barriers) <= kBarrierBytes, "the barriers fit their area");

  __device__ __forceinline__ static Barriers& barriers(u8* pipe) {
    return *reinterpret_cast<Barriers*>(pipe + kStages * kStageBytes);
  }
  // The team of a consumer thread, and its warpgroup's index in the team.
  __device__ __forceinline__ static int team() { return kPingPong ? static_cast<int>(threadIdx.x >> 7) - 1 : 0; }
  __device__ __forceinline__ static int team_wg() { return (static_cast<int>(threadIdx.x >> 7) - 1) % kTeamWGs; }
  // The staging area of the calling consumer thread's team.
  __device__ __forceinline__ static u8* staging(u8* pipe) {
    return pipe + kStagingOffset + team() * kStageRows * stage_pitch<1>();
  }

  // Before the pipeline's first use: every thread fences (the generic accesses of earlier phases to
  // this memory -> the TMA writes to come), thread 0 initialises; the caller synchronises the block.
  __device__ __forceinline__ static void init_barriers(u8* pipe) {
    fence_proxy_async_smem();
    if (threadIdx.x != 0) return;
    Barriers& b = barriers(pipe);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&b.full[s], kProducerThreads + 1);
      mbar_init(&b.empty[s], kTeamWarps);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      mbar_init(&b.ready[j], 1);
      mbar_init(&b.free[j], kTeamWarps);
      mbar_init(&b.turn[j], kTeamWarps);
    }
    fence_mbar_init();
  }
  // After the last use (the block synchronised: nothing in flight); the memory is reused.
  __device__ __forceinline__ static void inval_barriers(u8* pipe) {
    if (threadIdx.x != 0) return;
    Barriers& b = barriers(pipe);
    for (int s = 0; s < kStages; ++s) {
      mbar_inval(&b.full[s]);
      mbar_inval(&b.empty[s]);
    }
    for (int j = 0; j < 2; ++j) {
      mbar_inval(&b.ready[j]);
      mbar_inval(&b.free[j]);
      mbar_inval(&b.turn[j]);
    }
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
      if (round > 0 && !pipe_wait(&bar.empty[s], round - 1, p, c, WaitSite{role, kWaitPipeEmpty, s}, kt)) {
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

  // fp32 -> tf32 (cvt.rna) of a whole stage, in place, by the team that consumes it.
  __device__ __forceinline__ static void round_stage_tf32(u8* stage) {
    uint4* v = reinterpret_cast<uint4*>(stage);
#pragma unroll 4
    for (int i = Team::rank(); i < kStageBytes / 16; i += Team::kSize) {
      uint4 x = v[i];
      x.x = to_tf32(x.x);
      x.y = to_tf32(x.y);
      x.z = to_tf32(x.z);
      x.w = to_tf32(x.w);
      v[i] = x;
    }
  }

  // Ping-pong: job n's team waits for its turn (job n - 1's team passed its last stage wait; see
  // the top of the file). The record: index = the team, expected = the turn (phase) awaited.
  __device__ __forceinline__ static bool wait_turn(u8* pipe, u32 n, const Params& p, const Ctx& c, u32 role) {
    if (!kPingPong || n == 0) return true;
    const u32 phase = (n - 1) / kTeams;   // job n - 1 is the other team's ((n - 1) / 2)-th
    return pipe_wait(&barriers(pipe).turn[team()], phase, p, c, WaitSite{role, kWaitMathTurn, (u32)team()}, 0);
  }
  // After every wait of the team's job (each warp converged: its lanes are past them).
  __device__ __forceinline__ static void pass_turn(u8* pipe) {
    if (kPingPong && (threadIdx.x & 31) == 0) mbar_arrive(&barriers(pipe).turn[(team() + 1) % kTeams]);
  }

  // One tile's ktiles stages into acc, from stage `stage0` of the ring (how many stages the
  // pipeline went through before this tile); every stage is released once its wgmmas are done,
  // and the turn is passed once the last stage has been waited for. False: a wait for a stage's
  // data failed (recorded), or `ok` came in false. The team then runs the remaining k-tiles
  // without waiting, on whatever the stages hold: wgmma and the named barrier are collective over
  // the warpgroup / the team, so no thread may leave them early. The tile's result is discarded.
  __device__ __forceinline__ bool consume(u8* pipe, int ktiles, u32 stage0, const Params& p, const Ctx& c,
                                          u32 role, bool ok = true) {
    Barriers& bar = barriers(pipe);
    const int ct = threadIdx.x - kProducerThreads;   // this thread among the consumers
    const int wg = team_wg();
    const u32 pipe_addr = smem_addr(pipe);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < kAcc; ++i) {
        acc[mt][i] = 0.0f;
        wgmma_pin(acc[mt][i]);
      }
    for (int kt = 0; kt < ktiles; ++kt) {
      const u32 n = stage0 + kt, s = n % kStages, round = n / kStages;
      ok = ok && pipe_wait(&bar.full[s], round, p, c, WaitSite{role, kWaitPipeFull, s}, kt);
      if constexpr (kFp32) {
        round_stage_tf32(pipe + s * kStageBytes);
        fence_proxy_async_smem();                     // these generic writes -> the wgmma reads
        Team::sync();                                 // every part of the stage is rounded
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
    pass_turn(pipe);
    wgmma_wait<0>();
    if (ktiles > 0 && (ct & 31) == 0) mbar_arrive(&bar.empty[(stage0 + ktiles - 1) % kStages]);
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
  // A . B^T over k_bytes of K, in the first team's threads. Row tables live in shared memory;
  // the caller synchronised after writing them. b_map: the weight tensor map whose box (K,
  // b_row0 .., op, b_expert) of BN / b_ops rows is B operand op (b_ops: 1 or 2), or nullptr to
  // read B through b_rows. The pipeline's waits report as task `role` of block context c. Ends
  // with the block synchronised; false (in every thread) when a wait failed: acc is then garbage
  // and the error is recorded. The caller has checked that `pipe` starts on a kPipeAlign
  // boundary (pipe_aligned()).
  __device__ bool mainloop(u8* pipe, const u8* const* a_rows, const u8* const* b_rows, u32 k_bytes,
                           const void* dummy, const TensorMap* b_map, int b_row0, int b_expert, int b_ops,
                           const Params& p, const Ctx& c, u32 role) {
    init_barriers(pipe);
    __syncthreads();
    const int ktiles = ktiles_of(k_bytes);
    const bool ok = threadIdx.x < kProducerThreads
        ? produce(pipe, a_rows, b_rows, k_bytes, dummy, b_map, b_row0, b_expert, b_ops, ktiles, 0, p, c, role)
        : team() == 0 ? consume(pipe, ktiles, 0, p, c, role) : true;
    // Every stage consumed (or abandoned): no copy or wgmma of this tile is in flight.
    const bool failed = __syncthreads_or(!ok);
    inval_barriers(pipe);
    return !failed;
  }

  // Pass `pass` of the epilogue: writes f(row, col, v) (v: the kNB accumulators of one output
  // element, row its tile row, col its column of the tile's BN / kNB) of slab `pass` of each of
  // the team's warpgroups into its staging area `out` (staging()) as elem_t, warpgroup w's at
  // row w * 64. Call after the tile's stages are consumed, with `pass` a constant once the
  // caller's loop is unrolled; synchronise the team before store_rows(). Only the consumer
  // warpgroups hold accumulators.
  template <int kNB = NB, class F>
  __device__ __forceinline__ void stage_output(u8* out, int pass, F f) const {
    constexpr int kCols = BN / kNB, kPitch = stage_pitch<kNB>();
    if (threadIdx.x < kProducerThreads) return;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    // This thread's first element; every other one is a compile-time offset from it.
    u8* base = out + (team_wg() * 64 + warp * 16 + (lane >> 2)) * kPitch + (lane & 3) * 2 * kElemBytes;
    const int row = team_wg() * kWGRows + pass * 64 + warp * 16 + (lane >> 2);   // store_rows' mapping
    struct alignas(2 * kElemBytes) Pair { elem_t e[2]; };   // the two adjacent columns c = 0, 1
    const float* a = acc[pass];   // callers unroll their pass loop: acc stays in registers
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        Pair out;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float v[kNB];
#pragma unroll
          for (int b = 0; b < kNB; ++b) v[b] = a[b * (kCols / 2) + 4 * j + 2 * h + c];
          out.e[c] = from_float(f(row + h * 8, j * 8 + (lane & 3) * 2 + c, v));
        }
        *reinterpret_cast<Pair*>(base + h * 8 * kPitch + j * 8 * kElemBytes) = out;
      }
      // Ping-pong: keeps the compiler from interleaving more elements' activations than the
      // registers beside the other slab's accumulators hold (a plain GELU tile spilled).
      if constexpr (kMTiles > 1) __syncwarp();
    }
  }

  // Group G copies pass `pass` of the staged tile out, 16 bytes at a time: store(row, byte offset
  // in the row's column range, value) for every tile row with rows_valid[row] and every 16-byte
  // chunk below valid_cols.
  template <int kNB = NB, class G = Block, class Store>
  __device__ __forceinline__ static void store_rows(const u8* staged, int pass, const bool* rows_valid,
                                                    int valid_cols, Store store) {
    constexpr int kChunksPerRow = BN / kNB * kElemBytes / 16, kPitch = stage_pitch<kNB>();
    constexpr int kChunks = kStageRows * kChunksPerRow;
    // Not unrolled for tiles of 128 accumulators a thread: unrolled, the compiler hoists every
    // iteration's addresses out of the task loop, and those registers are the ones they need.
    // Nor in an NVSHMEM build, whose consumers keep 168 registers (tasks.cuh RegisterBudget).
    constexpr bool kRolled = kMTiles * kAcc > 64 || FLASHMOE_TRANSPORT_NVSHMEM;
    constexpr int kUnroll = kRolled ? 1 : (kChunks + G::kSize - 1) / G::kSize;
#pragma unroll (kUnroll)
    for (int idx = G::rank(); idx < kChunks; idx += G::kSize) {
      const int srow = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
      const int row = srow / 64 * kWGRows + pass * 64 + srow % 64;   // staged row -> tile row
      if (!rows_valid[row] || chunk * kVecElems >= valid_cols) continue;
      store(row, chunk * 16, *reinterpret_cast<const uint4*>(staged + srow * kPitch + chunk * 16));
    }
  }
};

}  // namespace flashmoe
