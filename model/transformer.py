"""The decoder-only `Transformer` (GPT-2 and Llama families) and its KV cache.

`Transformer.__call__` reads embed -> blocks -> final norm -> logits. The n_layers blocks are one
`Block` whose parameters carry a leading `layers` axis (made with `nnx.vmap`), so every way of
running them (the `_run_*` methods: scanned, unrolled, pipelined, over a KV cache) shares one
parameter layout and therefore one checkpoint format.

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

    k: (n_layers, B, K, S, Dh) and v: (n_layers, B, K, Dh, S), the layouts XLA:CPU's attention dots
    read, so a decode step takes each layer out with one contiguous slice instead of a transpose;
    or, `per_layer`, k and v are tuples of n_layers arrays (B, K, S, Dh) / (B, K, Dh, S): each
    layer its own buffer, which a step writes in place and its attention reads as it is, where
    a layer cut out of the stacked array after the write is a copy of it (at 8 rows, a fifth of
    a decode step of the quickstart model; infer/engine.py and infer/sampler.py choose by
    `per_layer_for`). The per-layer form needs the layers unrolled (a static layer index), not
    scanned.
    positions: (B, S) int32, -1 where a slot is empty (or holds left padding), which the position
    mask excludes; index: the next slot to write: () shared by rows, or (B,) one per row (the
    serving engine's slots, each request at its own position; infer/engine.py).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int, dtype: Any = None, *,
             per_layer: bool = False) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.compute_dtype)
        k_shape = (batch, cfg.kv_heads, length, cfg.head_dim)
        v_shape = (batch, cfg.kv_heads, cfg.head_dim, length)
        if per_layer:
            k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers))
            v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers))
        else:
            k, v = jnp.zeros((cfg.n_layers, *k_shape), dtype), jnp.zeros((cfg.n_layers, *v_shape), dtype)
        return cls(k, v, jnp.full((batch, length), -1, jnp.int32), jnp.zeros((), jnp.int32))

    @staticmethod
    def per_layer_for(batch: int) -> bool:
        """The faster form for a decode loop over `batch` rows on XLA:CPU: per layer above one row
        (each layer read in place instead of copied out of the stack after the step's write); the
        stack at one row, where XLA:CPU turns the row's write into an update it duplicates for its
        two readers, copying the layer several times (experiments/results.md, serving)."""
        return batch > 1

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    @property
    def batch(self) -> int:
        return self.positions.shape[0]


def _write_positions(cache: KVCache, positions: jax.Array) -> jax.Array:
    """The cache's slot positions (B, S) with this segment's `positions` (B, L) written from `cache.index` on."""
    if cache.index.ndim:  # one write index per row: row b's L new slots start at index[b]
        B, L = positions.shape
        cols = cache.index[:, None] + jnp.arange(L, dtype=jnp.int32)  # (B, L)
        return cache.positions.at[jnp.arange(B)[:, None], cols].set(positions, mode="drop")
    return jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.index, axis=1)


def _write_layer(ks, vs, layer, index, k, v):
    """Write this segment's k, v (B, L, K, Dh) into layer `layer` of the cache (KVCache's layouts,
    stacked or per layer) from slot `index` on; return the updated (ks, vs). Written straight into
    the stack so XLA updates it in place: cutting a layer out and writing it back copies the whole
    cache."""
    index = jnp.asarray(index, jnp.int32)
    if isinstance(ks, tuple):  # per layer: `layer` is a Python int (unrolled layers)
        kl, vl = _write_rows(ks[layer], vs[layer], (), index, k, v)
        return _replace_at(ks, layer, kl), _replace_at(vs, layer, vl)
    return _write_rows(ks, vs, (jnp.asarray(layer, jnp.int32),), index, k, v)


def _write_rows(ks, vs, lead: tuple, index, k, v):
    """_write_layer into buffers (*lead axes, B, K, S, Dh) / (*lead axes, B, K, Dh, S) at the
    indices `lead` of the axes before the batch: () for one layer's buffer, (layer,) in the stack."""
    if index.ndim:  # one write index per row: row b's L new slots start at index[b]
        rows = jnp.arange(k.shape[0])[:, None]  # (B, 1)
        cols = index[:, None] + jnp.arange(k.shape[1], dtype=jnp.int32)  # (B, L)
        every = slice(None)
        ks = ks.at[(*lead, rows, every, cols, every)].set(k.astype(ks.dtype), mode="drop")  # k: (B, L, K, Dh)
        vs = vs.at[(*lead, rows, every, every, cols)].set(v.astype(vs.dtype), mode="drop")
        return ks, vs
    zero, ones = jnp.zeros((), jnp.int32), (1,) * len(lead)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)  # as (B, K, L, Dh) and (B, K, Dh, L)
    ks = jax.lax.dynamic_update_slice(ks, kt.reshape(ones + kt.shape).astype(ks.dtype),
                                      (*lead, zero, zero, index, zero))
    vs = jax.lax.dynamic_update_slice(vs, vt.reshape(ones + vt.shape).astype(vs.dtype),
                                      (*lead, zero, zero, zero, index))
    return ks, vs


