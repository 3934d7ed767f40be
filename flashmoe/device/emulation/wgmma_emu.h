// The functions of ptx_sm90.cuh (the wgmma engine's Hopper instructions) for the CPU emulator, with
// the same names, signatures and semantics, from the PTX ISA sections cited there. What this lets
// a CPU check: the engine's warp roles and mbarrier protocol (counts, phases, parities; a wait that
// can never complete is reported), the shared-memory addresses its descriptors and TMA boxes
// produce (the 128-byte swizzle is applied to the shared-memory offset, as the hardware applies it
// to the address), the accumulator fragment layout and the epilogue indexing.
//
// Emulated semantics:
// - mbarrier: its 8 bytes hold pending count, expected count, phase and tx-count; which words hold
//   a valid one is kept beside the memory (LiveMbarrier). Every operation checks the object is
//   valid (init of a valid one, or use after inval, is an error) and that no other store changed
//   its bytes since its last operation. A phase completes when pending and tx-count both reach 0;
//   try_wait on an incomplete phase suspends the thread for 1 virtual us, as the hardware suspends
//   it. Completed phases are counted, and every wait of the engine is checked to ask for the phase
//   in progress or the last completed one (mbar_check_phase): the only ones its parity answers
//   right.
// - cp.async.mbarrier.arrive.noinc lands the thread's outstanding cp.async copies (simt.h defers
//   them to the latest moment the hardware allows) and arrives.
// - cp.async.bulk.tensor reads an emulator tensor map (make_emu_tensor_map(); the host encodes the
//   same format with flashmoe/host/tensormap.py emulated_map()), zero-fills out-of-bounds elements,
//   swizzles 128-byte rows and completes its bytes on the mbarrier: at once, or in a weak world at
//   a random later time (simt.h land_later), so a stage's phase may complete well after its issue.
// - wgmma.mma_async is deferred: each thread queues its operations and runs them at the
//   wgmma.wait_group that retires their group, reading shared memory then. A stage refilled
//   before the wgmma reading it was waited for therefore gives wrong results, as on the GPU.
//   Each thread computes its own fragment (row 16 * warp + lane / 4 + 8h, column 8j + 2(lane % 4)
//   + c) as a double-precision dot product, rounded once into the fp32 accumulator; .tf32 inputs
//   drop their low 13 mantissa bits, as the PTX ISA says the hardware does.
// - wgmma.fence / commit_group / wait_group are warp-synchronous (.sync.aligned): a warp barrier.
// - Fences are yield points; named barriers (runtime.cpp) park until `threads` threads of the block
//   have arrived, and a deadlock among them is reported like one at __syncthreads.
#pragma once

#include <map>
#include <unordered_map>
#include <utility>
#include <vector>

