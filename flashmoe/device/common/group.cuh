// Thread groups of a block: the threads that run a piece of block-level code together. The
// mma_sync engine's task loop runs on the whole block; the wgmma engine's runs as a producer
// warpgroup, which claims and prepares tasks and loads their tiles, and one or two consumer teams,
// which multiply and store them (device/roles/tasks.cuh), each synchronised by its own named
// barrier. Code a group runs takes it as a template argument: rank() and kSize stride its loops,
// sync() and any() are its barriers.
#pragma once

#include "flashmoe/device/common/spec.cuh"
#if FLASHMOE_GEMM_WGMMA
#include "flashmoe/device/common/ptx_sm90.cuh"
#endif

namespace flashmoe {

struct Block {
  static constexpr int kSize = kThreads;
  __device__ __forceinline__ static int rank() { return threadIdx.x; }
  __device__ __forceinline__ static void sync() { __syncthreads(); }
  __device__ __forceinline__ static bool any(bool v) { return __syncthreads_or(v) != 0; }
};

#if FLASHMOE_GEMM_WGMMA
// Threads [kFirst, kFirst + kCount) of the block, whole warpgroups, with named barrier kId.
template <int kFirst, int kCount, u32 kId>
struct ThreadRange {
  static constexpr int kSize = kCount;
  __device__ __forceinline__ static int rank() { return static_cast<int>(threadIdx.x) - kFirst; }
  __device__ __forceinline__ static void sync() { named_barrier_sync(kId, kCount); }
  __device__ __forceinline__ static bool any(bool v) { return named_barrier_or(kId, kCount, v); }
};
using Producers = ThreadRange<0, 128, 2>;                // warpgroup 0

// The consumer warpgroup of the calling thread (1 or 2), with named barrier 2 + its index.
struct ConsumerWarpgroup {
  static constexpr int kSize = 128;
  __device__ __forceinline__ static int rank() { return static_cast<int>(threadIdx.x & 127); }
  __device__ __forceinline__ static u32 id() { return 2 + (threadIdx.x >> 7); }
  __device__ __forceinline__ static void sync() { named_barrier_sync(id(), kSize); }
  __device__ __forceinline__ static bool any(bool v) { return named_barrier_or(id(), kSize, v); }
};

// A team: the consumer threads that run one tile together. Cooperative, every consumer
// warpgroup (each takes a slab of the tile's rows); ping-pong, one warpgroup (each takes whole
// tiles, in turn: gemm/wgmma.cuh).
#if FLASHMOE_PINGPONG
using Team = ConsumerWarpgroup;
#else
using Team = ThreadRange<128, kThreads - 128, 1>;
#endif
#endif

}  // namespace flashmoe
