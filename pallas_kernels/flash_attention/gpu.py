"""Flash attention on GPUs: Pallas kernels lowered through Triton.

Layout (B, L, H, Dh) as the model holds it, so no transposes: a program handles one (query
block or key block, batch row, query head) and reads its key/value head h // G straight from
the grouped tensor. Softmax runs in base 2 (exp2 is one instruction) on scores pre-multiplied
by log2(e); the saved log-sum-exp is in natural-log units, as the reference defines it.

Forward: grid (L/bq, B, H); online softmax over key blocks (FlashAttention-2), causal programs
stop at the diagonal, mask only the blocks that straddle it, and launch longest rows first.
Backward: delta = rowsum(dO * O) in XLA, then a dK/dV kernel (grid (S/bk, B, H), a key block
loops over the query blocks that see it) and a dQ kernel (grid (L/bq, B, H)). With grouped
heads, dK/dV come out per query head in float32 and ops.py sums each group.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.common import NEG_INF, tile_mask
from pallas_kernels.tiles import block_dot

LOG2E = math.log2(math.e)


def _warps(num_warps, head_dim: int) -> int:
    return num_warps or (4 if head_dim <= 64 else 8)


def _compiler_params(num_warps, num_stages, head_dim):
    return plgpu.CompilerParams(num_warps=_warps(num_warps, head_dim), num_stages=num_stages or 2)


def _query_block(i, n_q_blocks: int, causal: bool):
    """Grid index -> query block. Causal programs launch the longest rows (last query blocks,
    which see the most keys) first, so the short ones fill the GPU's tail instead of long ones."""
    return n_q_blocks - 1 - i if causal else i


def _causal_split(q_start, block_q, block_k, n_kv_blocks):
    """Key blocks [0, n_full) lie wholly at or below the diagonal of a query block starting at
    q_start (no causal mask needed); [n_full, n_end) straddle it; later blocks are skipped."""
    n_full = q_start // block_k
    n_end = jnp.minimum(lax.div(q_start + block_q + block_k - 1, block_k), n_kv_blocks)
    return n_full, n_end


def _forward_kernel(*refs, causal, segmented, scale2, block_q, block_k, n_kv_blocks, n_q_blocks):
    if segmented:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qseg_ref, kseg_ref = refs, None, None
    q_start = _query_block(pl.program_id(0), n_q_blocks, causal) * block_q
    q = q_ref[...]  # (bq, Dh)
    q_seg = qseg_ref[...] if segmented else None

    def body(j, carry, diagonal: bool):
        acc, m, l = carry
        ks = pl.ds(j * block_k, block_k)
        s = block_dot(q, k_ref[ks, :], trans_b=True) * scale2  # (bq, bk), log2 units
        mask = tile_mask(q_start, j * block_k, block_q, block_k, causal and diagonal, q_seg,
                         kseg_ref[ks] if segmented else None)
        if mask is not None:
            s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # a row with nothing visible yet stays at 0
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + block_dot(p.astype(v.dtype), v)
        return acc, m_new, l

    Dh = q.shape[-1]
    carry = (jnp.zeros((block_q, Dh), jnp.float32), jnp.full((block_q,), NEG_INF, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    if causal:
        n_full, n_end = _causal_split(q_start, block_q, block_k, n_kv_blocks)
        carry = lax.fori_loop(0, n_full, functools.partial(body, diagonal=False), carry)
        carry = lax.fori_loop(n_full, n_end, functools.partial(body, diagonal=True), carry)
    else:
        carry = lax.fori_loop(0, n_kv_blocks, functools.partial(body, diagonal=False), carry)
    acc, m, l = carry
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, NEG_INF, (m + jnp.log2(jnp.where(empty, 1.0, l))) / LOG2E)


def _seg_specs(segmented, q_spec, kv_spec):
    return [q_spec, kv_spec] if segmented else []


def check_triton_sizes(head_dim: int, blocks) -> None:
    """Triton tiles are powers of two of at least 16 elements: name the size that is not."""
    for name, size in (("head dim", head_dim), *dataclasses.asdict(blocks).items()):
        if name.startswith("num_") or size is None:
            continue
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16 for the GPU (Triton) kernels "
                             f"(block sizes are clipped to the sequence length)")