namespace flashmoe {

inline u64 generic_addr(const void* p) { return reinterpret_cast<u64>(p); }

namespace emu {

struct Mbarrier {
  u64 pending : 20, expected : 20, phase : 1;
  i64 tx : 22;
};
static_assert(sizeof(Mbarrier) == 8, "an mbarrier object is 8 bytes");

// Which shared-memory words hold a valid mbarrier (from its init to its inval), kept beside the
// memory: the other phases of the kernel reuse the barrier area for data, and data is not an
// mbarrier whatever its bits. With each: its launch (an earlier launch's shared memory is gone),
// the phases it completed (the hardware keeps the parity only, which is what lets
// mbar_check_phase see a wait the parity would answer wrongly) and its 8 bytes as its last
// mbarrier operation left them, so a store into a live mbarrier is reported at its next use.
struct LiveMbarrier {
  u64 launch, phases, bytes;
};
inline std::unordered_map<const void*, LiveMbarrier>& live_mbarriers() {
  static std::unordered_map<const void*, LiveMbarrier> live;   // one OS thread runs every fiber
  return live;
}
inline LiveMbarrier* live_mbarrier(const void* bar, u64 launch) {
  auto it = live_mbarriers().find(bar);
  return it != live_mbarriers().end() && it->second.launch == launch ? &it->second : nullptr;
}

// The valid mbarrier at `bar` of `launch`, untouched since its last mbarrier operation.
inline Mbarrier* live_object(u64* bar, u64 launch, const char* what) {
  const LiveMbarrier* live = live_mbarrier(bar, launch);
  if (!live) fatal("%s on a shared-memory location that holds no valid mbarrier", what);
  if (*bar != live->bytes)
    fatal("%s: the mbarrier's bytes changed since its last mbarrier operation (a store into a valid mbarrier)", what);
  return reinterpret_cast<Mbarrier*>(bar);
}
// The same for the calling thread, `bar` also checked to be in its block's shared memory and
// 8-byte aligned.
inline Mbarrier* mbarrier(u64* bar, const char* what) {
  smem_offset(bar, 8, what);
  check_aligned(bar, 8, what);
  return live_object(bar, current->launch, what);
}

// After a change of the mbarrier's state (checked by mbarrier() just before): completes the phase
// when its arrivals and transaction bytes are all in, and records the bytes it leaves. `race`: the
// block's race-check state (FiberView::race).
inline void mbarrier_progress(u64* bar, u64 launch, const char* what, void* race) {
  Mbarrier* m = reinterpret_cast<Mbarrier*>(bar);
  LiveMbarrier* live = live_mbarrier(bar, launch);
  if (m->tx < 0 && m->pending == 0) fatal("%s: more transaction bytes completed than expected", what);
  if (m->pending == 0 && m->tx == 0) {
    m->phase ^= 1;
    m->pending = m->expected;
    ++live->phases;
    race_mbar_complete(race, bar);
  }
  live->bytes = *bar;
}

// An arrive, expecting `tx_bytes` more transaction bytes of this phase first (expect_tx).
inline void mbarrier_arrive(u64* bar, const char* what, u32 tx_bytes = 0) {
  Mbarrier* m = mbarrier(bar, what);
  if (m->pending == 0) fatal("%s: more arrivals than the mbarrier's expected count", what);
  m->tx += tx_bytes;
  m->pending -= 1;
  race_mbar_arrive(bar);
  mbarrier_progress(bar, current->launch, what, current->race);
}

// The emulator's tensor map: what cuTensorMapEncodeTiled is given (rank 4, 128-byte swizzle,
// zero fill), in the 16 words of a TensorMap.
constexpr u64 kEmuTensorMapMagic = 0x50414d554d454d46ull;   // "FMEMUMAP"
inline void make_emu_tensor_map(TensorMap& map, const void* address, const u64 (&dims)[4], const u64 (&strides)[3],
                                const u32 (&box)[4], u32 element_bytes) {
  map = TensorMap{};
  map.opaque[0] = kEmuTensorMapMagic;
  map.opaque[1] = reinterpret_cast<u64>(address);
  for (int i = 0; i < 4; ++i) map.opaque[2 + i] = dims[i];
  for (int i = 0; i < 3; ++i) map.opaque[6 + i] = strides[i];
  for (int i = 0; i < 4; ++i) map.opaque[9 + i] = box[i];
  map.opaque[13] = element_bytes;
}

inline const TensorMap& tensor_map(const void* map) {
  check_aligned(map, 64, "tensor map");
  const TensorMap& m = *static_cast<const TensorMap*>(map);
  if (m.opaque[0] != kEmuTensorMapMagic) fatal("tensor map at %p was not made for the emulator", map);
  return m;
}

// Per-thread wgmma queue: committed groups of (accumulator, N, descriptors), oldest first.
struct WgmmaOp {
  float* d;
  int n;
  u64 desc_a, desc_b;
};
struct WgmmaQueue {
  std::vector<WgmmaOp> open;
  std::vector<std::vector<WgmmaOp>> groups;
};
// Keyed by the fiber (its view), not by (block, thread): the launches of a world share this map.
inline WgmmaQueue& wgmma_queue() {
  static std::map<const FiberView*, WgmmaQueue> queues;   // one OS thread runs every fiber
  return queues[current];
}

inline float wgmma_element(const u8* p) {
#if FLASHMOE_DTYPE == 0
  return __bfloat162float(bits<__nv_bfloat16>(*reinterpret_cast<const u16*>(p)));
#elif FLASHMOE_DTYPE == 1
  return __half2float(bits<__half>(*reinterpret_cast<const u16*>(p)));
#else
  return bits<float>(*reinterpret_cast<const u32*>(p) & 0xffffe000u);   // .tf32: low 13 bits ignored
#endif
}

// Byte offset in shared memory of byte `kbyte` of row `row` of a K-major SW128 operand.
inline u32 wgmma_operand_offset(u64 desc, int row, int kbyte) {
  const u32 start = static_cast<u32>(desc & 0x3fff) << 4;
  const u32 lbo = static_cast<u32>((desc >> 16) & 0x3fff), sbo = static_cast<u32>((desc >> 32) & 0x3fff) << 4;
  if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0 || lbo != 1 || sbo != 1024)
    fatal("wgmma descriptor %#llx is not the K-major 128-byte swizzle layout the engine uses",
          (unsigned long long)desc);
  const u32 linear = start + (row % 8) * 128 + (row / 8) * sbo + kbyte;
  return linear ^ ((linear & 0x380) >> 3);   // Swizzle<3,4,3>: bits [4,7) ^= bits [7,10)
}

inline void wgmma_run(const WgmmaOp& op) {
  const int t = threadIdx.x & 127, warp = t >> 5, lane = t & 31;
  constexpr int kEl = sizeof(elem_t) == 4 ? 4 : 2, kK = 32 / kEl;   // k16 (16-bit) or k8 (tf32)
  for (int j = 0; j < op.n / 8; ++j)
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 2; ++c) {
        const int row = warp * 16 + (lane >> 2) + h * 8, col = j * 8 + (lane & 3) * 2 + c;
        double sum = 0.0;
        for (int k = 0; k < kK; ++k) {
          const u32 a = wgmma_operand_offset(op.desc_a, row, k * kEl), b = wgmma_operand_offset(op.desc_b, col, k * kEl);
          sum += static_cast<double>(wgmma_element(smem_at(a, kEl, "wgmma operand A"))) *
                 wgmma_element(smem_at(b, kEl, "wgmma operand B"));
        }
        float& d = op.d[4 * j + 2 * h + c];
        d = static_cast<float>(static_cast<double>(d) + sum);
      }
}

