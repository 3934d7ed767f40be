// Weak memory and the NVSHMEM proxy behind simt.h.
//
// Weak memory (a world made with a weak seed). Global stores of a block wait in its store buffer;
// at random dispatches a random buffered word moves on (block -> the launch's buffer, which every
// block of that launch, one GPU, reads through -> memory, which every launch reads), so stores
// reach other blocks late and out of order. What orders them is what orders them in the PTX memory
// model: fence.acq_rel.gpu moves the fencing block's buffer into its launch's, fence.acq_rel.sys
// moves it and the launch's buffer to memory (the fence is cumulative over what the block's
// threads wrote before a bar.sync: one buffer per block); a release store is such a fence and then
// the store at its scope; an atomic acts on memory after its word's buffered stores; a launch's
// end empties its buffers. A block reads through its own buffer, then (for a plain load) its L1
// copy, then its launch's buffer, then memory; a plain load fills the L1 copy, which only an
// acquire load or a fence by one of the block's threads empties, so it may return a stale value;
// .cg and acquire loads go past L1. cp.async copies read like .cg loads when the issuing thread
// waits for them; the read-only path (ld.global.nc, TMA of the weights) reads memory.
//
// NVSHMEM. A put (nvshmem_*_p carries its value; putmem_nbi reads its source when delivered) is
// delivered at a random virtual time up to kPutLatencyNs after its issue, but never before a put
// to the same PE that this PE issued before a nvshmem_fence (the fence orders the PE's puts issued
// before it, by any of its threads, as the kernel's protocol assumes). nvshmem_quiet delivers
// every put of the PE at once. A delivered word reaches the target's memory, where its loads see
// it, at a random time up to kVisibleLatencyNs later, or when the target runs the consistency step
// (nvshmem_uint32_test). When nothing is left to run, every put is delivered and visible.
#include <algorithm>
#include <cstring>

#include "flashmoe/device/emulation/world.h"

namespace flashmoe::emu {
namespace detail {

void drain_launch(Launch& l) {
  for (auto it = G->landings.begin(); it != G->landings.end();)
    it = it->second.launch == &l ? G->landings.erase(it) : std::next(it);
  for (BlockState& b : l.blocks) {
    for (const auto& [a, v] : b.stores.items) l.gpu.put(a, v);
    b.stores.clear();
  }
  for (const auto& [a, v] : l.gpu.items) to_memory(a, v);
  l.gpu.clear();
}

void deliver(World& w, const PutOp& op) {
  Arrivals& target = w.arrivals[op.to];
  for (u32 i = 0; i < op.bytes; i += 4) {
    u32 v;
    if (op.src) std::memcpy(&v, op.src + i, 4);
    else v = op.value[i / 4];
    const u64 at = w.clock + xorshift(w.bg) % (kVisibleLatencyNs + 1);
    auto [it, fresh] = target.words.try_emplace(op.dst + i, v, at);
    if (!fresh) it->second = {v, std::min(it->second.second, at)};   // the newest value, seen no later
    target.due.emplace(it->second.second, op.dst + i);
  }
}

void make_visible(Arrivals& a, bool all, u64 now) {
  if (all) {
    for (const auto& [addr, word] : a.words) to_memory(addr, word.first);
    a.words.clear();
    a.due = {};
    return;
  }
  while (!a.due.empty() && a.due.top().first <= now) {
    const uintptr_t addr = a.due.top().second;
    a.due.pop();
    auto it = a.words.find(addr);
    if (it != a.words.end() && it->second.second <= now) {
      to_memory(addr, it->second.first);
      a.words.erase(it);
    }
  }
}

// Called before every dispatch: puts and arrivals whose time has come; under weak memory, now and
// then one buffered store moves a level on. Stores move rarely (a fiber dispatch is a few
// instructions of one thread): most wait for a fence, so a missing one leaves them unseen for
// a long time.
void background(World& w) {
  while (!w.landings.empty() && w.landings.begin()->first <= w.clock) {
    const std::function<void()> land = std::move(w.landings.begin()->second.land);
    w.landings.erase(w.landings.begin());
    land();
  }
  while (!w.in_flight.empty() && w.in_flight.begin()->first <= w.clock) {
    const PutOp op = w.in_flight.begin()->second;
    w.in_flight.erase(w.in_flight.begin());
    deliver(w, op);
  }
  for (Arrivals& a : w.arrivals) make_visible(a, false, w.clock);
  if (!w.weak || w.active.empty()) return;
  const u64 r = xorshift(w.bg);
  if ((r & 1023) == 0) {
    Launch& l = *w.active[(r >> 8) % w.active.size()];
    BlockState& b = l.blocks[(r >> 16) % l.grid];
    if (!b.stores.empty()) {
      const auto [a, v] = b.stores.take((r >> 24) % b.stores.items.size());
      l.gpu.put(a, v);
    }
    if (!l.gpu.empty() && ((r >> 4) & 1)) {
      const auto [a, v] = l.gpu.take((r >> 32) % l.gpu.items.size());
      to_memory(a, v);
    }
  }
}

// Nothing left to run: what a device synchronisation and a barrier would leave behind.
void settle_all(World& w) {
  for (const auto& [due, op] : w.in_flight) deliver(w, op);
  w.in_flight.clear();
  for (Arrivals& a : w.arrivals) make_visible(a, true, w.clock);
}

bool in_smem(const void* p) {
  const u8* q = static_cast<const u8*>(p);
  return q >= current->smem && q < current->smem + current->smem_bytes;
}

void check_words(const void* p, u32 bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 4 || bytes % 4)
    fatal("%s of %u bytes at %p: the weak-memory model moves whole aligned 4-byte words", what, bytes, p);
}

// A PE's heap address of the symmetric address `sym` of this PE's heap.
uintptr_t translate(const void* sym, u32 bytes, int pe) {
  World& w = *G;
  const int me = w.running->launch->pe;
  if (pe < 0 || pe >= (int)w.pes.size() || !w.pes[pe].first)
    fatal("NVSHMEM call to PE %d: no such PE in this emulated world (%zu registered)", pe, w.pes.size());
  const uintptr_t base = w.pes[me].first, a = reinterpret_cast<uintptr_t>(sym);
  if (a < base || a + bytes > base + w.pes[me].second)
    fatal("NVSHMEM call with address %p: not inside this PE's symmetric heap", sym);
  if (a - base + bytes > w.pes[pe].second) fatal("NVSHMEM call past the end of PE %d's heap", pe);
  return w.pes[pe].first + (a - base);
}

}  // namespace detail

