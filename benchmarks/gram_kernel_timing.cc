// Standalone timing of the native Gram kernel (optax_gaf/_src/native/gram_kernel.cc)
// on one thread, without JAX: GramRange with and without the column sums on a
// [K, n] float32 array, and a plain vector read of the same array for scale.
//
// Build and run from the repository root (jaxlib provides the FFI headers):
//
//   g++ -O3 -std=c++17 -fno-math-errno -ffp-contract=fast -march=native \
//     -I"$(python -c 'import jax; print(jax.ffi.include_dir())')" \
//     benchmarks/gram_kernel_timing.cc -o /tmp/gram_kernel_timing -lpthread
//   taskset -c 0 /tmp/gram_kernel_timing 8 1863690 30   # K, n, repetitions
//
// Prints the best time of the repetitions (after one warm-up call each) and
// the multiply-add rate (K(K+1)/2 * n per Gram matrix). To compare with an
// earlier kernel, write its source next to a copy of this file and build both:
//
//   mkdir -p /tmp/old/benchmarks /tmp/old/optax_gaf/_src/native
//   git show REV:optax_gaf/_src/native/gram_kernel.cc > /tmp/old/optax_gaf/_src/native/gram_kernel.cc
//   cp benchmarks/gram_kernel_timing.cc /tmp/old/benchmarks/
//
// then build /tmp/old/benchmarks/gram_kernel_timing.cc the same way and run
// the two binaries alternately (the VM's speed drifts between runs). Add
// -mno-avx512f (or -mno-avx) after -march=native for an AVX2 (or SSE) build.

#include "../optax_gaf/_src/native/gram_kernel.cc"

#include <chrono>
#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  const int64_t k = argc > 1 ? atoll(argv[1]) : 8;
  const int64_t n = argc > 2 ? atoll(argv[2]) : 1863690;
  const int reps = argc > 3 ? atoi(argv[3]) : 30;
  std::vector<float> x(k * n), sum(n);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
  }
  std::vector<double> sums(k * k);
  using Clock = std::chrono::steady_clock;
  auto seconds = [](Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };
  auto gram = [&](bool with_sum) {
    double best = 1e9;
    for (int r = -1; r < reps; ++r) {  // r = -1: warm-up, not timed
      std::fill(sums.begin(), sums.end(), 0.0);
      const auto t0 = Clock::now();
      GramRange(x.data(), k, n, 0, n, sums.data(), with_sum ? sum.data() : nullptr);
      if (r >= 0) best = std::min(best, seconds(t0));
    }
    return best;
  };
  const double g = gram(false), gs = gram(true);
  double read = 1e9;
  volatile float sink = 0.0f;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    Vec a0{}, a1{}, a2{}, a3{};
    const float* p = x.data();
    for (int64_t t = 0; t + 4 * kLanes <= k * n; t += 4 * kLanes) {
      a0 += Load(p + t);
      a1 += Load(p + t + kLanes);
      a2 += Load(p + t + 2 * kLanes);
      a3 += Load(p + t + 3 * kLanes);
    }
    sink = HorizontalSum(a0 + a1 + a2 + a3);
    read = std::min(read, seconds(t0));
  }
  const double fma = static_cast<double>(k) * (k + 1) / 2 * n;
  std::printf("K=%ld n=%ld: gram %.3f ms (%.1f GFMA/s), gram+sum %.3f ms (%.1f GFMA/s), "
              "read %.3f ms (%.1f GB/s)\n",
              static_cast<long>(k), static_cast<long>(n), g * 1e3, fma / g / 1e9, gs * 1e3,
              fma / gs / 1e9, read * 1e3, k * n * 4 / read / 1e9);
  return 0;
}
