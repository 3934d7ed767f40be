// The CUDA surface the device code uses, for a host C++ compiler: what ptx.cuh includes instead of
// its inline PTX when FLASHMOE_EMULATION is defined (flashmoe/host/emulator.py builds it with g++).
//
// Every CUDA thread of a launch runs as a cooperative fiber on one OS thread (runtime.cpp), so the
// kernel's own source runs unchanged on a CPU: threadIdx/blockIdx resolve to the running fiber,
// __syncthreads is a per-block barrier, warp collectives (shuffles, ballot, ldmatrix, mma) are
// exchanges among the 32 fibers of a warp, and %globaltimer is a virtual clock. Several launches
// (one per rank, as separate processes would make them) can share one scheduler and clock.
//
// Memory. By default memory is sequentially consistent: every store is visible at once. The weak
// mode (memory.cpp) instead holds each block's global stores in a store buffer
// that drains late and out of order, lets a plain load hit a stale per-block L1 copy, and orders
// only what the PTX memory model orders; it sees the global accesses that go through the named
// functions below (ptx.cuh's ld_/st_ functions, fences, atomics, cp.async), which is every access
// of the kernel to memory that another block or rank writes. What stays out of reach: races among
// the threads of one block in global memory (they share one buffer), and real parallel speed.
// Shared-memory races are racecheck.cpp's.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>

#include "flashmoe/device/common/params.cuh"

// ---- qualifiers: plain host C++ ----------------------------------------------------------------
// Defined after the standard headers above: libstdc++ spells __attribute__((__noinline__)).
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
// Static __shared__ variables would be one copy for all blocks: the kernel takes its shared memory
// from flashmoe::emu::dynamic_smem() only, and a use of __shared__ fails to compile by this name.
#define __shared__ __shared___is_not_emulated__use_dynamic_smem

#define FLASHMOE_EMU_EXPORT extern "C" __attribute__((visibility("default")))

struct uint4 { unsigned int x, y, z, w; };
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
struct alignas(16) float4 { float x, y, z, w; };

