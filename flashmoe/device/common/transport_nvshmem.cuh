// The NVSHMEM transport (KernelSpec.transport == "nvshmem"), included by transport.cuh.
//
// Per peer, chosen by the host (flashmoe/host/runtime.py): Params::peer_bases[rank] != 0 means
// this GPU can load/store the peer's slice (nvshmem_ptr: NVLink, or another PE on this GPU), and
// the peer gets the pointer path, exactly as in the peer transport. 0 means no load/store path
// (another node): the peer gets NVSHMEM device calls. Every peer's writes take one path, so the
// ordering arguments below never mix the two.
//
// Addressing. Rank r lives on PE r / L (L = Params::num_local_ranks ranks per PE: 1 for one
// process per GPU, W for virtual ranks on one PE) in slice r % L of that PE's heap. The heap is
// one nvshmem_malloc allocation, so this PE's address of a slice is also its symmetric address.
//
// Ordering (NVSHMEM 3.4.5 and 3.8 device API, built by compile.py with every transfer inlined;
// putmem_signal is avoided: its archive symbol's mangling never matches NVRTC's, see
// nvshmem_prelude.cuh):
//   data   nvshmemx_putmem_nbi_warp (rows), nvshmem_uint32_p / nvshmem_ulonglong_p (words and
//          16-byte entries: their value travels in the request, no source buffer to keep alive)
//   flag   fence.acq_rel.sys, nvshmem_fence, nvshmem_uint32_p: the fence delivers every earlier
//          operation to that PE first. It covers other threads' and blocks' puts because they
//          were issued before the block barrier / counter this thread passed (the proxy channel
//          is one ordered queue; P2P stores are ordered by the fence chain).
//   source nvshmem_quiet (remote_complete) before the data and done signals: the rows and result
//          tiles have left their staging buffers, so the next tile or launch may overwrite them.
//   wait   after a flag from an NVSHMEM peer is seen, nvshmem_uint32_test (always true) runs
//          NVSHMEM's consistency-at-target step, so data a NIC wrote before the flag is visible.
// NVSHMEM's own waits inside nvshmem_quiet and that step are not bounded by Params::timeout_ns.
//
// GEMM1 results. The epilogue holds a tile in shared memory, which a NIC cannot read, and a put
// per 16-byte chunk (two 8-byte p's each) would cost H * b / 8 requests per row. Instead rows for
// NVSHMEM peers go to this block's staging tile in the symmetric heap (region kPutStage: one
// BM x BN tile per block) and leave as one put per (row, column tile); the block quiets before it
// overwrites the tile. Cost over a CPU proxy: ceil(H / BN) requests per expert row and a quiet per
// GEMM1 tile. The x rows a rank dispatches must be symmetric too: the host copies x into region
// kXStage when any peer takes this path (a NIC reads the put's source).
#pragma once

