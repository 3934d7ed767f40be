// What a warp collective computes once all 32 lanes have deposited their operands (runtime.cpp
// warp_exchange): shuffles, ballot, ldmatrix and the mma shapes the kernel uses, with the fragment
// layouts of the PTX ISA.
#pragma once

#include <cstring>

#include "flashmoe/device/emulation/simt.h"

namespace flashmoe::emu {

// One warp's exchange slots: every lane's operand words in, every lane's result words out.
struct WarpSlots {
  u32 in[32][10];
  u32 out[32][4];
};

namespace warp_ops {

inline float bf16_value(u32 h) { return bits<float>(h << 16); }
inline float f16_value(u32 h) { return __half2float(__half{static_cast<unsigned short>(h)}); }
inline u32 half_of(u32 reg, int h) { return (reg >> (16 * h)) & 0xffffu; }

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: PTX ISA 9.7.14.5.8 "Matrix Fragments for
// mma.m16n8k16 with floating point type". groupID g = lane >> 2, threadID_in_group t = lane % 4;
// register r holds elements 2r (low half) and 2r + 1.
//   A (16 x 16): a_i at row g for i in {0,1,4,5}, else g + 8; col 2t + (i & 1), + 8 for i >= 4.
//   B (16 x 8):  b_i at row (k) 2t + (i & 1), + 8 for i >= 2; col (n) g.
//   C, D:        c_i at row g for i < 2, else g + 8; col 2t + (i & 1).
// mma.sync.aligned.m16n8k8.row.col.f32.tf32: 9.7.14.5.7 "Matrix Fragments for mma.m16n8k8".
//   A (16 x 8):  a_i at row g for i in {0,2}, else g + 8; col t for i < 2, else t + 4.
//   B (8 x 8):   b0 at row t, b1 at row t + 4; col g.   C, D as above.
// Products of bf16/f16/tf32 values are exact in fp32; the sum runs in fp32 in k order (the
// hardware's internal summation order and rounding are not modelled).
inline void mma(WarpSlots& w, WarpOp op) {
  float a[16][16], b[16][8], c[16][8];
  const int K = op == kOpMmaTf32 ? 8 : 16;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    const u32* in = w.in[lane];
    if (op == kOpMmaTf32) {
      // The tensor core reads only the tf32 bits of an fp32 register (the kernel rounds first).
      auto tf32 = [](u32 v) { return bits<float>(v & 0xffffe000u); };
      for (int i = 0; i < 4; ++i) a[(i == 0 || i == 2) ? g : g + 8][i < 2 ? t : t + 4] = tf32(in[i]);
      b[t][g] = tf32(in[4]);
      b[t + 4][g] = tf32(in[5]);
    } else {
      auto value = op == kOpMmaBf16 ? bf16_value : f16_value;
      for (int i = 0; i < 8; ++i) {
        const float v = value(half_of(in[i >> 1], i & 1));
        a[(i < 2 || (i >= 4 && i < 6)) ? g : g + 8][2 * t + (i & 1) + (i >= 4 ? 8 : 0)] = v;
      }
      for (int i = 0; i < 4; ++i) b[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = value(half_of(in[4 + (i >> 1)], i & 1));
    }
    for (int i = 0; i < 4; ++i) c[i < 2 ? g : g + 8][2 * t + (i & 1)] = bits<float>(in[6 + i]);
  }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < K; ++k) c[m][n] += a[m][k] * b[k][n];   // exact product: same as an fma
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) w.out[lane][i] = bits<u32>(c[i < 2 ? g : g + 8][2 * t + (i & 1)]);
  }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: PTX ISA 9.7.14.5.15. Lanes 8m .. 8m + 7 supply the row
// addresses of matrix m (16 bytes each); lane l receives, in register m, the 32-bit word l % 4 of
// row l / 4 of matrix m (its two b16 elements at columns 2 (l % 4) and 2 (l % 4) + 1).
inline void ldmatrix(WarpSlots& w) {
  for (int m = 0; m < 4; ++m)
    for (int lane = 0; lane < 32; ++lane) {
      const u32* addr = w.in[8 * m + lane / 4];
      const u8* row = reinterpret_cast<const u8*>(static_cast<uintptr_t>(addr[0] | (u64)addr[1] << 32));
      std::memcpy(&w.out[lane][m], row + 4 * (lane % 4), 4);
    }
}

inline void compute(WarpSlots& w, WarpOp op) {
  switch (op) {
    case kOpShfl:
      for (int lane = 0; lane < 32; ++lane) {
        const u32 src = w.in[lane][1];
        w.out[lane][0] = src < 32 ? w.in[src][0] : w.in[lane][0];
      }
      break;
    case kOpBallot: {
      u32 ballot = 0;
      for (int lane = 0; lane < 32; ++lane) ballot |= (w.in[lane][0] ? 1u : 0u) << lane;
      for (int lane = 0; lane < 32; ++lane) w.out[lane][0] = ballot;
      break;
    }
    case kOpLdmatrix: ldmatrix(w); break;
    case kOpSyncwarp: break;   // orders the lanes' memory accesses (racecheck.cpp), computes nothing
    default: mma(w, op);
  }
}

}  // namespace warp_ops
}  // namespace flashmoe::emu
