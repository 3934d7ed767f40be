// Shared-memory race detection for the emulator: what compute-sanitizer's racecheck does on a GPU,
// as a happens-before check (vector clocks, after FastTrack: Flanagan and Freund, PLDI 2009).
//
// On only in a library whose kernel translation unit was built with FLASHMOE_EMU_RACECHECK
// (flashmoe/host/emulator.py racecheck=True): g++'s -fsanitize=thread then calls a __tsan_* hook
// before every load and store of that unit, and the hooks below (this file; the sanitizer's own
// runtime is not linked) check the accesses that fall in the running thread's shared memory. Every
// other address (global memory, the emulator's own state) passes through untouched.
//
// Order. Each thread of a block has a vector clock over the block's threads. Program order, and:
// __syncthreads and a named barrier join the clocks of the threads that pass it; __syncwarp (also
// behind wgmma.fence / commit_group / wait_group, which are .sync.aligned) joins the warp's;
// an mbarrier arrive releases the thread's clock into the phase being gathered, and a wait that
// sees that phase complete acquires it. Shuffles and ballots order nothing, as in the CUDA memory
// model. An access races with an earlier one of another thread (at least one a write) that it is
// not ordered after. What the hardware does on a thread's behalf is charged to it:
// - a TMA load writes its box as its issuing thread at the issue (what had read or written those
//   bytes must be ordered before the issue), and its completion releases that clock on its mbarrier;
// - a cp.async copy writes as its thread where the emulator lands it (the wait for its group);
// - a wgmma reads its operands as lane 0 of each warp of the warpgroup, at the wait for its group
//   (the emulator runs it there); an ldmatrix reads its rows as the lanes that name them.
// Not checked: atomics (the emulator runs them atomically), the mbarrier objects (their own checks
// are in wgmma_emu.h), accesses of other translation units. A byte keeps every read not ordered
// before a later one, so a write is checked against all of them.
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <tuple>

#include "flashmoe/device/emulation/world.h"

namespace flashmoe::emu {

bool race_enabled = false;

void race_enable() { race_enabled = true; }

namespace detail {

// An access: the thread, its clock then, and where in this library (code offset).
struct Epoch {
  u32 clock = 0;   // 0: none
  u16 tid = 0;
  u32 pc = 0;
};

// A byte of shared memory: its last write, and its reads since that no later read is ordered
// after (one inline, the rest in a pooled set).
struct Shadow {
  Epoch write, read;
  u32 more = 0;   // 1 + index into BlockRace::sets, or 0
};

enum RaceKind : int { kReadAfterWrite, kWriteAfterRead, kWriteAfterWrite };

struct RaceReport {
  u64 count = 0;
  u32 block = 0, offset = 0;
  Epoch first, second;
};

struct MbarClocks {
  std::vector<u32> gathering, completed;   // the phase in progress, the last completed one
};

struct BlockRace {
  LaunchRace* launch = nullptr;
  u32 block = 0, threads = 0;
  const u8* smem = nullptr;        // the block's shared memory
  std::vector<u32> clocks;         // threads x threads: clocks[t * threads + u], what t knows of u
  std::vector<Shadow> shadow;      // per byte
  std::vector<u8> is_mbarrier;     // per byte: inside a valid mbarrier object
  std::vector<std::vector<Epoch>> sets;
  std::vector<u32> free_sets;
  std::unordered_map<const void*, MbarClocks> mbars;

  u32* row(u32 t) { return clocks.data() + (size_t)t * threads; }
};

struct LaunchRace {
  std::vector<BlockRace> blocks;
  // (kind, earlier pc, later pc) -> the first such race and how many accesses raced so.
  std::map<std::tuple<int, u32, u32>, RaceReport> races;
  u64 total = 0;
};

}  // namespace detail

// A TMA load in flight: the block, the issuing thread and its clock at the issue, the issue site.
struct RaceAsync {
  detail::BlockRace* block;
  std::shared_ptr<detail::LaunchRace> owner;   // the launch's state outlives a landing it drops
  u32 tid, pc;
  std::vector<u32> clock;
};

namespace detail {

uintptr_t library_base() {
  static uintptr_t base = [] {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&race_enable), &info);
    return reinterpret_cast<uintptr_t>(info.dli_fbase);
  }();
  return base;
}

