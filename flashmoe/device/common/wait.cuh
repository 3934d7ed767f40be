// Bounded waits. Every spin in the kernel goes through bounded_wait() (flags: wait_reached(); the
// GEMM pipeline's mbarriers: device/gemm/wgmma.cuh): on timeout it records who waited for what
// into Control::errors (first record per hosted rank wins), raises Control::abort with this
// launch's tag and returns false; the caller then leaves the kernel. Every other waiter of the
// launch polls abort and leaves too, recording what it was waiting for, so the host gets every
// rank's state, never a hang.
#pragma once

#include "flashmoe/device/common/transport.cuh"

namespace flashmoe {

struct WaitSite {
  u32 role;    // TaskKind the block is running
  u32 what;    // WaitKind
  u32 index;   // source/expert rank, tile or expert
};

__device__ __forceinline__ bool reached(u32 observed, u32 target) {
  // Flags hold epochs and counters count up from 0: compare on the circle, so an epoch that
  // wrapped around 2^32 still counts as reached, and a peer one launch ahead does too.
  return static_cast<i32>(observed - target) >= 0;
}

// Control::abort holds the tag of the launch that stopped (never 0). A later launch has another
// tag, so it runs normally even when nobody has reset the word (error_check="none"): a stopped
// launch must not turn every later one into garbage. Tags of launches up to 2^31 apart differ.
__device__ __forceinline__ u32 abort_tag(const Ctx& c) { return c.epoch | 0x80000000u; }

__device__ __forceinline__ bool aborted(const Params& p, const Ctx& c) {
  return ld_relaxed_gpu(&p.control->abort) == abort_tag(c);
}

// Out of line (it runs once, at the end of a failed launch); takes few scalars so the caller's
// context stays in registers (the global rank is first_local_rank + local). Inlined in an NVSHMEM
// build: linked with -rdc, a kernel that makes any call has its wgmmas serialised (ptx.cuh
// div_full). Anything but kErrAborted stops the launch: every wait then leaves.
#if FLASHMOE_TRANSPORT_NVSHMEM
__device__ __forceinline__
#else
__device__ __noinline__
#endif
void record_error(const Params& p, int local, u32 tag, u32 code, WaitSite site, u32 expected, u32 observed,
                  u64 waited_ns) {
  ErrorRecord* e = &p.control->errors[local];
  if (atomicCAS(&e->code, 0u, code) == 0u) {
    e->rank = p.first_local_rank + local;
    e->block = blockIdx.x;
    e->role = site.role;
    e->what = site.what;
    e->index = site.index;
    e->expected = expected;
    e->observed = observed;
    e->waited_ns = waited_ns;
  }
  if (code != kErrAborted) {
    atomicExch(&p.control->abort, tag);
    fence_acq_rel_sys();
  }
}

// How long a wait may take. A wait whose signal comes only after other waits of the launch end
// gets more time than they do: GEMM1 waits for GEMM0, which waits for a source's rows; a combine
// waits for results that wait for GEMM1; the wgmma consumers wait for the producer's next job,
// which may wait for any of those. All of them start within moments of each other, so with
// equal bounds chance decides which expires first; with these, when a rank stalls, the wait on
// its missing signal expires first and the error names that rank, not a wait downstream of it.
__device__ __forceinline__ u64 patience_ns(const Params& p, u32 what) {
  switch (what) {
    case kWaitTileDone:
    case kWaitSelectDone: return 2 * p.timeout_ns;
    case kWaitDoneFlag:
    case kWaitJobReady: return 3 * p.timeout_ns;   // the next job may wait for GEMM0 or a selection
    default: return p.timeout_ns;   // a peer's counts or rows, a barrier, the GEMM pipeline
  }
}

// The one spin of the kernel: calls poll(seen) until it returns true, at most patience_ns, and
// leaves early when this launch is aborted; false means the error is recorded (`expected` and the
// last `seen` go into the record). kBackoff sleeps between polls (flags in global memory); an
// mbarrier try_wait suspends in hardware by itself.
template <bool kBackoff, class Poll>
__device__ __forceinline__ bool bounded_wait(const Params& p, const Ctx& c, WaitSite site, u32 expected, Poll poll) {
  u32 seen = 0;
  if (poll(seen)) return true;
  const u64 start = globaltimer_ns(), limit = patience_ns(p, site.what);
  for (u32 backoff = 32;;) {
    if (kBackoff) {
      sleep_ns(backoff);
      if (backoff < 1024) backoff *= 2;
    }
    if (poll(seen)) return true;
    const u64 waited = globaltimer_ns() - start;
    if (aborted(p, c)) {
      record_error(p, c.local, abort_tag(c), kErrAborted, site, expected, seen, waited);
      return false;
    }
    if (waited > limit) {
      record_error(p, c.local, abort_tag(c), kErrTimeout, site, expected, seen, waited);
      return false;
    }
  }
}

// One thread spins until *flag reaches target: an acquire at world scope when another rank
// writes the flag (kPeer), else at gpu scope. False: timed out or the launch was aborted; the
// error is recorded.
template <bool kPeer>
__device__ bool wait_reached(const Params& p, const Ctx& c, const u32* flag, u32 target, WaitSite site) {
  return bounded_wait<true>(p, c, site, target, [&](u32& seen) {
    const u32 v = kPeer ? ld_acquire_world(p, flag) : ld_acquire_gpu(flag);
    seen = v;
    return reached(v, target);
  });
}

// Group versions (device/common/group.cuh; the whole block by default): the group's first thread
// waits, the others learn the outcome through `scratch`, a shared word of the group's.
template <bool kPeer, class G = Block>
__device__ __forceinline__ bool block_wait(const Params& p, const Ctx& c, const u32* flag, u32 target,
                                           WaitSite site, volatile u32* scratch) {
  G::sync();
  if (G::rank() == 0) {
    const bool ok = wait_reached<kPeer>(p, c, flag, target, site);
    // Rank site.index wrote the flag; its transport may need a step before its data is visible
    // (NVSHMEM over a NIC).
    if (kPeer && ok) remote_acquired(p, site.index, flag);
    *scratch = ok ? 1u : 0u;
  }
  G::sync();
  return *scratch != 0;
}

// The first warp of group G (the whole block by default), after the group's barrier: publishes the
// group's writes and counts them in at rank c.rank's sync counter `which`; the last of `arrivals`
// (default: one per block of the rank) then sends `value` to slot c.rank of flag region `flags`
// on every rank (unless `hold`, a test's stalled rank), one lane per destination, so the
// destinations' fences and flag stores run side by side, not in series.
template <class G = Block>
__device__ void count_and_signal(const Params& p, const Ctx& c, u32 which, RegionId flags, u32 value, bool hold,
                                 u32 arrivals = 0) {
  const int lane = G::rank();
  if (lane >= 32) return;
  u32 last = 0;
  if (lane == 0) {
    fence_world(p);
    u32* counter = region<u32>(p, c.slice, kSyncCounters, c.bank) + which;
    last = atomic_add_relaxed_gpu(counter, 1) == (arrivals ? arrivals : static_cast<u32>(p.blocks_per_rank)) - 1;
    if (last) {
      fence_world(p);        // every arrival's writes, seen through the counter
      remote_complete(p);    // and every put of theirs has left its source
    }
  }
  __syncwarp();            // what lane 0 saw is ordered before the other lanes' fences
  if (!__shfl_sync(0xffffffffu, last, 0) || hold) return;
  const u64 off = region_off(p, flags) + (u64)c.rank * 4;
  for (int dst = lane; dst < p.world; dst += 32) remote_signal(p, dst, off, value);
}

// Barrier over the blocks of one rank (all co-resident: cooperative launch). `generation` counts
// this rank's barriers in the launch from 1; the counter lives in this launch's bank.
__device__ __forceinline__ bool rank_barrier(const Params& p, const Ctx& c, u32 generation, u32 role,
                                             volatile u32* scratch) {
  u32* counter = region<u32>(p, c.slice, kSyncCounters, c.bank) + kBarrier;
  __syncthreads();
  if (threadIdx.x == 0) {
    // Publish this block's writes (including remote ones) before arriving.
    fence_world(p);
    atomic_add_relaxed_gpu(counter, 1);
    const bool ok = wait_reached<false>(p, c, counter, generation * p.blocks_per_rank,
                                        WaitSite{role, kWaitBarrier, generation});
    fence_world(p);
    *scratch = ok ? 1u : 0u;
  }
  __syncthreads();
  return *scratch != 0;
}

}  // namespace flashmoe