// The shared memory a warp's part of a wgmma reads (its 16 rows of A, every row of B), checked as
// lane 0's reads (racecheck.cpp): 16-byte granules, which the swizzle keeps whole.
inline void wgmma_check_reads(const WgmmaOp& op) {
  if (!race_enabled || (threadIdx.x & 31) != 0) return;
  const int warp = (threadIdx.x & 127) >> 5;
  for (int kbyte = 0; kbyte < 32; kbyte += 16) {
    for (int row = warp * 16; row < warp * 16 + 16; ++row)
      race_access(smem_at(wgmma_operand_offset(op.desc_a, row, kbyte), 16, "wgmma operand A"), 16, false);
    for (int col = 0; col < op.n; ++col)
      race_access(smem_at(wgmma_operand_offset(op.desc_b, col, kbyte), 16, "wgmma operand B"), 16, false);
  }
}

}  // namespace emu

// ---- mbarrier ----------------------------------------------------------------------------------
inline void mbar_init(u64* bar, u32 count) {
  emu::smem_offset(bar, 8, "mbarrier.init");
  emu::check_aligned(bar, 8, "mbarrier.init");
  if (emu::live_mbarrier(bar, emu::current->launch))
    emu::fatal("mbarrier.init of a valid mbarrier (invalidate it first)");
  if (count < 1 || count >= (1u << 20)) emu::fatal("mbarrier.init count %u out of range", count);
  *reinterpret_cast<emu::Mbarrier*>(bar) = emu::Mbarrier{count, count, 0, 0};
  emu::live_mbarriers()[bar] = emu::LiveMbarrier{emu::current->launch, 0, *bar};
  emu::race_mbar_init(bar);
}
inline void mbar_inval(u64* bar) {
  emu::mbarrier(bar, "mbarrier.inval");
  emu::live_mbarriers().erase(bar);
  emu::race_mbar_inval(bar);
}
inline void fence_mbar_init() { emu::yield(); }
inline void mbar_arrive(u64* bar) { emu::mbarrier_arrive(bar, "mbarrier.arrive"); }
inline void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
  emu::mbarrier_arrive(bar, "mbarrier.arrive.expect_tx", bytes);
}
// The arrive follows the completion of every cp.async this thread issued: land them, then arrive.
inline void cp_async_mbar_arrive_noinc(u64* bar) {
  emu::cp_async_commit_group();
  emu::cp_async_wait_groups(0);
  emu::mbarrier_arrive(bar, "cp.async.mbarrier.arrive.noinc");
}
// A wait for phase `phase` (counted from 0) is sound only while that phase is the one in progress
// or the last completed: earlier, try_wait.parity would take the phase before it for it; later,
// it would wait for the phase after. Every wait of the wgmma engine checks (wgmma.cuh pipe_wait).
inline void mbar_check_phase(u64* bar, u32 phase) {
  emu::mbarrier(bar, "mbarrier wait");
  const u64 done = emu::live_mbarrier(bar, emu::current->launch)->phases;
  if (done < phase)
    emu::fatal("mbarrier wait for phase %u while phase %llu is still in progress: its parity would pass it for "
               "an earlier phase", phase, (unsigned long long)done);
  if (done > phase + 1ull)
    emu::fatal("mbarrier wait for phase %u after phase %llu completed too: its parity would wait for a later "
               "phase", phase, (unsigned long long)(done - 1));
}

