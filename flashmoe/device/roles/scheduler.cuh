// The task map and the claim loop. No scheduler block: every block claims the next task index
// with one atomic on the rank's claim counter and decodes it against a map it computes itself from
// the counts every source sent. Claim order is
//
//   [shared GEMM0 tiles][shared GEMM1 tiles][capacity selections][routed GEMM0 tiles][routed GEMM1 tiles]
//
// and every task only waits for tasks with a lower index (or for other ranks' dispatch, which
// never waits for anything), so with all blocks resident there is no deadlock. The shared expert's
// tasks come first: their rows are this rank's own tokens, so they overlap the dispatch traffic.
#pragma once

#include "flashmoe/device/common/wait.cuh"

namespace flashmoe {

struct TaskMapHeader {
  i32 routed_ready;     // the routed part below is computed
  i32 shared_row_tiles; // ceil(T_mine / BM) when there are shared experts, else 0
  i32 shared_g0_cols;   // GEMM0 column tiles of the shared MLP
  i32 n_shared_g0;
  i32 n_shared;         // shared GEMM0 + GEMM1 tasks
  i32 g0_cols;          // GEMM0 column tiles of a routed expert: ceil(I / kGemm0Cols)
  i32 g1_cols;          // GEMM1 column tiles: ceil(H / kBlockN)
  i32 n_select;         // capacity selections (E_l in capacity mode, else 0)
  i32 n_g0, n_g1;
  i32 capacity;         // kept rows per expert; -1 when dropless
  i32 pad[5];
};
static_assert(sizeof(TaskMapHeader) == 16 * 4, "flashmoe/host/plan.py scheduler_smem_bytes() counts 16 words");

// Views of the task map in shared memory (sizes from flashmoe/host/plan.py scheduler_smem_bytes()).
struct TaskMap {
  TaskMapHeader* h;
  i32* rows;       // [E_l]      rows each local expert computes (kept rows under capacity)
  i32* row_off;    // [E_l + 1]  prefix of rows: where an expert's rows start in inter_rows
  i32* tile_off;   // [E_l + 1]  prefix of ceil(rows / BM): an expert's first row tile
  i32* seg;        // [E_l][W+1] prefix over sources of the rows each source sent the expert
  i32* tok_off;    // [W + 1]    prefix of the sources' token counts (global token index)

