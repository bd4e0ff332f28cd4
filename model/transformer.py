"""The decoder-only `Transformer` (GPT-2 and Llama families) and its KV cache.

The n_layers blocks are one `Block` module whose parameters carry a leading `layers` axis
(created with `nnx.vmap`), so the forward pass can `lax.scan` over layers (compile time independent
of depth) or unroll them (`ModelConfig.scan_layers=False`, faster on CPU for shallow models) with
the same parameter layout and therefore the same checkpoints.

    model = build_model(cfg, seed=0)
    logits, _ = model(tokens)                       # (B, L) int32 -> (B, L, V) float32
    cache = KVCache.init(cfg, batch=B, length=S)
    logits, cache = model(prompt, positions, cache=cache)   # prefill / decode
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Attention
from model.config import ModelConfig
from model.layers import MLP, Norm, dropout, param
from sharding import pipeline
from sharding.rules import validate_state, with_logical_constraint


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for S slots, and the absolute position held in each slot.

    k: (n_layers, B, K, S, Dh) and v: (n_layers, B, K, Dh, S): one layer's keys and values lie in
    the layouts XLA:CPU's attention dots read them in, so a decode step copies each out with one
    contiguous slice instead of transposing it (the transposes cost as much as the dots at batch 1);
    positions: (B, S) int32, -1 where a slot is empty (or holds left padding), which the position
    mask excludes; index: the next slot to write (shared by rows).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.compute_dtype)
        k_shape = (cfg.n_layers, batch, cfg.kv_heads, length, cfg.head_dim)
        v_shape = (cfg.n_layers, batch, cfg.kv_heads, cfg.head_dim, length)
        return cls(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype),
                   jnp.full((batch, length), -1, jnp.int32), jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.k.shape[3]


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, cache_kv=None, kv_positions=None, index=None, dropout_key=None):
        """x: (B, L, D). Without a cache, attends within x. With `cache_kv=(ks, vs, layer)` (every
        layer's cache, in KVCache's layouts, and this block's layer index), writes this segment's
        keys/values at [layer, :, index] and attends to the cache's layer (whose slot positions are
        `kv_positions`). Returns (x, (k, v)): this segment's own without a cache, else the updated
        stacked (ks, vs). Writing the new slots straight into the stacked cache lets XLA update it in
        place; cutting a layer out, updating it and writing it back copied every layer's cache (and
        the whole stack) on every decode step."""
        attn_key = mlp_key = None
        if dropout_key is not None:
            attn_key, mlp_key = jax.random.split(dropout_key)
        h = self.attn_norm(x)
        q, k, v = self.attn.project_qkv(h, positions)  # (B, L, H, Dh), (B, L, K, Dh) x 2
        if cache_kv is None:
            kv_positions = positions
            # Sequence parallelism: queries stay split over the sequence shards, keys/values are
            # all-gathered along the sequence, so attention is exact across shards.
            k = with_logical_constraint(k, ("batch", None, "kv_heads", "head_dim"))
            v = with_logical_constraint(v, ("batch", None, "kv_heads", "head_dim"))
        else:
            ks, vs, layer = cache_kv
            zero = jnp.zeros((), jnp.int32)
            layer, index = jnp.asarray(layer, jnp.int32), jnp.asarray(index, jnp.int32)
            ks = jax.lax.dynamic_update_slice(ks, k.transpose(0, 2, 1, 3)[None].astype(ks.dtype),
                                              (layer, zero, zero, index, zero))  # as (B, K, L, Dh)
            vs = jax.lax.dynamic_update_slice(vs, v.transpose(0, 2, 3, 1)[None].astype(vs.dtype),
                                              (layer, zero, zero, zero, index))  # as (B, K, Dh, L)
            # the (B, S, K, Dh) views attention takes; its dots read them as stored (a contiguous slice)
            k = jax.lax.dynamic_index_in_dim(ks, layer, axis=0, keepdims=False).transpose(0, 2, 1, 3)
            v = jax.lax.dynamic_index_in_dim(vs, layer, axis=0, keepdims=False).transpose(0, 3, 1, 2)
        x = x + self.attn(q, positions, k, v, kv_positions, dropout_key=attn_key, cached=cache_kv is not None)
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.cfg.dropout, mlp_key)
        x = with_logical_constraint(x, ("batch", "seq", None))
        return x, ((k, v) if cache_kv is None else (ks, vs))


class Transformer(nnx.Module):
    """Token embedding (+ learned positions) -> n_layers blocks -> final norm -> logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer when 0 in a run)")
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg, std=cfg.init_std)
        if cfg.positions == "learned":
            self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.d_model), (None, "embed"), cfg, std=cfg.init_std)
        else:
            self.pos_embed = None

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg, std=cfg.init_std)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, cache: KVCache | None = None,
                 dropout_key: jax.Array | None = None, layer_params: list | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """tokens: (B, L) int32; positions: (B, L) int32 (default 0..L-1; -1 marks left padding).
        Returns float32 logits (B, L, V) and the updated cache (None without one).

        layer_params (with a cache only): the blocks' parameters already cut per layer
        (`split_layers`), used instead of slicing the stacked ones; the layers are then unrolled. A
        decode loop cuts them once outside the loop: XLA does not hoist the slices out of a
        while_loop, and copying every weight each token dominates small-batch decoding on CPU."""
        cfg = self.cfg
        c = jnp.dtype(cfg.compute_dtype)
        B, L = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        emb_key = None
        if dropout_key is not None and cfg.dropout > 0:
            emb_key, dropout_key = jax.random.split(dropout_key)
        else:
            dropout_key = None

        x = jnp.take(self.embed[...], tokens, axis=0).astype(c)  # (B, L, D)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], jnp.maximum(positions, 0), axis=0).astype(c)
        x = dropout(x, cfg.dropout, emb_key)
        x = with_logical_constraint(x, ("batch", "seq", None))

        graphdef, block_params = nnx.split(self.blocks)
        kv_positions = None
        if cache is not None:
            kv_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.index, axis=1)

        def layer(x, i, params, ks=None, vs=None):
            block = nnx.merge(graphdef, params)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            cache_kv = None if ks is None else (ks, vs, i)
            return block(x, positions, cache_kv, kv_positions, None if cache is None else cache.index, key)

        if cache is None and pipeline.num_stages() > 1:
            if dropout_key is not None:
                raise ValueError("dropout is not supported with pipeline parallelism (mesh.stage > 1)")

            def block_fn(x, pos, i, params):
                return nnx.merge(graphdef, params)(x, pos)[0]
            x = pipeline.run_stages(block_fn, x, positions, block_params)
        elif cache is None:
            if cfg.scan_layers:
                def body(x, xs):
                    i, p = xs
                    return layer(x, i, p)[0], None
                x, _ = jax.lax.scan(body, x, (jnp.arange(cfg.n_layers), block_params))
            else:
                for i, p in enumerate(per_layer_params(block_params, cfg.n_layers)):
                    x, _ = layer(x, i, p)
        else:
            # The whole cache rides in the loop carry; each block writes its new slots into it in place.
            def body(carry, xs):
                x, ks, vs = carry
                i, p = xs
                x, (ks, vs) = layer(x, i, p, ks, vs)
                return (x, ks, vs), None

            if cfg.scan_layers and layer_params is None:
                (x, ks, vs), _ = jax.lax.scan(body, (x, cache.k, cache.v), (jnp.arange(cfg.n_layers), block_params))
            else:
                if layer_params is None:
                    layer_params = per_layer_params(block_params, cfg.n_layers)
                carry = (x, cache.k, cache.v)
                for i, p in enumerate(layer_params):
                    carry, _ = body(carry, (i, p))
                x, ks, vs = carry
            cache = KVCache(ks, vs, kv_positions, cache.index + L)

        x = self.final_norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]  # (D, V)
        logits = jnp.einsum("bld,dv->blv", x, head.astype(c), preferred_element_type=jnp.float32)
        return logits, cache


