// The NVSHMEM device calls of transport_nvshmem.cuh, for the CPU emulator. A PE is a launch of the
// emulated world (one rank per process, or every virtual rank of one launch on one PE); symmetric
// addresses are translated with the heap bases the host registered (flashmoe/host/emulator.py).
// The ordering the NVSHMEM specification promises, and no more (memory.cpp, "NVSHMEM"):
//   put / p        queued at this PE's proxy; delivered later, in any order nvshmem_fence allows
//   nvshmem_fence  puts to one PE issued after it are delivered after those issued before it
//   nvshmem_quiet  every put of this PE is delivered, its source read
//   delivery       the data reaches the target's memory but the target's loads see it only at a
//                  random later moment or after the target's consistency step (nvshmem_*_test)
#pragma once

#include <cstddef>
#include <cstdint>

#include "flashmoe/device/emulation/simt.h"

#define NVSHMEM_CMP_GE 5

inline void nvshmem_uint32_p(uint32_t* dst, uint32_t value, int pe) {
  flashmoe::emu::shmem_put(dst, nullptr, &value, 4, pe);
}
inline void nvshmem_ulonglong_p(unsigned long long* dst, unsigned long long value, int pe) {
  flashmoe::emu::shmem_put(dst, nullptr, &value, 8, pe);
}
inline void nvshmem_putmem_nbi(void* dst, const void* src, size_t bytes, int pe) {
  flashmoe::emu::shmem_put(dst, src, nullptr, static_cast<flashmoe::u32>(bytes), pe);
}
// A warp collective: every lane calls it with the same arguments; one request leaves.
inline void nvshmemx_putmem_nbi_warp(void* dst, const void* src, size_t bytes, int pe) {
  __syncwarp();
  if ((threadIdx.x & 31u) == 0) nvshmem_putmem_nbi(dst, src, bytes, pe);
  __syncwarp();
}
inline void nvshmem_fence() { flashmoe::emu::shmem_fence(); }
inline void nvshmem_quiet() { flashmoe::emu::shmem_quiet(); }
// The kernel calls it after its own acquire load saw the flag: the consistency step, then the test.
inline int nvshmem_uint32_test(uint32_t* ivar, int cmp, uint32_t value) {
  if (cmp != NVSHMEM_CMP_GE) flashmoe::emu::fatal("nvshmem_uint32_test: only NVSHMEM_CMP_GE is emulated");
  flashmoe::emu::shmem_consistency();
  return flashmoe::ld_acquire_sys(ivar) >= value;
}