  __device__ __forceinline__ TaskMap(const Params& p, const Ctx& c) {
    i32* base = reinterpret_cast<i32*>(c.smem() + p.smem_sched_offset);
    const int El = p.experts_per_rank;
    h = reinterpret_cast<TaskMapHeader*>(base);
    rows = base + 16;
    row_off = rows + El;
    tile_off = row_off + El + 1;
    seg = tile_off + El + 1;
    tok_off = seg + El * (p.world + 1);
  }
  __device__ __forceinline__ i32* seg_of(const Params& p, int e) const { return seg + e * (p.world + 1); }
  // The local expert whose row tiles contain `tile` (binary search over tile_off).
  __device__ __forceinline__ int expert_of_tile(const Params& p, int tile) const {
    int lo = 0, hi = p.experts_per_rank - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (tile_off[mid] <= tile) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
  // The source whose segment of expert e holds row q (of the expert's uncapped rows).
  __device__ __forceinline__ int source_of_row(const Params& p, int e, int q) const {
    const i32* s = seg_of(p, e);
    int src = 0;
    while (src + 1 < p.world && s[src + 1] <= q) ++src;
    return src;
  }
};

// The order of one routed expert's tiles. Row tile by row tile, the blocks running at once (132
// on an H200) share one row tile of A and each reads its own column panel of B, gone from L2
// before the next row tile wants it: Mixtral's GEMM0 (112 column tiles of 2 MB) reads its 235 MB of
// weights an expert once per row tile, 16 GB at 4096 tokens in an LRU model of a 50 MB L2, which
// the 4.2 ms it took on an H200 could only just stream. So row tiles go in bands of kBandTiles
// (KernelSpec.band_tiles: 12 shipped, 1 the row-by-row order, built beside it to measure), a band
// column by column: the band's tiles read each B panel at about the same time (one read from
// HBM serves them all) and its A (kBandTiles x BM x K, 12 MB at K = 4096) stays in L2 over the
// columns; the model reads 2 GB. Twelve balances the two for ~132 blocks running (sqrt(132 x BN /
// BM) is 11 to 16). With at most kBandTiles row tiles (decode, small experts) the order is column-
// major. The price: a band's row tiles finish GEMM0 together, so a GEMM1 tile waits for the whole
// band. Routed GEMM1 tasks come after all the rank's GEMM0 ones, so the first find their bands long
// done unless the rank has one band only (one expert of at most 12 row tiles). The shared expert
// keeps row tile by row tile: its GEMM1 tasks follow its GEMM0 ones at once, and with its few
// column tiles (16 to 44 in DeepSeek and Qwen2 layers) the row tiles running at once already share
// each panel.

struct GridTile {
  int row, col;
};

// Task j of a grid of `rows` x `cols` tiles, in bands of `band` row tiles (kBandTiles, above). Every
// band but the last is full, so the band is j / (band * cols).
__device__ __forceinline__ GridTile band_tile(int j, int rows, int cols, int band) {
  const int row0 = j / (band * cols) * band;
  const int band_rows = min(band, rows - row0);
  const int i = j - row0 * cols;
  return GridTile{row0 + i % band_rows, i / band_rows};
}

// A routed task index decoded: row tile `tile` (of all this rank's), column tile n, local expert e,
// and the tile's first row q0 and row count within the expert. Expert e's tasks are
// [tile_off[e], tile_off[e + 1]) x col_tiles, in band order (band_tile) within.
struct RoutedTile {
  int tile, n, e, q0, nrows;
};

__device__ __forceinline__ RoutedTile routed_tile(const Params& p, const TaskMap& tm, int task, int col_tiles) {
  RoutedTile t;
  t.e = tm.expert_of_tile(p, task / col_tiles);
  const int first = tm.tile_off[t.e];
  const GridTile g = band_tile(task - first * col_tiles, tm.tile_off[t.e + 1] - first, col_tiles, kBandTiles);
  t.tile = first + g.row;
  t.n = g.col;
  t.q0 = g.row * kBlockM;
  t.nrows = min(kBlockM, tm.rows[t.e] - t.q0);
  return t;
}

// The map is computed and read by the thread group G that claims tasks (device/common/group.cuh).

// Kept rows per expert, as MoEConfig.capacity() states it: x = cf * T * k rounded in double left
// to right, then the least c with c * E >= x. No division: a double one is a subroutine call
// (see div_full in ptx.cuh). A float estimate lands within a few of c; the exact double products
// (c * E < 2^53) correct it. T or more keeps every row (an expert gets one row a token at most):
// that is T.
__device__ __forceinline__ i32 capacity_of(double cf, i32 tokens, int k, int E) {
  const double x = cf * (double)tokens * (double)k;
  if (!(x < (double)tokens * E)) return tokens;
  i32 c = static_cast<i32>(div_full(static_cast<float>(x), static_cast<float>(E)));
  while (c > 0 && (double)(c - 1) * E >= x) --c;
  while ((double)c * E < x) ++c;
  return c;
}

// The part of the map that needs nothing from other ranks.
template <class G>
__device__ void map_shared_part(const Params& p, const Ctx& c, TaskMap& tm) {
  if (G::rank() == 0) {
    TaskMapHeader& h = *tm.h;
    h.routed_ready = 0;
    h.shared_row_tiles = p.shared_intermediate ? ceil_div(c.num_tokens, kBlockM) : 0;
    h.shared_g0_cols = ceil_div(p.shared_intermediate, kGemm0Cols);
    h.g0_cols = ceil_div(p.intermediate, kGemm0Cols);
    h.g1_cols = ceil_div(p.hidden, kBlockN);
    h.n_shared_g0 = h.shared_row_tiles * h.shared_g0_cols;
    h.n_shared = h.n_shared_g0 + h.shared_row_tiles * h.g1_cols;
  }
  G::sync();
}

// The routed part: wait for every source's counts, then lay out this rank's expert rows.
template <class G>
__device__ bool map_routed_part(const Params& p, const Ctx& c, TaskMap& tm, volatile u32* scratch) {
  const u32* flags = region<u32>(p, c.slice, kCountFlags);
  for (int src = 0; src < p.world; ++src)
    if (!block_wait<true, G>(p, c, flags + src, c.epoch, WaitSite{kTaskWait, kWaitCountFlag, (u32)src}, scratch))
      return false;
  const u32* counts = region<u32>(p, c.slice, kCounts, c.bank);
  const int El = p.experts_per_rank, W = p.world;
  if (G::rank() == 0) {
    i32 tokens = 0;
    for (int src = 0; src < W; ++src) {
      tm.tok_off[src] = tokens;
      tokens += static_cast<i32>(ld_cg_u32(counts + count_index(p, src, El + 1)));
    }
    tm.tok_off[W] = tokens;
    tm.h->capacity = p.capacity_factor > 0.0 ? capacity_of(p.capacity_factor, tokens, p.top_k, p.num_experts) : -1;
  }
  G::sync();
  for (int e = G::rank(); e < El; e += G::kSize) {
    i32* s = tm.seg_of(p, e);
    i32 rows = 0;
    for (int src = 0; src < W; ++src) {
      s[src] = rows;
      rows += static_cast<i32>(ld_cg_u32(counts + count_index(p, src, e)));
    }
    s[W] = rows;
    tm.rows[e] = tm.h->capacity >= 0 && rows > tm.h->capacity ? tm.h->capacity : rows;
  }
  G::sync();
  if (G::rank() == 0) {
    i32 rows = 0, tiles = 0;
    for (int e = 0; e < El; ++e) {
      tm.row_off[e] = rows;
      tm.tile_off[e] = tiles;
      rows += tm.rows[e];
      tiles += ceil_div(tm.rows[e], kBlockM);
    }
    tm.row_off[El] = rows;
    tm.tile_off[El] = tiles;
    TaskMapHeader& h = *tm.h;
    h.n_select = h.capacity >= 0 ? El : 0;
    h.n_g0 = tiles * h.g0_cols;
    h.n_g1 = tiles * h.g1_cols;
    h.routed_ready = 1;
  }
  G::sync();
  return true;
}

// Next task index for group G.
template <class G>
__device__ __forceinline__ u32 claim_task(const Params& p, const Ctx& c, volatile u32* scratch) {
  G::sync();   // everyone is done with the previous task's shared memory and scratch
  if (G::rank() == 0) *scratch = atomic_add_relaxed_gpu(region<u32>(p, c.slice, kSyncCounters, c.bank) + kClaim, 1);
  G::sync();
  return *scratch;
}

}  // namespace flashmoe
