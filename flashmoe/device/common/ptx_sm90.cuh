// The Hopper (sm_90a) instructions of the wgmma GEMM engine (flashmoe/device/gemm/wgmma.cuh), each
// behind a small named function as in ptx.cuh: mbarriers, the bulk tensor copy (TMA), the async
// proxy fence, named barriers and wgmma. Included only by specs with gemm="wgmma". Under
// FLASHMOE_EMULATION, device/emulation/wgmma_emu.h supplies the same functions for the CPU.
//
// PTX ISA sections relied on: "Parallel Synchronization and Communication Instructions: mbarrier"
// (init/inval, arrive, arrive.expect_tx, try_wait.parity, cp.async.mbarrier.arrive.noinc), "Data
// Movement and Conversion Instructions: cp.async.bulk.tensor", "membar/fence" (fence.proxy.async,
// fence.mbarrier_init), "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions"
// (wgmma.fence / mma_async / commit_group / wait_group, matrix descriptor format).
#pragma once

#include "flashmoe/device/common/spec.cuh"   // ptx.cuh, elem_t and FLASHMOE_DTYPE

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "the wgmma engine needs the sm_90a target (arch='sm_90a'): wgmma does not exist on plain sm_90"
#endif

namespace flashmoe {

// Matrix descriptor of a K-major operand in the 128-byte swizzle layout (PTX ISA "Matrix
// Descriptor Format"): start address >> 4 in bits 0-13, leading byte offset (unused for swizzled
// K-major, encoded as 1) in bits 16-29, stride byte offset = 1024 bytes between 8-row groups
// (>> 4 = 64) in bits 32-45, base offset 0 (bits 49-51: the tile starts on a 1024-byte boundary,
// the start of the swizzle pattern), swizzle mode 1 = 128-byte in bits 62-63.
constexpr u64 kWgmmaDescSw128 = (1ull << 16) | (64ull << 32) | (1ull << 62);
__device__ __host__ constexpr u64 wgmma_desc_sw128(u32 smem_byte_addr) {
  return kWgmmaDescSw128 | (u64)((smem_byte_addr & 0x3FFFF) >> 4);
}

}  // namespace flashmoe

#if defined(FLASHMOE_EMULATION)
#include "flashmoe/device/emulation/wgmma_emu.h"
#else

namespace flashmoe {

// A CUtensorMap lives in Params (param space: the kernel's Params is __grid_constant__), so its
// generic address is what cp.async.bulk.tensor takes.
__device__ __forceinline__ u64 generic_addr(const void* p) { return reinterpret_cast<u64>(p); }

// ---- mbarrier (shared::cta, 8 bytes, 8-byte aligned) -------------------------------------------
// Lifecycle: init on a location that holds no valid mbarrier, inval before the memory is used for
// anything else (including a new init). Phases start at 0; try_wait.parity(P) returns once the
// phase with parity P has completed.
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_inval(u64* bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];" :: "r"(smem_addr(bar)) : "memory");
}
// Makes the inits visible to the async proxy (the TMA unit's complete_tx) before first use.
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// Arrive (release at CTA scope).
__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_addr(bar)) : "memory");
}
// Arrive and add `bytes` to the phase's expected transaction count (the TMA copies that complete
// on this barrier count them down).
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// An arrive the hardware performs once every cp.async this thread issued so far has landed.
// .noinc: the arrive counts against the barrier's expected count (init includes these threads).
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(u64* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(smem_addr(bar)) : "memory");
}
// True once the phase with this parity has completed; may suspend the thread for a while (a
// system-dependent time) before returning false. Acquire at CTA scope: what the arriving threads
// (and the copies counted by the barrier) wrote before the phase completed is visible after it
// returns true. Callers bound the wait (wgmma.cuh pipe_wait).
__device__ __forceinline__ bool mbar_try_wait(u64* bar, u32 parity) {
  u32 done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  return done != 0;
}

// ---- proxies and barriers --------------------------------------------------------------------
// Orders this thread's generic-proxy shared-memory accesses (st.shared, cp.async writes it has
// observed) with later async-proxy accesses (TMA writes, wgmma reads), in both directions.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads, a multiple of 32.
__device__ __forceinline__ void named_barrier_sync(u32 id, u32 threads) {
  asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(threads) : "memory");
}
// The same barrier, returning whether any of the `threads` threads passed pred = true (bar.red.or).
__device__ __forceinline__ bool named_barrier_or(u32 id, u32 threads, bool pred) {
  u32 any;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, %3, p;\n selp.u32 %0, 1, 0, q;\n}"
      : "=r"(any) : "r"((u32)pred), "r"(id), "r"(threads) : "memory");
  return any != 0;
}

