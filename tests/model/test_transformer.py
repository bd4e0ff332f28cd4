"""Behaviour of the transformer: causality, cached decoding, layer scan vs unroll, shapes, configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import KVCache, PRESETS, build_model, preset

# float32 on CPU: cached and full forward differ only by summation order.
FLOAT32_ATOL = 1e-5

TINY = {
    "gpt2": preset("gpt2-nano", vocab_size=61, n_layers=2, d_model=32, n_heads=4, max_seq_len=32),
    "llama": preset("llama-tiny", vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=32, rope_theta=50000.0),
}


@pytest.fixture(params=sorted(TINY), ids=sorted(TINY))
def cfg(request):
    return TINY[request.param]


def tokens(B, L, V, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, V, dtype=jnp.int32)


def test_logits_shape_and_dtype(cfg):
    model = build_model(cfg, seed=0)
    logits, cache = model(tokens(2, 7, cfg.vocab_size))
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == jnp.float32
    assert cache is None


def test_parameter_count_matches_config(cfg):
    model = build_model(cfg, seed=0)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert n == cfg.num_params()


def test_causality_gradient_to_later_positions_is_zero(cfg):
    """d output[t] / d input[t'] == 0 for t' > t, and nonzero for t' <= t."""
    model = build_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    toks = tokens(1, 12, cfg.vocab_size)
    t = 5

    L, D = toks.shape[1], cfg.d_model

    def logits_t(delta):  # delta: (L, D), an additive perturbation of each position's input embedding
        # The embedding table gets one extra row per position, so position i reads row V + i.
        p = nnx.to_pure_dict(params)
        p["embed"] = jnp.concatenate([p["embed"], p["embed"][toks[0]] + delta], axis=0)
        m = nnx.merge(graphdef, p)
        ids = (cfg.vocab_size + jnp.arange(L))[None]  # each position reads its own perturbed row
        logits, _ = m(ids)
        return logits[0, t, :cfg.vocab_size].sum()

    g = jax.grad(logits_t)(jnp.zeros((L, D)))
    per_position = jnp.abs(g).sum(-1)
    assert np.all(np.asarray(per_position[t + 1:]) == 0.0)
    assert np.all(np.asarray(per_position[: t + 1]) > 0.0)


def test_cached_decode_matches_full_forward(cfg):
    model = build_model(cfg, seed=1)
    B, L, P = 3, 14, 6
    toks = tokens(B, L, cfg.vocab_size, seed=2)
    full, _ = model(toks)
    cache = KVCache.init(cfg, B, length=cfg.max_seq_len)
    prefill, cache = model(toks[:, :P], cache=cache)
    steps = [prefill]
    for t in range(P, L):
        logits, cache = model(toks[:, t:t + 1], jnp.full((B, 1), t, jnp.int32), cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=FLOAT32_ATOL, rtol=0)
    assert int(cache.index) == L


def test_per_row_cache_index_writes_each_row_at_its_own_slot(cfg):
    """KVCache.index of shape (B,) (the serving engine's slots): row b writes from slot index[b] on,
    and each row's logits still equal its own full forward pass."""
    model = build_model(cfg, seed=7)
    B, L, P = 2, 9, 4
    toks = tokens(B, L, cfg.vocab_size, seed=8)
    full, _ = model(toks)
    cache = dataclasses.replace(KVCache.init(cfg, B, length=16), index=jnp.array([0, 5], jnp.int32))
    prefill, cache = model(toks[:, :P], cache=cache)
    steps = [prefill]
    for t in range(P, L):
        logits, cache = model(toks[:, t:t + 1], jnp.full((B, 1), t, jnp.int32), cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=FLOAT32_ATOL, rtol=0)
    np.testing.assert_array_equal(cache.index, [L, 5 + L])
    expected = np.full((B, 16), -1)
    expected[0, :L], expected[1, 5:5 + L] = np.arange(L), np.arange(L)
    np.testing.assert_array_equal(cache.positions, expected)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared-index", "per-row-index"])
def test_per_layer_cache_equals_the_stacked_one_bit_for_bit(cfg, per_row):
    """KVCache(per_layer=True) (the serving engine's: one buffer per layer) holds the same keys and
    values at the same places as the stacked cache, and the logits of a prefill and of the decode
    steps after it are identical, not merely close (jitted, as every caller runs them)."""
    model = build_model(cfg, seed=3)
    graphdef, state = nnx.split(model)
    B, L, P = 2, 9, 4
    toks = tokens(B, L, cfg.vocab_size, seed=4)

    @jax.jit
    def forward(state, toks, positions, cache):
        return nnx.merge(graphdef, state)(toks, positions, cache=cache)

    def run(per_layer):
        cache = KVCache.init(cfg, B, length=16, per_layer=per_layer)
        if per_row:
            cache = dataclasses.replace(cache, index=jnp.array([0, 5], jnp.int32))
        assert cache.per_layer == per_layer
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        out, cache = forward(state, toks[:, :P], positions, cache)
        steps = [out]
        for t in range(P, L):
            out, cache = forward(state, toks[:, t:t + 1], jnp.full((B, 1), t, jnp.int32), cache)
            steps.append(out)
        k = jnp.stack(cache.k) if per_layer else cache.k
        v = jnp.stack(cache.v) if per_layer else cache.v
        return np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(k), np.asarray(v), np.asarray(cache.positions)

    for stacked, per_layer in zip(run(False), run(True)):
        np.testing.assert_array_equal(per_layer, stacked)


def test_left_padding_does_not_change_logits(cfg):
    """A row left-padded with position -1 gives the same logits for its real tokens."""
    model = build_model(cfg, seed=3)
    toks = tokens(1, 8, cfg.vocab_size, seed=4)
    ref, _ = model(toks)
    pad = 5
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), toks], axis=1)
    positions = jnp.concatenate([jnp.full((1, pad), -1, jnp.int32), jnp.arange(8, dtype=jnp.int32)[None]], axis=1)
    cache = KVCache.init(cfg, 1, length=16)
    out, _ = model(padded, positions, cache=cache)
    np.testing.assert_allclose(out[:, pad:], ref, atol=FLOAT32_ATOL, rtol=0)