def with_kernels(model: Transformer, attention: str, matmul: str = "xla", norm_impl: str = "xla") -> Transformer:
    """The same parameters under a config with other attention / matmul / norm implementations
    (they change no parameter: a model trained with a kernel samples with `xla`, the only
    attention the KV-cache path has)."""
    cfg = dataclasses.replace(model.cfg, attention=attention, matmul=matmul, norm_impl=norm_impl)
    if cfg == model.cfg:
        return model
    graphdef, _ = abstract_model(cfg)
    return nnx.merge(graphdef, nnx.state(model))


def per_layer_params(block_params, n_layers: int) -> list:
    """Stacked block parameters (leading `layers` axis) cut into one tree per layer.

    Cut with one split per parameter, not n_layers index slices: the gradient of a split is one
    concatenate into the stacked gradient, where that of n slices is n zero-padded copies summed
    (n_layers passes over every stacked gradient in each train step)."""
    leaves, treedef = jax.tree.flatten(block_params)
    layers = [[jnp.squeeze(part, 0) for part in jnp.split(leaf, n_layers, axis=0)] for leaf in leaves]
    return [treedef.unflatten([parts[i] for parts in layers]) for i in range(n_layers)]


def split_layers(model: Transformer) -> list:
    """The model's blocks' parameters cut per layer, once (see `Transformer.__call__`)."""
    _, block_params = nnx.split(model.blocks)
    return per_layer_params(block_params, model.cfg.n_layers)


def build_model(cfg: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                rules=None) -> Transformer:
    """Create a `Transformer` with parameters from `seed`.

    Without a mesh the parameters live on the default device. With a mesh (and logical-axis
    `rules`, see sharding/rules.py) the initializer is jitted with the parameters' shardings as
    outputs, so no device ever holds the whole unsharded model.
    """
    def init() -> Transformer:
        with nnx.use_eager_sharding(False):
            return Transformer(cfg, rngs=nnx.Rngs(params=seed))

    if mesh is None:
        return init()
    graphdef, abstract_state = abstract_model(cfg)
    if rules:  # a parameter that cannot be sharded is a ShardingError naming it, before compiling
        validate_state(abstract_state, mesh.shape, rules)
    shardings = state_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.state(init()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and its parameters as ShapeDtypeStructs (with logical-axis metadata),
    built without allocating anything: what restoring, sharding plans and conversions start from."""
    def init() -> Transformer:
        with nnx.use_eager_sharding(False):
            return Transformer(cfg, rngs=nnx.Rngs(0))

    return nnx.split(nnx.eval_shape(init))


def state_shardings(state, mesh: jax.sharding.Mesh, rules):
    """NamedShardings for an nnx State from its parameters' logical-axis metadata and `rules`."""
    with nnx.logical_axis_rules(rules or ()):
        return nnx.get_named_sharding(state, mesh)
