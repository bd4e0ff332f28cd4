"""Tiled matmul on TPUs: a Mosaic kernel with VMEM blocks.

Grid (M/bm, N/bn, K/bk); the K axis is innermost and 'arbitrary': each step adds one
(bm, bk) @ (bk, bn) product to a float32 VMEM accumulator, written out (cast) at the last step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tiles import block_dot


def _kernel(a_ref, b_ref, o_ref, acc_ref):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    acc_ref[...] += block_dot(a_ref[...], b_ref[...])

    @pl.when(kk == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def matmul(a, b, *, out_dtype, blocks, interpret):
    """(M, K) @ (K, N) -> (M, N) with M, N, K multiples of the blocks."""
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    return pl.pallas_call(
        functools.partial(_kernel),
        grid=(M // bm, N // bn, K // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="jaxlm_matmul_tpu",
    )(a, b)