u32 code_offset(const void* pc) { return static_cast<u32>(reinterpret_cast<uintptr_t>(pc) - library_base()); }

void report(BlockRace& b, RaceKind kind, const Epoch& first, const Epoch& second, u32 offset) {
  LaunchRace& l = *b.launch;
  ++l.total;
  RaceReport& r = l.races[{kind, first.pc, second.pc}];
  if (r.count++ == 0) r = RaceReport{1, b.block, offset, first, second};
}

bool ordered(const Epoch& e, const u32* clock) { return e.clock <= clock[e.tid]; }

void release_set(BlockRace& b, Shadow& s) {
  if (!s.more) return;
  b.sets[s.more - 1].clear();
  b.free_sets.push_back(s.more - 1);
  s.more = 0;
}

// One byte accessed by thread `me.tid`, whose clock is `clock`.
void check_byte(BlockRace& b, u32 offset, bool write, const Epoch& me, const u32* clock) {
  Shadow& s = b.shadow[offset];
  // Already checked in this epoch: a read since the last write, or the last write with no read since.
  const Epoch& last = write ? s.write : s.read;
  if (last.clock == me.clock && last.tid == me.tid && (!write || (!s.read.clock && !s.more))) return;
  if (s.write.clock && s.write.tid != me.tid && !ordered(s.write, clock))
    report(b, write ? kWriteAfterWrite : kReadAfterWrite, s.write, me, offset);
  if (write) {
    if (s.read.clock && s.read.tid != me.tid && !ordered(s.read, clock)) report(b, kWriteAfterRead, s.read, me, offset);
    if (s.more)
      for (const Epoch& r : b.sets[s.more - 1])
        if (r.tid != me.tid && !ordered(r, clock)) report(b, kWriteAfterRead, r, me, offset);
    s.write = me;
    s.read = Epoch{};
    release_set(b, s);
    return;
  }
  if (!s.read.clock || s.read.tid == me.tid || ordered(s.read, clock)) {
    s.read = me;
  } else {   // two reads in no order: both must be ordered before the next write
    if (!s.more) {
      if (b.free_sets.empty()) {
        b.sets.emplace_back();
        b.free_sets.push_back(static_cast<u32>(b.sets.size() - 1));
      }
      s.more = b.free_sets.back() + 1;
      b.free_sets.pop_back();
    }
    std::vector<Epoch>& set = b.sets[s.more - 1];
    set.push_back(s.read);
    s.read = me;
  }
  if (s.more) {   // drop the reads this one is ordered after (the later write is then too)
    std::vector<Epoch>& set = b.sets[s.more - 1];
    set.erase(std::remove_if(set.begin(), set.end(),
                             [&](const Epoch& r) { return r.tid == me.tid || ordered(r, clock); }),
              set.end());
    if (set.empty()) release_set(b, s);
  }
}

void access(BlockRace& b, u32 tid, const u32* clock, u32 offset, u32 bytes, bool write, u32 pc) {
  const Epoch me{clock[tid], static_cast<u16>(tid), pc};
  for (u32 i = offset; i < offset + bytes && i < b.shadow.size(); ++i)
    if (!b.is_mbarrier[i]) check_byte(b, i, write, me, clock);
}

// The running thread's block state and the offset of p in its shared memory, if p is in it.
BlockRace* running_block(const void* p, u32& offset) {
  const FiberView* v = current;
  if (!v || !v->race || v->race_ignore) return nullptr;
  const uintptr_t d = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(v->smem);
  if (d >= v->smem_bytes) return nullptr;
  offset = static_cast<u32>(d);
  return static_cast<BlockRace*>(v->race);
}

void access_here(const void* p, u32 bytes, bool write, const void* pc) {
  u32 offset;
  if (BlockRace* b = running_block(p, offset)) {
    const u32 t = current->thread.x;
    access(*b, t, b->row(t), offset, bytes, write, code_offset(pc));
  }
}