// The executing warpgroup's per-thread register budget, raised (waits for registers in the block's
// pool) or lowered (returns them): "setmaxnreg". kRegs: a multiple of 8 in [24, 256].
template <u32 kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(kRegs));
}
template <u32 kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(kRegs));
}

// ---- bulk tensor copy (TMA) --------------------------------------------------------------------
__device__ __forceinline__ void prefetch_tensor_map(const void* map) {
  asm volatile("prefetch.tensormap [%0];" :: "l"(generic_addr(map)) : "memory");
}
// Box at coordinates (c0 innermost .. c3) of a 4-D tensor map -> shared memory at `dst` (laid out
// and swizzled as the map says), completing `bytes of the box` on `bar`. Out-of-bounds elements
// are zero-filled (CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) and still count as transferred bytes.
__device__ __forceinline__ void tma_load_4d(void* dst, const void* map, u64* bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];"
      :: "r"(smem_addr(dst)), "l"(generic_addr(map)), "r"(smem_addr(bar)),
         "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// ---- wgmma -----------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
// Keeps the compiler from moving accesses of an accumulator register across this point (the
// wgmma instructions read and write them behind its back).
__device__ __forceinline__ void wgmma_pin(float& r) { asm volatile("" : "+f"(r) :: "memory"); }

// D[64 x N] (fp32, N/2 registers per thread) += A[64 x K] * B[N x K]^T with both operands in
// shared memory, K-major (imm-trans 0); K = 16 for bf16/fp16, 8 for tf32 (32 bytes of K either
// way). The accumulator fragment: d[4j + 2h + c] holds row 16 * warp + lane / 4 + 8h and column
// 8j + 2 * (lane % 4) + c of the warpgroup's 64 x N tile.
#if FLASHMOE_DTYPE == 0
#define FLASHMOE_WGMMA_KIND "k16.f32.bf16.bf16"
#define FLASHMOE_WGMMA_OPS "p, 1, 1, 0, 0"
#elif FLASHMOE_DTYPE == 1
#define FLASHMOE_WGMMA_KIND "k16.f32.f16.f16"
#define FLASHMOE_WGMMA_OPS "p, 1, 1, 0, 0"
#else
#define FLASHMOE_WGMMA_KIND "k8.f32.tf32.tf32"   // tf32: no transpose operands (K-major only)
#define FLASHMOE_WGMMA_OPS "p, 1, 1"
#endif
#define FLASHMOE_ACC4(i) "+f"(d[(i)]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3])
#define FLASHMOE_ACC16(i) FLASHMOE_ACC4(i), FLASHMOE_ACC4((i) + 4), FLASHMOE_ACC4((i) + 8), FLASHMOE_ACC4((i) + 12)
#define FLASHMOE_ACC32(i) FLASHMOE_ACC16(i), FLASHMOE_ACC16((i) + 16)
#define FLASHMOE_ACC64(i) FLASHMOE_ACC32(i), FLASHMOE_ACC32((i) + 32)
#define FLASHMOE_ACC128(i) FLASHMOE_ACC64(i), FLASHMOE_ACC64((i) + 64)

// scale-d is a predicate operand; it is always 1 (accumulate): the engine zeroes D first.
template <int N>
__device__ __forceinline__ void wgmma_m64k(float* d, u64 desc_a, u64 desc_b);
template <>
__device__ __forceinline__ void wgmma_m64k<32>(float* d, u64 desc_a, u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32" FLASHMOE_WGMMA_KIND " {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, " FLASHMOE_WGMMA_OPS ";\n}\n"
      : FLASHMOE_ACC16(0)
      : "l"(desc_a), "l"(desc_b), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_m64k<64>(float* d, u64 desc_a, u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64" FLASHMOE_WGMMA_KIND " {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, " FLASHMOE_WGMMA_OPS ";\n}\n"
      : FLASHMOE_ACC32(0)
      : "l"(desc_a), "l"(desc_b), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_m64k<128>(float* d, u64 desc_a, u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128" FLASHMOE_WGMMA_KIND " {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, " FLASHMOE_WGMMA_OPS ";\n}\n"
      : FLASHMOE_ACC64(0)
      : "l"(desc_a), "l"(desc_b), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_m64k<256>(float* d, u64 desc_a, u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256" FLASHMOE_WGMMA_KIND " {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, " FLASHMOE_WGMMA_OPS ";\n}\n"
      : FLASHMOE_ACC128(0)
      : "l"(desc_a), "l"(desc_b), "r"(1));
}

#undef FLASHMOE_ACC4
#undef FLASHMOE_ACC16
#undef FLASHMOE_ACC32
#undef FLASHMOE_ACC64
#undef FLASHMOE_ACC128

}  // namespace flashmoe

#endif  // FLASHMOE_EMULATION
