"""Plain-jnp attention with the kernels' exact semantics: the oracle the tests compare against.

q: (B, L, H, Dh); k, v: (B, S, K, Dh) with H a multiple of K (grouped-query attention: query
head h reads key/value head h // (H // K)). A query at index i may attend to a key at index j
iff (not causal or j <= i) and (no segment ids or q_segment_ids[i] == kv_segment_ids[j]).
A query with no key to attend to gets a zero output. Scores and softmax are float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attention_mask(q_len: int, kv_len: int, causal: bool, q_segment_ids=None, kv_segment_ids=None):
    """(B or 1, L, S) bool: may query i attend to key j."""
    mask = jnp.ones((1, q_len, kv_len), bool)
    if causal:
        mask = mask & (jnp.arange(kv_len)[None, None, :] <= jnp.arange(q_len)[None, :, None])
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def attention_reference(q, k, v, *, causal: bool = True, q_segment_ids=None, kv_segment_ids=None,
                        sm_scale: float | None = None) -> jax.Array:
    """Attention output (B, L, H, Dh) in q.dtype (see module docstring)."""
    B, L, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    scale = 1.0 / math.sqrt(Dh) if sm_scale is None else sm_scale
    if q_segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    qg = q.reshape(B, L, K, G, Dh)
    s = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32) * scale  # (B, K, G, L, S)
    mask = attention_mask(L, S, causal, q_segment_ids, kv_segment_ids)[:, None, None]  # (B, 1, 1, L, S)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))  # exactly 0 where masked
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgls,bskd->blkgd", p, v.astype(jnp.float32))
    return out.reshape(B, L, H, Dh).astype(q.dtype)
