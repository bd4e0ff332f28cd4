"""The tile-level matmul every kernel here uses (GPU and TPU, attention and matmul)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def block_dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """a @ b on tiles (optionally transposed operands), float32 accumulation. float32 inputs ask
    for full precision so the float32 tolerance is float32's, not TF32's."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
