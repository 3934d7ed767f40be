// Fibers, the cooperative scheduler and worlds of launches behind simt.h (barriers, collectives
// and the other thread operations: threads.cpp; weak memory and the NVSHMEM proxy: memory.cpp;
// the state they share: world.h).
//
// A world is one or more launches whose fibers (one per CUDA thread, each with its own stack) run
// on the calling OS thread under one scheduler and one virtual clock: a single launch, or one
// launch per rank started at chosen times, as separate processes would start them. A fiber runs
// until it reaches a yield point, then control returns to the scheduler, which picks the next
// ready fiber (round robin, or a seeded random pick to explore other interleavings). Yield points:
// __syncthreads and every warp collective (the fiber parks until its block / warp has all arrived),
// sleep_ns (parks on the virtual clock), and acquire/relaxed loads, fences and the relaxed atomic
// add (the fiber goes to the back of the ready queue). world_run() returns each time a launch
// ends, so the host can start that rank's next launch (a stream's order) while the others run on.
//
// Virtual time. %globaltimer reads a clock that advances 1 ns per fiber dispatch; sleep_ns(ns)
// parks a fiber until the clock has advanced by ns, and when no fiber is ready the clock jumps to
// the next wake-up or launch start. So a wait that can never complete reaches the kernel's timeout
// after about timeout_ns / 1024 spins (its backoff caps at 1024 ns) instead of hanging, and the
// same world with the same seeds always takes the same path. A world in which no fiber can ever
// run again (all of them at a barrier or in a collective that cannot complete) is reported as a
// deadlock; one that spins past $FLASHMOE_EMU_WALL_LIMIT_S (default 600) seconds of wall time, too.
//
// Context switch: a hand-written x86-64 switch (callee-saved registers, MXCSR and the x87 control
// word), about 20x the speed of glibc's swapcontext, which makes a sigprocmask syscall per switch
// (measured on a barrier-heavy test: 7 M against 0.34 M switches/s). Other architectures, or
// -DFLASHMOE_EMU_UCONTEXT, use ucontext.
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "flashmoe/device/emulation/world.h"

#if FLASHMOE_EMU_FAST_SWITCH
// switch(save, load): push the callee-saved state, store rsp into *save, load rsp, pop, return
// into the other context. A new context's stack is laid out as if it had called this function.
extern "C" void flashmoe_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl flashmoe_emu_switch
  .hidden flashmoe_emu_switch
  .type flashmoe_emu_switch, @function
flashmoe_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size flashmoe_emu_switch, .-flashmoe_emu_switch
)");
#endif

