// The weight gradient of a dense layer, dW = x^T dy, as an XLA:CPU kernel through the XLA FFI
// (pallas_kernels/cpu/matmul.py differentiates `dense` with it; model.matmul=cpu).
//
// Why: XLA:CPU hands a matmul whose left operand is transposed (contracting dimension 0) to
// Eigen, not YNNPACK, and Eigen ran the shakespeare_char_cpu model's weight gradients at 72-124
// GFLOP/s on one core, 12.3 ms of a 52 ms step (experiments/results.md, issue 7). Yet that layout
// is the natural one for an outer-product kernel: for every token k, a row of x and a row of dy
// are both contiguous, so an MR x NR block of dW accumulates in registers from one broadcast of
// each of MR x values and NR/W vector loads of dy per k, with no packing or transposing.
//
// x: (K, M), dy: (K, N), float32 row-major; out: (M, N). Any M, N (edges take a scalar path).
// Tasks are MB x NB blocks of the output over XLA's intra-op pool; each sums over all K in
// order, so the result does not depend on the thread count.

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxlm_cpu;

constexpr int64_t MR = 8, NR = 2 * W, NB = 64;

// out[m0:m0+MR, n0:n0+NR] = x[:, m0:m0+MR]^T dy[:, n0:n0+NR]
static inline void block(const float* x, const float* dy, float* out, int64_t K, int64_t M, int64_t N,
                         int64_t m0, int64_t n0) {
  vf acc[MR][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    const vf b0 = load(dy + k * N + n0), b1 = load(dy + k * N + n0 + W);
    const float* xr = x + k * M + m0;
    for (int r = 0; r < MR; ++r) {
      acc[r][0] += xr[r] * b0;
      acc[r][1] += xr[r] * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store(out + (m0 + r) * N + n0, acc[r][0]);
    store(out + (m0 + r) * N + n0 + W, acc[r][1]);
  }
}

// The same for the ragged edge: rows [m0, m1) x columns [n0, n1), one element at a time.
static void edge(const float* x, const float* dy, float* out, int64_t K, int64_t M, int64_t N, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[k * M + m] * dy[k * N + n];
      out[m * N + n] = s;
    }
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> out) {
  if (x.dimensions().size() != 2 || dy.dimensions().size() != 2 || x.dimensions()[0] != dy.dimensions()[0])
    return ffi::Error::InvalidArgument("weight gradient: x (K, M) and dy (K, N) expected");
  const int64_t K = x.dimensions()[0], M = x.dimensions()[1], N = dy.dimensions()[1];
  const float *X = x.typed_data(), *DY = dy.typed_data();
  float* O = out->typed_data();
  const int64_t MB = M >= 256 ? 64 : 32;
  const int64_t tm = (M + MB - 1) / MB, tn = (N + NB - 1) / NB;
  parallel_for(pool, tm * tn, [&](int64_t t) {
    const int64_t m_lo = (t / tn) * MB, m_hi = std::min(M, m_lo + MB);
    const int64_t n_lo = (t % tn) * NB, n_hi = std::min(N, n_lo + NB);
    const int64_t m_full = m_lo + (m_hi - m_lo) / MR * MR, n_full = n_lo + (n_hi - n_lo) / NR * NR;
    for (int64_t n0 = n_lo; n0 < n_full; n0 += NR)  // one NR-column panel of dy stays in cache
      for (int64_t m0 = m_lo; m0 < m_full; m0 += MR) block(X, DY, O, K, M, N, m0, n0);
    edge(X, DY, O, K, M, N, m_full, m_hi, n_lo, n_hi);
    edge(X, DY, O, K, M, N, m_lo, m_full, n_full, n_hi);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmWeightGrad, WeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (K, M)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy (K, N)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // x^T dy (M, N)
