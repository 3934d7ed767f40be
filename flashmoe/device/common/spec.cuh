// Compile-time facts of one kernel spec (flashmoe/host/spec.py KernelSpec.defines()), the element
// type they imply and its conversions. Everything else is a run-time value in Params.
#pragma once

#include "flashmoe/device/common/ptx.cuh"

#if !defined(FLASHMOE_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if !defined(FLASHMOE_DTYPE) || !defined(FLASHMOE_GATED) || !defined(FLASHMOE_BLOCK_M) || \
    !defined(FLASHMOE_BLOCK_N) || !defined(FLASHMOE_STAGES) || !defined(FLASHMOE_THREADS) || \
    !defined(FLASHMOE_BAND_TILES)
#error "compile through flashmoe.host.compile: the FLASHMOE_* spec macros are missing"
#endif
#ifndef FLASHMOE_GEMM_WGMMA
#define FLASHMOE_GEMM_WGMMA 0
#endif
#ifndef FLASHMOE_TRANSPORT_NVSHMEM
#define FLASHMOE_TRANSPORT_NVSHMEM 0
#endif
#ifndef FLASHMOE_PINGPONG
#define FLASHMOE_PINGPONG 0
#endif
#ifndef FLASHMOE_TRACE
#define FLASHMOE_TRACE 0
#endif
#ifndef FLASHMOE_ROUTING_GIVEN
#define FLASHMOE_ROUTING_GIVEN 0
#endif
#ifndef FLASHMOE_SCALE_INPUT
#define FLASHMOE_SCALE_INPUT 0
#endif

namespace flashmoe {

constexpr int kThreads = FLASHMOE_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockM = FLASHMOE_BLOCK_M;
constexpr int kBlockN = FLASHMOE_BLOCK_N;       // B rows per tile (gate + up when gated)
constexpr int kStages = FLASHMOE_STAGES;
constexpr bool kGated = FLASHMOE_GATED != 0;
constexpr int kNumB = kGated ? 2 : 1;           // B operands sharing one A tile
constexpr int kGemm0Cols = kBlockN / kNumB;     // intermediate columns per GEMM0 tile
constexpr bool kTrace = FLASHMOE_TRACE != 0;
// wgmma: each consumer warpgroup runs whole tiles, taking turns (gemm/wgmma.cuh); else they split each tile.
constexpr bool kPingPong = FLASHMOE_PINGPONG != 0;
constexpr bool kRoutingGiven = FLASHMOE_ROUTING_GIVEN != 0;   // no router: the caller's ids and weights
// The routing weight scales the expert's input (Llama4): applied to each routed row's GEMM0
// result instead (the projection is linear), and the combine weighs by 1 (roles/expert_gemm.cuh).
constexpr bool kScaleInput = FLASHMOE_SCALE_INPUT != 0;
// Row tiles per band of a routed expert's tile order (roles/scheduler.cuh band_tile).
constexpr int kBandTiles = FLASHMOE_BAND_TILES;
constexpr int kStageKBytes = 128;               // K bytes per stage and row: one swizzle atom
static_assert(kThreads % 128 == 0, "blocks are whole warpgroups");
static_assert(kBandTiles >= 1, "a band holds at least one row tile");

#if FLASHMOE_DTYPE == 0
typedef __nv_bfloat16 elem_t;
#elif FLASHMOE_DTYPE == 1
typedef __half elem_t;
#else
typedef float elem_t;
#endif
constexpr bool kFp32 = FLASHMOE_DTYPE == 2;
constexpr int kElemBytes = sizeof(elem_t);
constexpr int kVecElems = 16 / kElemBytes;      // elements per 16-byte vector

__device__ __forceinline__ float to_float(elem_t v) {
#if FLASHMOE_DTYPE == 0
  return __bfloat162float(v);
#elif FLASHMOE_DTYPE == 1
  return __half2float(v);
#else
  return v;
#endif
}
__device__ __forceinline__ elem_t from_float(float v) {
#if FLASHMOE_DTYPE == 0
  return __float2bfloat16_rn(v);
#elif FLASHMOE_DTYPE == 1
  return __float2half_rn(v);
#else
  return v;
#endif
}

// Activation codes of Params::activation (flashmoe/host/abi.py ACTIVATION_CODES), computed in fp32
// with the accurate library functions, as torch does (the division within 2 ulp: div_full).
__device__ __forceinline__ float activate(float v, int activation) {
  switch (activation) {
    case 0: return div_full(v, 1.0f + expf(-v));                                // silu
    case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));          // gelu (erf)
    case 2: {                                                                    // gelu, tanh form
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + tanhf(inner));
    }
    default: return (v > 0.0f || v != v) ? v : 0.0f;                            // relu (NaN stays)
  }
}

// The clamped SwiGLUs of one gate and up element, with g = min(gate, limit) and
// u' = clamp(up, -limit, limit), in fp32 as flashmoe/reference.py computes them: code 4 (GPT-OSS)
// g * sigmoid(alpha g) * (u' + 1), code 5 (DeepSeek-V4) silu(g) * u'. The comparisons keep a NaN
// (fminf would turn it into the limit, torch's clamp does not).
template <int kAct>
__device__ __forceinline__ float swiglu_clamped(float gate, float up, float alpha, float limit) {
  static_assert(kAct == 4 || kAct == 5, "the clamped SwiGLUs are activation codes 4 and 5");
  const float g = gate > limit ? limit : gate;
  const float u = up > limit ? limit : (up < -limit ? -limit : up);
  if constexpr (kAct == 4) return g * div_full(1.0f, 1.0f + expf(-alpha * g)) * (u + 1.0f);
  else return activate(g, 0) * u;
}

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// This block's dynamic shared memory. 1024: the 128-byte swizzle pattern of the wgmma engine's
// tiles (descriptors, TMA) repeats every 1024 bytes and the GEMM pipeline starts here
// (flashmoe/host/plan.py smem_layout()); the kernel checks it (expert_gemm.cuh pipe_aligned()).
__device__ __forceinline__ u8* dynamic_smem() {
#if defined(FLASHMOE_EMULATION)
  return emu::dynamic_smem();   // this block's, from the emulator
#else
  extern __shared__ __align__(1024) u8 flashmoe_smem[];
  return flashmoe_smem;
#endif
}
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

}  // namespace flashmoe
