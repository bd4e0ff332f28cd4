"""int8 weight-only quantization with per-output-channel scales, chosen at load time.

    params = nnx.to_pure_dict(nnx.state(model))
    q = quantize_params(params)                 # matrices -> QTensor(int8 values, float32 scales)
    weight_bytes(q) / weight_bytes(params)      # ~0.25-0.26
    dequantize_params(q)                        # float32 again (inside a jitted function)

Every matrix W is stored as round(W / s) in int8 with one scale s = max|W| / 127 per output
channel (the max runs over the contraction axes, so each output column keeps its own range);
vectors (norm scales, biases) stay float32. The sampler keeps the int8 tree on the device and
dequantizes inside its compiled program, at the top of each generate call, so weights at rest
take a quarter of the float32 memory; activations and the KV cache stay in the compute dtype.

Contraction axes per parameter (jaxlm layouts, L = layers axis): token and position embeddings
(V, D) / (S, D) are rows looked up and, tied, the output head contracting D: one scale per row.
wq/wk/wv (L, D, N, Dh), w_up/w_gate (L, D, F), w_down (L, F, D): contract axis 1.
wo (L, H, Dh, D): contracts axes 1 and 2. lm_head (D, V): contracts axis 0.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZE_MODES = ("none", "int8")

# Contraction axes by parameter name; every other matrix contracts axis 1. Read-only.
_CONTRACT = types.MappingProxyType({"embed": (1,), "pos_embed": (1,), "lm_head": (0,), "wo": (1, 2)})


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QTensor:
    """int8 values and float32 scales (size 1 on the contraction axes) of one weight matrix."""

    q: jax.Array
    scale: jax.Array

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return self.q.astype(dtype) * self.scale.astype(dtype)


def quantize_array(w, axes: tuple[int, ...]) -> QTensor:
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QTensor(q, scale.astype(jnp.float32))


def quantize_params(params: dict) -> dict:
    """A pure-dict parameter tree with every matrix (ndim >= 2) replaced by a QTensor."""
    def visit(tree, name):
        if isinstance(tree, dict):
            return {k: visit(v, k) for k, v in tree.items()}
        if getattr(tree, "ndim", 0) >= 2:
            return quantize_array(tree, _CONTRACT.get(name, (1,)))
        return tree

    return visit(params, "")


def is_quantized(params) -> bool:
    return any(isinstance(x, QTensor) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor)))


def dequantize_params(params, dtype=jnp.float32):
    """Float parameters from a (possibly) quantized tree; float leaves pass through."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QTensor) else x, params,
                        is_leaf=lambda x: isinstance(x, QTensor))


def weight_bytes(params) -> int:
    """Bytes the parameter tree holds (int8 values and their scales counted)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def prepare(params: dict, mode: str | None) -> dict:
    """Parameters as the sampler should hold them for `mode` ("none"/None or "int8")."""
    if mode in (None, "none"):
        return params
    if mode == "int8":
        return quantize_params(params)
    raise ValueError(f"quantize={mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