// Like the hardware's, a try_wait that finds the phase incomplete suspends the thread for a
// while (1 us of virtual time) before it returns false, so a bounded wait built on it advances
// time. A wait that could never complete is the kernel's own bounded wait's to report.
inline bool mbar_try_wait(u64* bar, u32 parity) {
  emu::yield();
  bool done = emu::mbarrier(bar, "mbarrier.try_wait")->phase != (parity & 1);
  if (!done) {
    emu::sleep_for(1024);
    done = emu::mbarrier(bar, "mbarrier.try_wait")->phase != (parity & 1);
  }
  if (done) emu::race_mbar_acquire(bar);
  return done;
}

// ---- proxies and barriers --------------------------------------------------------------------
inline void fence_proxy_async_smem() { emu::yield(); }
inline void named_barrier_sync(u32 id, u32 threads) { emu::named_barrier(id, threads, 0); }
inline bool named_barrier_or(u32 id, u32 threads, bool pred) { return emu::named_barrier(id, threads, pred) != 0; }

// Register budgets do not exist on the CPU; the limits are checked at compile time.
template <u32 kRegs>
inline void setmaxnreg_inc() { static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg"); }
template <u32 kRegs>
inline void setmaxnreg_dec() { static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg"); }

// ---- bulk tensor copy (TMA) --------------------------------------------------------------------
inline void prefetch_tensor_map(const void* map) { emu::tensor_map(map); }
inline void tma_load_4d(void* dst, const void* map, u64* bar, int c0, int c1, int c2, int c3) {
  const TensorMap& m = emu::tensor_map(map);
  const u8* src = reinterpret_cast<const u8*>(m.opaque[1]);
  const u64* dims = &m.opaque[2];
  const u64* strides = &m.opaque[6];
  const u64* box = &m.opaque[9];
  const u32 eb = static_cast<u32>(m.opaque[13]);
  const u32 row_bytes = static_cast<u32>(box[0]) * eb;
  if (row_bytes != 128) emu::fatal("tma_load_4d: the box's inner extent is %u bytes, not the 128-byte swizzle row", row_bytes);
  const u32 rows = static_cast<u32>(box[1] * box[2] * box[3]);
  const u32 base = emu::smem_offset(dst, rows * row_bytes, "tma_load_4d destination");
  if (base % 1024) emu::fatal("tma_load_4d: destination offset %u is not 1024-byte aligned (128B swizzle)", base);
  // The box as it will sit in shared memory (swizzled), read now: the weights do not change.
  std::vector<u8> bytes(rows * row_bytes);
  const int c[4] = {c0, c1, c2, c3};
  u32 r = 0;
  for (u64 i3 = 0; i3 < box[3]; ++i3)
    for (u64 i2 = 0; i2 < box[2]; ++i2)
      for (u64 i1 = 0; i1 < box[1]; ++i1, ++r)
        for (u32 byte = 0; byte < row_bytes; byte += eb) {
          const i64 g[4] = {c[0] + static_cast<i64>(byte / eb), c[1] + static_cast<i64>(i1), c[2] + static_cast<i64>(i2),
                            c[3] + static_cast<i64>(i3)};
          bool inside = true;
          for (int d = 0; d < 4; ++d) inside = inside && g[d] >= 0 && static_cast<u64>(g[d]) < dims[d];
          const u32 linear = r * row_bytes + byte;   // from the 1024-aligned base: the same swizzle
          u8* out = bytes.data() + (linear ^ ((linear & 0x380) >> 3));
          if (inside)
            std::memcpy(out, src + g[0] * eb + g[1] * strides[0] + g[2] * strides[1] + g[3] * strides[2], eb);
          else
            std::memset(out, 0, eb);
        }
  u8* dst_bytes = emu::smem_at(base, rows * row_bytes, "tma_load_4d destination");
  emu::mbarrier(bar, "cp.async.bulk.tensor");
  emu::land_later([dst_bytes, bytes = std::move(bytes), bar, launch = emu::current->launch,
                   race = emu::race_async_issue(), block = emu::current->race] {
    // A barrier invalidated meanwhile: the launch failed and left (the kernel's other paths
    // wait for every stage before they invalidate).
    if (!emu::live_mbarrier(bar, launch)) return;
    emu::race_async_land(race, dst_bytes, static_cast<u32>(bytes.size()), bar);
    std::memcpy(dst_bytes, bytes.data(), bytes.size());
    emu::live_object(bar, launch, "complete_tx")->tx -= static_cast<i64>(bytes.size());
    emu::mbarrier_progress(bar, launch, "complete_tx", block);
  });
}

// ---- wgmma -----------------------------------------------------------------------------------
inline void wgmma_fence() { __syncwarp(); }
inline void wgmma_commit() {
  emu::WgmmaQueue& q = emu::wgmma_queue();
  q.groups.push_back(std::move(q.open));
  q.open.clear();
  __syncwarp();
}
// .sync.aligned: the warp leaves together, so once any lane is past the wait every lane of its
// warp has its fragments (a lane then may release the stage for the warp, as the engine does).
template <int N>
inline void wgmma_wait() {
  emu::WgmmaQueue& q = emu::wgmma_queue();
  while (q.groups.size() > static_cast<size_t>(N)) {
    for (const emu::WgmmaOp& op : q.groups.front()) {
      emu::wgmma_check_reads(op);
      const emu::RaceIgnore checked_above;   // each thread's own element reads
      emu::wgmma_run(op);
    }
    q.groups.erase(q.groups.begin());
  }
  __syncwarp();
}
inline void wgmma_pin(float&) {}
template <int N>
inline void wgmma_m64k(float* d, u64 desc_a, u64 desc_b) {
  emu::wgmma_queue().open.push_back(emu::WgmmaOp{d, N, desc_a, desc_b});
}

}  // namespace flashmoe
