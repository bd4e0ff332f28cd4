"""Layer functions that replace a library call for speed compute the same function."""

import jax
import jax.numpy as jnp
import numpy as np

from model.layers import gelu_exact


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
