"""`flash_attention`: the public, differentiable entry point of the flash-attention kernels.

    out = flash_attention(q, k, v, causal=True)                  # q (B, L, H, Dh), k/v (B, S, K, Dh)
    out = flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)   # packed sequences

The forward kernel saves each query's log-sum-exp; the backward (a `custom_vjp`) recomputes the
probabilities block by block from it, so no (L, S) matrix is ever stored. The semantics are
`reference.attention_reference`'s exactly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.flash_attention import gpu, tpu
from pallas_kernels.flash_attention.blocks import BlockSizes
from pallas_kernels.flash_attention.common import check_shapes

_BACKENDS = {"gpu": gpu, "tpu": tpu}


def flash_attention(q, k, v, *, causal: bool = True, q_segment_ids=None, kv_segment_ids=None,
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    backend: str | None = None) -> jax.Array:
    """Attention output (B, L, H, Dh) in q.dtype.

    q: (B, L, H, Dh); k, v: (B, S, K, Dh), H a multiple of K (grouped-query heads). `causal`: a
    query at index i sees keys at indices <= i. Segment ids (int32, (B, L) and (B, S)): a query
    sees only keys of its own segment (packed sequences); a single `q_segment_ids` serves both
    when L == S. `sm_scale` defaults to 1/sqrt(Dh). `block_sizes` default per backend
    (`BlockSizes.default`); L and S must be multiples of the (clipped) blocks. `backend`:
    'gpu' / 'tpu' / None = the device's (see pallas_kernels/platform.py for CPU interpret mode).
    """
    backend, interpret = platform.resolve(backend)
    if q_segment_ids is not None and kv_segment_ids is None and q.shape[1] == k.shape[1]:
        kv_segment_ids = q_segment_ids
    blocks = (block_sizes or BlockSizes.default(backend)).clipped(q.shape[1], k.shape[1])
    check_shapes(q, k, v, q_segment_ids, kv_segment_ids, blocks)
    if q_segment_ids is not None:
        q_segment_ids = q_segment_ids.astype(jnp.int32)
        kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    static = (bool(causal), scale, blocks, backend, platform.interpret_arg(backend, interpret))
    return _flash(q, k, v, q_segment_ids, kv_segment_ids, static)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, static):
    return _forward(q, k, v, q_seg, kv_seg, static)[0]


def _forward(q, k, v, q_seg, kv_seg, static):
    causal, scale, blocks, backend, interpret = static
    return _BACKENDS[backend].forward(q, k, v, q_seg, kv_seg, causal=causal, sm_scale=scale, blocks=blocks,
                                      interpret=interpret)


def _flash_fwd(q, k, v, q_seg, kv_seg, static):
    out, lse = _forward(q, k, v, q_seg, kv_seg, static)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(static, residuals, do):
    causal, scale, blocks, backend, interpret = static
    q, k, v, q_seg, kv_seg, out, lse = residuals
    dq, dk, dv = _BACKENDS[backend].backward(q, k, v, q_seg, kv_seg, out, lse, do.astype(q.dtype), causal=causal,
                                             sm_scale=scale, blocks=blocks, interpret=interpret)
    B, S, K, Dh = k.shape
    G = q.shape[2] // K
    if G > 1:  # per-query-head gradients (B, S, H, Dh) -> sum over each group of G heads
        dk = dk.reshape(B, S, K, G, Dh).sum(axis=3)
        dv = dv.reshape(B, S, K, G, Dh).sum(axis=3)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
