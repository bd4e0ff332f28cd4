"""Flash attention on TPUs: Mosaic kernels with VMEM block specs.

Mosaic tiles the last two dims of every block, so the kernels work on head-major tensors
(B, H, L, Dh) / (B, K, S, Dh), transposed once in XLA. The key-block loop is the innermost grid
axis ('arbitrary', it carries the softmax state in VMEM scratch); the others are 'parallel'.
Causal programs skip the compute of blocks above the diagonal (`pl.when`) and their index maps
clamp the key block so Mosaic does not fetch it. Segment ids ride as (B, L, 1) for queries and
(B, 1, S) for keys so each block is a column / row that broadcasts to the (bq, bk) score tile.

Backward: a dK/dV kernel (grid (B, H, S/bk, L/bq), query blocks innermost) and a dQ kernel
(grid (B, H, L/bq, S/bk)); per-query-head dK/dV, summed per group in ops.py as on the GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.common import NEG_INF, tile_mask
from pallas_kernels.tiles import block_dot

PARALLEL, ARBITRARY = "parallel", "arbitrary"


def _visible(q_start, k_start, block_q, causal):
    """Does any query of the block starting at q_start see any key of the block starting at k_start?"""
    return (k_start <= q_start + block_q - 1) if causal else True


def _forward_kernel(*refs, causal, segmented, sm_scale, block_q, block_k):
    if segmented:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    i, j = pl.program_id(2), pl.program_id(3)
    q_start, k_start = i * block_q, j * block_k

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_visible(q_start, k_start, block_q, causal))
    def _compute():
        s = block_dot(q_ref[...], k_ref[...], trans_b=True) * sm_scale  # (bq, bk)
        mask = tile_mask(q_start, k_start, block_q, block_k, causal,
                         qseg_ref[...] if segmented else None, kseg_ref[...] if segmented else None)
        if mask is not None:
            s = jnp.where(mask, s, NEG_INF)
        m_prev = m_scr[...]  # (bq, 1)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_scr[...] = l_scr[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_scr[...] = acc_scr[...] * alpha + block_dot(p.astype(v.dtype), v)
        m_scr[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        empty = l == 0.0
        o_ref[...] = (acc_scr[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, NEG_INF, m_scr[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _last_visible_k_block(i, block_q, block_k):
    return (i * block_q + block_q - 1) // block_k


def _first_visible_q_block(j, block_q, block_k):
    return (j * block_k) // block_q


def _head_major(q, k, v):
    return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _segments(q_seg, kv_seg):
    return q_seg[:, :, None], kv_seg[:, None, :]  # (B, L, 1), (B, 1, S)


def forward(q, k, v, q_seg, kv_seg, *, causal, sm_scale, blocks, interpret):
    """(out (B, L, H, Dh) in q.dtype, lse (B, H, L) float32)."""
    B, L, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    bq, bk = blocks.block_q, blocks.block_k
    segmented = q_seg is not None
    qt, kt, vt = _head_major(q, k, v)

    def kv_index(b, h, i, j):
        if causal:  # blocks past the diagonal are not computed: re-point them at the last one used
            j = jnp.minimum(j, _last_visible_k_block(i, bq, bk))
        return (b, h // G, j, 0)

    in_specs = [pl.BlockSpec((None, None, bq, Dh), lambda b, h, i, j: (b, h, i, 0)),
                pl.BlockSpec((None, None, bk, Dh), kv_index),
                pl.BlockSpec((None, None, bk, Dh), kv_index)]
    args = [qt, kt, vt]
    if segmented:
        in_specs += [pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, kv_index(b, h, i, j)[2]))]
        args += list(_segments(q_seg, kv_seg))
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, causal=causal, segmented=segmented, sm_scale=sm_scale,
                          block_q=bq, block_k=bk),
        grid=(B, H, L // bq, S // bk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, Dh), lambda b, h, i, j: (b, h, i, 0)),
                   pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, L, Dh), q.dtype), jax.ShapeDtypeStruct((B, H, L, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, Dh), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=(PARALLEL, PARALLEL, PARALLEL, ARBITRARY)),
        interpret=interpret, name="jaxlm_flash_attention_fwd_tpu",
    )(*args)
    return out.transpose(0, 2, 1, 3), lse[..., 0]


def _probs_and_dscores(q, k, v, do, lse, delta, mask, sm_scale):
    """Recompute p from the saved log-sum-exp and ds = p * (dO v^T - delta), both (bq, bk)."""
    s = block_dot(q, k, trans_b=True) * sm_scale
    if mask is not None:
        s = jnp.where(mask, s, NEG_INF)
    p = jnp.exp(s - jnp.where(lse == NEG_INF, 0.0, lse))
    ds = p * (block_dot(do, v, trans_b=True) - delta)
    return p, ds


def _dkdv_kernel(*refs, causal, segmented, sm_scale, block_q, block_k):
    if segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    j, i = pl.program_id(2), pl.program_id(3)
    k_start, q_start = j * block_k, i * block_q

    @pl.when(i == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_visible(q_start, k_start, block_q, causal))
    def _compute():
        q, do = q_ref[...], do_ref[...]
        mask = tile_mask(q_start, k_start, block_q, block_k, causal,
                         qseg_ref[...] if segmented else None, kseg_ref[...] if segmented else None)
        p, ds = _probs_and_dscores(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], mask, sm_scale)
        dv_scr[...] += block_dot(p.astype(do.dtype), do, trans_a=True)
        dk_scr[...] += block_dot(ds.astype(q.dtype), q, trans_a=True)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, causal, segmented, sm_scale, block_q, block_k):
    if segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, dq_scr = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = refs
    i, j = pl.program_id(2), pl.program_id(3)
    q_start, k_start = i * block_q, j * block_k

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(_visible(q_start, k_start, block_q, causal))
    def _compute():
        k = k_ref[...]
        mask = tile_mask(q_start, k_start, block_q, block_k, causal,
                         qseg_ref[...] if segmented else None, kseg_ref[...] if segmented else None)
        _, ds = _probs_and_dscores(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask,
                                   sm_scale)
        dq_scr[...] += block_dot(ds.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * sm_scale).astype(dq_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, out, lse, do, *, causal, sm_scale, blocks, interpret):
    """(dq (B, L, H, Dh), dk, dv (B, S, H, Dh) per query head; float32 when heads are grouped)."""
    B, L, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    segmented = q_seg is not None
    qt, kt, vt = _head_major(q, k, v)
    dot = do.transpose(0, 2, 1, 3)
    delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))[..., None]  # (B,H,L,1)
    lse = lse[..., None]  # (B, H, L, 1)
    segs = list(_segments(q_seg, kv_seg)) if segmented else []
    kv_dtype = k.dtype if G == 1 else jnp.float32
    params = pltpu.CompilerParams(dimension_semantics=(PARALLEL, PARALLEL, PARALLEL, ARBITRARY))

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv

    def q_index(b, h, j, i):  # query blocks before the first that sees key block j are skipped
        if causal:
            i = jnp.maximum(i, _first_visible_q_block(j, bq, bk))
        return (b, h, i, 0)

    q_spec = pl.BlockSpec((None, None, bq, Dh), q_index)
    row_spec = pl.BlockSpec((None, None, bq, 1), q_index)
    kv_spec = pl.BlockSpec((None, None, bk, Dh), lambda b, h, j, i: (b, h // G, j, 0))
    seg_specs = [pl.BlockSpec((None, bq, 1), lambda b, h, j, i: (b, q_index(b, h, j, i)[2], 0)),
                 pl.BlockSpec((None, 1, bk), lambda b, h, j, i: (b, 0, j))] if segmented else []
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, causal=causal, segmented=segmented, sm_scale=sm_scale,
                          block_q=bq, block_k=bk),
        grid=(B, H, S // bk, L // bq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=[pl.BlockSpec((None, None, bk, Dh), lambda b, h, j, i: (b, h, j, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((B, H, S, Dh), kv_dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, Dh), jnp.float32), pltpu.VMEM((bk, Dh), jnp.float32)],
        compiler_params=params, interpret=interpret, name="jaxlm_flash_attention_dkdv_tpu",
    )(qt, kt, vt, dot, lse, delta, *segs)

    bq, bk = blocks.block_q_dq, blocks.block_k_dq

    def kv_index(b, h, i, j):
        if causal:
            j = jnp.minimum(j, _last_visible_k_block(i, bq, bk))
        return (b, h // G, j, 0)

    q_spec = pl.BlockSpec((None, None, bq, Dh), lambda b, h, i, j: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, Dh), kv_index)
    seg_specs = [pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
                 pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, kv_index(b, h, i, j)[2]))] if segmented else []
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, causal=causal, segmented=segmented, sm_scale=sm_scale,
                          block_q=bq, block_k=bk),
        grid=(B, H, L // bq, S // bk),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((B, H, L, Dh), q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, Dh), jnp.float32)],
        compiler_params=params, interpret=interpret, name="jaxlm_flash_attention_dq_tpu",
    )(qt, kt, vt, dot, lse, delta, *segs)
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  back to (B, L/S, H, Dh)
    return t(dq), t(dk), t(dv)