using namespace detail;

void wm_load(const void* p, void* out, u32 bytes, LoadKind kind) {
  if (in_smem(p)) {
    race_access_at(p, bytes, false, __builtin_return_address(0));
    std::memcpy(out, p, bytes);
    return;
  }
  check_words(p, bytes, "load");
  Fiber* f = G->running;
  BlockState& b = f->launch->blocks[f->view.block.x];
  const Words& gpu = f->launch->gpu;
  for (u32 i = 0; i < bytes; i += 4) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p) + i;
    u32 v;
    if (const u32* mine = b.stores.find(a)) {
      v = *mine;
    } else if (auto hit = kind == kLoadWeak ? b.l1.find(a) : b.l1.end(); hit != b.l1.end()) {
      v = hit->second;
    } else {
      const u32* seen = gpu.find(a);
      v = seen ? *seen : *reinterpret_cast<const volatile u32*>(a);
      if (kind == kLoadWeak) b.l1[a] = v;
    }
    std::memcpy(static_cast<u8*>(out) + i, &v, 4);
  }
  if (kind == kLoadAcquire) b.l1.clear();
}

void wm_store(void* p, const void* v, u32 bytes) {
  if (in_smem(p)) {
    race_access_at(p, bytes, true, __builtin_return_address(0));
    std::memcpy(p, v, bytes);
    return;
  }
  check_words(p, bytes, "store");
  BlockState& b = my_block();
  for (u32 i = 0; i < bytes; i += 4) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p) + i;
    u32 word;
    std::memcpy(&word, static_cast<const u8*>(v) + i, 4);
    b.stores.put(a, word);
    if (auto hit = b.l1.find(a); hit != b.l1.end()) hit->second = word;
  }
}

void wm_fence(bool sys) {
  Fiber* f = G->running;
  Launch& l = *f->launch;
  BlockState& b = l.blocks[f->view.block.x];
  for (const auto& [a, v] : b.stores.items) l.gpu.put(a, v);
  b.stores.clear();
  if (sys) {
    for (const auto& [a, v] : l.gpu.items) to_memory(a, v);
    l.gpu.clear();
  }
  b.l1.clear();
}

void wm_release(u32* p, u32 v, bool sys) {
  wm_fence(sys);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (sys) to_memory(a, v);
  else G->running->launch->gpu.put(a, v);
}

void wm_atomic(const void* p, u32 bytes) {
  if (in_smem(p)) return;
  check_words(p, bytes, "atomic");
  Fiber* f = G->running;
  Launch& l = *f->launch;
  BlockState& b = l.blocks[f->view.block.x];
  for (u32 i = 0; i < bytes; i += 4) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p) + i;
    u32 v;
    if (l.gpu.take(a, v)) to_memory(a, v);
    if (b.stores.take(a, v)) to_memory(a, v);
    b.l1.erase(a);
  }
}

void shmem_put(void* dst, const void* src, const void* value, u32 bytes, int pe) {
  if (bytes % 4 || reinterpret_cast<uintptr_t>(dst) % 4)
    fatal("NVSHMEM put of %u bytes to %p: the emulator moves whole aligned 4-byte words", bytes, dst);
  World& w = *G;
  PutOp op{translate(dst, bytes, pe), static_cast<const u8*>(src), {0, 0}, bytes, w.running->launch->pe, pe};
  if (!src) std::memcpy(op.value, value, bytes);
  const size_t pair = (size_t)op.from * w.pes.size() + op.to;
  const u64 due = std::max(w.clock + xorshift(w.bg) % (kPutLatencyNs + 1), w.fenced[pair]);
  w.latest[pair] = std::max(w.latest[pair], due);
  w.in_flight.emplace(due, op);   // equal times keep issue order
}

void shmem_fence() {
  World& w = *G;
  const size_t n = w.pes.size(), from = w.running->launch->pe;
  for (size_t to = 0; to < n; ++to) w.fenced[from * n + to] = w.latest[from * n + to];
}

void shmem_quiet() {
  World& w = *G;
  const int me = w.running->launch->pe;
  for (auto it = w.in_flight.begin(); it != w.in_flight.end();) {
    if (it->second.from != me) {
      ++it;
      continue;
    }
    deliver(w, it->second);
    it = w.in_flight.erase(it);
  }
}

void shmem_consistency() { make_visible(G->arrivals[G->running->launch->pe], true, G->clock); }

void land_later(std::function<void()> land) {
  detail::World& w = *detail::G;
  if (!w.weak) {
    land();
    return;
  }
  const u64 at = w.clock + detail::xorshift(w.bg) % (detail::kAsyncLatencyNs + 1);
  w.landings.emplace(at, detail::AsyncLanding{w.running->launch, std::move(land)});   // equal times: issue order
}

}  // namespace flashmoe::emu