def _replace_at(xs: tuple, i: int, x) -> tuple:
    return xs[:i] + (x,) + xs[i + 1:]


def _read_layer(ks, vs, layer):
    """Layer `layer` of the cache as the (B, S, K, Dh) keys and values attention takes (views its
    dots read as stored: per layer the buffer itself, stacked one contiguous slice each)."""
    if isinstance(ks, tuple):
        return ks[layer].transpose(0, 2, 1, 3), vs[layer].transpose(0, 3, 1, 2)
    layer = jnp.asarray(layer, jnp.int32)
    k = jax.lax.dynamic_index_in_dim(ks, layer, axis=0, keepdims=False).transpose(0, 2, 1, 3)
    v = jax.lax.dynamic_index_in_dim(vs, layer, axis=0, keepdims=False).transpose(0, 3, 1, 2)
    return k, v


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, cache_kv=None, kv_positions=None, index=None, dropout_key=None,
                 segment_ids=None):
        """x: (B, L, D) -> (x, kv). Without a cache, attends within x (within each packed example
        when `segment_ids` (B, L) is given) and kv is this segment's (k, v).
        With `cache_kv=(ks, vs, layer)` (every layer's cache in KVCache's layouts, and this block's
        layer), writes this segment's keys/values into that layer from slot `index` on, attends over
        the layer (slot positions `kv_positions`), and kv is the updated (ks, vs)."""
        attn_key = mlp_key = None
        if dropout_key is not None:
            attn_key, mlp_key = jax.random.split(dropout_key)
        q, k, v = self.attn.project_qkv(self.attn_norm(x), positions)  # (B, L, H, Dh), (B, L, K, Dh) x 2
        if cache_kv is None:
            # Sequence parallelism: queries stay split over the sequence shards, keys/values are
            # all-gathered along the sequence, so attention is exact across shards.
            k = with_logical_constraint(k, ("batch", None, "kv_heads", "head_dim"))
            v = with_logical_constraint(v, ("batch", None, "kv_heads", "head_dim"))
            kv_positions, kv = positions, (k, v)
        else:
            ks, vs, layer = cache_kv
            kv = _write_layer(ks, vs, layer, index, k, v)
            k, v = _read_layer(*kv, layer)  # (B, S, K, Dh) x 2
        x = x + self.attn(q, positions, k, v, kv_positions, dropout_key=attn_key, cached=cache_kv is not None,
                          segment_ids=segment_ids)
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.cfg.dropout, mlp_key)
        return with_logical_constraint(x, ("batch", "seq", None)), kv


