// Fibers, the cooperative scheduler and the warp exchanges behind simt.h.
//
// One launch = grid x block fibers on the calling OS thread, each with its own stack. A fiber runs
// until it reaches a yield point, then control returns to the scheduler, which picks the next
// ready fiber (round robin, or a seeded random pick to explore other interleavings). Yield points:
// __syncthreads and every warp collective (the fiber parks until its block / warp has all arrived),
// sleep_ns (parks on the virtual clock), and acquire/relaxed loads, fences and the relaxed atomic
// add (the fiber goes to the back of the ready queue).
//
// Virtual time. %globaltimer reads a clock that advances 1 ns per fiber dispatch; sleep_ns(ns)
// parks a fiber until the clock has advanced by ns, and when no fiber is ready the clock jumps to
// the next wake-up. So a wait that can never complete reaches the kernel's timeout after about
// timeout_ns / 1024 spins (its backoff caps at 1024 ns) instead of hanging, and the same launch
// with the same seed always takes the same path. A launch in which no fiber can ever run again
// (all of them at a barrier or in a collective that cannot complete) is reported as a deadlock;
// one that spins past $FLASHMOE_EMU_WALL_LIMIT_S (default 600) seconds of wall time, too.
//
// Context switch: a hand-written x86-64 switch (callee-saved registers, MXCSR and the x87 control
// word), about 20x the speed of glibc's swapcontext, which makes a sigprocmask syscall per switch
// (measured on a barrier-heavy test: 7 M against 0.34 M switches/s). Other architectures, or
// -DFLASHMOE_EMU_UCONTEXT, use ucontext.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <mutex>
#include <queue>
#include <string>
#include <vector>

#include "flashmoe/device/emulation/simt.h"
#include "flashmoe/device/emulation/warp_ops.h"

#if defined(__x86_64__) && !defined(FLASHMOE_EMU_UCONTEXT)
#define FLASHMOE_EMU_FAST_SWITCH 1
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
#else
#define FLASHMOE_EMU_FAST_SWITCH 0
#include <ucontext.h>
#endif