def test_scanned_and_unrolled_layers_agree(cfg):
    scanned = build_model(dataclasses.replace(cfg, scan_layers=True), seed=5)
    unrolled = build_model(dataclasses.replace(cfg, scan_layers=False), seed=5)
    toks = tokens(2, 9, cfg.vocab_size, seed=6)
    np.testing.assert_allclose(scanned(toks)[0], unrolled(toks)[0], atol=FLOAT32_ATOL, rtol=0)


def test_dropout_is_off_without_key_and_random_with_key():
    cfg = dataclasses.replace(TINY["gpt2"], dropout=0.2)
    model = build_model(cfg, seed=0)
    toks = tokens(2, 8, cfg.vocab_size)
    a, _ = model(toks)
    b, _ = model(toks)
    np.testing.assert_array_equal(a, b)
    c, _ = model(toks, dropout_key=jax.random.key(0))
    d, _ = model(toks, dropout_key=jax.random.key(1))
    assert not np.allclose(c, a) and not np.allclose(c, d)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(TINY["llama"], compute_dtype="bfloat16")
    model = build_model(cfg, seed=0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model)))
    logits, _ = model(tokens(1, 5, cfg.vocab_size))
    assert logits.dtype == jnp.float32
    ref, _ = build_model(dataclasses.replace(cfg, compute_dtype="float32"), seed=0)(tokens(1, 5, cfg.vocab_size))
    np.testing.assert_allclose(logits, ref, atol=5e-2)  # bfloat16 has an 8-bit mantissa


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_sized_as_published(name):
    cfg = dataclasses.replace(PRESETS[name], vocab_size=PRESETS[name].vocab_size or 65).validate()
    n = cfg.num_params()
    expected = {"gpt2-nano": (0.7e6, 0.9e6), "gpt2-124m": (123e6, 126e6), "llama-tiny": (0.7e6, 0.9e6),
                "llama-1b": (1.2e9, 1.3e9), "llama3-8b": (7.9e9, 8.1e9)}[name]
    assert expected[0] <= n <= expected[1], n


@pytest.mark.parametrize("field,value,match", [
    ("norm", "batchnorm", "model.norm"),
    ("n_heads", 3, "divisible"),
    ("n_kv_heads", 3, "n_kv_heads"),
    ("dropout", 1.5, "dropout"),
])
def test_bad_model_config_is_a_clear_error(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY["gpt2"], **{field: value}).validate()
