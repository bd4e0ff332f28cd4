"""Layer functions that replace a library call for speed compute the same function."""

import jax
import jax.numpy as jnp
import numpy as np

from model.layers import dense, gelu_exact, normalize, rope


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


def test_dense_on_2d_operands_equals_tensordot_in_value_and_gradients():
    """dense multiplies (tokens, in) x (in, out) for XLA:CPU's sake (issue 7); the function and its
    gradients are tensordot's, to float32 rounding, for one and two contracted axes."""
    kx, kw = jax.random.split(jax.random.key(0))
    for x_shape, w_shape, contract in (((3, 8, 16), (16, 4, 5), 1), ((3, 8, 4, 5), (4, 5, 16), 2)):
        x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)

        def loss(f):
            return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

        ours = loss(lambda x, w: dense(x, w, contract=contract))
        ref = loss(lambda x, w: jnp.tensordot(x, w, axes=contract))
        np.testing.assert_allclose(dense(x, w, contract=contract), jnp.tensordot(x, w, axes=contract), rtol=1e-5, atol=1e-5)
        for g, r in zip(jax.grad(ours, argnums=(0, 1))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_normalize_custom_backward_equals_autodiff_of_the_plain_norm():
    """Norm's closed-form backward (issue 7) gives autodiff's gradients of the plain LayerNorm /
    RMSNorm formula to float32 rounding, for x, scale and bias."""
    def plain(x, scale, bias, eps, center):
        if center:
            x = x - jnp.mean(x, -1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps) * scale
        return y if bias is None else y + bias

    k = jax.random.split(jax.random.key(1), 4)
    x = 3.0 * jax.random.normal(k[0], (3, 5, 16)) + 1.0
    scale, bias, w = jax.random.normal(k[1], (16,)), jax.random.normal(k[2], (16,)), jax.random.normal(k[3], (3, 5, 16))
    for center, b in ((True, bias), (False, None)):
        argnums = (0, 1, 2) if b is not None else (0, 1)
        np.testing.assert_allclose(normalize(x, scale, b, 1e-5, center), plain(x, scale, b, 1e-5, center), atol=1e-6)
        ours = jax.grad(lambda *a: jnp.sum(jnp.sin(normalize(*a, 1e-5, center)) * w), argnums)(x, scale, b)
        ref = jax.grad(lambda *a: jnp.sum(jnp.sin(plain(*a, 1e-5, center)) * w), argnums)(x, scale, b)
        assert len(ours) == len(argnums)
        for g, r in zip(ours, ref):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_attention_softmax_custom_backward_equals_autodiff_of_jax_softmax():
    from model.attention import softmax

    k1, k2 = jax.random.split(jax.random.key(3))
    scores = 4.0 * jax.random.normal(k1, (3, 2, 2, 16, 16), jnp.float32)
    # masked entries as the attention writes them (causal: the upper triangle), where probs are 0
    causal = jnp.tril(jnp.ones((16, 16), bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    w = jax.random.normal(k2, scores.shape, jnp.float32)
    np.testing.assert_array_equal(softmax(scores), jax.nn.softmax(scores, axis=-1))
    grad = jax.grad(lambda s: jnp.sum(softmax(s) * w))(scores)
    grad_ref = jax.grad(lambda s: jnp.sum(jax.nn.softmax(s, axis=-1) * w))(scores)
    # float32: the row sums sum(g * y) are accumulated in a different order
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(jnp.where(causal, 0.0, grad)))) == 0.0  # masked scores get no gradient


def test_fused_qkv_projection_equals_three_projections_and_is_skipped_under_tensor_parallelism():
    """project_qkv multiplies by [wq | wk | wv] at once unless heads are sharded; same q, k, v."""
    import dataclasses

    from flax import nnx

    from model.attention import Attention
    from model.config import preset
    from sharding.mesh import make_mesh
    from sharding.rules import is_sharded, rules_for
    from train.config import MeshConfig

    cfg = dataclasses.replace(preset("llama-tiny"), bias=True)  # grouped-query heads, RoPE, biases
    with nnx.use_eager_sharding(False):  # as build_model creates modules
        attn = Attention(cfg, rngs=nnx.Rngs(0))
    attn.bq[...] = jax.random.normal(jax.random.key(1), attn.bq.shape)
    x = jax.random.normal(jax.random.key(2), (2, 8, cfg.d_model), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    q, k, v = attn.project_qkv(x, positions)
    q_ref = rope(dense(x, attn.wq[...]) + attn.bq[...], positions, cfg.rope_theta)
    k_ref = rope(dense(x, attn.wk[...]) + attn.bk[...], positions, cfg.rope_theta)
    v_ref = dense(x, attn.wv[...]) + attn.bv[...]
    for got, ref in ((q, q_ref), (k, k_ref), (v, v_ref)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)  # float32: matmul blocking may differ

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=2), jax.devices()[:2])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for("tp")):
        assert is_sharded("heads") and not is_sharded("embed")
        sharded = jax.jit(lambda x: attn.project_qkv(x, positions)).lower(x).as_text()
    alone = jax.jit(lambda x: attn.project_qkv(x, positions)).lower(x).as_text()
    assert not is_sharded("heads")
    assert alone.count("stablehlo.dot_general") == 1  # one matmul for q, k and v
    assert sharded.count("stablehlo.dot_general") == 3  # the split weights are used apart, never gathered