// A thread's clock after a release: later accesses are not ordered before what acquires it.
void tick(BlockRace& b, u32 t) { ++b.row(t)[t]; }

void join_into(u32* into, const u32* from, u32 n) {
  for (u32 u = 0; u < n; ++u) into[u] = std::max(into[u], from[u]);
}

void race_start(Launch& l) {
  if (!race_enabled) return;
  l.race = std::make_shared<LaunchRace>();
  l.race->blocks.resize(l.grid);
  for (int b = 0; b < l.grid; ++b) {
    BlockRace& r = l.race->blocks[b];
    r.launch = l.race.get();
    r.block = b;
    r.threads = l.block;
    r.smem = l.smem + (u64)b * l.smem_stride + kRedzone;
    r.clocks.assign((size_t)l.block * l.block, 0);
    for (int t = 0; t < l.block; ++t) r.row(t)[t] = 1;
    r.shadow.resize(l.smem_bytes);
    r.is_mbarrier.assign(l.smem_bytes, 0);
  }
  for (Fiber& f : l.fibers) f.view.race = &l.race->blocks[f.view.block.x];
}

void race_join(Fiber* const* waiters, size_t n, Fiber* last) {
  if (!race_enabled) return;
  BlockRace& b = *static_cast<BlockRace*>(last->view.race);
  u32* joined = b.row(last->view.thread.x);
  for (size_t i = 0; i < n; ++i) join_into(joined, b.row(waiters[i]->view.thread.x), b.threads);
  for (size_t i = 0; i < n; ++i) {
    const u32 t = waiters[i]->view.thread.x;
    std::copy(joined, joined + b.threads, b.row(t));
    tick(b, t);
  }
  tick(b, last->view.thread.x);
}

// "function at file:line (inlined by) ..." for each code offset (addr2line, from binutils);
// the bare offset where it is not at hand.
std::map<u32, std::string> symbolize(const std::vector<u32>& offsets) {
  std::map<u32, std::string> out;
  for (u32 pc : offsets) {
    char hex[32];
    std::snprintf(hex, sizeof(hex), "+0x%x", pc);
    out[pc] = hex;
  }
  Dl_info info{};
  if (offsets.empty() || !dladdr(reinterpret_cast<void*>(&race_enable), &info) || !info.dli_fname) return out;
  std::string cmd = "addr2line -C -f -i -p -e '" + std::string(info.dli_fname) + "'";
  for (u32 pc : offsets) {
    char hex[16];
    std::snprintf(hex, sizeof(hex), " 0x%x", pc ? pc - 1 : 0);   // a return address: its call is just before
    cmd += hex;
  }
  cmd += " 2>/dev/null";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) return out;
  std::vector<std::string> lines;
  char buf[4096];
  while (std::fgets(buf, sizeof(buf), pipe)) {
    std::string line(buf);
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    if (line.rfind(" (inlined by) ", 0) == 0 && !lines.empty()) lines.back() += " <- " + line.substr(14);
    else lines.push_back(line);
  }
  pclose(pipe);
  if (lines.size() == offsets.size())
    for (size_t i = 0; i < offsets.size(); ++i) out[offsets[i]] = lines[i];
  return out;
}

