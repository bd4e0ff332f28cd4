// Causal attention for XLA:CPU as one fused kernel per (batch, kv head), called through the XLA FFI
// (pallas_kernels/cpu/attention.py differentiates it; build.py builds and loads it).
//
// Why: XLA:CPU runs jnp attention as ~11 ops forward and ~23 backward per layer (head transposes,
// small batched dots, softmax passes); for the shakespeare_char_cpu model that was 6 ms of a
// 36 ms train step against PyTorch's 3 ms (experiments/results.md, issue 7). Here each task keeps
// one (batch, kv head)'s keys and values in cache, reads q/k/v and writes the gradients in the
// model's own (B, L, H, Dh) layout (no transposes), skips key blocks that no query of a group of
// rows can see, and recomputes the probabilities in the backward pass instead of storing them.
//
// Semantics are those of model/attention.py's xla_attention with causal_mask: a query at position
// qp attends to a key at position kp iff 0 <= kp <= qp; masked scores are float32's lowest value
// (so a query that sees no key averages all of them, as the reference does); probabilities are
// exp(s - max) / sum; the backward is the reference's (softmax, where, scale) chain. Results agree
// with it to float32 rounding (summation order and the exp polynomial differ).
//
// Layouts: q (B, L, H, Dh), k and v (B, S, K, Dh) with H = K * G (grouped-query heads), positions
// (B, L) and (B, S) int32, all row-major float32. Dh is a template parameter (16 ... 256).

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxlm_cpu;

constexpr float kMasked = -3.4028234663852886e38f;  // jnp.finfo(float32).min, as the jnp reference

// exp(x) of W floats: Cephes' polynomial on x - n ln2, scaled by 2^n through the exponent bits.
// Relative error ~2e-7 (float32 rounding); 0 below -87.3 (as expf underflows).
static inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.7f);
  vf xc = x < lo ? lo : (x > hi ? hi : x);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf r2 = r * r;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vf y = p * scale;
  return x < lo ? vf{} : y;
}

struct Dims {
  int64_t B, L, S, H, K;
};

// One (batch, kv head) of keys or values, from (B, S, K, D) into the task's buffers: rows (S, D)
// and, transposed and zero-padded to SP columns, (D, SP).
template <int D>
static void gather_head(const float* x, const Dims& d, int64_t b, int64_t kh, int64_t SP, float* rows, float* cols) {
  for (int64_t s = 0; s < d.S; ++s) {
    const float* src = x + ((b * d.S + s) * d.K + kh) * D;
    if (rows) std::memcpy(rows + s * D, src, D * sizeof(float));
    if (cols) for (int j = 0; j < D; ++j) cols[j * SP + s] = src[j];
  }
  if (cols) for (int j = 0; j < D; ++j) for (int64_t s = d.S; s < SP; ++s) cols[j * SP + s] = 0.0f;
}

// Per-task key data of one (batch, kv head): key positions padded to SP with "never attend"
// (INT32_MAX; a negative position, an empty slot or left padding, becomes that too, so one compare
// `kpos <= qpos` is the mask), and the smallest position of each block of W keys, so blocks that
// no query row of a group can see are skipped (causal attention: half of them).
struct KeyPositions {
  std::vector<int32_t> pos, block_min;
  KeyPositions(const int32_t* kpos, int64_t S, int64_t SP) : pos(SP), block_min(SP / W) {
    for (int64_t s = 0; s < SP; ++s) pos[s] = (s < S && kpos[s] >= 0) ? kpos[s] : INT32_MAX;
    for (int64_t c = 0; c < SP / W; ++c)
      block_min[c] = *std::min_element(pos.begin() + c * W, pos.begin() + (c + 1) * W);
  }
};

