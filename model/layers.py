"""Building blocks of the transformer: parameter creation with logical axes, norms, MLPs, RoPE.

Shape letters: B batch, L sequence, D embed, H heads, K kv heads, Dh head dim, F mlp, V vocab.
Parameters are stored in `param_dtype` and cast to the compute dtype where they are used.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import MATMUL_IMPLS, ModelConfig


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], cfg: ModelConfig,
          std: float | None = None, value: float | None = None) -> nnx.Param:
    """A parameter annotated with its logical axes: normal(0, std) when `std` is given, else the
    constant `value` (zeros/ones for biases and norm scales)."""
    dtype = jnp.dtype(cfg.param_dtype)
    if std is not None:
        x = std * jax.random.normal(rngs.params(), shape, dtype)
    else:
        x = jnp.full(shape, value, dtype)
    return nnx.Param(x, out_sharding=axes)


def dense(x: jax.Array, w: jax.Array, impl: str = "xla", contract: int = 1) -> jax.Array:
    """Contract the last `contract` dims of x with the first of w: (..., *in) x (*in, *out) -> (..., *out).

    `impl` is `ModelConfig.matmul`: 'xla' (jnp), 'pallas' (the tiled kernel of
    pallas_kernels.matmul, float32 accumulation) or 'cpu' (jnp, with the weight gradient in
    pallas_kernels.cpu's C++ kernel).

    Both multiply 2-D operands, x as (tokens, in) and w as (in, out), so the weight gradient x^T dy
    contracts one axis, which XLA:CPU's matmul takes as it is; the (B, L) pair of a 3-D x it first
    copies into a transposed 2-D buffer (issue 7)."""
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"model.matmul={impl!r} is not one of {', '.join(MATMUL_IMPLS)}")
    lead, out = x.shape[:x.ndim - contract], w.shape[contract:]
    k = math.prod(w.shape[:contract])
    x2, w2 = x.reshape(math.prod(lead), k), w.reshape(k, math.prod(out))
    if impl == "xla":
        y = jnp.dot(x2, w2)
    elif impl == "cpu":
        from pallas_kernels.cpu import cpu_matmul

        y = cpu_matmul(x2, w2)
    else:
        from pallas_kernels.matmul import matmul

        y = matmul(x2, w2)
    return y.reshape(*lead, *out)


def adapted(module: nnx.Module, weight: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """`y` = x applied to `module.<weight>`, plus that weight's LoRA update when an adapter is
    attached to it (model/lora.py: `<weight>_lora`); `y` itself otherwise."""
    adapter = getattr(module, weight + "_lora", None)
    return y if adapter is None else y + adapter(x)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None (evaluation) or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def gelu_exact(x: jax.Array) -> jax.Array:
    """x * Phi(x) with the erf form, 0.5 x (1 + erf(x / sqrt 2)), as PyTorch computes it.

    Same function as jax.nn.gelu(approximate=False), which uses erfc; XLA:CPU expands erfc into
    two exponential/select branches, forward and backward, and erf into one polynomial."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class Norm(nnx.Module):
    """LayerNorm (GPT-2: scale and optional bias) or RMSNorm (Llama: scale only), statistics in float32."""

    def __init__(self, cfg: ModelConfig):
        self.kind, self.eps, self.impl = cfg.norm, cfg.norm_eps, cfg.norm_impl
        self.scale = param(None, (cfg.d_model,), ("embed",), cfg, value=1.0)
        self.bias = param(None, (cfg.d_model,), ("embed",), cfg, value=0.0) if (
            cfg.norm == "layernorm" and cfg.bias) else None

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, D) -> (B, L, D)
        bias = None if self.bias is None else self.bias[...].astype(jnp.float32)
        if self.impl == "cpu":
            from pallas_kernels.cpu import cpu_normalize as norm_fn
        else:
            norm_fn = normalize
        y = norm_fn(x.astype(jnp.float32), self.scale[...].astype(jnp.float32), bias, self.eps,
                    self.kind == "layernorm")
        return y.astype(x.dtype)


