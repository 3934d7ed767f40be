// Which handoffs does compute-sanitizer racecheck accept? One block of 256 threads: warpgroup 0
// produces into shared memory, warpgroup 1 consumes, 4 rounds, through a "ready" and a "free"
// mbarrier, as the wgmma task loop hands over a table slot (flashmoe/device/roles/tasks.cuh at
// 446305b: flags 0). argv[1]: a sum of the flags below. The .txt beside it came from
//   nvcc -arch=sm_90a -lineinfo -o race race.cu
//   for f in 1 0 128 2 4 32 36 8 16 64 80 72; do compute-sanitizer --tool racecheck ./race $f; done
// (its race.cu:29 is the producer's `data[i] = r + i`, from a copy without the last six lines of this comment), followed by
// racecheck on the selftest's W2-tpr1 case per engine/schedule ("head": the kernel at 446305b;
// "p2": every consumer thread arriving on "free" and testing "ready" after its team's barrier).
#include <cstdio>
#include <cstdlib>
typedef unsigned long long u64; typedef unsigned u32;
enum { SYNCTHREADS = 1, W_ALL = 2, PSYNC = 4, CWAIT_ALL = 8, CRETEST = 16, CSYNC = 32, FREE_ALL = 64, CASCADE = 128 };
__device__ __forceinline__ u32 sa(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void init(u64* b, u32 n) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(sa(b)), "r"(n) : "memory"); }
__device__ __forceinline__ void arrive(u64* b) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(sa(b)) : "memory"); }
__device__ __forceinline__ bool tryw(u64* b, u32 ph) { u32 d; asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n" : "=r"(d) : "r"(sa(b)), "r"(ph) : "memory"); return d; }
__device__ __forceinline__ void waitb(u64* b, u32 ph) { while (!tryw(b, ph)) {} }
__device__ __forceinline__ bool bar_or(u32 id, u32 n, bool v) { u32 a; asm volatile("{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, %3, p;\n selp.u32 %0, 1, 0, q;\n}" : "=r"(a) : "r"((u32)v), "r"(id), "r"(n) : "memory"); return a; }
__device__ __forceinline__ void bar_sync(u32 id, u32 n) { asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(n) : "memory"); }

__global__ void k(int f, int* out) {
  __shared__ __align__(8) u64 ready, fr;
  __shared__ int data[64];
  const int t = threadIdx.x;
  if (t == 0) { init(&ready, 1); init(&fr, (f & FREE_ALL) ? 128 : 4); asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
  __syncthreads();
  int acc = 0;
  if (f & SYNCTHREADS) {
    for (int r = 0; r < 4; ++r) { if (t == 0) for (int i = 0; i < 64; ++i) data[i] = r + i; __syncthreads(); acc += data[t & 63]; __syncthreads(); }
  } else if (t < 128) {
    for (int r = 0; r < 4; ++r) {
      if (r > 0) { if (t == 0) waitb(&fr, (r - 1) & 1); bar_or(2, 128, false); }
      if (f & W_ALL) { if (t < 64) data[t] = r + t; }
      else if (t == 0) for (int i = 0; i < 64; ++i) data[i] = r + i;
      if (f & (PSYNC | W_ALL)) bar_sync(2, 128);
      if (t == 0) arrive(&ready);
    }
  } else {
    for (int r = 0; r < 4; ++r) {
      if (f & CWAIT_ALL) waitb(&ready, r & 1);
      else { if (t == 128) waitb(&ready, r & 1); bar_or(3, 128, false); if (f & CRETEST) tryw(&ready, r & 1); }
      acc += data[t & 63];
      if (f & CSYNC) bar_sync(3, 128);
      if (f & FREE_ALL) arrive(&fr); else { __syncwarp(); if ((t & 31) == 0) arrive(&fr); }
    }
  }
  if (f & CASCADE) {
    __syncthreads();
    if (t == 0) for (int i = 0; i < 64; ++i) data[i] = 7 * i;
    __syncthreads();
    acc += data[t & 63];
  }
  out[blockIdx.x * blockDim.x + t] = acc;
}
int main(int argc, char** argv) {
  int f = atoi(argv[1]); int* out; cudaMalloc(&out, 4 * 256 * 4);
  k<<<4, 256>>>(f, out);
  cudaError_t e = cudaDeviceSynchronize();
  printf("flags %d: %s\n", f, cudaGetErrorString(e));
  return e != cudaSuccess;
}
