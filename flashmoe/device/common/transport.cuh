// Writes into another rank's heap slice. Every remote write of the kernel goes through the
// functions below, addressed as (rank, byte offset in the slice), which both transports understand:
//   peer pointers (default): a plain store through Params::peer_bases[rank] (NVLink peer mapping,
//     or this GPU's own memory for virtual ranks), published by a release at world scope;
//   NVSHMEM (FLASHMOE_TRANSPORT_NVSHMEM): per peer, the pointer path when peer_bases[rank] != 0
//     (NVLink, or several PEs on one GPU) and one-sided NVSHMEM puts when it is 0 (other nodes);
//     see transport_nvshmem.cuh.
//
// The interface:
//   remote_store_u32 / remote_store_v4   one word / one 16-byte vector
//   remote_copy_warp                     a warp copies a row (dispatch)
//   remote_signal                        a flag, ordered after every write published before it
//   remote_complete                      before a batch of signals: the PE's puts have read their
//                                        sources (a launch may reuse them afterwards)
//   remote_acquired                      after a flag written by `writer` was seen: its data is
//                                        visible (NVSHMEM: consistency at the target)
//   remote_tile_begin/_store/_end        the GEMM1 epilogue's rows (a tile staged in shared memory),
//                                        run by the thread group G that stores the tile
#pragma once

#include "flashmoe/device/common/group.cuh"
#include "flashmoe/device/common/heap.cuh"

namespace flashmoe {

__device__ __forceinline__ u64 region_off(const Params& p, RegionId id, int bank = 0) {
  return p.region_offset[id] + (u64)bank * p.region_stride[id];
}

// ---- world scope -------------------------------------------------------------------------------
// What orders a rank's writes for the other ranks. When every rank of the world runs in this
// launch (virtual ranks on one GPU) and writes by pointer, no other GPU, process or launch reads
// the heap while it runs, so gpu scope does what system scope would, without waiting for the
// system's ordering point; otherwise peers on other GPUs read it, and it takes system scope, as
// it does under the NVSHMEM transport, whose puts the library may carry outside the launch. A
// uniform branch per call.

__device__ __forceinline__ bool world_in_launch(const Params& p) {
  return !FLASHMOE_TRANSPORT_NVSHMEM && p.num_local_ranks == p.world;
}

__device__ __forceinline__ void fence_world(const Params& p) {
  if (world_in_launch(p)) fence_acq_rel_gpu();
  else fence_acq_rel_sys();
}
__device__ __forceinline__ u32 ld_acquire_world(const Params& p, const u32* flag) {
  return world_in_launch(p) ? ld_acquire_gpu(flag) : ld_acquire_sys(flag);
}
__device__ __forceinline__ void st_release_world(const Params& p, u32* flag, u32 v) {
  if (world_in_launch(p)) st_release_gpu(flag, v);
  else st_release_sys(flag, v);
}

// ---- the pointer path (both transports) --------------------------------------------------------

__device__ __forceinline__ void ptr_store_u32(const Params& p, int rank, u64 off, u32 v) {
  st_volatile_u32(reinterpret_cast<u32*>(peer_slice(p, rank) + off), v);
}

__device__ __forceinline__ void ptr_copy_warp(const Params& p, int rank, u64 off, const void* src, u32 bytes,
                                              int lane) {
  u8* dst = peer_slice(p, rank) + off;
  const u8* s = static_cast<const u8*>(src);
  for (u32 i = lane * 16u; i < bytes; i += 32u * 16u) st_v4(dst + i, ld_nc_v4(s + i));
}

// Publishes every write this thread made or observed (the callers reach here after a block
// barrier, so that covers the whole block's writes), then the flag.
__device__ __forceinline__ void ptr_signal(const Params& p, int rank, u64 off, u32 value) {
  fence_world(p);
  st_release_world(p, reinterpret_cast<u32*>(peer_slice(p, rank) + off), value);
}

}  // namespace flashmoe

#if FLASHMOE_TRANSPORT_NVSHMEM
#include "flashmoe/device/common/transport_nvshmem.cuh"
#else

namespace flashmoe {

__device__ __forceinline__ void remote_store_u32(const Params& p, int rank, u64 off, u32 v) {
  ptr_store_u32(p, rank, off, v);
}

__device__ __forceinline__ void remote_store_v4(const Params& p, int rank, u64 off, uint4 v) {
  st_v4(peer_slice(p, rank) + off, v);
}

// A warp copies `bytes` (a multiple of 16) from global memory `src` to rank's slice at `off`.
__device__ __forceinline__ void remote_copy_warp(const Params& p, int rank, u64 off, const void* src,
                                                 u32 bytes, int lane) {
  ptr_copy_warp(p, rank, off, src, bytes, lane);
}

__device__ __forceinline__ void remote_signal(const Params& p, int rank, u64 off, u32 value) {
  ptr_signal(p, rank, off, value);
}

// Stores complete when they are made: nothing to wait for.
__device__ __forceinline__ void remote_complete(const Params&) {}

// The acquire load of the flag already ordered the writer's stores.
__device__ __forceinline__ void remote_acquired(const Params&, int, const u32*) {}

template <class G>
__device__ __forceinline__ void remote_tile_begin(const Params&, const Ctx&) {}

__device__ __forceinline__ void remote_tile_store(const Params& p, const Ctx&, int rank, u64 off, int, int byte,
                                                  uint4 v) {
  st_v4(peer_slice(p, rank) + off + byte, v);
}

template <class G>
__device__ __forceinline__ void remote_tile_end(const Params&, const Ctx&, const i32*, const u64*, const bool*,
                                                u32) {}

}  // namespace flashmoe

#endif  // FLASHMOE_TRANSPORT_NVSHMEM