namespace flashmoe::emu {

struct Dim3 { unsigned int x, y, z; };

// What the built-in variables read: the running fiber's identity (runtime.cpp keeps `current`
// pointing at the fiber it switched to; every read goes through the pointer, and every switch is
// an out-of-line call, so the compiler never carries one fiber's value into another).
struct FiberView {
  Dim3 thread, block;
  Dim3 block_dim, grid_dim;   // of the fiber's launch
  u8* smem;          // this block's dynamic shared memory
  u64 smem_bytes;
  u32 smem_skew;     // the shared-window address of smem[0] (FLASHMOE_EMU_SMEM_SKEW; normally 0)
  u64 launch;        // the fiber's launch, numbered from 1 in the process: what an earlier launch
                     // left in a shared-memory record is not this one's
  void* race = nullptr;   // its block's race-check state (racecheck.cpp), when that is on
  u32 race_ignore = 0;    // inside emulator code whose shared-memory accesses it records itself
};
extern FiberView* current;
// Whether the running world models weak memory (the memory functions below skip the runtime
// calls when it does not).
extern bool weak_memory;

inline u8* dynamic_smem() { return current->smem; }

// Runtime entry points (runtime.cpp). None of them is inlined: each may switch fibers.
void yield();                                  // let every other runnable fiber run once
void sleep_for(u32 ns);                        // park until the virtual clock has advanced by ns
u64 now_ns();                                  // the virtual clock
void count_sys_scope();                        // a system-scope fence, release or acquire
void block_barrier();                          // __syncthreads
int named_barrier(u32 id, u32 threads, int pred); // bar.red.or id, threads (bar.sync: pred ignored)
[[noreturn]] void fatal(const char* fmt, ...); // end the launch with this message
enum WarpOp : int { kOpShfl, kOpBallot, kOpLdmatrix, kOpMmaBf16, kOpMmaF16, kOpMmaTf32, kOpSyncwarp };
// One warp-wide exchange: this lane deposits `in` (n words); once all 32 lanes have, the last one
// computes every lane's result; this lane gets back its 4 result words.
void warp_exchange(WarpOp op, u32 mask, const u32* in, int n, u32 (&out)[4]);
// cp.async: queue a 16-byte copy (src nullptr: zero-fill) in this thread's current group; close
// the group; complete every group but the n most recently committed ones.
void cp_async_issue(void* dst, const void* src);
void cp_async_commit_group();
void cp_async_wait_groups(int n);
// An asynchronous copy lands (a TMA load: its bytes and its mbarrier's transaction count): now,
// or in a weak world at a random virtual time up to kAsyncLatencyNs later, as a copy engine lands
// it while the threads run on. The copy's launch ending first drops it (a failed launch may leave
// one in flight).
void land_later(std::function<void()> land);
// Shared-window address of p (its byte offset in this block's dynamic shared memory plus the
// skew); fatal unless [p, p + bytes) lies inside it. smem_at is the inverse (for what addresses
// shared memory by window address: wgmma descriptors, TMA destinations).
u32 smem_offset(const void* p, u32 bytes, const char* what);
u8* smem_at(u32 address, u32 bytes, const char* what);
void check_aligned(const void* p, u32 align, const char* what);

// Shared-memory race detection (racecheck.cpp, where the order it checks is described): on in a
// library whose kernel unit is built with FLASHMOE_EMU_RACECHECK. The emulator's code calls these
// where it accesses shared memory or orders threads on the hardware's behalf.
extern bool race_enabled;
void race_enable();
void race_access(const void* p, u32 bytes, bool write);   // by the running thread, at the caller
void race_access_at(const void* p, u32 bytes, bool write, const void* pc);
struct RaceIgnore {   // the running thread's accesses in this scope are not checked
  FiberView* view = current;
  RaceIgnore() { if (view) ++view->race_ignore; }
  ~RaceIgnore() { if (view) --view->race_ignore; }
};
void race_mbar_init(const void* bar);
void race_mbar_inval(const void* bar);
void race_mbar_arrive(const void* bar);                // releases into the phase being gathered
void race_mbar_complete(void* block, const void* bar); // that phase completed (block: FiberView::race)
void race_mbar_acquire(const void* bar);               // a wait saw the last completed phase
struct RaceAsync;                                      // a TMA load in flight
std::shared_ptr<RaceAsync> race_async_issue();
void race_async_land(const std::shared_ptr<RaceAsync>& copy, const void* dst, u32 bytes, const void* bar);
#if FLASHMOE_EMU_RACECHECK
inline const bool race_on_load = (race_enable(), true);
#endif

// Global memory under the weak mode (memory.cpp): `bytes` is a multiple of 4, p 4-byte aligned.
// A weak load may be served by the block's L1 copy; .cg and acquire loads go past it, and an
// acquire (or a fence) empties it. A store waits in the block's store buffer; a fence moves the
// buffer out (gpu: to where every block of the launch sees it; sys: to memory every launch sees);
// a release store is a fence and then the store, at its scope. Before an atomic the word's
// buffered stores reach memory, where atomics operate.
enum LoadKind : int { kLoadWeak, kLoadCg, kLoadAcquire };
void wm_load(const void* p, void* out, u32 bytes, LoadKind kind);
void wm_store(void* p, const void* v, u32 bytes);
void wm_fence(bool sys);
void wm_release(u32* p, u32 v, bool sys);
void wm_atomic(const void* p, u32 bytes);

// NVSHMEM's device calls (emulation/nvshmem.h): a put goes into this PE's proxy queue and is
// delivered later, in any order nvshmem_fence allows; delivered data becomes visible to the target
// at random or when the target runs its consistency step. `src` nullptr: the value travels in the
// request (nvshmem_*_p); else it is read when the put is delivered (the source must stay intact
// until nvshmem_quiet).
void shmem_put(void* dst, const void* src, const void* value, u32 bytes, int pe);
void shmem_fence();
void shmem_quiet();
void shmem_consistency();

// Function-pointer launch: body(ctx) runs once per thread of grid x block threads.
int launch(int grid, int block, u64 smem_bytes, u64 seed, void (*body)(void*), void* ctx, char* err,
           u64 err_len);

// Worlds: several launches under one scheduler and clock (runtime.cpp). world_new(seed, weak
// seed: 0 = sequentially consistent); world_set_pe registers a PE's heap (NVSHMEM addressing);
// world_add queues a launch on PE `pe` to start delay_ns after the world's present time (its
// ctx is released with release(ctx) when it ends) and returns its id, -1 on error; world_run
// runs until a launch ends (its id), nothing is left (-1) or the world fails (-2, message in err).
void* world_new(u64 seed, u64 weak_seed);
int world_set_pe(void* world, int pe, const void* heap, u64 bytes, char* err, u64 err_len);
int world_add(void* world, void (*body)(void*), void* ctx, void (*release)(void*), int grid, int block,
              u64 smem_bytes, u64 delay_ns, int pe, char* err, u64 err_len);
int world_run(void* world, char* err, u64 err_len);
void world_free(void* world);

template <class To, class From>
inline To bits(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &v, sizeof(t));
  return t;
}

}  // namespace flashmoe::emu

