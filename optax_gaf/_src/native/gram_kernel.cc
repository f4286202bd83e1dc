// Gram matrix G = X X^T of a row-major float32 [..., K, n] array, for XLA:CPU.
//
// Why: XLA:CPU computes a [K, n] x [n, K] product (K small, n large) with a
// general matrix kernel that vectorises over the tiny K x K output and reaches
// about a third of a core's peak. This kernel vectorises over the long axis
// n instead, computes only the 4 x 4 row tiles on and above the diagonal
// (and only the upper half of the diagonal tiles; each diagonal tile is swept
// together with the tile to its right, which loads its rows once for both),
// and reads the matrix in blocks of columns that stay in cache while every
// tile pair reads them.
//
// For GAF's one-pass filter the same sweep can also write the column sums
// S = sum_r x_r (GramSum), and Combine writes a0 * S + sum_r coef_r x_r
// reading only the rows with a nonzero coefficient (see native_filter.py).
//
// Threads: matrices of at least 2 x 65536 columns are split into column
// ranges run on XLA's intra-op thread pool (one range per thread), so a
// multi-core run shares the arithmetic; with one thread (or a smaller leaf)
// everything runs on the calling thread.
//
// Numerics: float32 products, float32 vector partial sums over kFlush blocks,
// then a double-precision running sum per column range, the ranges' sums
// added in a fixed order; the result is rounded to float32 and
// mirrored, so G is exactly symmetric. NaN/Inf propagate as in a plain dot
// product (no fast-math).
//
// Built on first use by optax_gaf/_src/native_gram.py against jaxlib's XLA FFI
// headers; see that file.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector: one register of the widest vector unit the build
// targets (-march=native). With 16-float vectors on an AVX2-only build each
// vector takes two of its 16 registers and a 4 x 4 tile spills: 4x slower
// than 8-float vectors there (K = 8, one thread, x86-64-v3 build on Zen 4).
#ifndef OPTAX_GAF_LANES
#if defined(__AVX512F__)
#define OPTAX_GAF_LANES 16
#elif defined(__AVX__)
#define OPTAX_GAF_LANES 8
#else
#define OPTAX_GAF_LANES 4
#endif
#endif
#ifndef OPTAX_GAF_BLOCK
#define OPTAX_GAF_BLOCK 8192
#endif
#ifndef OPTAX_GAF_PREFETCH
#define OPTAX_GAF_PREFETCH 0
#endif
// Blocks per flush of the float32 vector partial sums into double: each lane
// then adds kFlush * kBlock / kLanes = 8192 products (at the default block)
// before a flush, whatever the vector width.
#ifndef OPTAX_GAF_FLUSH
#define OPTAX_GAF_FLUSH OPTAX_GAF_LANES
#endif
// Sweep each diagonal tile together with the tile to its right (26 vector
// accumulators; they fit AVX-512's 32 registers). Measured K = 8, one thread,
// [8, 1.86M]: Gram + column sums 25-30% faster with AVX-512 (16 lanes) and
// 5-20% faster on an AVX2 build (8 lanes, where it spills a little); with 16
// lanes on AVX2 every tile spills and both variants were 4x slower.
#ifndef OPTAX_GAF_FUSE_DIAGONAL
#define OPTAX_GAF_FUSE_DIAGONAL 1
#endif
// Measured on a Zen 4 core (AVX-512), K = 4..16, one thread: 16 lanes and
// blocks of 8192 columns were the fastest of 8/16 lanes x 256..8192 columns.
// Software prefetching of the next block helped before the diagonal tiles
// were halved; since then the hardware prefetcher alone is 15-20% faster
// (K = 4, 8, 16 at 1M-column leaves), so it is off by default.
constexpr int kLanes = OPTAX_GAF_LANES;      // floats per vector
constexpr int64_t kBlock = OPTAX_GAF_BLOCK;  // columns per block
constexpr int kTile = 4;                     // rows per tile side
constexpr int64_t kFlush = OPTAX_GAF_FLUSH;  // blocks per flush to double
constexpr bool kFuseDiagonal = OPTAX_GAF_FUSE_DIAGONAL;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline float HorizontalSum(Vec v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// What a tile does with the column sums of its b rows: nothing, store them
// (the first tile of a block), or add them to those stored.
enum SumMode { kNoSum, kStoreSum, kAddSum };

// Vector partial sums of one R x C tile: acc[r][c] += a_r[t] * b_c[t] over
// the full vectors of columns [0, len). The accumulators live in memory
// between blocks (one load and store each per block), so blocks can be small
// enough for L1 without horizontal sums per block. A diagonal tile (b == a,
// R == C) accumulates only c >= r; the caller mirrors the rest.
template <int R, int C, bool Diag, SumMode Sum>
inline void Tile(const float* const* a, const float* const* b, int64_t len,
                 Vec* acc_mem, float* sum) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = acc_mem[r * kTile + c];
  for (int64_t t = 0; t + kLanes <= len; t += kLanes) {
    Vec va[R], vb[C];
    for (int r = 0; r < R; ++r) va[r] = Load(a[r] + t);
    for (int c = 0; c < C; ++c) {
      vb[c] = Diag ? va[c < R ? c : R - 1] : Load(b[c] + t);
#if OPTAX_GAF_PREFETCH
      // Same rows, next block. Integer address arithmetic: the address may
      // lie past the buffer (a prefetch never faults; a pointer there is UB).
      __builtin_prefetch(reinterpret_cast<const void*>(
          reinterpret_cast<std::uintptr_t>(b[c] + t) + kBlock * sizeof(float)));
#endif
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c)
        if (!Diag || c >= r) acc[r][c] += va[r] * vb[c];
    if (Sum != kNoSum) {
      Vec s = vb[0];
      for (int c = 1; c < C; ++c) s += vb[c];
      if (Sum == kAddSum) s += Load(sum + t);
      Store(sum + t, s);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc_mem[r * kTile + c] = acc[r][c];
}

template <bool Diag, SumMode Sum, int R>
inline void TileR(int c, const float* const* a, const float* const* b,
                  int64_t len, Vec* acc, float* sum) {
  switch (c) {
    case 1: Tile<R, 1, Diag, Sum>(a, b, len, acc, sum); break;
    case 2: Tile<R, 2, Diag, Sum>(a, b, len, acc, sum); break;
    case 3: Tile<R, 3, Diag, Sum>(a, b, len, acc, sum); break;
    default: Tile<R, 4, Diag, Sum>(a, b, len, acc, sum); break;
  }
}

template <bool Diag, SumMode Sum>
inline void AnyTile(int r, int c, const float* const* a, const float* const* b,
                    int64_t len, Vec* acc, float* sum) {
  switch (r) {
    case 1: TileR<Diag, Sum, 1>(c, a, b, len, acc, sum); break;
    case 2: TileR<Diag, Sum, 2>(c, a, b, len, acc, sum); break;
    case 3: TileR<Diag, Sum, 3>(c, a, b, len, acc, sum); break;
    default: TileR<Diag, Sum, 4>(c, a, b, len, acc, sum); break;
  }
}

// A diagonal tile fused with the tile to its right, over a block: rows
// a[0..kTile) against themselves (upper half) and against the next tile's C
// rows b[0..C), in one sweep, so the a rows are loaded once for both tiles
// and, in the first tile row, the column sums of all kTile + C rows are
// stored without a reload. The products and their order per accumulator are
// those of Tile<kTile, kTile, true> followed by Tile<kTile, C, false>, and
// the column sums add in the same order, so results are bit-identical.
template <int C, bool StoreSum>
inline void DiagAndNextTile(const float* const* a, const float* const* b,
                            int64_t len, Vec* diag_mem, Vec* next_mem,
                            float* sum) {
  Vec d[kTile][kTile], e[kTile][C];
  for (int r = 0; r < kTile; ++r) {
    for (int c = r; c < kTile; ++c) d[r][c] = diag_mem[r * kTile + c];
    for (int c = 0; c < C; ++c) e[r][c] = next_mem[r * kTile + c];
  }
  for (int64_t t = 0; t + kLanes <= len; t += kLanes) {
    Vec va[kTile];
    for (int r = 0; r < kTile; ++r) va[r] = Load(a[r] + t);
    for (int r = 0; r < kTile; ++r)
      for (int c = r; c < kTile; ++c) d[r][c] += va[r] * va[c];
    Vec sb{};
    for (int c = 0; c < C; ++c) {
      const Vec vb = Load(b[c] + t);
      for (int r = 0; r < kTile; ++r) e[r][c] += va[r] * vb;
      if (StoreSum) sb = c == 0 ? vb : sb + vb;
    }
    if (StoreSum) {
      Vec sa = va[0];
      for (int r = 1; r < kTile; ++r) sa += va[r];
      Store(sum + t, sb + sa);
    }
  }
  for (int r = 0; r < kTile; ++r) {
    for (int c = r; c < kTile; ++c) diag_mem[r * kTile + c] = d[r][c];
    for (int c = 0; c < C; ++c) next_mem[r * kTile + c] = e[r][c];
  }
}

template <bool StoreSum>
inline void AnyDiagAndNext(int c, const float* const* a, const float* const* b,
                           int64_t len, Vec* diag, Vec* next, float* sum) {
  switch (c) {
    case 1: DiagAndNextTile<1, StoreSum>(a, b, len, diag, next, sum); break;
    case 2: DiagAndNextTile<2, StoreSum>(a, b, len, diag, next, sum); break;
    case 3: DiagAndNextTile<3, StoreSum>(a, b, len, diag, next, sum); break;
    default: DiagAndNextTile<4, StoreSum>(a, b, len, diag, next, sum); break;
  }
}

// One tile pair (ti, tj), tj >= ti, over a block; the tiles of the first row
// (ti == 0) see every row of x once as b rows, so they also make the column
// sums when ``sum`` is not null.
inline void TilePair(int64_t ti, int64_t tj, int r, int c, const float* const* a,
                     const float* const* b, int64_t len, Vec* acc, float* sum) {
  if (ti == tj) {
    if (sum != nullptr && ti == 0) {
      AnyTile<true, kStoreSum>(r, c, a, b, len, acc, sum);
    } else {
      AnyTile<true, kNoSum>(r, c, a, b, len, acc, sum);
    }
  } else if (sum != nullptr && ti == 0) {
    AnyTile<false, kAddSum>(r, c, a, b, len, acc, sum);
  } else {
    AnyTile<false, kNoSum>(r, c, a, b, len, acc, sum);
  }
}

// Runs fn(0), ..., fn(shares - 1), on XLA's intra-op thread pool when it has
// more than one thread. The calling thread takes shares too and only waits for
// shares other threads have already started, so it cannot deadlock on a busy
// pool; tasks that start after all shares are taken return at once (the state
// they touch is shared-owned). Returns false if any share threw.
bool ParallelFor(ffi::ThreadPool* pool, int64_t shares,
                 const std::function<void(int64_t)>& fn) {
  const int64_t threads = pool == nullptr ? 1 : pool->num_threads();
  if (shares <= 1 || threads <= 1) {
    try {
      for (int64_t i = 0; i < shares; ++i) fn(i);
    } catch (...) {
      return false;
    }
    return true;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t shares = 0;
    int64_t done = 0;
    bool failed = false;
    std::mutex mu;
    std::condition_variable cv;
    const std::function<void(int64_t)>* fn = nullptr;
  };
  auto state = std::make_shared<State>();
  state->shares = shares;
  state->fn = &fn;
  auto run = [state]() {
    for (int64_t i = state->next.fetch_add(1); i < state->shares;
         i = state->next.fetch_add(1)) {
      bool ok = true;
      try {
        (*state->fn)(i);
      } catch (...) {
        ok = false;
      }
      std::lock_guard<std::mutex> lock(state->mu);
      state->failed |= !ok;
      if (++state->done == state->shares) state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min(threads, shares) - 1;
  // If scheduling fails part-way (it allocates), the caller's own run() below
  // takes every share not yet claimed; nothing may unwind past this frame
  // while queued helpers can still reach fn.
  try {
    for (int64_t t = 0; t < helpers; ++t) pool->Schedule(decltype(run)(run));
  } catch (...) {
  }
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->shares; });
  return !state->failed;
}

// Upper-triangle inner products (sums[i * k + j], i <= j, added in double) of
// the whole-vector columns [begin, end) of x[k * n]; if sum is not null, also
// the column sums sum[begin..end).
void GramRange(const float* x, int64_t k, int64_t n, int64_t begin, int64_t end,
               double* sums, float* sum) {
  const int64_t tiles = (k + kTile - 1) / kTile;
  const int64_t pairs = tiles * tiles;
  // Per upper-triangular tile pair: kTile x kTile vector accumulators, and
  // double totals they are flushed into every kFlush blocks (accuracy).
  std::vector<Vec> acc(pairs * kTile * kTile, Vec{});
  std::vector<const float*> a(kTile), b(kTile);
  auto tile_acc = [&](int64_t ti, int64_t tj) { return &acc[(ti * tiles + tj) * kTile * kTile]; };
  // Points rows[q] at row tile * kTile + q, column start; returns the tile's
  // row count (kTile, or fewer for the last tile).
  auto point = [&](int64_t tile, int64_t start, std::vector<const float*>& rows) {
    const int count = static_cast<int>(std::min<int64_t>(kTile, k - tile * kTile));
    for (int q = 0; q < count; ++q) rows[q] = x + (tile * kTile + q) * n + start;
    return count;
  };
  auto flush = [&]() {
    for (int64_t ti = 0; ti < tiles; ++ti) {
      for (int64_t tj = ti; tj < tiles; ++tj) {
        Vec* tile = tile_acc(ti, tj);
        for (int r = 0; r < kTile; ++r) {
          for (int c = 0; c < kTile; ++c) {
            const int64_t i = ti * kTile + r, j = tj * kTile + c;
            if (i < k && j < k && i <= j) sums[i * k + j] += static_cast<double>(HorizontalSum(tile[r * kTile + c]));
            tile[r * kTile + c] = Vec{};
          }
        }
      }
    }
  };
  int64_t blocks = 0;
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t len = std::min(kBlock, end - start);
    for (int64_t ti = 0; ti < tiles; ++ti) {
      const int r = point(ti, start, a);
      int64_t tj = ti;
      if (kFuseDiagonal && ti + 1 < tiles) {  // then r == kTile
        const int c = point(ti + 1, start, b);
        if (sum != nullptr && ti == 0) {
          AnyDiagAndNext<true>(c, a.data(), b.data(), len, tile_acc(ti, ti),
                               tile_acc(ti, ti + 1), sum + start);
        } else {
          AnyDiagAndNext<false>(c, a.data(), b.data(), len, tile_acc(ti, ti),
                                tile_acc(ti, ti + 1), nullptr);
        }
        tj = ti + 2;
      }
      for (; tj < tiles; ++tj) {
        const int c = point(tj, start, b);
        TilePair(ti, tj, r, c, a.data(), b.data(), len, tile_acc(ti, tj),
                 sum == nullptr ? nullptr : sum + start);
      }
    }
    if (++blocks % kFlush == 0) flush();
  }
  flush();
}

// Columns per thread share, at least: below this, scheduling costs more than
// it saves.
constexpr int64_t kMinShareColumns = 1 << 16;

// The whole-vector columns [0, full) split into one range per pool thread
// (ranges are multiples of kLanes long; one range for small matrices).
struct ColumnSplit {
  ColumnSplit(ffi::ThreadPool* pool, int64_t full) : full(full) {
    const int64_t threads = pool == nullptr ? 1 : std::max<int64_t>(1, pool->num_threads());
    shares = std::max<int64_t>(1, std::min<int64_t>(threads, full / kMinShareColumns));
    per_share = (full / kLanes + shares - 1) / shares * kLanes;
  }
  int64_t begin(int64_t i) const { return std::min(full, i * per_share); }
  int64_t end(int64_t i) const { return std::min(full, begin(i) + per_share); }
  int64_t full, shares, per_share;
};

// g[k * k] = x[k * n] x[k * n]^T; if sum is not null, also
// sum[n] = sum_r x[r * n] (the column sums, while each block is in cache).
// Large matrices are split into column ranges run on the thread pool; their
// double partial sums are added in a fixed order.
bool Gram(const float* x, int64_t k, int64_t n, float* g, float* sum,
          ffi::ThreadPool* pool) {
  const int64_t full = n - n % kLanes;  // columns covered by whole vectors
  const ColumnSplit split(pool, full);
  const int64_t shares = split.shares;
  std::vector<double> partial(shares * k * k, 0.0);
  const bool ok = ParallelFor(pool, shares, [&](int64_t i) {
    GramRange(x, k, n, split.begin(i), split.end(i), &partial[i * k * k], sum);
  });
  if (!ok) return false;
  if (sum != nullptr) {
    for (int64_t t = full; t < n; ++t) {
      float s = 0.0f;
      for (int64_t r = 0; r < k; ++r) s += x[r * n + t];
      sum[t] = s;
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = i; j < k; ++j) {
      double total = 0.0;
      for (int64_t p = 0; p < shares; ++p) total += partial[p * k * k + i * k + j];
      float s = 0.0f;  // columns past the last whole vector
      for (int64_t t = full; t < n; ++t) s += x[i * n + t] * x[j * n + t];
      const float v = static_cast<float>(total + static_cast<double>(s));
      g[i * k + j] = v;
      g[j * k + i] = v;
    }
  }
  return true;
}

// out[n] = a0 * sum[n] + sum_{r : coef[r] != 0} coef[r] * x[r * n]. Rows with a
// zero coefficient are never read (their NaN/Inf cannot leak), nor is sum when
// a0 is zero. Each output vector is made in a register from all the rows it
// needs (one sequential stream per row, each output written once).
// Large outputs are split into column ranges run on the thread pool.
bool Combine(const float* x, int64_t k, int64_t n, const float* sum,
             const float* coef, float a0, float* out, ffi::ThreadPool* pool) {
  std::vector<const float*> rows;
  std::vector<float> coefs;
  if (a0 != 0.0f) {
    rows.push_back(sum);
    coefs.push_back(a0);
  }
  for (int64_t r = 0; r < k; ++r) {
    if (coef[r] != 0.0f) {
      rows.push_back(x + r * n);
      coefs.push_back(coef[r]);
    }
  }
  const size_t m = rows.size();
  const int64_t full = n - n % kLanes;
  if (m == 0) {
    std::fill(out, out + n, 0.0f);
    return true;
  }
  std::vector<Vec> vcoefs(m);
  for (size_t i = 0; i < m; ++i) vcoefs[i] = Vec{} + coefs[i];
  const ColumnSplit split(pool, full);
  const bool ok = ParallelFor(pool, split.shares, [&](int64_t share) {
    const int64_t end = split.end(share);
    for (int64_t t = split.begin(share); t < end; t += kLanes) {
      Vec acc = vcoefs[0] * Load(rows[0] + t);
      for (size_t i = 1; i < m; ++i) acc += vcoefs[i] * Load(rows[i] + t);
      Store(out + t, acc);
    }
  });
  for (int64_t t = full; t < n; ++t) {
    float acc = coefs[0] * rows[0][t];
    for (size_t i = 1; i < m; ++i) acc += coefs[i] * rows[i][t];
    out[t] = acc;
  }
  return ok;
}

// The [..., K, n] shape of a kernel's input: leading axes (from vmap) are a
// batch of [K, n] matrices.
struct MatrixBatch {
  int64_t batch, k, n;
};

template <typename Dims>
ffi::ErrorOr<MatrixBatch> Matrices(const std::string& name, const Dims& dims) {
  if (dims.size() < 2) {
    return ffi::Unexpected<ffi::Error>(
        ffi::Error::InvalidArgument(name + ": input must have rank >= 2"));
  }
  int64_t batch = 1;
  for (size_t d = 0; d + 2 < dims.size(); ++d) batch *= dims[d];
  return MatrixBatch{batch, dims[dims.size() - 2], dims[dims.size() - 1]};
}

// Runs body(b) for b = 0..batch-1; a share that failed or a C++ exception
// (none may cross the FFI boundary) becomes an FFI error naming the kernel.
template <typename Body>
ffi::Error EachMatrix(const std::string& name, int64_t batch, Body body) {
  try {
    for (int64_t b = 0; b < batch; ++b) {
      if (!body(b)) return ffi::Error::Internal(name + ": a thread share failed");
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(name + ": " + e.what());
  }
  return ffi::Error::Success();
}

// Gram matrices (and column sums, if sum is not null) of every [K, n] matrix
// in a batch of them.
ffi::Error GramBatch(const std::string& name, ffi::ThreadPool* pool, ffi::Buffer<ffi::F32>& x,
                     float* g, float* sum) {
  const auto m = Matrices(name, x.dimensions());
  if (!m) return m.error();
  const int64_t k = m->k, n = m->n;
  return EachMatrix(name, m->batch, [&](int64_t b) {
    float* gb = g + b * k * k;
    float* sb = sum == nullptr ? nullptr : sum + b * n;
    if (n == 0 || k == 0) {
      std::fill(gb, gb + k * k, 0.0f);
      if (sb != nullptr) std::fill(sb, sb + n, 0.0f);
      return true;
    }
    return Gram(x.typed_data() + b * k * n, k, n, gb, sb, pool);
  });
}

ffi::Error GramImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> g) {
  return GramBatch("optax_gaf gram", &pool, x, g->typed_data(), nullptr);
}

ffi::Error GramSumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::ResultBuffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> s) {
  return GramBatch("optax_gaf gram_sum", &pool, x, g->typed_data(), s->typed_data());
}

ffi::Error CombineImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> sum,
                       ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> a0,
                       ffi::ResultBuffer<ffi::F32> out) {
  const std::string name = "optax_gaf combine";
  const auto m = Matrices(name, x.dimensions());
  if (!m) return m.error();
  const int64_t batch = m->batch, k = m->k, n = m->n;
  if (sum.element_count() != static_cast<size_t>(batch * n) ||
      coef.element_count() != static_cast<size_t>(batch * k) ||
      a0.element_count() != static_cast<size_t>(batch)) {
    return ffi::Error::InvalidArgument(name + ": operand sizes disagree");
  }
  return EachMatrix(name, batch, [&](int64_t b) {
    return Combine(x.typed_data() + b * k * n, k, n, sum.typed_data() + b * n,
                   coef.typed_data() + b * k, a0.typed_data()[b], out->typed_data() + b * n,
                   &pool);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    OptaxGafGramF32, GramImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    OptaxGafGramSumF32, GramSumImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    OptaxGafCombineF32, CombineImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());