std::string race_finish(Launch& l) {
  if (!l.race || l.race->races.empty()) return "";
  const LaunchRace& r = *l.race;
  std::vector<u32> pcs;
  for (const auto& [key, rep] : r.races) {
    pcs.push_back(rep.first.pc);
    pcs.push_back(rep.second.pc);
  }
  const auto where = symbolize(pcs);
  // The instructions of one source line race alike (a struct's fields, a vector's elements): one
  // entry per pair of places.
  std::map<std::tuple<int, std::string, std::string>, RaceReport> places;
  for (const auto& [key, rep] : r.races) {
    RaceReport& p = places[{std::get<0>(key), where.at(rep.first.pc), where.at(rep.second.pc)}];
    if (!p.count) p = rep;
    else p.count += rep.count;
  }
  static const char* kinds[] = {"read after write", "write after read", "write after write"};
  static const char* first_access[] = {"write", "read", "write"};
  static const char* second_access[] = {"read", "write", "write"};
  std::string msg = launch_name(l) + "shared-memory races (racecheck): " + std::to_string(r.total) +
                    " racing accesses at " + std::to_string(places.size()) + " pairs of places";
  int shown = 0;
  for (const auto& [key, rep] : places) {
    if (++shown > 8) {
      msg += "\n  ...";
      break;
    }
    const int kind = std::get<0>(key);
    char head[160];
    std::snprintf(head, sizeof(head), "\n  %s, %llu accesses (the first: block %u, shared offset %u):", kinds[kind],
                  (unsigned long long)rep.count, rep.block, rep.offset);
    msg += head;
    msg += "\n    " + std::string(first_access[kind]) + " by thread " + std::to_string(rep.first.tid) + " at " +
           std::get<1>(key);
    msg += "\n    " + std::string(second_access[kind]) + " by thread " + std::to_string(rep.second.tid) + " at " +
           std::get<2>(key) + ", not ordered after it";
  }
  return msg;
}

}  // namespace detail

using namespace detail;

void race_access(const void* p, u32 bytes, bool write) {
  if (race_enabled) access_here(p, bytes, write, __builtin_return_address(0));
}

void race_access_at(const void* p, u32 bytes, bool write, const void* pc) {
  if (race_enabled) access_here(p, bytes, write, pc);
}

static MbarClocks* mbar_clocks(BlockRace* b, const void* bar) {
  if (!b) return nullptr;
  auto it = b->mbars.find(bar);
  return it == b->mbars.end() ? nullptr : &it->second;
}

static BlockRace* my_race_block() { return current && race_enabled ? static_cast<BlockRace*>(current->race) : nullptr; }

void race_mbar_init(const void* bar) {
  BlockRace* b = my_race_block();
  if (!b) return;
  const u32 at = smem_offset(bar, 8, "mbarrier.init");
  std::fill_n(b->is_mbarrier.begin() + at, 8, 1);
  b->mbars[bar] = MbarClocks{std::vector<u32>(b->threads, 0), std::vector<u32>(b->threads, 0)};
}

void race_mbar_inval(const void* bar) {
  BlockRace* b = my_race_block();
  if (!b) return;
  std::fill_n(b->is_mbarrier.begin() + smem_offset(bar, 8, "mbarrier.inval"), 8, 0);
  b->mbars.erase(bar);
}

void race_mbar_arrive(const void* bar) {
  BlockRace* b = my_race_block();
  if (MbarClocks* m = mbar_clocks(b, bar)) {
    const u32 t = current->thread.x;
    join_into(m->gathering.data(), b->row(t), b->threads);
    tick(*b, t);
  }
}

void race_mbar_complete(void* block, const void* bar) {
  BlockRace* b = static_cast<BlockRace*>(block);
  if (MbarClocks* m = mbar_clocks(b, bar)) {
    m->completed.swap(m->gathering);
    std::fill(m->gathering.begin(), m->gathering.end(), 0);
  }
}

void race_mbar_acquire(const void* bar) {
  BlockRace* b = my_race_block();
  if (MbarClocks* m = mbar_clocks(b, bar)) join_into(b->row(current->thread.x), m->completed.data(), b->threads);
}

std::shared_ptr<RaceAsync> race_async_issue() {
  BlockRace* b = my_race_block();
  if (!b) return nullptr;
  const u32 t = current->thread.x;
  auto a = std::make_shared<RaceAsync>();
  a->block = b;
  a->owner = std::shared_ptr<LaunchRace>(G->running->launch->race);
  a->tid = t;
  a->pc = code_offset(__builtin_return_address(0));
  a->clock.assign(b->row(t), b->row(t) + b->threads);
  tick(*b, t);   // the copy's writes are the issue's, not what the thread does next
  return a;
}

