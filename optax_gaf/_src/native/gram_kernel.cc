// Gram matrix G = X X^T of a row-major float32 [..., K, n] array, for XLA:CPU.
//
// Why: XLA:CPU computes a [K, n] x [n, K] product (K small, n large) with a
// general matrix kernel that vectorises over the tiny K x K output and reaches
// about a third of a core's peak. This kernel vectorises over the long axis
// n instead, computes only the 4 x 4 row tiles on and above the diagonal,
// reads the matrix in blocks of columns that stay in cache while every tile
// pair reads them, and prefetches the next block.
//
// Numerics: float32 products, float32 vector partial sums over kFlush blocks,
// then a double-precision running sum; the result is rounded to float32 and
// mirrored, so G is exactly symmetric. NaN/Inf propagate as in a plain dot
// product (no fast-math).
//
// Built on first use by optax_gaf/_src/native_gram.py against jaxlib's XLA FFI
// headers; see that file.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifndef OPTAX_GAF_LANES
#define OPTAX_GAF_LANES 16
#endif
#ifndef OPTAX_GAF_BLOCK
#define OPTAX_GAF_BLOCK 8192
#endif
#ifndef OPTAX_GAF_PREFETCH
#define OPTAX_GAF_PREFETCH 1
#endif
#ifndef OPTAX_GAF_FLUSH
#define OPTAX_GAF_FLUSH 16
#endif
// Measured on a Zen 4 core (AVX-512), K = 4..16, one thread: 16 lanes,
// blocks of 8192 columns and prefetching the next block were the fastest of
// 8/16 lanes x 256..8192 columns x with/without prefetch.
constexpr int kLanes = OPTAX_GAF_LANES;      // floats per vector
constexpr int64_t kBlock = OPTAX_GAF_BLOCK;  // columns per block
constexpr int kTile = 4;                     // rows per tile side
constexpr int64_t kFlush = OPTAX_GAF_FLUSH;  // blocks per flush to double
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

// Vector partial sums of one R x C tile: acc[r][c] += a_r[t] * b_c[t] over
// the full vectors of columns [0, len). The accumulators live in memory
// between blocks (one load and store each per block), so blocks can be small
// enough for L1 without horizontal sums per block.
template <int R, int C>
inline void Tile(const float* const* a, const float* const* b, int64_t len,
                 Vec* acc_mem) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = acc_mem[r * kTile + c];
  for (int64_t t = 0; t + kLanes <= len; t += kLanes) {
    Vec va[R], vb[C];
    for (int r = 0; r < R; ++r) va[r] = Load(a[r] + t);
    for (int c = 0; c < C; ++c) {
      vb[c] = Load(b[c] + t);
#if OPTAX_GAF_PREFETCH
      // Same rows, next block. Integer address arithmetic: the address may
      // lie past the buffer (a prefetch never faults; a pointer there is UB).
      __builtin_prefetch(reinterpret_cast<const void*>(
          reinterpret_cast<std::uintptr_t>(b[c] + t) + kBlock * sizeof(float)));
#endif
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += va[r] * vb[c];
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc_mem[r * kTile + c] = acc[r][c];
}

template <int R>
inline void TileR(int c, const float* const* a, const float* const* b,
                  int64_t len, Vec* acc) {
  switch (c) {
    case 1: Tile<R, 1>(a, b, len, acc); break;
    case 2: Tile<R, 2>(a, b, len, acc); break;
    case 3: Tile<R, 3>(a, b, len, acc); break;
    default: Tile<R, 4>(a, b, len, acc); break;
  }
}

inline void AnyTile(int r, int c, const float* const* a, const float* const* b,
                    int64_t len, Vec* acc) {
  switch (r) {
    case 1: TileR<1>(c, a, b, len, acc); break;
    case 2: TileR<2>(c, a, b, len, acc); break;
    case 3: TileR<3>(c, a, b, len, acc); break;
    default: TileR<4>(c, a, b, len, acc); break;
  }
}

// g[k * k] = x[k * n] x[k * n]^T.
void Gram(const float* x, int64_t k, int64_t n, float* g) {
  const int64_t tiles = (k + kTile - 1) / kTile;
  const int64_t pairs = tiles * tiles;
  // Per upper-triangular tile pair: kTile x kTile vector accumulators, and
  // double totals they are flushed into every kFlush blocks (accuracy).
  std::vector<Vec> acc(pairs * kTile * kTile, Vec{});
  std::vector<double> sums(k * k, 0.0);
  std::vector<const float*> a(kTile), b(kTile);
  const int64_t full = n - n % kLanes;  // columns covered by whole vectors
  auto flush = [&]() {
    for (int64_t ti = 0; ti < tiles; ++ti) {
      for (int64_t tj = ti; tj < tiles; ++tj) {
        Vec* tile = &acc[(ti * tiles + tj) * kTile * kTile];
        for (int r = 0; r < kTile; ++r) {
          for (int c = 0; c < kTile; ++c) {
            const int64_t i = ti * kTile + r, j = tj * kTile + c;
            if (i < k && j < k) sums[i * k + j] += static_cast<double>(HorizontalSum(tile[r * kTile + c]));
            tile[r * kTile + c] = Vec{};
          }
        }
      }
    }
  };
  int64_t blocks = 0;
  for (int64_t start = 0; start < full; start += kBlock) {
    const int64_t len = std::min(kBlock, full - start);
    for (int64_t ti = 0; ti < tiles; ++ti) {
      const int r = static_cast<int>(std::min<int64_t>(kTile, k - ti * kTile));
      for (int q = 0; q < r; ++q) a[q] = x + (ti * kTile + q) * n + start;
      for (int64_t tj = ti; tj < tiles; ++tj) {
        const int c = static_cast<int>(std::min<int64_t>(kTile, k - tj * kTile));
        for (int q = 0; q < c; ++q) b[q] = x + (tj * kTile + q) * n + start;
        AnyTile(r, c, a.data(), b.data(), len, &acc[(ti * tiles + tj) * kTile * kTile]);
      }
    }
    if (++blocks % kFlush == 0) flush();
  }
  flush();
  for (int64_t i = 0; i < k; ++i) {  // columns past the last whole vector
    for (int64_t j = i; j < k; ++j) {
      float s = 0.0f;
      for (int64_t t = full; t < n; ++t) s += x[i * n + t] * x[j * n + t];
      const float v = static_cast<float>(sums[i * k + j] + static_cast<double>(s));
      g[i * k + j] = v;
      g[j * k + i] = v;
    }
  }
}

ffi::Error GramImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> g) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) {
    return ffi::Error::InvalidArgument("optax_gaf gram: input must have rank >= 2");
  }
  const int64_t k = dims[dims.size() - 2];
  const int64_t n = dims[dims.size() - 1];
  int64_t batch = 1;
  for (size_t d = 0; d + 2 < dims.size(); ++d) batch *= dims[d];
  const float* in = x.typed_data();
  float* out = g->typed_data();
  try {  // no C++ exception may cross the FFI boundary
    for (int64_t b = 0; b < batch; ++b) {
      if (n == 0) {
        std::fill(out + b * k * k, out + (b + 1) * k * k, 0.0f);
      } else {
        Gram(in + b * k * n, k, n, out + b * k * k);
      }
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("optax_gaf gram: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    OptaxGafGramF32, GramImpl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
