// Every inline-PTX instruction and hardware register the kernel uses, each behind a small named
// function. Nothing else in the device code writes asm but ptx_sm90.cuh (the Hopper instructions
// of the wgmma engine, never emulated): the CPU emulator (flashmoe/host/emulator.py)
// compiles the same sources with FLASHMOE_EMULATION and supplies these functions from
// device/emulation/simt.h instead.
#pragma once

#include "flashmoe/device/common/params.cuh"

#if defined(FLASHMOE_EMULATION)
#include "flashmoe/device/emulation/simt.h"
#else

namespace flashmoe {

// ---- memory ordering --------------------------------------------------------------------------
// Acquire/release at gpu scope order work between blocks of one GPU (virtual ranks, counters);
// sys scope is used for everything a peer GPU reads or writes (heap slices behind peer pointers).

__device__ __forceinline__ u32 ld_acquire_gpu(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u32 ld_acquire_sys(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u32 ld_relaxed_gpu(const u32* p) {
  u32 v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_gpu(u32* p, u32 v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys(u32* p, u32 v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed_gpu(u32* p, u32 v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
// A word for another rank (counts, drop marks): published later by a fence and a flag.
__device__ __forceinline__ void st_volatile_u32(u32* p, u32 v) { *reinterpret_cast<volatile u32*>(p) = v; }
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// Returns the old value. Relaxed: callers put the fences they need around it.
__device__ __forceinline__ u32 atomic_add_relaxed_gpu(u32* p, u32 v) {
  u32 old;
  asm volatile("atom.relaxed.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// ---- loads and stores of data other blocks or GPUs wrote ---------------------------------------
// Plain accesses, named so that the emulator's weak-memory mode sees them (a plain load may hit a
// stale L1 line, a plain store may reach others late): the same code as `*p` here.
template <class T>
__device__ __forceinline__ T ld_weak(const T* p) { return *p; }
template <class T>
__device__ __forceinline__ void st_weak(T* p, T v) { *p = v; }
// .cg caches in L2 only: data a peer wrote after this SM last read the line must not come from L1.
__device__ __forceinline__ uint4 ld_cg_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u32 ld_cg_u32(const void* p) {
  u32 v;
  asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// Read-only for the whole launch (x, weights): the non-coherent path is fine.
__device__ __forceinline__ uint4 ld_nc_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ void st_v4(void* p, uint4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// ---- timers and identity ---------------------------------------------------------------------
__device__ __forceinline__ u64 globaltimer_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ u32 sm_id() {
  u32 id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
// blockIdx.x, read where it is used: an address built from it cannot be hoisted out of a loop and
// kept in registers through it (the trace's record address, through the wgmma consumers' loop).
__device__ __forceinline__ u32 block_id_here() {
  u32 id;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(id));
  return id;
}
__device__ __forceinline__ void sleep_ns(u32 ns) { __nanosleep(ns); }

// ---- asynchronous copies into shared memory (sm_80+) ------------------------------------------
__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, bypassing L1; zero-fills when !valid (src is then never read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// ---- tensor cores (mma.sync, sm_80+) ---------------------------------------------------------
// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem)));
}
// d += a * b; a: m16 x k16 row-major fragment, b: k16 x n8 column-major fragment, d: m16 x n8 fp32.
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_f16_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// a: m16 x k8 tf32 fragment (4 registers), b: k8 x n8 (2 registers).
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// a / b to within 2 ulp over the whole range, inline. The IEEE quotient (a / b, 1.0f / b) branches
// to a subroutine for operands it cannot finish inline; a call anywhere in a kernel linked with
// -rdc (the NVSHMEM transport) makes ptxas serialise every wgmma and ignore setmaxnreg.
__device__ __forceinline__ float div_full(float a, float b) {
  float q;
  asm("div.full.f32 %0, %1, %2;" : "=f"(q) : "f"(a), "f"(b));
  return q;
}
// sqrt(a) to about an ulp (what sqrtf compiles to with -prec-sqrt=false; denormals kept), inline:
// the IEEE square root branches to a subroutine, as the IEEE quotient does (div_full), and the
// NVSHMEM build must have no call (tests/test_nvshmem_build.py counts them in the Hopper SASS).
__device__ __forceinline__ float sqrt_approx(float a) {
  float r;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
// fp32 -> tf32, round to nearest (ties away), as reference.py's _tf32 does.
__device__ __forceinline__ u32 to_tf32(u32 fp32_bits) {
  u32 r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(__uint_as_float(fp32_bits)));
  return r;
}

}  // namespace flashmoe

#endif  // FLASHMOE_EMULATION