namespace flashmoe::emu {

FiberView* current = nullptr;
bool weak_memory = false;

namespace detail {

inline void switch_context(Context& save, Context& load) {
#if FLASHMOE_EMU_FAST_SWITCH
  flashmoe_emu_switch(&save.sp, load.sp);
#else
  swapcontext(&save.uc, &load.uc);
#endif
}

void init_context(Context& c, char* stack_lo, size_t bytes, void (*entry)()) {
#if FLASHMOE_EMU_FAST_SWITCH
  u32 mxcsr;
  u16 fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  u64* sp = reinterpret_cast<u64*>(reinterpret_cast<uintptr_t>(stack_lo + bytes) & ~uintptr_t{15});
  *--sp = 0;                                  // entry's return address: entry never returns
  *--sp = reinterpret_cast<u64>(entry);       // where the switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = 0;      // rbp rbx r12-r15
  *--sp = mxcsr | (static_cast<u64>(fpucw) << 32);
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_lo;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

World* G = nullptr;   // the world being run
thread_local bool in_fiber = false;
std::mutex run_mutex;   // one world runs at a time per library: `current` and G are global
u64 last_stats[5] = {0, 0, 0, 0, 0};   // switches, virtual ns, fibers, wall ns, system-scope
                                      // operations of the last world

// "launch 2 (PE 2) " in a world of several launches; nothing for a lone launch.
std::string launch_name(const Launch& l) {
  if (G->launches.size() < 2) return "";
  return "launch " + std::to_string(l.id) + " (PE " + std::to_string(l.pe) + ") ";
}

void park(Fiber* f, State s) {
  f->state = s;
  switch_context(f->ctx, G->sched);
}

[[noreturn]] void fiber_entry() {
  Fiber* f = G->running;
  f->launch->body(f->launch->ctx);
  f = G->running;
  // Copies that nobody waited for land at an undefined time: the kernel must wait for them all.
  if (!f->copies.empty()) fatal("the thread exits with %zu cp.async copies never waited for", f->copies.size());
  --f->launch->live;
  park(f, State::kDone);
  __builtin_unreachable();
}

std::string ranges(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(v[i]) + (j > i ? "-" + std::to_string(v[j]) : "");
    i = j + 1;
  }
  return s;
}

// Which threads of which blocks are stuck where (every block not entirely finished).
std::string deadlock_report() {
  std::string msg = "emulator deadlock: no thread can run again (virtual time " + std::to_string(G->clock) + " ns)";
  int shown = 0;
  for (Launch* l : G->active) {
    for (int b = 0; b < l->grid; ++b) {
      std::vector<int> barrier, named, warp, done;
      std::string ops;
      for (int t = 0; t < l->block; ++t) {
        const Fiber& f = l->fibers[(size_t)b * l->block + t];
        if (f.state == State::kBarrier) barrier.push_back(t);
        else if (f.state == State::kNamedBarrier) named.push_back(t);
        else if (f.state == State::kDone) done.push_back(t);
        else if (f.state == State::kWarp) {
          warp.push_back(t);
          const char* name = op_name(l->warps[((size_t)b * l->block + t) / 32].op);
          if (ops.find(name) == std::string::npos) ops += (ops.empty() ? "" : ", ") + std::string(name);
        }
      }
      if ((int)done.size() == l->block) continue;
      if (++shown > 16) return msg + "\n  ...";
      msg += "\n  " + launch_name(*l) + "block " + std::to_string(b) + ":";
      if (!barrier.empty()) msg += " threads " + ranges(barrier) + " wait at __syncthreads;";
      if (!named.empty()) msg += " threads " + ranges(named) + " wait at a named barrier;";
      if (!warp.empty()) msg += " threads " + ranges(warp) + " wait in a warp collective (" + ops + ");";
      if (!done.empty()) msg += " threads " + ranges(done) + " have exited;";
    }
  }
  return msg;
}

// Shared memory: [canary][smem, poisoned][canary] per block; a write past either end shows up as
// a changed canary after the launch.
std::string check_canaries(const Launch& l) {
  for (int b = 0; b < l.grid; ++b) {
    const u8* base = l.smem + (u64)b * l.smem_stride;
    for (u64 i = 0; i < kRedzone; ++i) {
      if (base[i] != kCanary)
        return launch_name(l) + "block " + std::to_string(b) + " wrote shared memory " + std::to_string(kRedzone - i) +
               " bytes before its start";
      if (base[kRedzone + l.smem_bytes + i] != kCanary)
        return launch_name(l) + "block " + std::to_string(b) + " wrote shared memory past its " +
               std::to_string(l.smem_bytes) + " bytes (offset " + std::to_string(l.smem_bytes + i) + ")";
    }
  }
  return "";
}

void start_launch(World& w, Launch& l) {
  const size_t n = (size_t)l.grid * l.block;
  const char* kb = std::getenv("FLASHMOE_EMU_STACK_KB");
  // Where the dynamic shared memory starts in the shared window (tests of the kernel's alignment
  // check: a GPU puts it after any static __shared__ variables).
  const char* skew = std::getenv("FLASHMOE_EMU_SMEM_SKEW");
  const u32 smem_skew = skew ? static_cast<u32>(std::strtoul(skew, nullptr, 10)) : 0;
  const u64 page = (u64)sysconf(_SC_PAGESIZE);
  const u64 stack_bytes = ((kb ? std::strtoull(kb, nullptr, 10) : 256) * 1024 + page - 1) / page * page;
  l.stacks_bytes = n * (stack_bytes + page);
  // Stacks are reserved, not committed: a fiber only touches the few pages it uses. Each stack has
  // an inaccessible guard page below it, so an overflow faults instead of corrupting a neighbour.
  void* stacks = mmap(nullptr, l.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
  if (stacks == MAP_FAILED) {
    w.error = "cannot map " + std::to_string(l.stacks_bytes) + " bytes of fiber stacks";
    l.stacks = nullptr;
    return;
  }
  l.stacks = static_cast<char*>(stacks);
  l.smem_storage.assign(l.smem_stride * l.grid + 128, 0);
  l.smem = reinterpret_cast<u8*>((reinterpret_cast<uintptr_t>(l.smem_storage.data()) + 127) & ~uintptr_t{127});
  for (int b = 0; b < l.grid; ++b) {
    u8* base = l.smem + (u64)b * l.smem_stride;
    std::memset(base, kCanary, kRedzone);
    std::memset(base + kRedzone, kPoison, l.smem_bytes);
    std::memset(base + kRedzone + l.smem_bytes, kCanary, kRedzone);
  }
  static u64 launches = 0;   // one OS thread runs every world
  const u64 serial = ++launches;
  l.fibers.resize(n);
  l.blocks.resize(l.grid);
  l.warps.resize(n / 32);
  const Dim3 block_dim{static_cast<u32>(l.block), 1, 1}, grid_dim{static_cast<u32>(l.grid), 1, 1};
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    const int b = static_cast<int>(i / l.block);
    f.view = FiberView{{static_cast<u32>(i % l.block), 0, 0}, {static_cast<u32>(b), 0, 0}, block_dim, grid_dim,
                       l.smem + (u64)b * l.smem_stride + kRedzone, l.smem_bytes, smem_skew, serial};
    f.launch = &l;
    char* lo = l.stacks + i * (stack_bytes + page);
    mprotect(lo, page, PROT_NONE);
    init_context(f.ctx, lo + page, stack_bytes, fiber_entry);
    w.ready.push_back(&f);
  }
  race_start(l);
  l.live = static_cast<int>(n);
  w.fibers_total += n;
  w.active.push_back(&l);
}

void finish_launch(World& w, Launch& l) {
  drain_launch(l);   // a launch's end publishes every store it made
  if (w.error.empty()) w.error = check_canaries(l);
  if (w.error.empty()) w.error = race_finish(l);
  l.finished = true;
  l.free_resources();
  for (size_t i = 0; i < w.active.size(); ++i)
    if (w.active[i] == &l) {
      w.active.erase(w.active.begin() + i);
      break;
    }
  w.completed.push_back(l.id);
}

// Runs until a launch ends (its id), nothing is left to run (-1) or the world failed (-2).
int run_world(World& w) {
  for (;;) {
    if (!w.error.empty()) return -2;
    if (!w.completed.empty()) {
      const int id = w.completed.front();
      w.completed.pop_front();
      return id;
    }
    while (!w.starts.empty() && w.starts.top().at <= w.clock) {
      Launch* l = w.starts.top().launch;
      w.starts.pop();
      start_launch(w, *l);
      if (!w.error.empty()) return -2;
    }
    while (!w.sleepers.empty() && w.sleepers.top().wake <= w.clock) {
      make_ready(w.sleepers.top().fiber);
      w.sleepers.pop();
    }
    if (w.ready.empty()) {
      u64 next = ~0ull;
      if (!w.sleepers.empty()) next = w.sleepers.top().wake;
      if (!w.starts.empty()) next = std::min(next, w.starts.top().at);
      if (next == ~0ull) {
        if (!w.active.empty()) {
          w.error = deadlock_report();
          return -2;
        }
        settle_all(w);
        return -1;
      }
      w.clock = next;
      continue;
    }
    // Every wait of the kernel is bounded, so a launch ends; a spin without a bound would not
    // (it only ever sleeps and polls). The wall-clock limit turns that into a message.
    if ((w.switches & 0xffff) == 0 && std::chrono::steady_clock::now() > w.deadline) {
      w.error = "emulator: the launch ran past FLASHMOE_EMU_WALL_LIMIT_S (" + std::to_string(w.wall_limit_s) +
                " s of wall time) at virtual time " + std::to_string(w.clock) + " ns: a wait without a bound?";
      return -2;
    }
    background(w);
    if (w.rng) std::swap(w.ready.front(), w.ready[xorshift(w.rng) % w.ready.size()]);
    Fiber* f = w.ready.front();
    w.ready.pop_front();
    ++w.clock;
    ++w.switches;
    w.running = f;
    current = &f->view;
    f->state = State::kRunning;
    switch_context(w.sched, f->ctx);
    if (f->state == State::kDone && f->launch->live == 0 && !f->launch->finished && w.error.empty())
      finish_launch(w, *f->launch);
  }
}

// Runs `w` on this thread (one world at a time) until world_run's answer.
int run_locked(World& w) {
  std::lock_guard<std::mutex> lock(run_mutex);
  G = &w;
  weak_memory = w.weak;
  in_fiber = true;   // fibers run on this OS thread: a launch from one of them is refused
  w.deadline = std::chrono::steady_clock::now() + std::chrono::seconds(w.wall_limit_s);
  const int r = run_world(w);
  in_fiber = false;
  G = nullptr;
  current = nullptr;
  weak_memory = false;
  return r;
}

}  // namespace detail

using namespace detail;

// An error in a fiber: recorded for the host, and the world ends.
void fatal(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  if (!G || !G->running) {
    std::fprintf(stderr, "flashmoe emulator: %s\n", buf);
    std::abort();
  }
  Fiber* f = G->running;
  G->error = launch_name(*f->launch) + "block " + std::to_string(f->view.block.x) + " thread " +
             std::to_string(f->view.thread.x) + ": " + buf;
  // Races before the failure are often its cause: the report goes with it.
  const std::string races = race_finish(*f->launch);
  if (!races.empty()) G->error += "\n" + races;
  park(f, State::kDone);   // the scheduler sees the error and ends the world; this fiber never resumes
  __builtin_unreachable();
}

// ---- worlds -------------------------------------------------------------------------------------

void* world_new(u64 seed, u64 weak_seed) {
  World* w = new World;
  w->rng = seed ? seed * 0x9E3779B97F4A7C15ull | 1 : 0;
  w->weak = weak_seed != 0;
  // The background moves (stores, puts) always draw from a generator: from the weak seed when
  // there is one, else a fixed one, so a world without one is still reproducible.
  w->bg = (weak_seed ? weak_seed : 0x5DEECE66Dull) * 0xD1B54A32D192ED03ull | 1;
  const char* limit = std::getenv("FLASHMOE_EMU_WALL_LIMIT_S");
  w->wall_limit_s = limit ? std::strtoull(limit, nullptr, 10) : 600;
  w->wall0 = std::chrono::steady_clock::now();
  return w;
}

int world_set_pe(void* world, int pe, const void* heap, u64 bytes, char* err, u64 err_len) {
  World& w = *static_cast<World*>(world);
  if (pe < 0 || pe > 4096) {
    std::snprintf(err, err_len, "PE %d out of range", pe);
    return 1;
  }
  if ((size_t)pe >= w.pes.size()) {
    if (!w.in_flight.empty()) {
      std::snprintf(err, err_len, "PE %d registered while puts are in flight: register every PE first", pe);
      return 1;
    }
    const size_t n = pe + 1, old = w.pes.size();
    std::vector<u64> latest(n * n, 0), fenced(n * n, 0);   // the pair tables, re-laid for n PEs
    for (size_t i = 0; i < old; ++i)
      for (size_t j = 0; j < old; ++j) {
        latest[i * n + j] = w.latest[i * old + j];
        fenced[i * n + j] = w.fenced[i * old + j];
      }
    w.latest.swap(latest);
    w.fenced.swap(fenced);
    w.pes.resize(n, {0, 0});
    w.arrivals.resize(n);
  }
  w.pes[pe] = {reinterpret_cast<uintptr_t>(heap), bytes};
  return 0;
}

int world_add(void* world, void (*body)(void*), void* ctx, void (*release)(void*), int grid, int block,
              u64 smem_bytes, u64 delay_ns, int pe, char* err, u64 err_len) {
  World& w = *static_cast<World*>(world);
  auto fail = [&](const std::string& m) {
    std::snprintf(err, err_len, "%s", m.c_str());
    if (release) release(ctx);
    return -1;
  };
  if (in_fiber) return fail("a launch from inside an emulated kernel is not supported");
  if (grid < 1 || block < 32 || block % 32 || block > 1024)
    return fail("grid " + std::to_string(grid) + " x block " + std::to_string(block) +
                ": need grid >= 1 and a block of whole warps, at most 1024 threads");
  if (pe < 0 || (size_t)pe >= w.pes.size() || !w.pes[pe].first)
    return fail("PE " + std::to_string(pe) + " has no heap registered (world_set_pe)");
  auto l = std::make_unique<Launch>();
  l->id = static_cast<int>(w.launches.size());
  l->pe = pe;
  l->grid = grid;
  l->block = block;
  l->smem_bytes = smem_bytes;
  l->smem_stride = kRedzone + ((smem_bytes + 127) & ~u64{127}) + kRedzone;
  l->body = body;
  l->ctx = ctx;
  l->release = release;
  l->start_at = w.clock + delay_ns;
  w.starts.push(Start{l->start_at, pe, w.seq++, l.get()});
  w.launches.push_back(std::move(l));
  return w.launches.back()->id;
}

int world_run(void* world, char* err, u64 err_len) {
  World& w = *static_cast<World*>(world);
  if (in_fiber) {
    std::snprintf(err, err_len, "a world run from inside an emulated kernel is not supported");
    return -2;
  }
  const int r = run_locked(w);
  if (r == -2) std::snprintf(err, err_len, "%s", w.error.c_str());
  else if (err_len) err[0] = '\0';
  return r;
}

void world_free(void* world) {
  World* w = static_cast<World*>(world);
  last_stats[0] = w->switches;
  last_stats[1] = w->clock;
  last_stats[2] = w->fibers_total;
  last_stats[3] = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - w->wall0).count();
  last_stats[4] = w->sys_scope;
  delete w;
}

int launch(int grid, int block, u64 smem_bytes, u64 seed, void (*body)(void*), void* ctx, char* err, u64 err_len) {
  void* w = world_new(seed, 0);
  // A lone launch on PE 0; its heap is never addressed through NVSHMEM (the probes).
  static u8 no_heap;
  world_set_pe(w, 0, &no_heap, 0, err, err_len);
  int r = world_add(w, body, ctx, nullptr, grid, block, smem_bytes, 0, 0, err, err_len);
  if (r < 0) {
    world_free(w);
    return 1;
  }
  while (r >= 0) r = world_run(w, err, err_len);
  world_free(w);
  return r == -1 ? 0 : 1;
}

}  // namespace flashmoe::emu

// Switches, virtual nanoseconds, fibers, wall-clock nanoseconds and system-scope operations of the
// last world freed.
FLASHMOE_EMU_EXPORT void flashmoe_emu_stats(unsigned long long* out) {
  for (int i = 0; i < 5; ++i) out[i] = flashmoe::emu::last_stats[i];
}
