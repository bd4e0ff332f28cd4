"""The tiled matmul kernels against the reference (float32 accumulation): outputs and gradients
(whose backward runs the same kernel), shapes that are not multiples of the tiles (padded),
float32 and bfloat16, GPU kernels interpreted on CPU and TPU kernels under TPU interpret mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matmul import MatmulBlockSizes, matmul, matmul_reference

# Written tolerances (atol = rtol) per dtype: float32 differs by summation order; bfloat16
# results are rounded to bfloat16 once, from the same float32 sums.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}

CASES = {
    # x (3, 40, 96) @ w (96, 80): M=120, N=80, K=96 are no multiples of 32 -> padded tiles;
    # group_m=2 exercises the grouped tile order over a 4 x 3 tile grid.
    "gpu-f32": (jnp.float32, "gpu", MatmulBlockSizes(32, 32, 32, group_m=2)),
    "gpu-bf16": (jnp.bfloat16, "gpu", MatmulBlockSizes(32, 32, 32, group_m=2)),
    "tpu-f32": (jnp.float32, "tpu", MatmulBlockSizes(64, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matmul_matches_reference(name):
    dtype, backend, blocks = CASES[name]
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 40, 96), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (96, 80), jnp.float32).astype(dtype)
    cot = jax.random.normal(kg, (3, 40, 80), jnp.float32)

    def run(f, x, w):
        def loss(x, w):
            y = f(x, w)
            return jnp.sum(y.astype(jnp.float32) * cot), y
        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
        return y, grads

    y, (dx, dw) = run(lambda x, w: matmul(x, w, block_sizes=blocks, backend=backend), x, w)
    ry, (rdx, rdw) = run(matmul_reference, x, w)
    tol = TOLERANCE[dtype]
    for got, want, label in ((y, ry, "y"), (dx, rdx, "dx"), (dw, rdw, "dw")):
        assert got.dtype == dtype and got.shape == want.shape, label
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol,
                                   err_msg=label)


def test_matmul_input_errors():
    with pytest.raises(ValueError, match=r"matching K; got x.shape=\(4, 8\), w.shape=\(6, 2\)"):
        matmul(jnp.zeros((4, 8)), jnp.zeros((6, 2)), backend="gpu")
    with pytest.raises(ValueError, match="one dtype, bfloat16 or float32; got bfloat16 and float32"):
        matmul(jnp.zeros((4, 8), jnp.bfloat16), jnp.zeros((8, 2)), backend="gpu")