namespace flashmoe::emu {

FiberView* current = nullptr;
Dim3 block_dim{}, grid_dim{};

namespace {

struct Context {
#if FLASHMOE_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

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

enum class State : u8 { kReady, kRunning, kBarrier, kWarp, kSleep, kDone };

struct AsyncCopy {
  void* dst;
  const void* src;   // nullptr: zero-fill
  u64 group;         // the commit group it belongs to (commits before its issue)
};

struct Fiber {
  FiberView view;
  Context ctx;
  State state = State::kReady;
  std::deque<AsyncCopy> copies;   // cp.async copies issued and not yet waited for, oldest first
  u64 commits = 0;
};

struct WarpState {
  int arrived = 0;
  WarpOp op = kOpShfl;
  WarpSlots slots;
  Fiber* waiters[32];   // the lanes parked until the last one arrives
};

struct BlockState {
  int arrived = 0;
  std::vector<Fiber*> waiters;
  int reduced = 0;   // __syncthreads_or's value
};

struct Sleeper {
  u64 wake, seq;
  Fiber* fiber;
  bool operator>(const Sleeper& o) const { return wake != o.wake ? wake > o.wake : seq > o.seq; }
};

constexpr u64 kRedzone = 128;                 // canary bytes around each block's shared memory
constexpr u8 kCanary = 0xA5, kPoison = 0xCD;  // poison: shared memory never written reads as this

struct Launch {
  int grid = 0, block = 0;
  u64 smem_bytes = 0, smem_stride = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<Fiber> fibers;
  std::vector<BlockState> blocks;
  std::vector<WarpState> warps;
  std::deque<Fiber*> ready;
  std::priority_queue<Sleeper, std::vector<Sleeper>, std::greater<Sleeper>> sleepers;
  u64 clock = 0, seq = 0, switches = 0, rng = 0;
  u64 wall_limit_s = 0;
  std::chrono::steady_clock::time_point deadline;
  int live = 0;
  Context sched;
  Fiber* running = nullptr;
  std::string error;
  u8* smem = nullptr;
  char* stacks = nullptr;
  u64 stacks_bytes = 0;
};

Launch* L = nullptr;
thread_local bool in_fiber = false;
u64 last_stats[4] = {0, 0, 0, 0};   // switches, virtual ns, fibers, wall ns of the last launch

const char* op_name(WarpOp op) {
  switch (op) {
    case kOpShfl: return "__shfl_sync/__shfl_xor_sync";
    case kOpBallot: return "__ballot_sync";
    case kOpLdmatrix: return "ldmatrix_x4";
    case kOpMmaBf16: return "mma_bf16_m16n8k16";
    case kOpMmaF16: return "mma_f16_m16n8k16";
    default: return "mma_tf32_m16n8k8";
  }
}

// Back to the scheduler; returns when the scheduler next dispatches this fiber.
inline void park(Fiber* f, State s) {
  f->state = s;
  switch_context(f->ctx, L->sched);
}

inline void make_ready(Fiber* f) {
  f->state = State::kReady;
  L->ready.push_back(f);
}

[[noreturn]] void fiber_entry() {
  Launch* l = L;
  l->body(l->ctx);
  Fiber* f = l->running;
  // Copies that nobody waited for land at an undefined time: the kernel must wait for them all.
  if (!f->copies.empty()) fatal("the thread exits with %zu cp.async copies never waited for", f->copies.size());
  --l->live;
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
  std::string msg = "emulator deadlock: no thread can run again (virtual time " + std::to_string(L->clock) + " ns)";
  int shown = 0;
  for (int b = 0; b < L->grid; ++b) {
    std::vector<int> barrier, warp, done;
    std::string ops;
    for (int t = 0; t < L->block; ++t) {
      const Fiber& f = L->fibers[(size_t)b * L->block + t];
      if (f.state == State::kBarrier) barrier.push_back(t);
      else if (f.state == State::kDone) done.push_back(t);
      else if (f.state == State::kWarp) {
        warp.push_back(t);
        const char* name = op_name(L->warps[((size_t)b * L->block + t) / 32].op);
        if (ops.find(name) == std::string::npos) ops += (ops.empty() ? "" : ", ") + std::string(name);
      }
    }
    if ((int)done.size() == L->block) continue;
    if (++shown > 16) { msg += "\n  ..."; break; }
    msg += "\n  block " + std::to_string(b) + ":";
    if (!barrier.empty()) msg += " threads " + ranges(barrier) + " wait at __syncthreads;";
    if (!warp.empty()) msg += " threads " + ranges(warp) + " wait in a warp collective (" + ops + ");";
    if (!done.empty()) msg += " threads " + ranges(done) + " have exited;";
  }
  return msg;
}

u64 next_random() {
  u64 x = L->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  L->rng = x;
  return x * 0x2545F4914F6CDD1Dull;
}

void run_scheduler() {
  while (L->live > 0 && L->error.empty()) {
    while (!L->sleepers.empty() && L->sleepers.top().wake <= L->clock) {
      make_ready(L->sleepers.top().fiber);
      L->sleepers.pop();
    }
    if (L->ready.empty()) {
      if (L->sleepers.empty()) {
        L->error = deadlock_report();
        break;
      }
      L->clock = L->sleepers.top().wake;
      continue;
    }
    // Every wait of the kernel is bounded, so a launch ends; a spin without a bound would not
    // (it only ever sleeps and polls). The wall-clock limit turns that into a message.
    if ((L->switches & 0xffff) == 0 && std::chrono::steady_clock::now() > L->deadline) {
      L->error = "emulator: the launch ran past FLASHMOE_EMU_WALL_LIMIT_S (" + std::to_string(L->wall_limit_s) +
                 " s of wall time) at virtual time " + std::to_string(L->clock) + " ns: a wait without a bound?";
      break;
    }
    if (L->rng) std::swap(L->ready.front(), L->ready[next_random() % L->ready.size()]);
    Fiber* f = L->ready.front();
    L->ready.pop_front();
    ++L->clock;
    ++L->switches;
    L->running = f;
    current = &f->view;
    f->state = State::kRunning;
    switch_context(L->sched, f->ctx);
  }
}

// Shared memory: [canary][smem, poisoned][canary] per block; a write past either end shows up as
// a changed canary after the launch.
std::string check_canaries() {
  for (int b = 0; b < L->grid; ++b) {
    const u8* base = L->smem + (u64)b * L->smem_stride;
    for (u64 i = 0; i < kRedzone; ++i) {
      if (base[i] != kCanary)
        return "block " + std::to_string(b) + " wrote shared memory " + std::to_string(kRedzone - i) +
               " bytes before its start";
      if (base[kRedzone + L->smem_bytes + i] != kCanary)
        return "block " + std::to_string(b) + " wrote shared memory past its " + std::to_string(L->smem_bytes) +
               " bytes (offset " + std::to_string(L->smem_bytes + i) + ")";
    }
  }
  return "";
}

}  // namespace

// ---- what simt.h calls ------------------------------------------------------------------------

void yield() {
  Fiber* f = L->running;
  make_ready(f);
  park(f, State::kReady);
}

void sleep_for(u32 ns) {
  Fiber* f = L->running;
  L->sleepers.push(Sleeper{L->clock + (ns ? ns : 1), L->seq++, f});
  park(f, State::kSleep);
}

u64 now_ns() { return L->clock; }

void block_barrier() {
  Fiber* f = L->running;
  BlockState& b = L->blocks[f->view.block.x];
  if (++b.arrived < L->block) {
    b.waiters.push_back(f);
    park(f, State::kBarrier);
    return;
  }
  b.arrived = 0;
  for (Fiber* w : b.waiters) make_ready(w);
  b.waiters.clear();
}

}  // namespace flashmoe::emu

// Three barriers: every thread has read the last result before thread 0 clears it, and every
// thread has contributed before anyone reads.
int __syncthreads_or(int pred) {
  using namespace flashmoe::emu;
  BlockState& b = L->blocks[L->running->view.block.x];
  block_barrier();
  if (L->running->view.thread.x == 0) b.reduced = 0;
  block_barrier();
  if (pred) b.reduced = 1;
  block_barrier();
  return b.reduced;
}

namespace flashmoe::emu {

void warp_exchange(WarpOp op, u32 mask, const u32* in, int n, u32 (&out)[4]) {
  Fiber* f = L->running;
  const u32 t = f->view.thread.x, lane = t & 31u;
  if (mask != 0xffffffffu)
    fatal("%s with mask %#x: the emulator supports whole-warp collectives only", op_name(op), mask);
  WarpState& w = L->warps[((size_t)f->view.block.x * L->block + t) / 32];
  if (w.arrived == 0) w.op = op;
  else if (w.op != op)
    fatal("warp collective mismatch: this lane is in %s while other lanes of its warp are in %s", op_name(op),
          op_name(w.op));
  std::memcpy(w.slots.in[lane], in, sizeof(u32) * n);
  if (w.arrived == 31) {
    // The last lane computes every lane's result. The others read theirs before they can deposit
    // into the next exchange, so one set of slots per warp suffices.
    warp_ops::compute(w.slots, w.op);
    for (int i = 0; i < 31; ++i) make_ready(w.waiters[i]);
    w.arrived = 0;
  } else {
    w.waiters[w.arrived++] = f;
    park(f, State::kWarp);
  }
  std::memcpy(out, w.slots.out[lane], sizeof(out));
}

void cp_async_issue(void* dst, const void* src) {
  Fiber* f = L->running;
  f->copies.push_back(AsyncCopy{dst, src, f->commits});
}

void cp_async_commit_group() { ++L->running->commits; }

void cp_async_wait_groups(int n) {
  Fiber* f = L->running;
  while (!f->copies.empty() && f->copies.front().group + n < f->commits) {
    const AsyncCopy& c = f->copies.front();
    if (c.src) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
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

void fatal(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  if (!L || !L->running) {
    std::fprintf(stderr, "flashmoe emulator: %s\n", buf);
    std::abort();
  }
  Fiber* f = L->running;
  L->error = "block " + std::to_string(f->view.block.x) + " thread " + std::to_string(f->view.thread.x) + ": " + buf;
  park(f, State::kDone);   // the scheduler sees the error and ends the launch; this fiber never resumes
  __builtin_unreachable();
}

int launch(int grid, int block, u64 smem_bytes, u64 seed, void (*body)(void*), void* ctx, char* err, u64 err_len) {
  auto fail = [&](const std::string& m) {
    std::snprintf(err, err_len, "%s", m.c_str());
    return 1;
  };
  if (in_fiber) return fail("a launch from inside an emulated kernel is not supported");
  if (grid < 1 || block < 32 || block % 32 || block > 1024)
    return fail("grid " + std::to_string(grid) + " x block " + std::to_string(block) +
                ": need grid >= 1 and a block of whole warps, at most 1024 threads");
  static std::mutex mu;   // one launch at a time per library: the scheduler state is global
  std::lock_guard<std::mutex> lock(mu);
  const auto wall0 = std::chrono::steady_clock::now();

  Launch l;
  l.grid = grid;
  l.block = block;
  l.smem_bytes = smem_bytes;
  l.smem_stride = kRedzone + ((smem_bytes + 127) & ~u64{127}) + kRedzone;
  l.body = body;
  l.ctx = ctx;
  l.rng = seed ? seed * 0x9E3779B97F4A7C15ull | 1 : 0;
  const char* limit = std::getenv("FLASHMOE_EMU_WALL_LIMIT_S");
  l.wall_limit_s = limit ? std::strtoull(limit, nullptr, 10) : 600;
  l.deadline = wall0 + std::chrono::seconds(l.wall_limit_s);
  const size_t n = (size_t)grid * block;
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
  if (stacks == MAP_FAILED) return fail("cannot map " + std::to_string(l.stacks_bytes) + " bytes of fiber stacks");
  l.stacks = static_cast<char*>(stacks);
  std::vector<u8> smem(l.smem_stride * grid + 128);
  l.smem = reinterpret_cast<u8*>((reinterpret_cast<uintptr_t>(smem.data()) + 127) & ~uintptr_t{127});
  for (int b = 0; b < grid; ++b) {
    u8* base = l.smem + (u64)b * l.smem_stride;
    std::memset(base, kCanary, kRedzone);
    std::memset(base + kRedzone, kPoison, smem_bytes);
    std::memset(base + kRedzone + smem_bytes, kCanary, kRedzone);
  }
  l.fibers.resize(n);
  l.blocks.resize(grid);
  l.warps.resize(n / 32);
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    const int b = static_cast<int>(i / block);
    f.view = FiberView{{static_cast<u32>(i % block), 0, 0}, {static_cast<u32>(b), 0, 0},
                       l.smem + (u64)b * l.smem_stride + kRedzone, smem_bytes, smem_skew};
    char* lo = l.stacks + i * (stack_bytes + page);
    mprotect(lo, page, PROT_NONE);
    init_context(f.ctx, lo + page, stack_bytes, fiber_entry);
    l.ready.push_back(&f);
  }
  l.live = static_cast<int>(n);
  block_dim = Dim3{static_cast<u32>(block), 1, 1};
  grid_dim = Dim3{static_cast<u32>(grid), 1, 1};

  L = &l;
  in_fiber = true;   // fibers run on this OS thread: a launch from one of them is refused above
  run_scheduler();
  in_fiber = false;
  if (l.error.empty()) l.error = check_canaries();
  L = nullptr;
  current = nullptr;
  munmap(l.stacks, l.stacks_bytes);
  last_stats[0] = l.switches;
  last_stats[1] = l.clock;
  last_stats[2] = n;
  const auto wall = std::chrono::steady_clock::now() - wall0;
  last_stats[3] = std::chrono::duration_cast<std::chrono::nanoseconds>(wall).count();
  if (!l.error.empty()) return fail(l.error);
  if (err_len) err[0] = '\0';
  return 0;
}

}  // namespace flashmoe::emu

// Switches, virtual nanoseconds, fibers and wall-clock nanoseconds of the last launch.
FLASHMOE_EMU_EXPORT void flashmoe_emu_stats(unsigned long long* out) {
  for (int i = 0; i < 4; ++i) out[i] = flashmoe::emu::last_stats[i];
}
