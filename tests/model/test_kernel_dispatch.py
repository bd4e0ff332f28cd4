"""The model's kernel switches: `attention=pallas` / `attention=cpu` (and `matmul=pallas`) give
the logits and gradients of `attention=xla`; choices the device or the call cannot run are clear
errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import KVCache, build_model, preset
from model.attention import KERNEL_IMPLS, check_kernel_platform, dot_product_attention
from model.config import ATTENTION_IMPLS
from pallas_kernels import platform
from train.step import cross_entropy

# float32 on CPU; the kernels differ from XLA by summation order only.
FLOAT32_ATOL = 2e-5

TINY = {
    # Grouped-query heads and RoPE; L=32 gives the default 128-blocks clipped to 32.
    "llama-gqa": preset("llama-tiny", vocab_size=61, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96,
                        max_seq_len=32, scan_layers=True),
    # Both switches: flash attention and the tiled matmul in every projection and the MLP.
    "gpt2-pallas-matmul": preset("gpt2-nano", vocab_size=61, n_layers=2, d_model=64, n_heads=2, max_seq_len=32,
                                 matmul="pallas", scan_layers=True),
}


def loss_and_grads(cfg, tokens, positions=None):
    graphdef, params = nnx.split(build_model(cfg, seed=0))

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(tokens, positions)
        total, count = cross_entropy(logits[:, :-1], tokens[:, 1:])
        return total / count, logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def kernel_cfg(name, impl):
    """TINY[name] with attention=impl; the CPU case also takes the CPU matmul (its weight
    gradient) and norm, the pallas case keeps TINY's matmul (pallas in one of them, interpreted)."""
    cfg = dataclasses.replace(TINY[name], attention=impl)
    return dataclasses.replace(cfg, matmul="cpu", norm_impl="cpu") if impl == "cpu" else cfg


CPU_ONLY = pytest.mark.skipif(platform.device_platform() != "cpu", reason="the XLA:CPU kernel")
IMPLS = ["pallas", pytest.param("cpu", marks=CPU_ONLY)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(TINY))
def test_kernel_logits_and_gradients_equal_xla(name, impl):
    kernel = kernel_cfg(name, impl)
    xla_cfg = dataclasses.replace(kernel, attention="xla", matmul="xla", norm_impl="xla")
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 61, dtype=jnp.int32)
    logits, grads = loss_and_grads(kernel, tokens)
    ref_logits, ref_grads = loss_and_grads(xla_cfg, tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=FLOAT32_ATOL, rtol=FLOAT32_ATOL)
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for (path, g), rg in zip(flat, ref_flat):
        np.testing.assert_allclose(g, rg, atol=FLOAT32_ATOL, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_left_padding_matches_xla(impl):
    """Left padding (position -1) is masked out by the kernel paths exactly as by the xla one."""
    cfg = TINY["llama-gqa"]
    tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, 61, dtype=jnp.int32)
    pad = jnp.array([0, 5])[:, None]
    positions = jnp.where(jnp.arange(32)[None] < pad, -1, jnp.arange(32)[None] - pad).astype(jnp.int32)
    graphdef, params = nnx.split(build_model(cfg, seed=0))
    out = {}
    for name in ("xla", impl):
        model = nnx.merge(nnx.split(build_model(dataclasses.replace(cfg, attention=name), seed=0))[0], params)
        out[name] = np.asarray(jax.jit(lambda t, p: model(t, p)[0])(tokens, positions))
    real = np.asarray(positions >= 0)
    np.testing.assert_allclose(out[impl][real], out["xla"][real], atol=FLOAT32_ATOL, rtol=FLOAT32_ATOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_attention_with_kv_cache_is_a_clear_error(impl):
    cfg = dataclasses.replace(TINY["llama-gqa"], attention=impl)
    model = build_model(cfg, seed=0)
    cache = KVCache.init(cfg, batch=1, length=16)
    message = r"cannot attend over a KV cache.*model.attention='xla' \(model.transformer.with_kernels"
    with pytest.raises(ValueError, match=message):
        model(jnp.zeros((1, 4), jnp.int32), jnp.arange(4, dtype=jnp.int32)[None], cache=cache)


def test_every_attention_the_config_accepts_is_dispatched():
    """Each value model.attention accepts reaches an implementation: over a KV cache (S > L) xla
    attends and a kernel refuses with its own error; any other name is an error listing them."""
    q, kv = jnp.ones((1, 2, 2, 8)), jnp.ones((1, 4, 2, 8))  # (B, L, H, Dh), (B, S, K, Dh)
    mask = jnp.ones((1, 2, 4), bool)
    for impl in ATTENTION_IMPLS:
        if impl in KERNEL_IMPLS:
            with pytest.raises(ValueError, match=f"model.attention={impl!r} .*cannot attend over a KV cache"):
                dot_product_attention(q, kv, kv, mask, impl=impl, positions=jnp.zeros((1, 2), jnp.int32), cached=True)
        else:
            out = dot_product_attention(q, kv, kv, mask, impl=impl, cached=True)
            np.testing.assert_allclose(out, jnp.ones_like(q), rtol=1e-6)  # uniform weights over equal values
    with pytest.raises(ValueError, match="'flash' is not available; choose one of xla, pallas, cudnn, cpu"):
        dot_product_attention(q, kv, kv, mask, impl="flash")


def test_platform_check_names_the_setting(monkeypatch):
    if platform.device_platform() != "cpu":
        pytest.skip("checks what a CPU cannot run")
    base = TINY["llama-gqa"]
    with pytest.raises(ValueError, match="model.attention='cudnn' needs an NVIDIA GPU, but the device is 'cpu'"):
        check_kernel_platform(dataclasses.replace(base, attention="cudnn"))
    monkeypatch.delenv(platform.ENV_VAR, raising=False)
    for field in ("attention", "matmul"):
        with pytest.raises(ValueError, match=f"model.{field}='pallas' needs a GPU or TPU.*JAXLM_PALLAS_INTERPRET"):
            check_kernel_platform(dataclasses.replace(base, **{field: "pallas"}))
    monkeypatch.setenv(platform.ENV_VAR, "gpu")  # the interpreter, asked for explicitly
    check_kernel_platform(dataclasses.replace(base, attention="pallas", matmul="pallas"))
    check_kernel_platform(base)
    check_kernel_platform(dataclasses.replace(base, attention="cpu", matmul="cpu", norm_impl="cpu"))  # head_dim 16
    with pytest.raises(ValueError, match=r"model.attention='cpu' supports head_dim in .*not 24"):
        check_kernel_platform(preset("gpt2-nano", vocab_size=61, d_model=48, n_heads=2, attention="cpu"))


@pytest.mark.parametrize("overrides, message", [
    (dict(attention="flash"), "model.attention='flash' is not one of xla, pallas, cudnn"),
    (dict(matmul="cublas"), "model.matmul='cublas' is not one of xla, pallas"),
    (dict(attention="pallas", dropout=0.1), "model.attention='pallas' has no attention dropout"),
])
def test_config_rejects_kernel_choices(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset("gpt2-nano", vocab_size=61, **overrides)
