// Tile GEMM on tensor cores with mma.sync (sm_80 and newer): C[BM, BN/NB] (x NB) = A . B^T with fp32
// accumulators, where every A row and every B row is fetched through its own pointer. That one
// form serves all the kernel's GEMMs: A rows gathered from wherever a token landed (recv buffer,
// x, the GEMM0 output), B rows from an expert's weights (gate rows then up rows for a gated GEMM0,
// so one thread holds gate and up of the same output element and SwiGLU fuses in registers).
//
// Shared memory per stage: (BM + BN) rows of 128 bytes (64 bf16/fp16 or 32 fp32 of K). A row's
// eight 16-byte chunks are XOR-swizzled by (row % 8), so cp.async writes and ldmatrix reads are
// both free of bank conflicts; the same layout is the wgmma 128-byte swizzle atom.
//
// fp32 operands run as TF32 (m16n8k8, rounded to nearest): per 32 bytes of K a bf16 tile takes one
// m16n8k16 and an fp32 tile one m16n8k8, so loads and fragments are shared byte for byte.
#pragma once

#include "flashmoe/device/common/spec.cuh"

namespace flashmoe {

template <int BM, int BN, int NB>
struct MmaSyncTile {
  static constexpr int kBNop = BN / NB;          // columns of C per B operand
  static constexpr int kWarpsNMax = BM >= 128 ? kWarps / 2 : kWarps;
  static constexpr int kWarpsN = kWarpsNMax < kBNop / 16 ? kWarpsNMax : kBNop / 16;
  static constexpr int kWarpsM = kWarps / kWarpsN;
  static constexpr int kWM = BM / kWarpsM;       // warp tile rows
  static constexpr int kWN = kBNop / kWarpsN;    // warp tile columns per operand
  static constexpr int kMI = kWM / 16;
  static constexpr int kNI = kWN / 8;
  static constexpr int kStageBytes = (BM + BN) * kStageKBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr u32 kPipeAlign = 16;          // cp.async and ldmatrix rows; the swizzle is relative
  // Epilogue staging tile: BM rows of kBNop elements, padded by 16 bytes against bank conflicts.
  static constexpr int kStagePitch = kBNop * kElemBytes + 16;
  static_assert(kWarpsM * kWarpsN == kWarps, "warps must tile the block");
  static_assert(kWM % 16 == 0 && kWN % 16 == 0, "warp tiles are whole m16 x (2 n8) fragments");
  static_assert(BM * kStagePitch <= kPipeBytes, "the epilogue tile reuses the pipeline's shared memory");
  // The epilogue tile reuses the pipeline's shared memory (the block finished the main loop).
  __device__ __forceinline__ static u8* staging(u8* pipe) { return pipe; }

  float acc[NB][kMI][kNI][4];

  __device__ __forceinline__ static int swizzle(int row, int chunk) {
    return row * kStageKBytes + ((chunk ^ (row & 7)) << 4);
  }

  // Stage `stage` <- K bytes [kt * 128, kt * 128 + 128) of every A and B row (zeros past k_bytes
  // or for a null row). `dummy` is any valid global address (cp.async needs one even when it
  // reads nothing).
  __device__ __forceinline__ static void load_stage(u8* pipe, int stage, int kt, const u8* const* a_rows,
                                                    const u8* const* b_rows, u32 k_bytes, const void* dummy) {
    u8* base = pipe + stage * kStageBytes;
    for (int idx = threadIdx.x; idx < (BM + BN) * 8; idx += kThreads) {
      const int row = idx >> 3, chunk = idx & 7;
      const u8* src = row < BM ? a_rows[row] : b_rows[row - BM];
      const u32 kbyte = kt * kStageKBytes + chunk * 16;
      const bool valid = src != nullptr && kbyte < k_bytes;
      cp_async_16(base + swizzle(row, chunk), valid ? src + kbyte : dummy, valid);
    }
  }

