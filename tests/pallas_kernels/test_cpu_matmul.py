"""The dense layers' C++ weight gradient (pallas_kernels/cpu/matmul.cc, model.matmul=cpu): x^T dy
equals a float64 product to float32 rounding for any shape (edges included), and `cpu_matmul`'s
gradients equal `jnp.dot`'s."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cpu import cpu_matmul, weight_gradient

pytestmark = pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the XLA:CPU kernel")


@pytest.mark.parametrize("K, M, N", [
    (384, 128, 384),   # the shakespeare_char_cpu model's q/k/v projection at half its batch
    (384, 512, 128),   # its MLP down-projection
    (7, 13, 45),       # nothing a multiple of the 8 x 32 register block
    (1, 8, 32),        # one token
    (100, 40, 70),     # full blocks and edges in both directions
])
def test_weight_gradient_is_x_transpose_dy(K, M, N):
    rng = np.random.default_rng(K + M + N)
    x, dy = rng.standard_normal((K, M)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    out = np.asarray(jax.jit(weight_gradient)(jnp.asarray(x), jnp.asarray(dy)))
    exact = x.T.astype(np.float64) @ dy.astype(np.float64)
    # float32 sums of K products of O(1) values: error grows like sqrt(K) ulps of the sum's size
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5 * np.sqrt(K))


def test_cpu_matmul_gradients_equal_jnp_dot():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((96, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 80)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((96, 80)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.tanh(f(x, w)) * c)

    np.testing.assert_allclose(jax.jit(cpu_matmul)(x, w), x @ w, rtol=1e-6, atol=1e-5)
    got = jax.jit(jax.grad(loss(cpu_matmul), argnums=(0, 1)))(x, w)
    ref = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    for name, g, r in zip(("dx", "dw"), got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bfloat16_weights_get_a_bfloat16_gradient():
    x = jnp.ones((16, 32), jnp.bfloat16)
    w = jnp.ones((32, 32), jnp.bfloat16)
    dw = jax.grad(lambda w: cpu_matmul(x, w).astype(jnp.float32).sum())(w)
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(dw.astype(jnp.float32), 16.0)


def test_bad_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"cpu_matmul: x \(4, 3\) and w \(4, 5\) are not \(N, K\) and \(K, M\)"):
        cpu_matmul(jnp.ones((4, 3)), jnp.ones((4, 5)))
