"""The matmul the kernels must equal: float32 accumulation, output in the inputs' dtype."""

from __future__ import annotations

import jax.numpy as jnp


def matmul_reference(a, b, out_dtype=None):
    """(..., K) @ (K, N) -> (..., N), accumulated in float32."""
    out = jnp.matmul(a, b, preferred_element_type=jnp.float32)
    return out.astype(out_dtype or a.dtype)
