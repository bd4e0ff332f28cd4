"""LoRA adapters in the model (model/lora.py): rank 0 and fresh adapters are the base exactly, the
adapted forward equals the merged weights (every way of running the layers, the KV cache too), and
adapters shard like the weights they adapt."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import KVCache, build_model, lora, preset
from model.config import ConfigError
from model.transformer import abstract_model

# float32 on CPU: the adapted forward ((x A) B added to x W) and the merged weights (x (W + A B))
# differ only by float32 rounding.
FLOAT32_ATOL = 1e-5
ALL = ("q", "k", "v", "o", "mlp")

TINY = {
    "gpt2": preset("gpt2-nano", vocab_size=61, n_layers=2, d_model=32, n_heads=4, max_seq_len=32),
    "llama": preset("llama-tiny", vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=32, scan_layers=True),
}


@pytest.fixture(params=sorted(TINY), ids=sorted(TINY))
def cfg(request):
    return TINY[request.param]


def tokens(B=2, L=9, V=61, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, V, dtype=jnp.int32)


def with_random_b(model, seed=3):
    """The model's adapters with B made random (fresh ones start at B = 0, a no-op)."""
    graphdef, state = nnx.split(model)
    adapters, base = lora.split_params(nnx.to_pure_dict(state))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, lora.join_params(base, treedef.unflatten(leaves)))


def test_rank_zero_is_the_base_model_exactly(cfg):
    model = build_model(cfg, seed=0)
    before = nnx.to_pure_dict(nnx.state(model))
    expected = model(tokens())[0]
    assert lora.add_adapters(model, 0, 16.0, ALL) is model
    assert not nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    jax.tree.map(np.testing.assert_array_equal, before, nnx.to_pure_dict(nnx.state(model)))
    np.testing.assert_array_equal(model(tokens())[0], expected)


def test_fresh_adapters_compute_the_base_exactly(cfg):
    """B starts at zero, so step 0 of a LoRA run is its base, bit for bit."""
    model = build_model(cfg, seed=0)
    expected = model(tokens())[0]
    lora.add_adapters(model, 4, 8.0, ALL, seed=1)
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    assert all(not np.any(v["b"]) and np.any(v["a"]) for m in adapters["blocks"].values() for v in m.values())
    np.testing.assert_array_equal(model(tokens())[0], expected)


def test_adapter_shapes_and_logical_axes(cfg):
    model = lora.add_adapters(build_model(cfg, seed=0), 4, 8.0, ALL, seed=1)
    L, D, H, K, Dh, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim
    attn, mlp = model.blocks.attn, model.blocks.mlp
    expect = [
        (attn.wq_lora.a, (L, D, 4), ("layers", "embed", None)), (attn.wq_lora.b, (L, 4, H, Dh), ("layers", None, "heads", "head_dim")),
        (attn.wk_lora.b, (L, 4, K, Dh), ("layers", None, "kv_heads", "head_dim")),
        (attn.wo_lora.a, (L, H, Dh, 4), ("layers", "heads", "head_dim", None)), (attn.wo_lora.b, (L, 4, D), ("layers", None, "embed")),
        (mlp.w_up_lora.a, (L, D, 4), ("layers", "embed", None)), (mlp.w_down_lora.a, (L, F, 4), ("layers", "mlp", None)),
    ]
    for var, shape, axes in expect:
        assert var[...].shape == shape and var.get_metadata()["out_sharding"] == axes
    assert hasattr(mlp, "w_gate_lora") == (cfg.mlp == "swiglu")
    # the tree load_for_inference restores a LoRA checkpoint's params onto
    abstract = lora.abstract_adapters(cfg, 4, ALL)
    actual = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, actual)


