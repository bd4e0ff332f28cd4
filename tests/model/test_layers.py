"""Layer functions that replace a library call for speed compute the same function."""

import jax
import jax.numpy as jnp
import numpy as np

from model.layers import dense, gelu_exact


def test_gelu_exact_equals_jax_exact_gelu_in_value_and_gradient():
    x = jnp.linspace(-12.0, 12.0, 20001, dtype=jnp.float32)
    ref = jax.nn.gelu(x, approximate=False)
    # float32: the erf and erfc forms differ by rounding only (|gelu| <= 12 here)
    np.testing.assert_allclose(gelu_exact(x), ref, atol=2e-6, rtol=1e-6)
    grad = jax.vmap(jax.grad(gelu_exact))(x)
    grad_ref = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-6)
    # and it is the exact GELU, not the tanh approximation (they differ by ~1e-3 near |x| = 2)
    assert float(jnp.max(jnp.abs(gelu_exact(x) - jax.nn.gelu(x, approximate=True)))) > 1e-4


def test_dense_on_2d_operands_equals_tensordot_in_value_and_gradients():
    """dense multiplies (tokens, in) x (in, out) for XLA:CPU's sake (issue 7); the function and its
    gradients are tensordot's, to float32 rounding, for one and two contracted axes."""
    kx, kw = jax.random.split(jax.random.key(0))
    for x_shape, w_shape, contract in (((3, 8, 16), (16, 4, 5), 1), ((3, 8, 4, 5), (4, 5, 16), 2)):
        x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)

        def loss(f):
            return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

        ours = loss(lambda x, w: dense(x, w, contract=contract))
        ref = loss(lambda x, w: jnp.tensordot(x, w, axes=contract))
        np.testing.assert_allclose(dense(x, w, contract=contract), jnp.tensordot(x, w, axes=contract), rtol=1e-5, atol=1e-5)
        for g, r in zip(jax.grad(ours, argnums=(0, 1))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))