// R query rows at once (their scores share every load of the keys): p[r * SP + s] = softmax over
// keys of (q_r . k_s) * scale, masked keys at kMasked, exactly as the jnp reference computes it
// (where(mask, scores, finfo.min), then jax.nn.softmax). Columns s >= S get p = 0.
template <int D, int R>
static inline void rows_probs(const float* const* q, const int32_t* qp, const float* kt, const KeyPositions& kp,
                              float scale, int64_t S, int64_t SP, float* p) {
  int32_t qmax = qp[0];
  for (int r = 1; r < R; ++r) qmax = std::max(qmax, qp[r]);
  vf m[R];
  for (int r = 0; r < R; ++r) m[r] = splat(kMasked);
  for (int64_t s0 = 0; s0 < SP; s0 += W) {
    if (kp.block_min[s0 / W] > qmax) {  // no row sees any key of this block
      for (int r = 0; r < R; ++r) store(p + r * SP + s0, splat(kMasked));
      continue;
    }
    vf acc[R] = {};
    for (int j = 0; j < D; ++j) {
      const vf kv = load(kt + j * SP + s0);
      for (int r = 0; r < R; ++r) acc[r] += q[r][j] * kv;
    }
    const vi kpos = loadi(kp.pos.data() + s0);
    for (int r = 0; r < R; ++r) {
      vf sc = acc[r] * scale;
      sc = kpos <= qp[r] ? sc : splat(kMasked);
      m[r] = vmax(m[r], sc);
      store(p + r * SP + s0, sc);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* pr = p + r * SP;
    const float mx = hmax(m[r]);
    vf sum{};
    for (int64_t s0 = 0; s0 < SP; s0 += W) {
      const vf e = vexp(load(pr + s0) - mx);
      store(pr + s0, e);
      sum += e;
    }
    // With every key masked (mx = kMasked) the padding columns count 1 each; the reference has none.
    float total = hsum(sum);
    for (int64_t s = S; s < SP; ++s) total -= pr[s];
    const vf tot = splat(total);
    for (int64_t s0 = 0; s0 < SP; s0 += W) store(pr + s0, load(pr + s0) / tot);
    for (int64_t s = S; s < SP; ++s) pr[s] = 0.0f;
  }
}

template <int D>
constexpr int rows_per_group() { return D <= 64 ? 4 : (D <= 128 ? 2 : 1); }

template <int D, int R>
static void fwd_group(const float* const* q, const int32_t* qp, float* const* out, const float* kt, const float* vr,
                      const KeyPositions& kp, float scale, int64_t S, int64_t SP, float* p) {
  rows_probs<D, R>(q, qp, kt, kp, scale, S, SP, p);
  vf acc[R][D / W] = {};
  for (int64_t s = 0; s < S; ++s) {
    bool any = false;
    for (int r = 0; r < R; ++r) any |= p[r * SP + s] != 0.0f;
    if (!any) continue;
    for (int c = 0; c < D / W; ++c) {
      const vf vv = load(vr + s * D + c * W);
      for (int r = 0; r < R; ++r) acc[r][c] += p[r * SP + s] * vv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < D / W; ++c) store(out[r] + c * W, acc[r][c]);
}

// For one (batch b, kv head kh) task: fn(h, l, rows) over its query heads h and groups of rows
// l .. l + rows - 1, rows = R (std::integral_constant) while R rows remain, then 1.
template <int R, typename F>
static void for_row_groups(const Dims& d, int64_t kh, F fn) {
  const int64_t G = d.H / d.K;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = kh * G + g;
    int64_t l = 0;
    for (; l + R <= d.L; l += R) fn(h, l, std::integral_constant<int, R>{});
    for (; l < d.L; ++l) fn(h, l, std::integral_constant<int, 1>{});
  }
}

template <int D>
void attention_fwd(ffi::ThreadPool& pool, const Dims& d, float scale, const float* Q, const float* Kp,
                   const float* V, const int32_t* QP, const int32_t* KP, float* O) {
  constexpr int R = rows_per_group<D>();
  const int64_t SP = (d.S + W - 1) / W * W;
  parallel_for(pool, d.B * d.K, [&](int64_t task) {
    const int64_t b = task / d.K, kh = task % d.K;
    std::vector<float> kt(D * SP), vr(d.S * D), p(R * SP);
    gather_head<D>(Kp, d, b, kh, SP, nullptr, kt.data());
    gather_head<D>(V, d, b, kh, SP, vr.data(), nullptr);
    const KeyPositions kp(KP + b * d.S, d.S, SP);
    for_row_groups<R>(d, kh, [&](int64_t h, int64_t l, auto rows) {
      constexpr int n = decltype(rows)::value;
      const float* q[n];
      float* o[n];
      for (int r = 0; r < n; ++r) {
        q[r] = Q + ((b * d.L + l + r) * d.H + h) * D;
        o[r] = O + ((b * d.L + l + r) * d.H + h) * D;
      }
      fwd_group<D, n>(q, QP + b * d.L + l, o, kt.data(), vr.data(), kp, scale, d.S, SP, p.data());
    });
  });
}

template <int D, int R>
static void bwd_group(const float* const* q, const float* const* dout, const int32_t* qp, float* const* dq,
                      const float* kt, const float* vt, const float* kr, const KeyPositions& kp, float scale,
                      int64_t S, int64_t SP, float* p, float* ds, float* dka, float* dva) {
  rows_probs<D, R>(q, qp, kt, kp, scale, S, SP, p);
  int32_t qmax = qp[0];
  for (int r = 1; r < R; ++r) qmax = std::max(qmax, qp[r]);
  // dp_rs = dout_r . v_s; softmax backward: ds = p (dp - sum_s p dp); where(mask) passes no
  // gradient to masked keys; the score scale comes last, as in the reference's transpose.
  vf rowv[R] = {};
  for (int64_t s0 = 0; s0 < SP; s0 += W) {
    if (kp.block_min[s0 / W] > qmax) {
      for (int r = 0; r < R; ++r) store(ds + r * SP + s0, vf{});  // p = 0 here unless a row sees no key
      continue;
    }
    vf acc[R] = {};
    for (int j = 0; j < D; ++j) {
      const vf vv = load(vt + j * SP + s0);
      for (int r = 0; r < R; ++r) acc[r] += dout[r][j] * vv;
    }
    for (int r = 0; r < R; ++r) {
      store(ds + r * SP + s0, acc[r]);
      rowv[r] += acc[r] * load(p + r * SP + s0);
    }
  }
  for (int r = 0; r < R; ++r) {
    const vf row = splat(hsum(rowv[r]));
    for (int64_t s0 = 0; s0 < SP; s0 += W) {
      const vi kpos = loadi(kp.pos.data() + s0);
      const vf g = load(p + r * SP + s0) * (load(ds + r * SP + s0) - row) * scale;
      store(ds + r * SP + s0, kpos <= qp[r] ? g : vf{});
    }
  }
  vf dqa[R][D / W] = {};
  for (int64_t s = 0; s < S; ++s) {
    bool any_p = false, any_ds = false;
    for (int r = 0; r < R; ++r) { any_p |= p[r * SP + s] != 0.0f; any_ds |= ds[r * SP + s] != 0.0f; }
    if (any_p) {
      for (int c = 0; c < D / W; ++c) {
        vf a = load(dva + s * D + c * W);
        for (int r = 0; r < R; ++r) a += p[r * SP + s] * load(dout[r] + c * W);
        store(dva + s * D + c * W, a);
      }
    }
    if (any_ds) {
      for (int c = 0; c < D / W; ++c) {
        const vf kv = load(kr + s * D + c * W);
        vf a = load(dka + s * D + c * W);
        for (int r = 0; r < R; ++r) {
          const float g = ds[r * SP + s];
          dqa[r][c] += g * kv;
          a += g * load(q[r] + c * W);
        }
        store(dka + s * D + c * W, a);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < D / W; ++c) store(dq[r] + c * W, dqa[r][c]);
}

template <int D>
void attention_bwd(ffi::ThreadPool& pool, const Dims& d, float scale, const float* Q, const float* Kp,
                   const float* V, const int32_t* QP, const int32_t* KP, const float* DO, float* DQ,
                   float* DK, float* DV) {
  constexpr int R = rows_per_group<D>();
  const int64_t SP = (d.S + W - 1) / W * W;
  parallel_for(pool, d.B * d.K, [&](int64_t task) {
    const int64_t b = task / d.K, kh = task % d.K;
    std::vector<float> kt(D * SP), vt(D * SP), kr(d.S * D), p(R * SP), ds(R * SP);
    std::vector<float> dka(d.S * D, 0.0f), dva(d.S * D, 0.0f);
    gather_head<D>(Kp, d, b, kh, SP, kr.data(), kt.data());
    gather_head<D>(V, d, b, kh, SP, nullptr, vt.data());
    const KeyPositions kp(KP + b * d.S, d.S, SP);
    for_row_groups<R>(d, kh, [&](int64_t h, int64_t l, auto rows) {
      constexpr int n = decltype(rows)::value;
      const float *q[n], *o[n];
      float* dq[n];
      for (int r = 0; r < n; ++r) {
        const int64_t at = ((b * d.L + l + r) * d.H + h) * D;
        q[r] = Q + at;
        o[r] = DO + at;
        dq[r] = DQ + at;
      }
      bwd_group<D, n>(q, o, QP + b * d.L + l, dq, kt.data(), vt.data(), kr.data(), kp, scale, d.S, SP, p.data(),
                      ds.data(), dka.data(), dva.data());
    });
    for (int64_t s = 0; s < d.S; ++s) {
      std::memcpy(DK + ((b * d.S + s) * d.K + kh) * D, dka.data() + s * D, D * sizeof(float));
      std::memcpy(DV + ((b * d.S + s) * d.K + kh) * D, dva.data() + s * D, D * sizeof(float));
    }
  });
}

template <typename F>
ffi::Error by_head_dim(int64_t D, F f) {
  switch (D) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default:
      return ffi::Error::InvalidArgument("head_dim must be one of 16, 32, 64, 128, 256");
  }
  return ffi::Error::Success();
}

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qpos,
                            ffi::Buffer<ffi::S32> kpos, float scale, ffi::ResultBuffer<ffi::F32> o) {
  auto qd = q.dimensions(), kd = k.dimensions();
  Dims d{qd[0], qd[1], kd[1], qd[2], kd[2]};
  return by_head_dim(qd[3], [&](auto D) {
    attention_fwd<decltype(D)::value>(pool, d, scale, q.typed_data(), k.typed_data(), v.typed_data(),
                                      qpos.typed_data(), kpos.typed_data(), o->typed_data());
  });
}

ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qpos,
                            ffi::Buffer<ffi::S32> kpos, ffi::Buffer<ffi::F32> dout, float scale,
                            ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                            ffi::ResultBuffer<ffi::F32> dv) {
  auto qd = q.dimensions(), kd = k.dimensions();
  Dims d{qd[0], qd[1], kd[1], qd[2], kd[2]};
  return by_head_dim(qd[3], [&](auto D) {
    attention_bwd<decltype(D)::value>(pool, d, scale, q.typed_data(), k.typed_data(), v.typed_data(),
                                      qpos.typed_data(), kpos.typed_data(), dout.typed_data(),
                                      dq->typed_data(), dk->typed_data(), dv->typed_data());
  });
}

// Both handlers take q, k, v and the query and key positions first.
auto BindAttentionInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // q (B, L, H, Dh)
      .Arg<ffi::Buffer<ffi::F32>>()   // k (B, S, K, Dh)
      .Arg<ffi::Buffer<ffi::F32>>()   // v (B, S, K, Dh)
      .Arg<ffi::Buffer<ffi::S32>>()   // query positions (B, L)
      .Arg<ffi::Buffer<ffi::S32>>();  // key positions (B, S)
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmAttentionFwd, AttentionFwdImpl,
                              BindAttentionInputs().Attr<float>("scale").Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmAttentionBwd, AttentionBwdImpl,
                              BindAttentionInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d out (B, L, H, Dh)
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