def test_targets_choose_the_projections():
    cfg = TINY["llama"]
    model = lora.add_adapters(build_model(cfg, seed=0), 2, 4.0, lora.parse_targets("q,v"), seed=1)
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    assert set(adapters["blocks"]) == {"attn"} and set(adapters["blocks"]["attn"]) == {"wq_lora", "wv_lora"}
    with pytest.raises(ConfigError, match="'up' is not one of q, k, v, o, mlp"):
        lora.add_adapters(build_model(cfg, seed=0), 2, 4.0, ("up",))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_adapted_forward_equals_merged_weights(cfg, scan):
    cfg = dataclasses.replace(cfg, scan_layers=scan)
    model = with_random_b(lora.add_adapters(build_model(cfg, seed=0), 4, 8.0, ALL, seed=1))
    base = build_model(cfg, seed=0)(tokens())[0]
    adapted = model(tokens())[0]
    assert float(jnp.abs(adapted - base).max()) > 1e-2  # the adapters do change the function
    merged = lora.merged_model(model)
    assert not nnx.to_pure_dict(nnx.state(merged, nnx.LoRAParam))  # a plain Transformer
    np.testing.assert_allclose(merged(tokens())[0], adapted, atol=FLOAT32_ATOL, rtol=0)
    # the merge is W + alpha / r * A B, by hand for one weight
    a, b = model.blocks.attn.wq_lora.a[...], model.blocks.attn.wq_lora.b[...]
    want = model.blocks.attn.wq[...] + 2.0 * jnp.einsum("ldr,lrhk->ldhk", a, b)
    np.testing.assert_allclose(merged.blocks.attn.wq[...], want, atol=1e-6, rtol=0)


def test_cached_decode_with_adapters_equals_full_forward(cfg):
    model = with_random_b(lora.add_adapters(build_model(cfg, seed=0), 4, 8.0, ALL, seed=1))
    toks = tokens(B=2, L=8)
    full = model(toks)[0]
    cache = KVCache.init(cfg, batch=2, length=16)
    pre, cache = model(toks[:, :5], cache=cache)
    steps = [pre]
    for t in range(5, 8):
        out, cache = model(toks[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache=cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=FLOAT32_ATOL, rtol=0)


def test_only_adapters_get_gradients_that_move_them():
    """At B = 0 the loss's gradient reaches B (A's is zero until B moves); the base is an input."""
    cfg = TINY["llama"]
    model = lora.add_adapters(build_model(cfg, seed=0), 4, 8.0, ALL, seed=1)
    graphdef, state = nnx.split(model)
    adapters, base = lora.split_params(nnx.to_pure_dict(state))

    def loss(adapters):
        logits = nnx.merge(graphdef, lora.join_params(base, adapters))(tokens())[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    grads = jax.grad(loss)(adapters)
    for m in grads["blocks"].values():
        for g in m.values():
            assert np.any(g["b"]) and not np.any(g["a"])


def test_adapters_shard_like_their_weights():
    """On an 8-device fsdp x tensor mesh each adapter is split along its weight's axes (the rank
    never), and the sharded adapted forward equals the unsharded one."""
    from sharding.mesh import make_mesh
    from sharding.rules import rules_for
    from train.config import MeshConfig

    cfg = dataclasses.replace(TINY["llama"], vocab_size=64)  # the vocabulary splits over tensor=2
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = rules_for("fsdp_tp")
    expected = with_random_b(lora.add_adapters(build_model(cfg, seed=0), 4, 8.0, ALL, seed=1))(tokens())[0]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = lora.add_adapters(build_model(cfg, seed=0, mesh=mesh, rules=rules), 4, 8.0, ALL, seed=1)
        for name in ("wq", "wo"):
            w, ad = getattr(model.blocks.attn, name), getattr(model.blocks.attn, name + "_lora")
            spec = tuple(w[...].sharding.spec) + (None,) * (w[...].ndim - len(w[...].sharding.spec))
            n_in = ad.contract
            assert tuple(ad.a[...].sharding.spec) == (*spec[:1 + n_in], None)
            assert tuple(ad.b[...].sharding.spec) == (spec[0], None, *spec[1 + n_in:])
        assert any(ax is not None for ax in model.blocks.attn.wq_lora.a[...].sharding.spec)
        sharded = jax.jit(lambda m, t: m(t)[0])(with_random_b(model), tokens())
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(expected), atol=FLOAT32_ATOL, rtol=0)


def test_split_and_join_are_inverse():
    model = lora.add_adapters(build_model(TINY["gpt2"], seed=0), 2, 4.0, ALL, seed=1)
    params = nnx.to_pure_dict(nnx.state(model))
    adapters, base = lora.split_params(params)
    _, plain = abstract_model(TINY["gpt2"])
    assert jax.tree.structure(base) == jax.tree.structure(nnx.to_pure_dict(plain))
    assert all("_lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters))
    assert jax.tree.structure(lora.join_params(base, adapters)) == jax.tree.structure(params)


def test_parse_base():
    assert lora.parse_base("runs/base") == ("runs/base", None)
    assert lora.parse_base("runs/base@40") == ("runs/base", 40)
    assert lora.parse_base("runs/a@b") == ("runs/a@b", None)
