// The emulator's internal state, shared by runtime.cpp (fibers, the scheduler, worlds), threads.cpp
// (barriers, collectives, cp.async) and memory.cpp (weak memory and the NVSHMEM proxy): a world,
// its launches, their blocks and fibers.
// Not part of the emulated CUDA surface (that is simt.h).
#pragma once

#include <sys/mman.h>

#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

#include "flashmoe/device/emulation/simt.h"
#include "flashmoe/device/emulation/warp_ops.h"

#if defined(__x86_64__) && !defined(FLASHMOE_EMU_UCONTEXT)
#define FLASHMOE_EMU_FAST_SWITCH 1   // runtime.cpp's hand-written switch
#else
#define FLASHMOE_EMU_FAST_SWITCH 0
#include <ucontext.h>
#endif

namespace flashmoe::emu::detail {

struct Context {
#if FLASHMOE_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// 4-byte words by address, in an order a random pick can draw from (store buffers).
struct Words {
  std::vector<std::pair<uintptr_t, u32>> items;
  std::unordered_map<uintptr_t, size_t> where;

  bool empty() const { return items.empty(); }
  const u32* find(uintptr_t a) const {
    auto it = where.find(a);
    return it == where.end() ? nullptr : &items[it->second].second;
  }
  void put(uintptr_t a, u32 v) {   // a newer store of the word replaces the older one
    auto it = where.find(a);
    if (it != where.end()) {
      items[it->second].second = v;
      return;
    }
    where.emplace(a, items.size());
    items.emplace_back(a, v);
  }
  std::pair<uintptr_t, u32> take(size_t i) {
    const auto e = items[i];
    where.erase(e.first);
    if (i + 1 != items.size()) {
      items[i] = items.back();
      where[items[i].first] = i;
    }
    items.pop_back();
    return e;
  }
  bool take(uintptr_t a, u32& v) {
    auto it = where.find(a);
    if (it == where.end()) return false;
    v = take(it->second).second;
    return true;
  }
  void clear() {
    items.clear();
    where.clear();
  }
};

inline void to_memory(uintptr_t a, u32 v) { *reinterpret_cast<volatile u32*>(a) = v; }

enum class State : u8 { kReady, kRunning, kBarrier, kNamedBarrier, kWarp, kSleep, kDone };

struct AsyncCopy {
  void* dst;
  const void* src;   // nullptr: zero-fill
  u64 group;         // the commit group it belongs to (commits before its issue)
  const void* pc;    // where it was issued (race reports)
};

struct Launch;
struct LaunchRace;

struct Fiber {
  FiberView view;
  Context ctx;
  State state = State::kReady;
  std::deque<AsyncCopy> copies;   // cp.async copies issued and not yet waited for, oldest first
  u64 commits = 0;
  Launch* launch = nullptr;
};

struct WarpState {
  int arrived = 0;
  WarpOp op = kOpShfl;
  WarpSlots slots;
  Fiber* waiters[32];   // the lanes parked until the last one arrives
};

// A named barrier (bar.sync / bar.red id, threads) of one block: ids 1..15.
struct NamedBarrier {
  u32 arrived = 0, threads = 0;
  int reduced = 0, result = 0;              // bar.red.or: the generation being gathered, the last one
  std::vector<Fiber*> waiters;
};

struct BlockState {
  int arrived = 0;
  std::vector<Fiber*> waiters;
  int reduced = 0;                          // __syncthreads_or's value
  NamedBarrier named[16];
  Words stores;                             // weak memory: stores no other block sees yet
  std::unordered_map<uintptr_t, u32> l1;    // weak memory: what plain loads cached
};

struct Sleeper {
  u64 wake, seq;
  Fiber* fiber;
  bool operator>(const Sleeper& o) const { return wake != o.wake ? wake > o.wake : seq > o.seq; }
};

constexpr u64 kRedzone = 128;                 // canary bytes around each block's shared memory
constexpr u8 kCanary = 0xA5, kPoison = 0xCD;  // poison: shared memory never written reads as this

struct Launch {
  int id = 0, pe = 0;
  int grid = 0, block = 0;
  u64 smem_bytes = 0, smem_stride = 0, start_at = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  void (*release)(void*) = nullptr;   // frees ctx when the launch ends
  std::vector<Fiber> fibers;
  std::vector<BlockState> blocks;
  std::vector<WarpState> warps;
  int live = 0;
  bool finished = false;
  std::vector<u8> smem_storage;
  u8* smem = nullptr;
  char* stacks = nullptr;
  u64 stacks_bytes = 0;
  Words gpu;   // weak memory: stores every block of this launch sees and no other launch yet
  std::shared_ptr<LaunchRace> race;   // shared-memory race checks (racecheck.cpp), when on

