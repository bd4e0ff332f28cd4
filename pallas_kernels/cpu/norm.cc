// LayerNorm / RMSNorm over the last axis, forward and backward, as an XLA:CPU kernel through the
// XLA FFI (pallas_kernels/cpu/norm.py; model.norm_impl=cpu).
//
// Why: XLA:CPU splits a norm into reduction ops (YNNPACK reduce fusions) and elementwise loops on
// either side, and its backward into more; on the shakespeare_char_cpu model replacing the norms by
// `x * scale + bias` saved 2.4 ms of a 35 ms forward+backward while PyTorch's fused native norm costs
// about nothing extra (experiments/results.md, issue 7). Here each row is one pass over registers
// for the statistics and one for the output; the backward is the closed form of model/layers.py's
// `normalize` (dx = rstd (g - xhat mean(g xhat) - mean(g)), g = dy scale, no mean(g) term for
// RMSNorm), with dscale and dbias summed per block of rows and then over blocks in order (the
// result does not depend on the thread count).
//
// x (..., D) float32 with D a multiple of W (16); scale, bias (D,). Forward returns y and the
// rows' 1 / sqrt(var + eps) for the backward, which recomputes the mean from x.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace ffi = xla::ffi;
namespace {

using namespace jaxlm_cpu;

constexpr int64_t kRows = 32;  // rows per task, and per partial sum of dscale / dbias

ffi::Error NormFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       float eps, bool center, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> rstd_out) {
  const int64_t D = x.dimensions().back(), N = x.element_count() / D, V = D / W;
  const float *X = x.typed_data(), *S = scale.typed_data(), *Bi = bias.typed_data();
  float *Y = y->typed_data(), *R = rstd_out->typed_data();
  const float invD = 1.0f / D;
  parallel_for(pool, (N + kRows - 1) / kRows, [&](int64_t t) {
    for (int64_t n = t * kRows; n < std::min(N, (t + 1) * kRows); ++n) {
      const float* xr = X + n * D;
      vf s{};
      for (int64_t c = 0; c < V; ++c) s += load(xr + c * W);
      const float mean = center ? hsum(s) * invD : 0.0f;
      vf q{};
      for (int64_t c = 0; c < V; ++c) { vf d = load(xr + c * W) - mean; q += d * d; }
      const float r = 1.0f / std::sqrt(hsum(q) * invD + eps);
      R[n] = r;
      float* yr = Y + n * D;
      for (int64_t c = 0; c < V; ++c) store(yr + c * W, (load(xr + c * W) - mean) * r * load(S + c * W) + load(Bi + c * W));
    }
  });
  return ffi::Error::Success();
}
ffi::Error NormBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> rstd,
                       ffi::Buffer<ffi::F32> scale, bool center, ffi::ResultBuffer<ffi::F32> dx,
                       ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias) {
  const int64_t D = x.dimensions().back(), N = x.element_count() / D, T = (N + kRows - 1) / kRows, V = D / W;
  const float *DY = dy.typed_data(), *X = x.typed_data(), *R = rstd.typed_data(), *S = scale.typed_data();
  float* DX = dx->typed_data();
  std::vector<float> part(T * 2 * D);
  const float invD = 1.0f / D;
  parallel_for(pool, T, [&](int64_t t) {
    float* ps = part.data() + t * 2 * D; float* pb = ps + D;
    std::fill(ps, ps + 2 * D, 0.0f);
    for (int64_t n = t * kRows; n < std::min(N, (t + 1) * kRows); ++n) {
      const float* xr = X + n * D; const float* dyr = DY + n * D;
      const float r = R[n];
      vf s{};
      for (int64_t c = 0; c < V; ++c) s += load(xr + c * W);
      const float mean = center ? hsum(s) * invD : 0.0f;
      vf mg{}, mgx{};
      for (int64_t c = 0; c < V; ++c) {
        const vf xh = (load(xr + c * W) - mean) * r, d = load(dyr + c * W), g = d * load(S + c * W);
        mg += g; mgx += g * xh;
        store(ps + c * W, load(ps + c * W) + d * xh); store(pb + c * W, load(pb + c * W) + d);
      }
      const float a = hsum(mgx) * invD, b = center ? hsum(mg) * invD : 0.0f;
      float* dxr = DX + n * D;
      for (int64_t c = 0; c < V; ++c) {
        const vf xh = (load(xr + c * W) - mean) * r, g = load(dyr + c * W) * load(S + c * W);
        store(dxr + c * W, r * (g - xh * a - b));
      }
    }
  });
  float *DS = dscale->typed_data(), *DB = dbias->typed_data();
  std::fill(DS, DS + D, 0.0f); std::fill(DB, DB + D, 0.0f);
  for (int64_t t = 0; t < T; ++t) for (int64_t j = 0; j < D; ++j) { DS[j] += part[t * 2 * D + j]; DB[j] += part[t * 2 * D + D + j]; }
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmNormFwd, NormFwdImpl, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Attr<float>("eps").Attr<bool>("center").Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmNormBwd, NormBwdImpl, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
    .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
    .Attr<bool>("center").Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
