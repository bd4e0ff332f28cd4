// Shared by jaxlm's XLA:CPU kernels (attention.cc, matmul.cc): W-float vectors through GCC's
// vector extensions (one AVX-512 register, or two AVX2 ones: -march=native picks), and a
// parallel loop over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxlm_cpu {

namespace ffi = xla::ffi;

constexpr int W = 16;  // floats per vector: one AVX-512 register, two AVX2 ones (GCC splits it)
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf splat(float x) { return vf{} + x; }
static inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
static inline float hsum(vf v) { float s = 0.0f; for (int i = 0; i < W; ++i) s += v[i]; return s; }
static inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < W; ++i) m = std::max(m, v[i]); return m; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vi loadi(const int32_t* p) { vi v; std::memcpy(&v, p, sizeof(v)); return v; }

// Run fn(task) for task in [0, n) on the calling thread and XLA's intra-op pool.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  F* f = &fn;
  auto work = [state, n, f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*f)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  // A helper that starts after every task was claimed returns without touching `fn`; the caller
  // waits until every claimed task is done, so `fn` outlives its uses.
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace jaxlm_cpu