  void free_resources() {
    if (stacks) munmap(stacks, stacks_bytes);
    stacks = nullptr;
    std::vector<u8>().swap(smem_storage);
    race.reset();
    std::vector<Fiber>().swap(fibers);
    std::vector<BlockState>().swap(blocks);
    std::vector<WarpState>().swap(warps);
    if (release && ctx) release(ctx);
    ctx = nullptr;
  }
  ~Launch() { free_resources(); }
};

// Launches due at the same time start in PE order, not in the order hosts added them: host threads
// race to add, and the schedule must not depend on who won.
struct Start {
  u64 at;
  int pe;
  u64 seq;
  Launch* launch;
  bool operator>(const Start& o) const {
    return at != o.at ? at > o.at : pe != o.pe ? pe > o.pe : seq > o.seq;
  }
};

struct PutOp {
  uintptr_t dst;      // in the target PE's heap
  const u8* src;      // read at delivery; nullptr: `value`
  u32 value[2];
  u32 bytes;
  int from, to;
};

constexpr u64 kPutLatencyNs = 20000, kVisibleLatencyNs = 20000;
constexpr u64 kAsyncLatencyNs = 4000;   // a TMA load in flight (emu::land_later), weak worlds

struct AsyncLanding {
  Launch* launch;
  std::function<void()> land;
};

// Words a NIC wrote into a PE's memory, not yet visible to its loads: the newest value of each
// word and when it becomes visible (a heap of those times finds the due ones; stale heap entries
// are skipped).
struct Arrivals {
  std::unordered_map<uintptr_t, std::pair<u32, u64>> words;
  std::priority_queue<std::pair<u64, uintptr_t>, std::vector<std::pair<u64, uintptr_t>>, std::greater<>> due;
};

struct World {
  u64 clock = 0, seq = 0, switches = 0, rng = 0, bg = 0;
  bool weak = false;
  u64 wall_limit_s = 600;
  std::chrono::steady_clock::time_point wall0, deadline;
  std::deque<Fiber*> ready;
  std::priority_queue<Sleeper, std::vector<Sleeper>, std::greater<Sleeper>> sleepers;
  std::priority_queue<Start, std::vector<Start>, std::greater<Start>> starts;
  std::vector<std::unique_ptr<Launch>> launches;   // by id
  std::vector<Launch*> active;                     // started and not finished
  std::deque<int> completed;                       // finished, not yet reported by world_run
  u64 fibers_total = 0;
  u64 sys_scope = 0;   // system-scope fences, releases and acquires (emu::count_sys_scope)
  Context sched;
  Fiber* running = nullptr;
  std::string error;
  // NVSHMEM: every PE's heap (base, bytes); puts in flight by delivery time; per (source, target)
  // pair the latest delivery time issued and the one a fence holds later puts behind; arrivals.
  std::vector<std::pair<uintptr_t, u64>> pes;
  std::multimap<u64, PutOp> in_flight;
  std::multimap<u64, AsyncLanding> landings;   // TMA loads in flight by landing time
  std::vector<u64> latest, fenced;   // [from * pes + to]
  std::vector<Arrivals> arrivals;
};

extern World* G;   // the world being run

inline u64 xorshift(u64& state) {
  u64 x = state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  state = x;
  return x * 0x2545F4914F6CDD1Dull;
}

inline BlockState& my_block() {
  Fiber* f = G->running;
  return f->launch->blocks[f->view.block.x];
}

inline void make_ready(Fiber* f) {
  f->state = State::kReady;
  G->ready.push_back(f);
}

// runtime.cpp: back to the scheduler, in state `s`; returns when the scheduler next dispatches f.
void park(Fiber* f, State s);
// runtime.cpp: "launch 2 (PE 2) " in a world of several launches, for messages.
std::string launch_name(const Launch& l);
// threads.cpp: the collective's name, for messages.
const char* op_name(WarpOp op);

// memory.cpp: what moves buffered stores and puts along (runtime.cpp's scheduler calls them).
void drain_launch(Launch& l);   // a launch's end publishes every store it made, drops its copies in flight
void background(World& w);      // before every dispatch
void settle_all(World& w);      // nothing left to run: every put delivered and visible

// racecheck.cpp: a launch's race-check state (nothing when it is off); `waiters` (n of them) and
// `last`, threads of one block, pass a barrier together; the races a finished launch made, as a
// message ("" for none).
void race_start(Launch& l);
void race_join(Fiber* const* waiters, size_t n, Fiber* last);
std::string race_finish(Launch& l);

}  // namespace flashmoe::emu::detail
