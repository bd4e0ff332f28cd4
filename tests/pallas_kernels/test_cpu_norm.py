"""The C++ LayerNorm / RMSNorm kernel (pallas_kernels/cpu/norm.cc, model.norm_impl=cpu): output
and gradients (x, scale, bias) equal model.layers.normalize's to float32 rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.layers import normalize
from pallas_kernels.cpu import cpu_normalize

pytestmark = pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the XLA:CPU kernel")


@pytest.mark.parametrize("shape", [(12, 64, 128), (5, 16), (3, 7, 48)])  # rows: many blocks, one, ragged
@pytest.mark.parametrize("center, with_bias", [(True, True), (True, False), (False, False)])
def test_matches_normalize(shape, center, with_bias):
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(3.0 + 2.0 * rng.standard_normal(shape), jnp.float32)  # an offset, as residual streams have
    D = shape[-1]
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(D), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal(D), jnp.float32) if with_bias else None
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    np.testing.assert_allclose(jax.jit(cpu_normalize, static_argnums=(3, 4))(x, scale, bias, 1e-5, center),
                               normalize(x, scale, bias, 1e-5, center), rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b, 1e-5, center)) * w)

    args = (x, scale, bias)
    argnums = (0, 1, 2) if with_bias else (0, 1)
    got = jax.jit(jax.grad(loss(cpu_normalize), argnums=argnums))(*args)
    ref = jax.grad(loss(normalize), argnums=argnums)(*args)
    for name, g, r in zip(("dx", "dscale", "dbias"), got, ref):
        # dscale / dbias sum over every row: float32 sums of up to 768 terms
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=name)


def test_unsupported_width_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="needs d_model a multiple of 16, not 24"):
        cpu_normalize(jnp.ones((4, 24)), jnp.ones(24), None, 1e-5, True)
    with pytest.raises(ValueError, match="do not match the last axis"):
        cpu_normalize(jnp.ones((4, 32)), jnp.ones(16), None, 1e-5, True)