#if defined(FLASHMOE_EMULATION)
#include "flashmoe/device/emulation/nvshmem.h"   // the calls below, with their ordering, on the CPU
#else
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace flashmoe {

__device__ __forceinline__ bool via_pointer(const Params& p, int rank) { return p.peer_bases[rank] != 0; }

__device__ __forceinline__ int rank_pe(const Params& p, int rank) { return rank / p.num_local_ranks; }

// Rank's slice as a symmetric address (valid on rank's PE through NVSHMEM calls).
__device__ __forceinline__ u8* symmetric_slice(const Params& p, int rank) {
  return p.heap + (u64)(rank % p.num_local_ranks) * p.rank_heap_bytes;
}

__device__ __forceinline__ void remote_store_u32(const Params& p, int rank, u64 off, u32 v) {
  if (via_pointer(p, rank)) {
    ptr_store_u32(p, rank, off, v);
  } else {
    nvshmem_uint32_p(reinterpret_cast<uint32_t*>(symmetric_slice(p, rank) + off), v, rank_pe(p, rank));
  }
}

__device__ __forceinline__ void remote_store_v4(const Params& p, int rank, u64 off, uint4 v) {
  if (via_pointer(p, rank)) {
    st_v4(peer_slice(p, rank) + off, v);
  } else {
    unsigned long long* dst = reinterpret_cast<unsigned long long*>(symmetric_slice(p, rank) + off);
    const int pe = rank_pe(p, rank);
    nvshmem_ulonglong_p(dst, (unsigned long long)v.y << 32 | v.x, pe);
    nvshmem_ulonglong_p(dst + 1, (unsigned long long)v.w << 32 | v.z, pe);
  }
}

// The whole warp calls it with the same arguments (nvshmemx_*_warp is a warp collective). `src`
// is symmetric for NVSHMEM peers (the host staged x in kXStage).
__device__ __forceinline__ void remote_copy_warp(const Params& p, int rank, u64 off, const void* src,
                                                 u32 bytes, int lane) {
  if (via_pointer(p, rank)) {
    ptr_copy_warp(p, rank, off, src, bytes, lane);
  } else {
    nvshmemx_putmem_nbi_warp(symmetric_slice(p, rank) + off, src, bytes, rank_pe(p, rank));
  }
}

__device__ __forceinline__ void remote_signal(const Params& p, int rank, u64 off, u32 value) {
  if (via_pointer(p, rank)) {
    ptr_signal(p, rank, off, value);
  } else {
    fence_acq_rel_sys();   // this thread's and (by cumulativity) the block's P2P stores
    nvshmem_fence();
    nvshmem_uint32_p(reinterpret_cast<uint32_t*>(symmetric_slice(p, rank) + off), value, rank_pe(p, rank));
  }
}

// One thread, before a batch of data / done signals: every put this PE issued so far has read its
// source (the proxy's quiet counts the whole PE's requests, not only this thread's).
__device__ __forceinline__ void remote_complete(const Params&) {
  fence_acq_rel_sys();
  nvshmem_quiet();
}

// Thread 0 of a block, after its acquire load saw `writer`'s flag.
__device__ __forceinline__ void remote_acquired(const Params& p, int writer, const u32* flag) {
  if (!via_pointer(p, writer))
    (void)nvshmem_uint32_test(const_cast<uint32_t*>(flag), NVSHMEM_CMP_GE, 0u);   // true: runs the consistency step
}

// ---- GEMM1 epilogue -----------------------------------------------------------------------------

__device__ __forceinline__ u8* put_stage_row(const Params& p, const Ctx& c, int row) {
  return c.slice + p.region_offset[kPutStage] + ((u64)c.block * kBlockM + row) * (kBlockN * kElemBytes);
}

// Before group G writes the block's staging tile (G synchronises next): the previous tile's puts
// have read it.
template <class G>
__device__ __forceinline__ void remote_tile_begin(const Params&, const Ctx&) {
  if (G::rank() == 0) nvshmem_quiet();
}

// `byte` is the offset in the row's column range of this tile.
__device__ __forceinline__ void remote_tile_store(const Params& p, const Ctx& c, int rank, u64 off, int row,
                                                  int byte, uint4 v) {
  if (via_pointer(p, rank)) st_v4(peer_slice(p, rank) + off + byte, v);
  else st_v4(put_stage_row(p, c, row) + byte, v);
}

// Group G, after its remote_tile_stores: one put per staged row.
template <class G>
__device__ __forceinline__ void remote_tile_end(const Params& p, const Ctx& c, const i32* ranks, const u64* offs,
                                                const bool* valid, u32 bytes) {
  G::sync();   // the staging rows are written; the fence makes them visible to a NIC too
  fence_acq_rel_sys();
  for (int row = G::rank(); row < kBlockM; row += G::kSize) {
    if (!valid[row] || via_pointer(p, ranks[row])) continue;
    const int rank = ranks[row];
    nvshmem_putmem_nbi(symmetric_slice(p, rank) + offs[row], put_stage_row(p, c, row), bytes, rank_pe(p, rank));
  }
}

}  // namespace flashmoe
