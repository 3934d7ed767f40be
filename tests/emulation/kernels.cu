// Test kernels for tests/test_emulator.py, built by flashmoe.host.emulator.build_library with the
// spec macros the test picks (dtype, threads, pipeline stages). Each export runs one emulated
// launch and returns 0, or 1 with the emulator's message in `err`.
#include "flashmoe/device/common/spec.cuh"
#include "flashmoe/device/common/wait.cuh"
#include "flashmoe/device/gemm/mma_sync.cuh"
#include "flashmoe/device/common/ptx_sm90.cuh"
#include "flashmoe/device/roles/scheduler.cuh"

using namespace flashmoe;

namespace {

template <class F>
int run(int grid, int block, u64 smem, u64 seed, F f, char* err, u64 err_len) {
  return emu::launch(grid, block, smem, seed, [](void* ctx) { (*static_cast<F*>(ctx))(); }, &f, err, err_len);
}

// One warp: a 16 x 128-byte A tile and a 16 x 128-byte B tile (B rows are output columns) go into
// shared memory with the engine's swizzle, fragments come out through ldmatrix_x4 addressed as
// MmaSyncTile::compute_stage addresses them, and two m16n8 MMAs per 32 bytes of K give D = A B^T.
// op: 0 bf16 m16n8k16, 1 f16 m16n8k16, 2 tf32 m16n8k8 (operands rounded with to_tf32 first).
void mma_warp(int op, const u8* a, const u8* b, float* d) {
  using Tile = MmaSyncTile<64, 64, 1>;
  u8* smem = emu::dynamic_smem();
  const int lane = threadIdx.x & 31;
  for (int idx = lane; idx < 32 * 8; idx += 32) {
    const int row = idx >> 3, chunk = idx & 7;
    const u8* src = row < 16 ? a + row * 128 + chunk * 16 : b + (row - 16) * 128 + chunk * 16;
    cp_async_16(smem + Tile::swizzle(row, chunk), src, true);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  float acc[2][4] = {};
  const u8* b_tile = smem + 16 * kStageKBytes;
  for (int ks = 0; ks < kStageKBytes / 32; ++ks) {
    u32 af[4], bf[4];
    ldmatrix_x4(af, smem + Tile::swizzle(lane & 15, 2 * ks + (lane >> 4)));
    ldmatrix_x4(bf, b_tile + Tile::swizzle((lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
    if (op == 2)
      for (int r = 0; r < 4; ++r) af[r] = to_tf32(af[r]), bf[r] = to_tf32(bf[r]);
    for (int ni = 0; ni < 2; ++ni) {
      const u32 b0 = bf[ni * 2], b1 = bf[ni * 2 + 1];
      if (op == 0) mma_bf16_m16n8k16(acc[ni], af, b0, b1);
      else if (op == 1) mma_f16_m16n8k16(acc[ni], af, b0, b1);
      else mma_tf32_m16n8k8(acc[ni], af, b0, b1);
    }
  }
  for (int ni = 0; ni < 2; ++ni)
    for (int i = 0; i < 4; ++i)
      d[((lane >> 2) + (i >= 2 ? 8 : 0)) * 16 + ni * 8 + (lane & 3) * 2 + (i & 1)] = acc[ni][i];
}

// The whole engine on one gathered tile: tables in shared memory after the pipeline (as
// expert_gemm.cuh's TileTables), mainloop, epilogue f, store_rows into out[BM][kBNop].
template <int BM, int BN, int NB>
int tile(const elem_t* a, const i32* a_rows, const elem_t* b, const i32* b_rows, int K, const u8* rows_valid,
         int valid_cols, int act, elem_t* out, u64 seed, char* err, u64 err_len) {
  using T = MmaSyncTile<BM, BN, NB>;
  constexpr u64 smem = T::kPipeBytes + (BM + BN) * sizeof(void*) + BM;
  return run(1, kThreads, smem, seed, [=] {
    u8* s = emu::dynamic_smem();
    const u8** ar = reinterpret_cast<const u8**>(s + T::kPipeBytes);
    const u8** br = ar + BM;
    bool* valid = reinterpret_cast<bool*>(br + BN);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      ar[i] = a_rows[i] < 0 ? nullptr : reinterpret_cast<const u8*>(a + (u64)a_rows[i] * K);
      valid[i] = rows_valid[i] != 0;
    }
    for (int i = threadIdx.x; i < BN; i += kThreads)
      br[i] = b_rows[i] < 0 ? nullptr : reinterpret_cast<const u8*>(b + (u64)b_rows[i] * K);
    __syncthreads();
    T g;
    g.mainloop(s, ar, br, (u32)K * kElemBytes, a);
    g.stage_output(s, [act](int, int, const float* v) { return NB == 2 ? activate(v[0], act) * v[NB - 1] : v[0]; });
    __syncthreads();
    T::store_rows(s, valid, valid_cols, [&](int row, int byte, uint4 v) {
      st_v4(reinterpret_cast<u8*>(out + (u64)row * T::kBNop) + byte, v);
    });
  }, err, err_len);
}

}  // namespace

FLASHMOE_EMU_EXPORT int emu_test_mma(int op, const u8* a, const u8* b, float* d, char* err, u64 n) {
  return run(1, 32, 32 * kStageKBytes, 0, [=] { mma_warp(op, a, b, d); }, err, n);
}

// Engine shapes: 0 <64,64,1>, 1 <64,64,2>, 2 <128,64,1> (two warps along M), 3 <64,128,2>.
FLASHMOE_EMU_EXPORT int emu_test_tile(int shape, const elem_t* a, const i32* a_rows, const elem_t* b,
                                      const i32* b_rows, int K, const u8* rows_valid, int valid_cols, int act,
                                      elem_t* out, u64 seed, char* err, u64 n) {
  switch (shape) {
    case 0: return tile<64, 64, 1>(a, a_rows, b, b_rows, K, rows_valid, valid_cols, act, out, seed, err, n);
    case 1: return tile<64, 64, 2>(a, a_rows, b, b_rows, K, rows_valid, valid_cols, act, out, seed, err, n);
    case 2: return tile<128, 64, 1>(a, a_rows, b, b_rows, K, rows_valid, valid_cols, act, out, seed, err, n);
    default: return tile<64, 128, 2>(a, a_rows, b, b_rows, K, rows_valid, valid_cols, act, out, seed, err, n);
  }
}

// Two blocks of two warps; per thread 8 words: xor shuffles by 1..16, __shfl_sync from lane
// (7 lane + 3) % 32, the ballot of "in is odd", and a butterfly sum of the warp's values.
FLASHMOE_EMU_EXPORT int emu_test_warp(const u32* in, u32* out, char* err, u64 n) {
  return run(2, 64, 0, 0, [=] {
    const int gid = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31;
    const u32 v = in[gid];
    for (int j = 0; j < 5; ++j) out[gid * 8 + j] = __shfl_xor_sync(0xffffffffu, v, 1 << j);
    out[gid * 8 + 5] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32);
    out[gid * 8 + 6] = __ballot_sync(0xffffffffu, v & 1);
    float s = static_cast<float>(v & 0xff);
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    out[gid * 8 + 7] = static_cast<u32>(s);
  }, err, n);
}

// Three blocks; every round each thread yields or sleeps a thread-dependent number of times,
// writes its slot, and after a barrier reads a neighbour's: a barrier that lets anyone through
// early shows up as a stale value.
FLASHMOE_EMU_EXPORT int emu_test_barrier(int rounds, u64 seed, u32* out, char* err, u64 n) {
  return run(3, 128, 128 * 4, seed, [=] {
    u32* slot = reinterpret_cast<u32*>(emu::dynamic_smem());
    const int t = threadIdx.x;
    for (int r = 0; r < rounds; ++r) {
      for (int i = 0; i < (t * (r + 1)) % 5; ++i) fence_acq_rel_gpu();
      if (t % 3 == 0) sleep_ns(100 * (t % 7));
      slot[t] = t * 1000 + r;
      __syncthreads();
      out[((u64)blockIdx.x * rounds + r) * 128 + t] = slot[(t + 1 + r) % 128];
      __syncthreads();
    }
  }, err, n);
}

// Four blocks of 128: tickets from atomic_add_relaxed_gpu, int/float adds, an atomicOr mask in
// shared memory, an atomicExch chain and a CAS increment loop that yields between read and CAS.
FLASHMOE_EMU_EXPORT int emu_test_atomics(u32* counters, float* fsum, u32* tickets, u64* masks, u32* exch_old,
                                         char* err, u64 n) {
  return run(4, 128, 8, 0, [=] {
    const int gid = blockIdx.x * 128 + threadIdx.x;
    tickets[gid] = atomic_add_relaxed_gpu(&counters[0], 1);
    atomicAdd(reinterpret_cast<int*>(&counters[1]), 2);
    atomicAdd(fsum, 0.5f);
    exch_old[gid] = atomicExch(&counters[2], gid + 1);
    for (;;) {
      const u32 old = ld_relaxed_gpu(&counters[3]);
      fence_acq_rel_gpu();
      if (atomicCAS(&counters[3], old, old + 1) == old) break;
    }
    u64* mask = reinterpret_cast<u64*>(emu::dynamic_smem());
    if (threadIdx.x == 0) *mask = 0;
    __syncthreads();
    atomicOr(mask, 1ull << (threadIdx.x % 64));
    __syncthreads();
    if (threadIdx.x == 0) masks[blockIdx.x] = *mask;
  }, err, n);
}

// Conversions of fp32 bit patterns: to bf16 / f16 (round to nearest even) and back, to tf32.
FLASHMOE_EMU_EXPORT int emu_test_convert(const u32* in, int count, u16* bf, u16* hf, float* bf_back, float* hf_back,
                                         u32* tf, char* err, u64 n) {
  return run(1, 32, 0, 0, [=] {
    for (int i = threadIdx.x; i < count; i += 32) {
      const float f = __uint_as_float(in[i]);
      const __nv_bfloat16 b = __float2bfloat16_rn(f);
      const __half h = __float2half_rn(f);
      bf[i] = b.__x;
      hf[i] = h.__x;
      bf_back[i] = __bfloat162float(b);
      hf_back[i] = __half2float(h);
      tf[i] = to_tf32(in[i]);
    }
  }, err, n);
}

// rank_barrier (wait.cuh): three blocks of one rank pass two barriers; each checks the others'
// writes. (Bounded waits that time out or see a flag: the wait probe, device/probes.cu.)
FLASHMOE_EMU_EXPORT int emu_test_rank_barrier(u64 timeout_ns, Control* control, u32* flags, u32* result,
                                              char* err, u64 n) {
  return run(3, 128, 16, 0, [=] {
    Params p{};
    p.control = control;
    p.timeout_ns = timeout_ns;
    p.blocks_per_rank = 3;
    p.region_offset[kSyncCounters] = 0;          // slice = flags: counters at flags[0 .. 3]
    Ctx c{};
    c.rank = 3;
    c.block = blockIdx.x;
    c.slice = reinterpret_cast<u8*>(flags);
    volatile u32* scratch = reinterpret_cast<volatile u32*>(emu::dynamic_smem());
    if (threadIdx.x == 0) flags[8 + blockIdx.x] = 100 + blockIdx.x;
    bool ok = rank_barrier(p, c, 1, kTaskRoute, scratch);
    u32 seen = 0;
    for (int b = 0; b < 3; ++b) seen += flags[8 + b];
    if (threadIdx.x == 0) flags[12 + blockIdx.x] = 200 + blockIdx.x;
    ok = ok && rank_barrier(p, c, 2, kTaskPrefix, scratch);
    for (int b = 0; b < 3; ++b) seen += flags[12 + b];
    if (threadIdx.x == 0) result[blockIdx.x] = ok ? seen : 0;
  }, err, n);
}

// cp.async lands at the issuing thread's wait: out[0] is read after the commit (still poison),
// out[1] after wait_group 1 with a second group pending (the first group's data), out[2] the
// second group's slot at that point (poison), out[3] after wait_group 0.
FLASHMOE_EMU_EXPORT int emu_test_cp_async(const u32* src, u32* out, char* err, u64 n) {
  return run(1, 32, 64, 0, [=] {
    u32* smem = reinterpret_cast<u32*>(emu::dynamic_smem());
    if (threadIdx.x != 0) return;
    cp_async_16(smem, src, true);
    cp_async_commit();
    out[0] = smem[0];
    cp_async_16(smem + 4, src + 4, true);
    cp_async_16(smem + 8, src, false);
    cp_async_commit();
    cp_async_wait<1>();
    out[1] = smem[0];
    out[2] = smem[4];
    cp_async_wait<0>();
    out[3] = smem[4] + smem[8];
  }, err, n);
}

// Misuses the emulator must report instead of hanging or passing silently.
FLASHMOE_EMU_EXPORT int emu_test_misuse(int mode, u8* global, char* err, u64 n) {
  return run(2, 64, 256, 0, [=] {
    u8* smem = emu::dynamic_smem();
    const int t = threadIdx.x;
    u32 r[4];
    switch (mode) {
      case 0:   // a thread leaves while its block waits at a barrier
        if (blockIdx.x == 1 && t == 5) return;
        __syncthreads();
        break;
      case 1:   // half a warp shuffles, the other half votes
        if (t < 16) (void)__shfl_xor_sync(0xffffffffu, t, 1);
        else (void)__ballot_sync(0xffffffffu, 1);
        break;
      case 2:   // ldmatrix from global memory
        ldmatrix_x4(r, global + 16 * (t & 7));
        break;
      case 3:   // a store past the block's shared memory
        if (t == 0) smem[256 + blockIdx.x] = 1;
        break;
      case 4:   // a misaligned 16-byte store
        st_v4(global + 8, make_uint4(1, 2, 3, 4));
        break;
      case 7:   // cp.async copies nobody waits for
        cp_async_16(smem + 16 * (t % 16), global, true);
        cp_async_commit();
        break;
      case 6:   // a spin with no bound, on a flag nobody sets
        while (ld_acquire_gpu(reinterpret_cast<const u32*>(global)) == 0) sleep_ns(1000);
        break;
      default:  // a collective over part of a warp
        (void)__shfl_sync(0x0000ffffu, t, 0);
    }
  }, err, n);
}

// An mbarrier's life in shared memory the kernel also uses for data (wgmma.cuh's barrier area
// holds the router's values before the task loop). One warp; mode 0: the words are written with
// data whose bits would read as a live barrier, then init, an arrive by every lane, the wait,
// inval, data again and a second init -- all legal. 1: a plain store into a valid mbarrier, then
// an arrive. 2: init twice. 3: an arrive after inval.
FLASHMOE_EMU_EXPORT int emu_test_mbarrier(int mode, char* err, u64 n) {
  return run(1, 32, 64, 0, [=] {
    u64* bar = reinterpret_cast<u64*>(emu::dynamic_smem());
    const int t = threadIdx.x;
    if (t == 0) *bar = ~0ull;
    __syncthreads();
    if (t == 0) mbar_init(bar, 32);
    if (t == 0 && mode == 2) mbar_init(bar, 32);
    __syncthreads();
    if (t == 0 && mode == 1) *bar = 0;
    if (t == 0 && mode == 3) mbar_inval(bar);
    __syncthreads();
    mbar_arrive(bar);
    while (!mbar_try_wait(bar, 0)) {}
    __syncthreads();
    if (t == 0) {
      mbar_inval(bar);
      *bar = ~0ull;
      mbar_init(bar, 1);
      mbar_inval(bar);
    }
  }, err, n);
}

// The routed tasks of a rank whose E_l local experts have rows[e] rows (scheduler.cuh
// routed_tile, band order within an expert): for each task of a grid of `cols` column tiles, its
// rank-wide row tile, column tile, expert, first row in the expert and row count, five ints.
FLASHMOE_EMU_EXPORT int emu_test_routed_tiles(int experts, const i32* rows, int cols, i32* out, char* err, u64 n) {
  const u64 smem = (16 + 3 * experts + 2) * sizeof(i32);   // TaskMap's header, rows, row_off, tile_off
  return run(1, 32, smem, 0, [=] {
    if (threadIdx.x != 0) return;
    Params p{};
    p.experts_per_rank = experts;
    p.smem_sched_offset = 0;
    const Ctx c{};
    TaskMap tm(p, c);
    tm.tile_off[0] = 0;
    for (int e = 0; e < experts; ++e) {
      tm.rows[e] = rows[e];
      tm.tile_off[e + 1] = tm.tile_off[e] + ceil_div(rows[e], kBlockM);
    }
    for (int task = 0; task < tm.tile_off[experts] * cols; ++task) {
      const RoutedTile t = routed_tile(p, tm, task, cols);
      const int got[5] = {t.tile, t.n, t.e, t.q0, t.nrows};
      for (int i = 0; i < 5; ++i) out[task * 5 + i] = got[i];
    }
  }, err, n);
}

// band_tile on its own, with any band size: for each task of a `rows` x `cols` grid, its row and
// column tile, two ints.
FLASHMOE_EMU_EXPORT int emu_test_band_tile(int rows, int cols, int band, i32* out, char* err, u64 n) {
  return run(1, 32, 0, 0, [=] {
    if (threadIdx.x != 0) return;
    for (int j = 0; j < rows * cols; ++j) {
      const GridTile g = band_tile(j, rows, cols, band);
      out[j * 2] = g.row;
      out[j * 2 + 1] = g.col;
    }
  }, err, n);
}
