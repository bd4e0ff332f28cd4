"""Causal self-attention with grouped-query heads, and the one dispatch to attention kernels.

Every attention computation goes through `dot_product_attention(..., impl=cfg.attention)`: `xla`
(plain jnp, runs everywhere, the default and the only one that attends over a KV cache) or a
kernel for full-sequence training attention (`pallas`, `cudnn`, `cpu`). A kernel asked to do what
it cannot, or on a device that cannot run it, is a clear error, never a silent fallback.

Masking is by positions, not by a triangle: a query attends to a key iff 0 <= key_pos <= query_pos
(empty cache slots and left padding carry -1). This one rule covers training, prefill, decoding
and ragged batches.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import adapted, dense, dropout, param, rope
from sharding.rules import is_sharded


def causal_mask(q_positions: jax.Array, kv_positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """(B, L) query positions, (B, S) key positions -> (B, L, S) bool: may query attend to key.

    segment_ids (B, L), self-attention only (S = L): packed examples, each with positions from 0; a
    query attends only to keys of its own segment, so no example sees another."""
    kv = kv_positions[:, None, :]
    mask = (kv >= 0) & (kv <= q_positions[:, :, None])
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # (B, L, L)
    return mask


@jax.custom_vjp
def softmax(scores: jax.Array) -> jax.Array:
    """`jax.nn.softmax` over the last axis, with the backward y * (g - sum(g * y)) written out.

    The row sum is an einsum (a contraction) because XLA:CPU runs the multiply-then-reduce that
    autodiff produces much slower (experiments/results.md, issue 7); same arithmetic up to float32
    rounding of the row sums.
    """
    return jax.nn.softmax(scores, axis=-1)


def _softmax_fwd(scores):
    probs = jax.nn.softmax(scores, axis=-1)
    return probs, probs


def _softmax_bwd(probs, g):
    row = jnp.einsum("...s,...s->...", g, probs)
    return (probs * (g - row[..., None]),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def xla_attention(q, k, v, mask, *, dropout_rate=0.0, dropout_key=None):
    """Reference attention in plain jnp. q: (B, L, H, Dh); k, v: (B, S, K, Dh); mask: (B, L, S).

    Grouped-query heads are handled by viewing q as (B, L, K, G, Dh) with G = H // K, so K/V are
    never repeated in memory. Scores and softmax are float32.
    """
    B, L, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    q = q.reshape(B, L, K, G, Dh)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)  # (B, K, G, L, S)
    scores = scores * (1.0 / math.sqrt(Dh))
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = softmax(scores)
    probs = dropout(probs, dropout_rate, dropout_key)
    out = jnp.einsum("bkgls,bskd->blkgd", probs.astype(v.dtype), v)  # (B, L, K, G, Dh)
    return out.reshape(B, L, H, Dh)


def pallas_attention(q, k, v, positions):
    """Flash attention (pallas_kernels) for causal self-attention. Keys left-padded with position
    -1 are excluded through segment ids (padding = segment 0, tokens = segment 1): for positions
    that increase along the sequence this is exactly `causal_mask(positions, positions)`."""
    from pallas_kernels.flash_attention import flash_attention

    segment_ids = (positions >= 0).astype(jnp.int32)  # (B, L)
    return flash_attention(q, k, v, causal=True, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)


def cpu_attention(q, k, v, positions):
    """The fused XLA:CPU kernel (pallas_kernels.cpu, C++ through the XLA FFI) for causal
    self-attention over `positions`: exactly causal_mask(positions, positions)."""
    from pallas_kernels.cpu import cpu_attention as kernel

    return kernel(q, k, v, positions, positions)


def cudnn_attention(q, k, v, positions):
    """cuDNN's fused attention through jax.nn.dot_product_attention (GPU only); causal over
    positions 0..L-1 (the training layout). Grouped-query heads are native to it."""
    del positions
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


# model.attention -> the function that computes it (the keys are config.ATTENTION_IMPLS)
_ATTENTION_FUNCTIONS = {"xla": xla_attention, "pallas": pallas_attention, "cudnn": cudnn_attention,
                        "cpu": cpu_attention}
# the kernels: full-sequence causal self-attention only (training, evaluation), never over a KV cache
KERNEL_IMPLS = ("pallas", "cudnn", "cpu")


def dot_product_attention(q, k, v, mask, *, impl: str = "xla", dropout_rate=0.0, dropout_key=None,
                          positions=None, cached: bool = False, segment_ids=None):
    """Dispatch to the configured attention implementation (see module docstring). The kernel
    implementations need `positions` (B, L) of this self-attention and no KV cache; packed
    examples (`segment_ids`, already in `mask`) only the xla path masks."""
    if impl not in _ATTENTION_FUNCTIONS:
        raise ValueError(f"model.attention={impl!r} is not available; "
                         f"choose one of {', '.join(_ATTENTION_FUNCTIONS)}")
    if impl in KERNEL_IMPLS and segment_ids is not None:
        raise ValueError(f"model.attention={impl!r} does not mask packed examples (segment_ids); "
                         "use model.attention='xla' for packed chat data")
    if impl in KERNEL_IMPLS:
        if cached or positions is None or q.shape[1] != k.shape[1]:
            raise ValueError(f"model.attention={impl!r} computes full-sequence self-attention and cannot attend "
                             "over a KV cache (sampling); sample with model.attention='xla' "
                             "(model.transformer.with_kernels(model, 'xla') keeps the parameters; "
                             "python -m infer does it)")
        if dropout_rate > 0 and dropout_key is not None:
            raise ValueError(f"model.attention={impl!r} has no attention dropout; set model.dropout=0")
        return _ATTENTION_FUNCTIONS[impl](q, k, v, positions)
    return _ATTENTION_FUNCTIONS[impl](q, k, v, mask, dropout_rate=dropout_rate, dropout_key=dropout_key)


def check_kernel_platform(cfg: ModelConfig) -> None:
    """Raise ValueError when the device cannot run cfg's attention or matmul implementation
    (cuDNN needs an NVIDIA GPU; Pallas a GPU or TPU, or JAXLM_PALLAS_INTERPRET on a CPU; the CPU
    kernels a CPU and a C++ compiler, attention a head size it is built for)."""
    from pallas_kernels import platform

    if cfg.attention == "cpu":
        from pallas_kernels.cpu import check_cpu_attention

        check_cpu_attention(cfg.head_dim)  # builds the kernel now if this machine has no cached build
    if cfg.attention == "cudnn" and platform.device_platform() != "gpu":
        raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU, but the device is "
                         f"{platform.device_platform()!r}; use model.attention='xla' (or 'pallas' on a GPU/TPU)")
    if cfg.matmul == "cpu":
        from pallas_kernels.cpu import check_cpu_matmul

        check_cpu_matmul()
    if cfg.norm_impl == "cpu":
        from pallas_kernels.cpu import check_cpu_norm

        check_cpu_norm(cfg.d_model)
    for name, value in (("model.attention", cfg.attention), ("model.matmul", cfg.matmul)):
        if value == "pallas":
            platform.check_pallas_platform(f"{name}='pallas'")


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention: projections (D -> H*Dh, K*Dh, K*Dh), RoPE, output (H*Dh -> D)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.cfg = cfg
        self.wq = param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), cfg, std=std)
        self.wk = param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), cfg, std=std)
        self.wv = param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), cfg, std=std)
        self.wo = param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), cfg, std=out_std)
        if cfg.bias:
            self.bq = param(None, (H, Dh), ("heads", "head_dim"), cfg, value=0.0)
            self.bk = param(None, (K, Dh), ("kv_heads", "head_dim"), cfg, value=0.0)
            self.bv = param(None, (K, Dh), ("kv_heads", "head_dim"), cfg, value=0.0)
            self.bo = param(None, (D,), ("embed",), cfg, value=0.0)
        else:
            self.bq = self.bk = self.bv = self.bo = None

    def project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: (B, L, D) -> q: (B, L, H, Dh), k, v: (B, L, K, Dh), with RoPE applied to q and k.

        Unless heads are split over devices, the three projections are one matmul against the
        weights side by side, (D, (H + 2K) Dh): one larger matmul is faster on XLA:CPU (issue 7)
        and each output column is the same dot product. The parameters stay three (checkpoints,
        Hugging Face conversion and sharding rules name them); with heads sharded they are used
        apart, as concatenating differently split weights would make XLA gather them."""
        c = jnp.dtype(self.cfg.compute_dtype)
        wq, wk, wv = (w[...].astype(c) for w in (self.wq, self.wk, self.wv))
        if is_sharded("heads") or is_sharded("kv_heads"):
            q, k, v = (dense(x, w, self.cfg.matmul) for w in (wq, wk, wv))
        else:
            D, H, Dh = wq.shape
            K = wk.shape[1]
            w = jnp.concatenate([wq.reshape(D, H * Dh), wk.reshape(D, K * Dh), wv.reshape(D, K * Dh)], axis=1)
            q, k, v = jnp.split(dense(x, w, self.cfg.matmul), [H * Dh, (H + K) * Dh], axis=-1)
            lead = x.shape[:-1]
            q, k, v = q.reshape(*lead, H, Dh), k.reshape(*lead, K, Dh), v.reshape(*lead, K, Dh)
        q, k, v = adapted(self, "wq", x, q), adapted(self, "wk", x, k), adapted(self, "wv", x, v)  # LoRA, if any
        if self.bq is not None:
            q, k, v = q + self.bq[...].astype(c), k + self.bk[...].astype(c), v + self.bv[...].astype(c)
        if self.cfg.positions == "rope":
            q, k = rope(q, positions, self.cfg.rope_theta), rope(k, positions, self.cfg.rope_theta)
        return q, k, v

    def __call__(self, q, positions, k, v, kv_positions, *, dropout_key=None, cached: bool = False,
                 segment_ids=None):
        """q: (B, L, H, Dh) queries of this segment (`project_qkv`); positions: (B, L); k, v:
        (B, S, K, Dh) keys/values to attend to (this segment's own, or the cache after writing
        them: `cached`); kv_positions: (B, S); segment_ids: (B, L) packed examples (no cache).
        Returns the attention output projected, (B, L, D)."""
        c = jnp.dtype(self.cfg.compute_dtype)
        mask = causal_mask(positions, kv_positions, segment_ids)  # (B, L, S)
        attn_key = resid_key = None
        if dropout_key is not None:
            attn_key, resid_key = jax.random.split(dropout_key)
        out = dot_product_attention(q, k, v, mask, impl=self.cfg.attention, dropout_rate=self.cfg.dropout,
                                    dropout_key=attn_key, positions=positions, cached=cached,
                                    segment_ids=segment_ids)  # (B, L, H, Dh)
        y = adapted(self, "wo", out, dense(out, self.wo[...].astype(c), self.cfg.matmul, contract=2))  # (B, L, D)
        if self.bo is not None:
            y = y + self.bo[...].astype(c)
        return dropout(y, self.cfg.dropout, resid_key)
