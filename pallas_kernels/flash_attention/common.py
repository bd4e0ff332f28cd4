"""Pieces the GPU and TPU flash-attention kernels share: the tile mask and the
shape checks whose errors name the offending sizes."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

NEG_INF = float("-inf")


def tile_mask(q_start, k_start, block_q: int, block_k: int, causal: bool, q_seg=None, kv_seg=None):
    """(block_q, block_k) bool for the tile whose first query/key indices are q_start/k_start,
    or None when nothing in it is masked. q_seg: (block_q, 1) or (block_q,); kv_seg: (1, block_k) or (block_k,)."""
    mask = None
    if causal:
        q_idx = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        k_idx = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        mask = k_idx <= q_idx
    if q_seg is not None:
        qs = q_seg if q_seg.ndim == 2 else q_seg[:, None]
        ks = kv_seg if kv_seg.ndim == 2 else kv_seg[None, :]
        seg = qs == ks
        mask = seg if mask is None else mask & seg
    return mask


def check_shapes(q, k, v, q_segment_ids, kv_segment_ids, blocks) -> None:
    """Raise ValueError naming the sizes that do not fit together (or do not fit the blocks)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, L, H, Dh) / (B, S, K, Dh); got {q.shape=}, {k.shape=}, {v.shape=}")
    B, L, H, Dh = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape=}, {v.shape=}")
    Bk, S, K, Dhk = k.shape
    if Bk != B:
        raise ValueError(f"batch sizes differ: q has B={B}, k and v have B={Bk}")
    if Dhk != Dh:
        raise ValueError(f"head dims differ: q has Dh={Dh}, k and v have Dh={Dhk}")
    if H % K:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads K={K}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        if q_segment_ids.shape != (B, L):
            raise ValueError(f"q_segment_ids.shape={q_segment_ids.shape} must be (B, L)={(B, L)}")
        if kv_segment_ids.shape != (B, S):
            raise ValueError(f"kv_segment_ids.shape={kv_segment_ids.shape} must be (B, S)={(B, S)}")
    for name, size, block in (("L", L, blocks.block_q), ("S", S, blocks.block_k), ("L", L, blocks.block_q_dkv),
                              ("S", S, blocks.block_k_dkv), ("L", L, blocks.block_q_dq),
                              ("S", S, blocks.block_k_dq)):
        if size % block:
            raise ValueError(f"sequence length {name}={size} must be a multiple of its block size {block} "
                             f"(block sizes {blocks})")