def _normalize_fwd(x, scale, bias, eps, center):
    if center:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    y = xhat * scale
    if bias is not None:
        y = y + bias
    return y, (xhat, rstd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x, scale, bias, eps: float, center: bool):
    """LayerNorm (`center`) or RMSNorm of float32 x over its last axis, then `* scale (+ bias)`.

    The backward is the closed form (as PyTorch's native layer norm has it), one pass over the
    rows: dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy scale (no mean(g) term for RMSNorm).
    XLA's own derivative of the forward differs only in float32 rounding but takes more passes
    over the activations on CPU (issue 7)."""
    return _normalize_fwd(x, scale, bias, eps, center)[0]


def _normalize_vjp_fwd(x, scale, bias, eps, center):
    y, (xhat, rstd) = _normalize_fwd(x, scale, bias, eps, center)
    return y, (xhat, rstd, scale, bias)  # bias: only whether there is one matters


def _normalize_vjp_bwd(eps, center, res, dy):
    xhat, rstd, scale, bias = res
    rows = tuple(range(dy.ndim - 1))
    g = dy * scale
    inner = g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    if center:
        inner = inner - jnp.mean(g, axis=-1, keepdims=True)
    dbias = None if bias is None else dy.sum(rows)
    return rstd * inner, (dy * xhat).sum(rows), dbias


normalize.defvjp(_normalize_vjp_fwd, _normalize_vjp_bwd)


class MLP(nnx.Module):
    """GPT-2's GELU MLP (D -> F -> D) or Llama's SwiGLU (silu(x W_gate) * (x W_up)) W_down."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.ff_dim
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.kind, self.compute_dtype = cfg.mlp, jnp.dtype(cfg.compute_dtype)
        self.matmul = cfg.matmul
        self.gelu_approximate = cfg.gelu_approximate
        if cfg.mlp == "swiglu":
            self.w_gate = param(rngs, (D, F), ("embed", "mlp"), cfg, std=std)
        self.w_up = param(rngs, (D, F), ("embed", "mlp"), cfg, std=std)
        self.w_down = param(rngs, (F, D), ("mlp", "embed"), cfg, std=out_std)
        self.b_up = param(None, (F,), ("mlp",), cfg, value=0.0) if cfg.bias else None
        self.b_gate = param(None, (F,), ("mlp",), cfg, value=0.0) if cfg.bias and cfg.mlp == "swiglu" else None
        self.b_down = param(None, (D,), ("embed",), cfg, value=0.0) if cfg.bias else None

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, D) -> (B, L, D)
        c = self.compute_dtype
        h = adapted(self, "w_up", x, dense(x, self.w_up[...].astype(c), self.matmul))  # (B, L, F)
        if self.b_up is not None:
            h = h + self.b_up[...].astype(c)
        if self.kind == "swiglu":
            g = adapted(self, "w_gate", x, dense(x, self.w_gate[...].astype(c), self.matmul))
            if self.b_gate is not None:
                g = g + self.b_gate[...].astype(c)
            h = jax.nn.silu(g) * h
        elif self.gelu_approximate:
            h = jax.nn.gelu(h, approximate=True)  # tanh GELU, as Hugging Face GPT-2 ("gelu_new")
        else:
            h = gelu_exact(h)  # exact erf GELU, as GPT-2 / nanoGPT (torch default)
        y = adapted(self, "w_down", h, dense(h, self.w_down[...].astype(c), self.matmul))  # (B, L, D)
        if self.b_down is not None:
            y = y + self.b_down[...].astype(c)
        return y


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, Llama's "rotate half" layout (as Hugging Face implements it).

    x: (B, L, N, Dh); positions: (B, L) int32. Angles are computed in float32.
    """
    Dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))  # (Dh/2,)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # (B, L, Dh/2)
    cos = jnp.cos(angles)[:, :, None, :]  # (B, L, 1, Dh/2)
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