def forward(q, k, v, q_seg, kv_seg, *, causal, sm_scale, blocks, interpret):
    """(out (B, L, H, Dh) in q.dtype, lse (B, H, L) float32)."""
    B, L, H, Dh = q.shape
    check_triton_sizes(Dh, blocks)
    S, K = k.shape[1], k.shape[2]
    G = H // K
    bq, bk = blocks.block_q, blocks.block_k
    segmented = q_seg is not None
    kernel = functools.partial(_forward_kernel, causal=causal, segmented=segmented, scale2=sm_scale * LOG2E,
                               block_q=bq, block_k=bk, n_kv_blocks=S // bk, n_q_blocks=L // bq)
    qb = functools.partial(_query_block, n_q_blocks=L // bq, causal=causal)
    in_specs = [
        pl.BlockSpec((None, bq, None, Dh), lambda i, b, h: (b, qb(i), h, 0)),
        pl.BlockSpec((None, S, None, Dh), lambda i, b, h: (b, 0, h // G, 0)),
        pl.BlockSpec((None, S, None, Dh), lambda i, b, h: (b, 0, h // G, 0)),
        *_seg_specs(segmented, pl.BlockSpec((None, bq), lambda i, b, h: (b, qb(i))),
                    pl.BlockSpec((None, S), lambda i, b, h: (b, 0))),
    ]
    out_specs = [pl.BlockSpec((None, bq, None, Dh), lambda i, b, h: (b, qb(i), h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qb(i)))]
    args = (q, k, v) + ((q_seg, kv_seg) if segmented else ())
    return pl.pallas_call(
        kernel, grid=(L // bq, B, H), in_specs=in_specs, out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, L), jnp.float32)],
        compiler_params=_compiler_params(blocks.num_warps, blocks.num_stages, Dh),
        interpret=interpret, name="jaxlm_flash_attention_fwd",
    )(*args)


def _dkdv_kernel(*refs, causal, segmented, sm_scale, block_q, block_k, n_q_blocks):
    if segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), qseg_ref, kseg_ref = refs, None, None
    k_start = pl.program_id(0) * block_k
    k = k_ref[...]  # (bk, Dh)
    v = v_ref[...]
    kv_seg = kseg_ref[...] if segmented else None
    scale2 = sm_scale * LOG2E

    def body(i, carry, diagonal: bool):
        dk, dv = carry
        qs = pl.ds(i * block_q, block_q)
        q = q_ref[qs, :]
        do = do_ref[qs, :]
        s = block_dot(q, k, trans_b=True) * scale2  # (bq, bk)
        mask = tile_mask(i * block_q, k_start, block_q, block_k, causal and diagonal,
                         qseg_ref[qs] if segmented else None, kv_seg)
        if mask is not None:
            s = jnp.where(mask, s, NEG_INF)
        lse2 = lse_ref[qs] * LOG2E
        p = jnp.exp2(s - jnp.where(lse2 == NEG_INF, 0.0, lse2)[:, None])  # (bq, bk) probabilities
        dv = dv + block_dot(p.astype(do.dtype), do, trans_a=True)
        dp = block_dot(do, v, trans_b=True)  # (bq, bk)
        ds = p * (dp - delta_ref[qs][:, None])
        dk = dk + block_dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    Dh = k.shape[-1]
    carry = (jnp.zeros((block_k, Dh), jnp.float32), jnp.zeros((block_k, Dh), jnp.float32))
    if causal:
        # Query blocks before k_start // block_q see none of this key block; those from
        # first_full on see all of it.
        start = k_start // block_q
        first_full = jnp.minimum(lax.div(k_start + block_k + block_q - 1, block_q), n_q_blocks)
        carry = lax.fori_loop(start, first_full, functools.partial(body, diagonal=True), carry)
        carry = lax.fori_loop(first_full, n_q_blocks, functools.partial(body, diagonal=False), carry)
    else:
        carry = lax.fori_loop(0, n_q_blocks, functools.partial(body, diagonal=False), carry)
    dk, dv = carry
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, causal, segmented, sm_scale, block_q, block_k, n_kv_blocks, n_q_blocks):
    if segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), qseg_ref, kseg_ref = refs, None, None
    q_start = _query_block(pl.program_id(0), n_q_blocks, causal) * block_q
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...] * LOG2E
    lse2 = jnp.where(lse2 == NEG_INF, 0.0, lse2)
    delta = delta_ref[...]
    q_seg = qseg_ref[...] if segmented else None
    scale2 = sm_scale * LOG2E

    def body(j, dq, diagonal: bool):
        ks = pl.ds(j * block_k, block_k)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        s = block_dot(q, k, trans_b=True) * scale2
        mask = tile_mask(q_start, j * block_k, block_q, block_k, causal and diagonal, q_seg,
                         kseg_ref[ks] if segmented else None)
        if mask is not None:
            s = jnp.where(mask, s, NEG_INF)
        p = jnp.exp2(s - lse2[:, None])
        dp = block_dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + block_dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    if causal:
        n_full, n_end = _causal_split(q_start, block_q, block_k, n_kv_blocks)
        dq = lax.fori_loop(0, n_full, functools.partial(body, diagonal=False), dq)
        dq = lax.fori_loop(n_full, n_end, functools.partial(body, diagonal=True), dq)
    else:
        dq = lax.fori_loop(0, n_kv_blocks, functools.partial(body, diagonal=False), dq)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, out, lse, do, *, causal, sm_scale, blocks, interpret):
    """(dq (B, L, H, Dh) in q.dtype, dk, dv (B, S, H, Dh): per query head, float32 when heads are
    grouped (ops.py sums each group), else in k.dtype)."""
    B, L, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    segmented = q_seg is not None
    delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))  # (B, H, L)
    params = _compiler_params(blocks.num_warps_bwd, blocks.num_stages_bwd, Dh)
    args = (q, k, v, do, lse, delta) + ((q_seg, kv_seg) if segmented else ())
    kv_dtype = k.dtype if G == 1 else jnp.float32

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    full_q = pl.BlockSpec((None, L, None, Dh), lambda j, b, h: (b, 0, h, 0))
    full_row = pl.BlockSpec((None, None, L), lambda j, b, h: (b, h, 0))
    kv_block = pl.BlockSpec((None, bk, None, Dh), lambda j, b, h: (b, j, h // G, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, causal=causal, segmented=segmented, sm_scale=sm_scale, block_q=bq,
                          block_k=bk, n_q_blocks=L // bq),
        grid=(S // bk, B, H),
        in_specs=[full_q, kv_block, kv_block, full_q, full_row, full_row,
                  *_seg_specs(segmented, pl.BlockSpec((None, L), lambda j, b, h: (b, 0)),
                              pl.BlockSpec((None, bk), lambda j, b, h: (b, j)))],
        out_specs=[pl.BlockSpec((None, bk, None, Dh), lambda j, b, h: (b, j, h, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((B, S, H, Dh), kv_dtype)] * 2,
        compiler_params=params, interpret=interpret, name="jaxlm_flash_attention_dkdv",
    )(*args)

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    qb = functools.partial(_query_block, n_q_blocks=L // bq, causal=causal)
    q_block = pl.BlockSpec((None, bq, None, Dh), lambda i, b, h: (b, qb(i), h, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qb(i)))
    full_kv = pl.BlockSpec((None, S, None, Dh), lambda i, b, h: (b, 0, h // G, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, causal=causal, segmented=segmented, sm_scale=sm_scale, block_q=bq,
                          block_k=bk, n_kv_blocks=S // bk, n_q_blocks=L // bq),
        grid=(L // bq, B, H),
        in_specs=[q_block, full_kv, full_kv, q_block, row_block, row_block,
                  *_seg_specs(segmented, pl.BlockSpec((None, bq), lambda i, b, h: (b, qb(i))),
                              pl.BlockSpec((None, S), lambda i, b, h: (b, 0)))],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="jaxlm_flash_attention_dq",
    )(*args)
    return dq, dk, dv
