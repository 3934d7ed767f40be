// Where things are: the hosted rank a block serves, its heap slice, its peers' slices and the
// regions inside them. Offsets come from Params (flashmoe/host/plan.py computes them).
#pragma once

#include "flashmoe/device/common/spec.cuh"

namespace flashmoe {

// Per-block context, fixed for the whole launch.
struct Ctx {
  int local;        // hosted rank index v (0 .. L-1)
  int rank;         // global rank
  int block;        // block index within the rank (0 .. blocks_per_rank-1)
  int bank;         // epoch & 1: which copy of the banked regions this launch uses
  u32 epoch;
  int num_tokens;   // this rank's tokens
  u8* slice;        // this rank's heap slice
  const elem_t* x;
  elem_t* out;
  __device__ __forceinline__ static u8* smem() { return dynamic_smem(); }   // dynamic shared memory
};

// The block's shared-memory tail (flashmoe/host/plan.py smem_layout(): SCRATCH_BYTES, CTX_BYTES):
// scratch words, the block's own Ctx, then the Ctx of the rank its task loop works for
// (device/roles/tasks.cuh task_ctx()).
constexpr int kScratchBytes = 64;
constexpr int kCtxBytes = 64;
static_assert(sizeof(Ctx) <= kCtxBytes, "the Ctx fits its shared-memory area");

// The context of hosted rank `local` in launch `epoch`, for a block with index `block` among the
// rank's blocks.
__device__ __forceinline__ Ctx make_ctx(const Params& p, int local, int block, u32 epoch) {
  Ctx c;
  c.local = local;
  c.rank = p.first_local_rank + c.local;
  c.block = block;
  c.num_tokens = p.local[c.local].num_tokens;
  c.slice = p.heap + (u64)c.local * p.rank_heap_bytes;
  c.epoch = epoch;
  c.bank = c.epoch & 1;
  c.x = static_cast<const elem_t*>(p.local[c.local].x);
  c.out = static_cast<elem_t*>(p.local[c.local].out);
  return c;
}

// This block's own: it serves rank blockIdx.x / blocks_per_rank. The rank's heap word counts
// finished launches; this launch's epoch is one more, so it is never the 0 that fresh (zeroed)
// flags hold. The previous launch on this stream has completed. (Every rank of a heap counts the
// same launches, so the ranks of one launch share an epoch.)
__device__ __forceinline__ Ctx make_ctx(const Params& p) {
  const int local = blockIdx.x / p.blocks_per_rank;
  const u8* slice = p.heap + (u64)local * p.rank_heap_bytes;
  const u32 epoch = *reinterpret_cast<const volatile u32*>(slice + p.region_offset[kEpoch]) + 1;
  return make_ctx(p, local, blockIdx.x % p.blocks_per_rank, epoch);
}

// The kernel keeps its Ctx in shared memory rather than in registers: held in registers it would
// stay live through every phase, inside the wgmma task loop too, where a 128 x 256 tile's consumers
// need 128 accumulators within 192 registers (device/roles/tasks.cuh RegisterBudget); read from
// shared memory, each field is a load where it is used. Thread 0 writes it; the caller synchronises.
__device__ __forceinline__ Ctx& block_ctx(const Params& p) {
  return *reinterpret_cast<Ctx*>(dynamic_smem() + p.smem_scratch_offset + kScratchBytes);
}

// Base of rank r's slice as this GPU addresses it (a peer pointer, or this GPU's own memory).
__device__ __forceinline__ u8* peer_slice(const Params& p, int r) {
  return reinterpret_cast<u8*>(p.peer_bases[r]);
}

template <class T>
__device__ __forceinline__ T* region(const Params& p, u8* slice, RegionId id, int bank = 0) {
  return reinterpret_cast<T*>(slice + p.region_offset[id] + (u64)bank * p.region_stride[id]);
}

__device__ __forceinline__ int expert_owner(const Params& p, int expert) {
  return expert / p.experts_per_rank;
}

// Row-major strides of the banked peer-written regions (the sizes of plan.region_sizes()).
__device__ __forceinline__ u64 recv_row_index(const Params& p, int source, u32 row) {
  return (u64)source * p.max_tokens + row;                      // recv_rows[W][T][H]
}
__device__ __forceinline__ u64 entry_index(const Params& p, int local_expert, int source, u32 pos) {
  return ((u64)local_expert * p.world + source) * p.max_tokens + pos;  // entries[E_l][W][T]
}
__device__ __forceinline__ u64 count_index(const Params& p, int source, int column) {
  return (u64)source * (p.experts_per_rank + 2) + column;       // counts[W][E_l + 2]
}
__device__ __forceinline__ u64 ret_row_index(const Params& p, u32 token, int slot) {
  return (u64)token * p.slots + slot;                           // ret_rows[T][S][H]
}

}  // namespace flashmoe