def _layer_key(dropout_key: jax.Array | None, i) -> jax.Array | None:
    """Layer i's dropout key (None: no dropout)."""
    return None if dropout_key is None else jax.random.fold_in(dropout_key, i)


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

        self.blocks = make_blocks(rngs)  # one Block whose parameters have a leading `layers` axis
        self.final_norm = Norm(cfg)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg, std=cfg.init_std)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, cache: KVCache | None = None,
                 dropout_key: jax.Array | None = None, layer_params: list | None = None,
                 segment_ids: jax.Array | None = None, head: bool = True) -> tuple[jax.Array, KVCache | None]:
        """tokens: (B, L) int32; positions: (B, L) int32 (default 0..L-1; -1 marks left padding).
        Returns float32 logits (B, L, V) and the updated cache (None without one).
        head=False: the final-normed hidden states (B, L, D) instead of logits (`logits()` makes
        them logits), for a prefill that needs the logits of few or no columns.

        segment_ids: (B, L) int32, packed examples (training on conversations): a token attends only
        to earlier tokens of the same segment; pass positions restarting at 0 per example. Not with a
        cache or pipeline stages.

        layer_params (with a cache only): the blocks' parameters already cut per layer
        (`split_layers`), used instead of cutting the stacked ones here (the layers are then
        unrolled). A decode loop cuts them once outside the loop: XLA does not hoist slices out of
        a while_loop, so cutting them here would copy every weight on every token."""
        B, L = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        embed_key, layers_key = self._dropout_keys(dropout_key)

        if segment_ids is not None and (cache is not None or pipeline.num_stages() > 1):
            raise ValueError("segment_ids (packed examples) work without a KV cache and without pipeline stages")

        x = self._embed(tokens, positions, embed_key)  # (B, L, D)
        if cache is not None:
            x, cache = self._run_cached(x, positions, cache, layers_key, layer_params)
        elif pipeline.num_stages() > 1:
            x = self._run_pipeline(x, positions, layers_key)
        elif self.cfg.scan_layers:
            x = self._run_scanned(x, positions, layers_key, segment_ids)
        else:
            x = self._run_unrolled(x, positions, layers_key, segment_ids)
        x = self.final_norm(x)
        return (self.logits(x) if head else x), cache  # (B, L, V)

    def _dropout_keys(self, dropout_key):
        """(embedding key, layers key); both None when dropout is off (no key, or model.dropout 0)."""
        if dropout_key is None or self.cfg.dropout <= 0:
            return None, None
        embed_key, layers_key = jax.random.split(dropout_key)
        return embed_key, layers_key

    def _embed(self, tokens, positions, dropout_key):
        """(B, L) token ids -> (B, L, D) embeddings in the compute dtype (+ learned positions)."""
        c = jnp.dtype(self.cfg.compute_dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(c)  # (B, L, D)
        if self.pos_embed is not None:  # left padding (-1) reads row 0; attention masks it out
            x = x + jnp.take(self.pos_embed[...], jnp.maximum(positions, 0), axis=0).astype(c)
        x = dropout(x, self.cfg.dropout, dropout_key)
        return with_logical_constraint(x, ("batch", "seq", None))

    def logits(self, x):
        """Final-normed hidden states (B, L, D) -> float32 logits (B, L, V) against the tied
        embedding or the separate head."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]  # (D, V)
        c = jnp.dtype(self.cfg.compute_dtype)
        return jnp.einsum("bld,dv->blv", x, head.astype(c), preferred_element_type=jnp.float32)

    # The ways of running the n_layers blocks; each maps x (B, L, D) -> (B, L, D).

    def _run_scanned(self, x, positions, dropout_key, segment_ids=None):
        """lax.scan over the stacked layers: one block is traced, so compile time does not grow with depth."""
        graphdef, stacked = nnx.split(self.blocks)

        def body(x, xs):
            i, params = xs
            x, _ = nnx.merge(graphdef, params)(x, positions, dropout_key=_layer_key(dropout_key, i),
                                               segment_ids=segment_ids)
            return x, None

        x, _ = jax.lax.scan(body, x, (jnp.arange(self.cfg.n_layers), stacked))
        return x

    def _run_unrolled(self, x, positions, dropout_key, segment_ids=None):
        """The layers one after another in the graph (`scan_layers=False`): faster on CPU for shallow models."""
        graphdef, stacked = nnx.split(self.blocks)
        for i, params in enumerate(per_layer_params(stacked, self.cfg.n_layers)):
            x, _ = nnx.merge(graphdef, params)(x, positions, dropout_key=_layer_key(dropout_key, i),
                                               segment_ids=segment_ids)
        return x

    def _run_pipeline(self, x, positions, dropout_key):
        """The layers as GPipe stages over the mesh axes that `layers` maps to (sharding/pipeline.py)."""
        if dropout_key is not None:
            raise ValueError("dropout is not supported with pipeline parallelism (mesh.stage > 1)")
        graphdef, stacked = nnx.split(self.blocks)

        def block_fn(x, positions, i, params):
            return nnx.merge(graphdef, params)(x, positions)[0]

        return pipeline.run_stages(block_fn, x, positions, stacked)

    def _run_cached(self, x, positions, cache, dropout_key, layer_params):
        """The layers over a KV cache (prefill or a decode step), scanned or unrolled (always
        unrolled with `layer_params`): each block writes this segment's keys/values into the cache
        and attends over its layer. Returns (x, the updated cache)."""
        kv_positions = _write_positions(cache, positions)  # (B, S)
        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, xs):  # the whole cache rides in the carry; each block writes into it in place
            x, ks, vs = carry
            i, params = xs
            block = nnx.merge(graphdef, params)
            x, (ks, vs) = block(x, positions, (ks, vs, i), kv_positions, cache.index, _layer_key(dropout_key, i))
            return (x, ks, vs), None

        carry = (x, cache.k, cache.v)
        if self.cfg.scan_layers and layer_params is None and not cache.per_layer:
            carry, _ = jax.lax.scan(body, carry, (jnp.arange(self.cfg.n_layers), stacked))
        else:
            if layer_params is None:
                layer_params = per_layer_params(stacked, self.cfg.n_layers)
            for i, params in enumerate(layer_params):
                carry, _ = body(carry, (i, params))
        x, ks, vs = carry
        return x, KVCache(ks, vs, kv_positions, cache.index + x.shape[1])


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