  __device__ __forceinline__ void compute_stage(const u8* base, int warp_m, int warp_n, int lane) {
    const u8* a_tile = base;
    const u8* b_tile = base + BM * kStageKBytes;
#pragma unroll
    for (int ks = 0; ks < kStageKBytes / 32; ++ks) {
      u32 a[kMI][4];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        const int row = warp_m * kWM + mi * 16 + (lane & 15);
        ldmatrix_x4(a[mi], a_tile + swizzle(row, 2 * ks + (lane >> 4)));
        if (kFp32) {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[mi][r] = to_tf32(a[mi][r]);
        }
      }
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        u32 bf[kNI / 2][4];
#pragma unroll
        for (int nj = 0; nj < kNI / 2; ++nj) {
          const int row = b * kBNop + warp_n * kWN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(bf[nj], b_tile + swizzle(row, 2 * ks + ((lane >> 3) & 1)));
          if (kFp32) {
#pragma unroll
            for (int r = 0; r < 4; ++r) bf[nj][r] = to_tf32(bf[nj][r]);
          }
        }
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
          for (int ni = 0; ni < kNI; ++ni) {
            const u32 b0 = bf[ni >> 1][(ni & 1) * 2], b1 = bf[ni >> 1][(ni & 1) * 2 + 1];
#if FLASHMOE_DTYPE == 0
            mma_bf16_m16n8k16(acc[b][mi][ni], a[mi], b0, b1);
#elif FLASHMOE_DTYPE == 1
            mma_f16_m16n8k16(acc[b][mi][ni], a[mi], b0, b1);
#else
            mma_tf32_m16n8k8(acc[b][mi][ni], a[mi], b0, b1);
#endif
          }
        }
      }
    }
  }

  // acc = A . B^T over k_bytes of K. Row tables live in shared memory; the caller synchronised
  // after writing them. Ends with the pipeline drained and the block synchronised.
  __device__ void mainloop(u8* pipe, const u8* const* a_rows, const u8* const* b_rows, u32 k_bytes,
                           const void* dummy) {
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[b][mi][ni][r] = 0.0f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
    const int ktiles = static_cast<int>((k_bytes + kStageKBytes - 1) / kStageKBytes);
    // One commit per stage slot, loaded or not, so "stage kt is complete" is always
    // "at most kStages - 2 groups pending".
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < ktiles) load_stage(pipe, s, s, a_rows, b_rows, k_bytes, dummy);
      cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
      cp_async_wait<kStages - 2>();
      __syncthreads();   // stage kt is visible to all; stage kt - 1 is no longer being read
      const int next = kt + kStages - 1;
      if (next < ktiles) load_stage(pipe, next % kStages, next, a_rows, b_rows, k_bytes, dummy);
      cp_async_commit();
      compute_stage(pipe + (kt % kStages) * kStageBytes, warp_m, warp_n, lane);
    }
    cp_async_wait<0>();
    __syncthreads();
  }

  // Writes f(row, col, v) (v: the NB accumulators of one output element, row its tile row, col its
  // column in the tile's BN / NB) into the staging tile in shared memory as elem_t. Call after
  // mainloop(); synchronise before store_rows().
  template <class F>
  __device__ __forceinline__ void stage_output(u8* pipe, F f) const {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = warp_m * kWM + mi * 16 + (lane >> 2) + half * 8;
          const int col = warp_n * kWN + ni * 8 + (lane & 3) * 2;
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float v[NB];
#pragma unroll
            for (int b = 0; b < NB; ++b) v[b] = acc[b][mi][ni][half * 2 + c];
            *reinterpret_cast<elem_t*>(pipe + row * kStagePitch + (col + c) * kElemBytes) =
                from_float(f(row, col + c, v));
          }
        }
      }
    }
  }

  // Copies the staged tile out, 16 bytes at a time: store(row, byte offset in the row's column
  // range, value) for every row with rows_valid[row] and every 16-byte chunk below valid_cols.
  template <class Store>
  __device__ __forceinline__ static void store_rows(const u8* pipe, const bool* rows_valid, int valid_cols,
                                                    Store store) {
    constexpr int kChunksPerRow = kBNop * kElemBytes / 16;
    for (int idx = threadIdx.x; idx < BM * kChunksPerRow; idx += kThreads) {
      const int row = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
      if (!rows_valid[row] || chunk * kVecElems >= valid_cols) continue;
      store(row, chunk * 16, *reinterpret_cast<const uint4*>(pipe + row * kStagePitch + chunk * 16));
    }
  }
};

}  // namespace flashmoe
