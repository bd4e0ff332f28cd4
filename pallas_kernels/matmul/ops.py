"""`matmul`: the public, differentiable tiled matmul (float32 accumulation).

    y = matmul(x, w)        # x (..., K), w (K, N) -> (..., N) in x.dtype

Leading dims of x are flattened into M; M, N and K are zero-padded up to the tiles (zeros add
nothing to the products) and the result is sliced back, so any shape runs. The backward
(`custom_vjp`) runs the same kernel: dx = g @ w^T, dw = x^T @ g.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.matmul import gpu, tpu
from pallas_kernels.matmul.blocks import MatmulBlockSizes

_BACKENDS = {"gpu": gpu, "tpu": tpu}
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def matmul(x, w, *, block_sizes: MatmulBlockSizes | None = None, backend: str | None = None) -> jax.Array:
    """x (..., K) @ w (K, N) -> (..., N) in x.dtype; bfloat16 or float32 inputs of one dtype,
    float32 accumulation. `backend`: 'gpu' / 'tpu' / None = the device's (pallas_kernels/platform.py)."""
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"matmul needs x (..., K) and w (K, N) with matching K; got {x.shape=}, {w.shape=}")
    if x.dtype != w.dtype or x.dtype not in DTYPES:
        raise ValueError(f"matmul needs x and w of one dtype, bfloat16 or float32; got {x.dtype} and {w.dtype}")
    backend, interpret = platform.resolve(backend)
    static = (block_sizes or MatmulBlockSizes.default(backend), backend, platform.interpret_arg(backend, interpret))
    lead = x.shape[:-1]
    y = _matmul(x.reshape(-1, x.shape[-1]), w, static)
    return y.reshape(*lead, w.shape[1])


def _pad_to(x, rows: int, cols: int):
    pr, pc = -x.shape[0] % rows, -x.shape[1] % cols
    return jnp.pad(x, ((0, pr), (0, pc))) if (pr or pc) else x


def _run(a, b, static):
    """(M, K) @ (K, N) on the kernel, padding to whole tiles."""
    blocks, backend, interpret = static
    (M, K), N = a.shape, b.shape[1]
    blocks = blocks.clipped(M, N, K)
    a_p = _pad_to(a, blocks.block_m, blocks.block_k)
    b_p = _pad_to(b, blocks.block_k, blocks.block_n)
    out = _BACKENDS[backend].matmul(a_p, b_p, out_dtype=a.dtype, blocks=blocks, interpret=interpret)
    return out[:M, :N] if out.shape != (M, N) else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(a, b, static):
    return _run(a, b, static)


def _matmul_fwd(a, b, static):
    return _run(a, b, static), (a, b)


def _matmul_bwd(static, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)
    return _run(g, b.T, static), _run(a.T, g, static)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
