"""Causal attention as one fused XLA:CPU kernel (C++ through the XLA FFI): `model.attention='cpu'`.

    from pallas_kernels.cpu import cpu_attention
    out = cpu_attention(q, k, v, q_positions, kv_positions)   # (B, L, H, Dh), differentiable

`attention.cc`, built for the machine on first use (`build.py`; needs a C++ compiler) and called
with `jax.ffi.ffi_call`. Its reference is the jnp attention every other path uses, `model.attention.xla_attention` with
`causal_mask(q_positions, kv_positions)`; the tests hold the two to float32 rounding, forward and
gradients, including grouped-query heads, left padding and lengths that are not multiples of the
kernel's blocks. Why it exists: on the 2-core CPU of issue 7 XLA's attention took ~6 ms of a
36 ms train step of the shakespeare_char_cpu model, PyTorch's 3 ms (experiments/results.md).

For training and evaluation on one CPU device: the sampler's KV-cache path uses 'xla' (like the
other kernels), and under a device mesh the call would be replicated, so that is an error.
Inputs of another float dtype are computed in float32 and cast back.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu.build import check_one_device, register_kernels

HEAD_DIMS = (16, 32, 64, 128, 256)  # the head sizes attention.cc is instantiated for
_FWD, _BWD = "jaxlm_cpu_attention_fwd", "jaxlm_cpu_attention_bwd"


def check_cpu_attention(head_dim: int) -> None:
    """Raise ValueError (CpuKernelBuildError among them) unless this process can run the kernel
    for `head_dim` (a CPU device, a supported head size, a compiler); builds it if not cached."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"model.attention='cpu' supports head_dim in {HEAD_DIMS}, not {head_dim}; "
                         "use model.attention='xla'")
    register_kernels("model.attention='cpu'")


def _call_fwd(q, k, v, q_pos, kv_pos, scale):
    return jax.ffi.ffi_call(_FWD, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k, v, q_pos, kv_pos, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, q_pos, kv_pos, scale):
    return _call_fwd(q, k, v, q_pos, kv_pos, scale)


def _attention_fwd(q, k, v, q_pos, kv_pos, scale):
    return _call_fwd(q, k, v, q_pos, kv_pos, scale), (q, k, v, q_pos, kv_pos)


def _attention_bwd(scale, res, dout):
    q, k, v, q_pos, kv_pos = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(_BWD, shapes)(q, k, v, q_pos, kv_pos, dout, scale=np.float32(scale))
    zero_pos = tuple(np.zeros(p.shape, jax.dtypes.float0) for p in (q_pos, kv_pos))
    return (dq, dk, dv, *zero_pos)


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                  kv_positions: jax.Array) -> jax.Array:
    """q: (B, L, H, Dh); k, v: (B, S, K, Dh) with H a multiple of K; positions (B, L) and (B, S)
    int (-1: no token). Returns (B, L, H, Dh) in q's dtype: softmax(q k^T / sqrt(Dh)) v over the
    keys with 0 <= kv_position <= q_position."""
    B, L, H, Dh = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != Dh or H % k.shape[2]:
        raise ValueError(f"cpu_attention: q {q.shape} and k/v {k.shape}/{v.shape} are not (B, L, H, Dh) and "
                         "(B, S, K, Dh) with H a multiple of K")
    if q_positions.shape != (B, L) or kv_positions.shape != (B, k.shape[1]):
        raise ValueError(f"cpu_attention: positions {q_positions.shape}/{kv_positions.shape} do not match "
                         f"q {q.shape} and k {k.shape}")
    check_cpu_attention(Dh)
    check_one_device("model.attention='cpu'")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out = _attention(*f32, q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32), 1.0 / math.sqrt(Dh))
    return out.astype(q.dtype)