void race_async_land(const std::shared_ptr<RaceAsync>& a, const void* dst, u32 bytes, const void* bar) {
  if (!a) return;
  BlockRace& b = *a->block;
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(b.smem);
  if (d < b.shadow.size()) access(b, a->tid, a->clock.data(), static_cast<u32>(d), bytes, true, a->pc);
  if (MbarClocks* m = mbar_clocks(&b, bar)) join_into(m->gathering.data(), a->clock.data(), b.threads);
}

}  // namespace flashmoe::emu

// The hooks g++ -fsanitize=thread calls (GCC's tsan.cc; the entry and exit hooks are turned off,
// --param tsan-instrument-func-entry-exit=0). Atomic builtins of the instrumented unit (the
// standard library's reference counts) run here as the builtins themselves.
extern "C" {
using flashmoe::emu::detail::access_here;
// Each checks its access as the running thread's, at the instrumented instruction (its caller).
#define FLASHMOE_RACE_HOOK(name, bytes, write)                                                        \
  void name(void* p) {                                                                                \
    if (flashmoe::emu::race_enabled) access_here(p, bytes, write, __builtin_return_address(0));       \
  }
#define FLASHMOE_RACE_HOOKS(n)                                                                          \
  FLASHMOE_RACE_HOOK(__tsan_read##n, n, false)                                                          \
  FLASHMOE_RACE_HOOK(__tsan_write##n, n, true)                                                          \
  FLASHMOE_RACE_HOOK(__tsan_unaligned_read##n, n, false)                                                \
  FLASHMOE_RACE_HOOK(__tsan_unaligned_write##n, n, true)
FLASHMOE_RACE_HOOKS(1)
FLASHMOE_RACE_HOOKS(2)
FLASHMOE_RACE_HOOKS(4)
FLASHMOE_RACE_HOOKS(8)
FLASHMOE_RACE_HOOKS(16)
#undef FLASHMOE_RACE_HOOKS
#undef FLASHMOE_RACE_HOOK
void __tsan_read_range(void* p, unsigned long n) {
  if (flashmoe::emu::race_enabled) access_here(p, static_cast<flashmoe::u32>(n), false, __builtin_return_address(0));
}
void __tsan_write_range(void* p, unsigned long n) {
  if (flashmoe::emu::race_enabled) access_here(p, static_cast<flashmoe::u32>(n), true, __builtin_return_address(0));
}
#define FLASHMOE_RACE_ATOMICS(n, T)                                                                        \
  T __tsan_atomic##n##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }      \
  void __tsan_atomic##n##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }      \
  T __tsan_atomic##n##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##n##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##n##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  int __tsan_atomic##n##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                    \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
  }                                                                                                        \
  int __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                      \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
  }                                                                                                        \
  T __tsan_atomic##n##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                          \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
    return c;                                                                                              \
  }
FLASHMOE_RACE_ATOMICS(8, char)
FLASHMOE_RACE_ATOMICS(16, short)
FLASHMOE_RACE_ATOMICS(32, int)
FLASHMOE_RACE_ATOMICS(64, long long)
#undef FLASHMOE_RACE_ATOMICS
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
// Where a compiler routes the unit's memcpy/memset/memmove through the sanitizer (clang does).
void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  if (flashmoe::emu::race_enabled) {
    access_here(s, static_cast<flashmoe::u32>(n), false, __builtin_return_address(0));
    access_here(d, static_cast<flashmoe::u32>(n), true, __builtin_return_address(0));
  }
  return std::memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  if (flashmoe::emu::race_enabled) {
    access_here(s, static_cast<flashmoe::u32>(n), false, __builtin_return_address(0));
    access_here(d, static_cast<flashmoe::u32>(n), true, __builtin_return_address(0));
  }
  return std::memmove(d, s, n);
}
void* __tsan_memset(void* d, int c, unsigned long n) {
  if (flashmoe::emu::race_enabled) access_here(d, static_cast<flashmoe::u32>(n), true, __builtin_return_address(0));
  return std::memset(d, c, n);
}
void __tsan_init() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
}