#define threadIdx (::flashmoe::emu::current->thread)
#define blockIdx (::flashmoe::emu::current->block)
#define blockDim (::flashmoe::emu::current->block_dim)
#define gridDim (::flashmoe::emu::current->grid_dim)

// ---- 16-bit floats: IEEE round to nearest even, as cuda_bf16.h / cuda_fp16.h ---------------------
struct __nv_bfloat16 { unsigned short __x; };
struct __half { unsigned short __x; };

inline float __bfloat162float(__nv_bfloat16 h) { return flashmoe::emu::bits<float>((unsigned int)h.__x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const unsigned int x = flashmoe::emu::bits<unsigned int>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {0x7fff};                  // NaN: CUDA's canonical one
  return {static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

namespace flashmoe::emu {
// m >> s rounded to nearest, ties to even (1 <= s <= 31).
inline u32 shift_rne(u32 m, int s) {
  const u32 q = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
  return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}
}  // namespace flashmoe::emu

inline __half __float2half_rn(float f) {
  const unsigned int x = flashmoe::emu::bits<unsigned int>(f);
  const unsigned short sign = static_cast<unsigned short>((x >> 16) & 0x8000u);
  const unsigned int ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return {0x7fff};                                 // NaN
  if (ax >= 0x477ff000u) return {static_cast<unsigned short>(sign | 0x7c00u)};   // >= 65520: inf
  const int e = static_cast<int>(ax >> 23);
  if (e <= 112) {                                                         // half subnormal (or 0)
    const int s = 126 - e;
    if (s > 31) return {sign};
    return {static_cast<unsigned short>(sign | flashmoe::emu::shift_rne((ax & 0x7fffffu) | 0x800000u, s))};
  }
  // A carry out of the mantissa rolls into the exponent, which is the right encoding.
  return {static_cast<unsigned short>(sign | (((e - 112) << 10) + flashmoe::emu::shift_rne(ax & 0x7fffffu, 13)))};
}
inline float __half2float(__half h) {
  const unsigned int sign = (h.__x & 0x8000u) << 16, e = (h.__x >> 10) & 31u, m = h.__x & 0x3ffu;
  if (e == 31) return flashmoe::emu::bits<float>(sign | 0x7f800000u | (m << 13));
  if (e == 0) {                                                           // subnormal: m * 2^-24
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign ? -v : v;
  }
  return flashmoe::emu::bits<float>(sign | ((e + 112) << 23) | (m << 13));
}

// ---- bit casts, bit counts, min/max ------------------------------------------------------------
inline unsigned int __float_as_uint(float f) { return flashmoe::emu::bits<unsigned int>(f); }
inline float __uint_as_float(unsigned int u) { return flashmoe::emu::bits<float>(u); }
inline float __int_as_float(int i) { return flashmoe::emu::bits<float>(i); }
inline int __float_as_int(float f) { return flashmoe::emu::bits<int>(f); }
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
// CUDA's min/max take mixed integer types; the common type does what its overloads do.
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// ---- block and warp primitives -----------------------------------------------------------------
inline void __syncthreads() { flashmoe::emu::block_barrier(); }
// Non-zero in every thread when pred is non-zero in any thread of the block (bar.red.or).
int __syncthreads_or(int pred);
inline void __nanosleep(unsigned int ns) { flashmoe::emu::sleep_for(ns); }
inline size_t __cvta_generic_to_shared(const void* p) {
  return flashmoe::emu::smem_offset(p, 1, "__cvta_generic_to_shared");
}

namespace flashmoe::emu {
// Shuffle of a 4-byte value; `src` is the lane read (>= 32: the lane keeps its own value).
template <class T>
inline T shfl(u32 mask, T v, u32 src) {
  static_assert(sizeof(T) == 4, "the emulator shuffles 4-byte values");
  const u32 in[2] = {bits<u32>(v), src};
  u32 out[4];
  warp_exchange(kOpShfl, mask, in, 2, out);
  return bits<T>(out[0]);
}
}  // namespace flashmoe::emu

template <class T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
  if (width != 32) flashmoe::emu::fatal("__shfl_xor_sync with width %d is not emulated", width);
  return flashmoe::emu::shfl(mask, v, (threadIdx.x & 31u) ^ static_cast<unsigned int>(lane_mask));
}
template <class T>
inline T __shfl_sync(unsigned int mask, T v, int src_lane, int width = 32) {
  if (width != 32) flashmoe::emu::fatal("__shfl_sync with width %d is not emulated", width);
  return flashmoe::emu::shfl(mask, v, static_cast<unsigned int>(src_lane) & 31u);
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  const flashmoe::u32 in[1] = {0};
  flashmoe::u32 out[4];
  flashmoe::emu::warp_exchange(flashmoe::emu::kOpSyncwarp, mask, in, 1, out);
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  const flashmoe::u32 in[1] = {predicate != 0};
  flashmoe::u32 out[4];
  flashmoe::emu::warp_exchange(flashmoe::emu::kOpBallot, mask, in, 1, out);
  return out[0];
}

// ---- atomics: one OS thread runs every fiber, so a plain read-modify-write is atomic -------------
namespace flashmoe::emu {
template <class T, class F>
inline T rmw(T* p, F f) {
  const RaceIgnore atomic;
  if (weak_memory) wm_atomic(p, sizeof(T));
  const T old = *p;
  *p = f(old);
  return old;
}
}  // namespace flashmoe::emu
inline int atomicAdd(int* p, int v) { return flashmoe::emu::rmw(p, [v](int o) { return o + v; }); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return flashmoe::emu::rmw(p, [v](unsigned o) { return o + v; }); }
inline float atomicAdd(float* p, float v) { return flashmoe::emu::rmw(p, [v](float o) { return o + v; }); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return flashmoe::emu::rmw(p, [v](unsigned o) { return o - v; }); }
inline int atomicMax(int* p, int v) { return flashmoe::emu::rmw(p, [v](int o) { return o < v ? v : o; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
  return flashmoe::emu::rmw(p, [v](unsigned o) { return o < v ? v : o; });
}
inline int atomicMin(int* p, int v) { return flashmoe::emu::rmw(p, [v](int o) { return v < o ? v : o; }); }
inline unsigned atomicMin(unsigned* p, unsigned v) {
  return flashmoe::emu::rmw(p, [v](unsigned o) { return v < o ? v : o; });
}
inline unsigned atomicOr(unsigned* p, unsigned v) { return flashmoe::emu::rmw(p, [v](unsigned o) { return o | v; }); }
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) {
  return flashmoe::emu::rmw(p, [v](unsigned long long o) { return o | v; });
}
inline unsigned atomicExch(unsigned* p, unsigned v) { return flashmoe::emu::rmw(p, [v](unsigned) { return v; }); }
inline unsigned atomicCAS(unsigned* p, unsigned compare, unsigned v) {
  return flashmoe::emu::rmw(p, [=](unsigned o) { return o == compare ? v : o; });
}

// ---- the functions of ptx.cuh, same names, signatures and semantics -----------------------------
namespace flashmoe {

// Memory ordering. Every load another block may be waiting to change is a yield point, so a
// spinning fiber lets the others run; fences and the relaxed atomic add are yield points too: more
// interleavings where the protocol hands data from one block to another. Without the weak mode
// memory is sequentially consistent and the ordering functions only yield.
namespace emu {
inline u32 load_u32(const void* p, LoadKind kind) {
  if (!weak_memory) return *static_cast<const volatile u32*>(p);
  u32 v;
  wm_load(p, &v, 4, kind);
  return v;
}
inline void store_u32(void* p, u32 v) {
  if (weak_memory) wm_store(p, &v, 4);
  else *static_cast<volatile u32*>(p) = v;
}
inline void release_u32(u32* p, u32 v, bool sys) {
  if (sys) count_sys_scope();
  if (weak_memory) wm_release(p, v, sys);
  else *reinterpret_cast<volatile u32*>(p) = v;
}
inline void fence(bool sys) {
  yield();
  if (sys) count_sys_scope();
  if (weak_memory) wm_fence(sys);
}
}  // namespace emu
inline u32 ld_acquire_gpu(const u32* p) { emu::yield(); return emu::load_u32(p, emu::kLoadAcquire); }
inline u32 ld_acquire_sys(const u32* p) {
  emu::yield();
  emu::count_sys_scope();
  return emu::load_u32(p, emu::kLoadAcquire);
}
inline u32 ld_relaxed_gpu(const u32* p) { emu::yield(); return emu::load_u32(p, emu::kLoadCg); }
inline void st_release_gpu(u32* p, u32 v) { emu::release_u32(p, v, false); }
inline void st_release_sys(u32* p, u32 v) { emu::release_u32(p, v, true); }
inline void st_relaxed_gpu(u32* p, u32 v) { emu::store_u32(p, v); }
inline void st_volatile_u32(u32* p, u32 v) { emu::store_u32(p, v); }
inline void fence_acq_rel_gpu() { emu::fence(false); }
inline void fence_acq_rel_sys() { emu::fence(true); }
inline u32 atomic_add_relaxed_gpu(u32* p, u32 v) {
  emu::yield();
  if (emu::weak_memory) emu::wm_atomic(p, 4);
  const u32 old = *p;
  *p = old + v;
  return old;
}

// Plain (weak) accesses of global memory other blocks read or write; 4-byte types.
template <class T>
inline T ld_weak(const T* p) {
  static_assert(sizeof(T) == 4, "weak accesses are of 4-byte values");
  if (!emu::weak_memory) return *p;
  T v;
  emu::wm_load(p, &v, 4, emu::kLoadWeak);
  return v;
}
template <class T>
inline void st_weak(T* p, T v) {
  static_assert(sizeof(T) == 4, "weak accesses are of 4-byte values");
  if (emu::weak_memory) emu::wm_store(p, &v, 4);
  else *p = v;
}

// Vector accesses: the hardware faults on a misaligned 16-byte access, so the emulator does too.
inline uint4 ld_cg_v4(const void* p) {
  emu::check_aligned(p, 16, "ld_cg_v4");
  uint4 v;
  if (emu::weak_memory) emu::wm_load(p, &v, 16, emu::kLoadCg);
  else std::memcpy(&v, p, 16);
  return v;
}
inline u32 ld_cg_u32(const void* p) {
  emu::check_aligned(p, 4, "ld_cg_u32");
  return emu::load_u32(p, emu::kLoadCg);
}
// Read-only for the whole launch: memory itself, whatever any buffer holds.
inline uint4 ld_nc_v4(const void* p) {
  emu::check_aligned(p, 16, "ld_nc_v4");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void st_v4(void* p, uint4 v) {
  emu::check_aligned(p, 16, "st_v4");
  if (emu::weak_memory) emu::wm_store(p, &v, 16);
  else std::memcpy(p, &v, 16);
}

inline u64 globaltimer_ns() { return emu::now_ns(); }
inline u32 sm_id() { return blockIdx.x; }
inline u32 block_id_here() { return blockIdx.x; }
inline void sleep_ns(u32 ns) { emu::sleep_for(ns); }

inline u32 smem_addr(const void* p) { return emu::smem_offset(p, 1, "smem_addr"); }
// cp.async with cp-size 16. A copy lands when its issuing thread waits for its group (the latest
// moment the hardware allows), so a stage read before its cp_async_wait + __syncthreads reads the
// shared-memory poison, and a wrong wait_group count shows up as wrong data, not as luck.
inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  emu::smem_offset(smem, 16, "cp_async_16 destination");
  emu::check_aligned(smem, 16, "cp_async_16 destination");
  if (valid) emu::check_aligned(gmem, 16, "cp_async_16 source");
  emu::cp_async_issue(smem, valid ? gmem : nullptr);
}
inline void cp_async_commit() { emu::cp_async_commit_group(); }
template <int N>
inline void cp_async_wait() { emu::cp_async_wait_groups(N); }

// Tensor-core fragments: the layouts are in warp_ops.h, cited from the PTX ISA.
inline void ldmatrix_x4(u32 (&r)[4], const void* smem) {
  emu::smem_offset(smem, 16, "ldmatrix_x4 row");
  emu::check_aligned(smem, 16, "ldmatrix_x4 row");
  emu::race_access(smem, 16, false);   // the row this lane names
  const u64 a = reinterpret_cast<u64>(smem);
  const u32 in[2] = {static_cast<u32>(a), static_cast<u32>(a >> 32)};
  emu::warp_exchange(emu::kOpLdmatrix, 0xffffffffu, in, 2, r);
}
namespace emu {
inline void mma(WarpOp op, float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  const u32 in[10] = {a[0], a[1], a[2], a[3], b0, b1, bits<u32>(d[0]), bits<u32>(d[1]), bits<u32>(d[2]),
                      bits<u32>(d[3])};
  u32 out[4];
  warp_exchange(op, 0xffffffffu, in, 10, out);
  for (int i = 0; i < 4; ++i) d[i] = bits<float>(out[i]);
}
}  // namespace emu
inline void mma_bf16_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  emu::mma(emu::kOpMmaBf16, d, a, b0, b1);
}
inline void mma_f16_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  emu::mma(emu::kOpMmaF16, d, a, b0, b1);
}
inline void mma_tf32_m16n8k8(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  emu::mma(emu::kOpMmaTf32, d, a, b0, b1);
}

// div.full.f32 is within 2 ulp of the quotient; the CPU's is exact.
inline float div_full(float a, float b) { return a / b; }
// sqrt.approx.f32 is within about an ulp of the square root; the CPU's is exact.
inline float sqrt_approx(float a) { return std::sqrt(a); }

// cvt.rna.tf32.f32: keep 10 explicit mantissa bits, round to nearest with ties away from zero
// (adding half an ulp to the magnitude bits does exactly that); NaN and Inf pass unchanged.
inline u32 to_tf32(u32 fp32_bits) {
  if ((fp32_bits & 0x7f800000u) == 0x7f800000u) return fp32_bits;
  return (fp32_bits + 0x1000u) & 0xffffe000u;
}

}  // namespace flashmoe
