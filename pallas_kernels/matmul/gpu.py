"""Tiled matmul on GPUs through Pallas' Triton lowering.

One program per (block_m, block_n) output tile; it walks K in block_k steps, accumulating in
float32 registers, then casts once. Programs are launched in groups of `group_m` tile rows that
sweep the tile columns together, so B's column tiles are reused from L2 (Triton's matmul tutorial).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tiles import block_dot


def _kernel(a_ref, b_ref, o_ref, *, block_k: int, n_k: int):
    def body(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
        return acc + block_dot(a_ref[:, ks], b_ref[ks, :])

    acc = lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _tile(p, n_m: int, n_n: int, group_m: int):
    """Program id -> (tile row, tile column) in grouped order."""
    per_group = group_m * n_n
    first_m = (p // per_group) * group_m
    size = jnp.minimum(n_m - first_m, group_m)
    return first_m + (p % per_group) % size, (p % per_group) // size


def matmul(a, b, *, out_dtype, blocks, interpret):
    """(M, K) @ (K, N) -> (M, N) with M, N, K multiples of the blocks."""
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    n_m, n_n = M // bm, N // bn
    tile = functools.partial(_tile, n_m=n_m, n_n=n_n, group_m=blocks.group_m)
    return pl.pallas_call(
        functools.partial(_kernel, block_k=bk, n_k=K // bk),
        grid=(n_m * n_n,),
        in_specs=[pl.BlockSpec((bm, K), lambda p: (tile(p)[0], 0)),
                  pl.BlockSpec((K, bn), lambda p: (0, tile(p)[1]))],
        out_specs=pl.BlockSpec((bm, bn), lambda p: tile(p)),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret, name="jaxlm_matmul",
    )(a, b)
