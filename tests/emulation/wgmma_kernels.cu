// Test kernels for tests/test_wgmma_emulated.py: the wgmma engine (device/gemm/wgmma.cuh) on one
// gathered tile, run by the CPU emulator with device/emulation/wgmma_emu.h standing in for the
// Hopper instructions. Built with the spec macros the test picks (dtype, threads, stages).
#include "flashmoe/device/common/spec.cuh"
#include "flashmoe/device/gemm/wgmma.cuh"

using namespace flashmoe;

namespace {

template <class F>
int run(int grid, int block, u64 smem, u64 seed, F f, char* err, u64 err_len) {
  return emu::launch(grid, block, smem, seed, [](void* ctx) { (*static_cast<F*>(ctx))(); }, &f, err, err_len);
}

// A rows a[a_rows[i]] (-1: zeros). B operand op of the tile: rows col0 .. col0 + BN/NB of
// w[expert][op] where w is [experts][NB][inter][K] (rows past `inter` read as zeros), loaded by TMA
// from a 4-D map of w (tma != 0) or through row pointers as expert_gemm.cuh builds them. The
// epilogue writes act(gate) * up (NB = 2) or the accumulator (NB = 1) to out[BM][BN / NB].
template <int NB>
int tile(const elem_t* a, const i32* a_rows, const elem_t* w, int experts, int inter, int expert, int col0, int K,
         int tma, const u8* rows_valid, int valid_cols, int act, elem_t* out, u64 seed, char* err, u64 err_len) {
  using T = WgmmaTile<kBlockM, kBlockN, NB>;
  constexpr int kOpRows = kBlockN / NB;
  constexpr u64 smem = T::kPipeBytes + (kBlockM + kBlockN) * sizeof(void*) + kBlockM;
  alignas(64) static TensorMap map;
  const u64 dims[4] = {(u64)K, (u64)inter, NB, (u64)experts};
  const u64 strides[3] = {(u64)K * kElemBytes, (u64)inter * K * kElemBytes, (u64)NB * inter * K * kElemBytes};
  const u32 box[4] = {(u32)T::kBlockK, (u32)kOpRows, 1, 1};
  emu::make_emu_tensor_map(map, w, dims, strides, box, kElemBytes);
  const TensorMap* map_ptr = tma ? &map : nullptr;
  return run(1, kThreads, smem, seed, [=] {
    u8* s = emu::dynamic_smem();
    const u8** ar = reinterpret_cast<const u8**>(s + T::kPipeBytes);
    const u8** br = ar + kBlockM;
    bool* valid = reinterpret_cast<bool*>(br + kBlockN);
    for (int i = threadIdx.x; i < kBlockM; i += kThreads) {
      ar[i] = a_rows[i] < 0 ? nullptr : reinterpret_cast<const u8*>(a + (u64)a_rows[i] * K);
      valid[i] = rows_valid[i] != 0;
    }
    for (int r = threadIdx.x; r < kBlockN; r += kThreads) {
      const int op = r / kOpRows, col = col0 + r % kOpRows;
      br[r] = col < inter ? reinterpret_cast<const u8*>(w + (((u64)expert * NB + op) * inter + col) * K) : nullptr;
    }
    __syncthreads();
    T g;
    g.mainloop(s, ar, br, (u32)K * kElemBytes, a, map_ptr, col0, expert, NB);
    g.stage_output(s, [act](const float* v) { return NB == 2 ? activate(v[0], act) * v[NB - 1] : v[0]; });
    __syncthreads();
    T::store_rows(s, valid, valid_cols, [&](int row, int byte, uint4 v) {
      st_v4(reinterpret_cast<u8*>(out + (u64)row * kOpRows) + byte, v);
    });
  }, err, err_len);
}

}  // namespace

FLASHMOE_EMU_EXPORT int emu_wgmma_tile(int nb, const elem_t* a, const i32* a_rows, const elem_t* w, int experts,
                                       int inter, int expert, int col0, int K, int tma, const u8* rows_valid,
                                       int valid_cols, int act, elem_t* out, u64 seed, char* err, u64 n) {
  if (nb == 2)
    return tile<2>(a, a_rows, w, experts, inter, expert, col0, K, tma, rows_valid, valid_cols, act, out, seed, err, n);
  return tile<1>(a, a_rows, w, experts, inter, expert, col0, K, tma, rows_valid, valid_cols, act, out, seed, err, n);
}
