// What a CUDA thread does that the scheduler takes part in (simt.h's declarations): yielding and
// sleeping, block and named barriers, warp collectives, cp.async groups, and the shared-memory
// window's addresses. The scheduler itself, worlds and fatal(): runtime.cpp.
#include <cstring>

#include "flashmoe/device/emulation/world.h"

namespace flashmoe::emu {

namespace detail {

const char* op_name(WarpOp op) {
  switch (op) {
    case kOpShfl: return "__shfl_sync/__shfl_xor_sync";
    case kOpBallot: return "__ballot_sync";
    case kOpLdmatrix: return "ldmatrix_x4";
    case kOpSyncwarp: return "__syncwarp";
    case kOpMmaBf16: return "mma_bf16_m16n8k16";
    case kOpMmaF16: return "mma_f16_m16n8k16";
    default: return "mma_tf32_m16n8k8";
  }
}

}  // namespace detail

using namespace detail;

void yield() {
  Fiber* f = G->running;
  make_ready(f);
  park(f, State::kReady);
}

void sleep_for(u32 ns) {
  Fiber* f = G->running;
  G->sleepers.push(Sleeper{G->clock + (ns ? ns : 1), G->seq++, f});
  park(f, State::kSleep);
}

u64 now_ns() { return G->clock; }

void count_sys_scope() { ++G->sys_scope; }

void block_barrier() {
  Fiber* f = G->running;
  BlockState& b = f->launch->blocks[f->view.block.x];
  if (++b.arrived < f->launch->block) {
    b.waiters.push_back(f);
    park(f, State::kBarrier);
    return;
  }
  b.arrived = 0;
  race_join(b.waiters.data(), b.waiters.size(), f);
  for (Fiber* w : b.waiters) make_ready(w);
  b.waiters.clear();
}

// Named barrier `id` of this block over `threads` threads; returns the OR of every arrival's pred
// (bar.red.or). A waiter reads the result when it resumes: the next generation cannot complete
// before it has arrived again.
int named_barrier(u32 id, u32 threads, int pred) {
  Fiber* f = G->running;
  if (id == 0 || id > 15 || threads == 0 || threads % 32 || threads > (u32)f->launch->block)
    fatal("bar.sync %u, %u: bad barrier id or thread count", id, threads);
  NamedBarrier& b = f->launch->blocks[f->view.block.x].named[id];
  if (b.arrived && b.threads != threads) fatal("bar.sync %u: thread counts %u and %u differ", id, b.threads, threads);
  b.threads = threads;
  b.reduced |= pred ? 1 : 0;
  if (++b.arrived < threads) {
    b.waiters.push_back(f);
    park(f, State::kNamedBarrier);
    return b.result;
  }
  b.result = b.reduced;
  b.reduced = 0;
  b.arrived = 0;
  race_join(b.waiters.data(), b.waiters.size(), f);
  for (Fiber* w : b.waiters) make_ready(w);
  b.waiters.clear();
  return b.result;
}

}  // namespace flashmoe::emu

// Three barriers: every thread has read the last result before thread 0 clears it, and every
// thread has contributed before anyone reads.
int __syncthreads_or(int pred) {
  using namespace flashmoe::emu;
  BlockState& b = my_block();
  block_barrier();
  if (G->running->view.thread.x == 0) b.reduced = 0;
  block_barrier();
  if (pred) b.reduced = 1;
  block_barrier();
  return b.reduced;
}

namespace flashmoe::emu {

void warp_exchange(WarpOp op, u32 mask, const u32* in, int n, u32 (&out)[4]) {
  Fiber* f = G->running;
  const u32 t = f->view.thread.x, lane = t & 31u;
  if (mask != 0xffffffffu)
    fatal("%s with mask %#x: the emulator supports whole-warp collectives only", op_name(op), mask);
  WarpState& w = f->launch->warps[((size_t)f->view.block.x * f->launch->block + t) / 32];
  if (w.arrived == 0) w.op = op;
  else if (w.op != op)
    fatal("warp collective mismatch: this lane is in %s while other lanes of its warp are in %s", op_name(op),
          op_name(w.op));
  std::memcpy(w.slots.in[lane], in, sizeof(u32) * n);
  if (w.arrived == 31) {
    // The last lane computes every lane's result. The others read theirs before they can deposit
    // into the next exchange, so one set of slots per warp suffices.
    warp_ops::compute(w.slots, w.op);
    if (w.op == kOpSyncwarp) race_join(w.waiters, 31, f);
    for (int i = 0; i < 31; ++i) make_ready(w.waiters[i]);
    w.arrived = 0;
  } else {
    w.waiters[w.arrived++] = f;
    park(f, State::kWarp);
  }
  std::memcpy(out, w.slots.out[lane], sizeof(out));
}

void cp_async_issue(void* dst, const void* src) {
  Fiber* f = G->running;
  f->copies.push_back(AsyncCopy{dst, src, f->commits, __builtin_return_address(0)});
}

void cp_async_commit_group() { ++G->running->commits; }

void cp_async_wait_groups(int n) {
  Fiber* f = G->running;
  while (!f->copies.empty() && f->copies.front().group + n < f->commits) {
    const AsyncCopy& c = f->copies.front();
    race_access_at(c.dst, 16, true, c.pc);   // the copy's writes, as its thread's, where it lands
    if (!c.src) std::memset(c.dst, 0, 16);
    else if (weak_memory) wm_load(c.src, c.dst, 16, kLoadCg);
    else std::memcpy(c.dst, c.src, 16);
    f->copies.pop_front();
  }
}

u32 smem_offset(const void* p, u32 bytes, const char* what) {
  const u8* base = current->smem;
  const u8* q = static_cast<const u8*>(p);
  if (q < base || q + bytes > base + current->smem_bytes)
    fatal("%s: %p is not inside this block's %llu bytes of shared memory at %p", what, p,
          (unsigned long long)current->smem_bytes, (const void*)base);
  return static_cast<u32>(q - base) + current->smem_skew;
}

u8* smem_at(u32 address, u32 bytes, const char* what) {
  const u64 offset = (u64)address - current->smem_skew;
  if (address < current->smem_skew || offset + bytes > current->smem_bytes)
    fatal("%s: shared address %u is outside this block's %llu bytes of shared memory", what, address,
          (unsigned long long)current->smem_bytes);
  return current->smem + offset;
}

void check_aligned(const void* p, u32 align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align) fatal("%s: address %p is not %u-byte aligned", what, p, align);
}

}  // namespace flashmoe::emu
