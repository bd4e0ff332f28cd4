"""Flash-attention kernels against the plain-jnp reference: outputs and gradients over a grid of
shapes, dtypes, causal / non-causal, grouped-query heads, segment ids and block sizes.

On a CPU every case runs in interpret mode: the GPU kernels in Pallas' interpreter, the TPU
kernels under Mosaic TPU interpret mode. On a GPU (`python -m pallas_kernels.gpu_check`) the
`gpu` cases run the compiled Triton kernels. Each case is one jitted forward + gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import platform
from pallas_kernels.flash_attention import BlockSizes, attention_reference, flash_attention

# Written tolerances (atol = rtol) per dtype, outputs and gradients alike. float32 kernels
# differ from the reference by summation order only; bfloat16 kernels round the probabilities
# to bfloat16 before the P @ V product (as every flash kernel does) and return bfloat16.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def case(dtype, B, L, S, H, K, Dh, causal, segments, blocks, backend):
    return dict(dtype=dtype, B=B, L=L, S=S, H=H, K=K, Dh=Dh, causal=causal, segments=segments, blocks=blocks,
                backend=backend)


SPLIT_BLOCKS = BlockSizes(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=32)
CASES = {
    # Large grids (many blocks) in few cases: the interpreter's cost is per compile, not per block.
    "gpu-f32-d64-causal-gqa-seg-b16": case(jnp.float32, 2, 64, 64, 4, 2, 64, True, "packed", BlockSizes.uniform(16), "gpu"),
    "gpu-bf16-d128-causal-mha-b32": case(jnp.bfloat16, 1, 128, 128, 2, 2, 128, True, None, BlockSizes.uniform(32), "gpu"),
    "gpu-f32-d128-noncausal-gqa-seg-splitblocks": case(jnp.float32, 1, 64, 64, 4, 1, 128, False, "cross",
                                                       SPLIT_BLOCKS, "gpu"),
    "gpu-bf16-d64-noncausal-L32-S64": case(jnp.bfloat16, 2, 32, 64, 2, 1, 64, False, None, BlockSizes.uniform(16), "gpu"),
    "tpu-f32-d64-causal-gqa-seg-b32": case(jnp.float32, 1, 64, 64, 2, 1, 64, True, "packed", BlockSizes.uniform(32), "tpu"),
    "tpu-bf16-d128-noncausal-b32": case(jnp.bfloat16, 1, 64, 64, 1, 1, 128, False, None, BlockSizes.uniform(32), "tpu"),
}


def segment_ids(kind, B, L, S):
    """packed: three sequences of unequal length per row (q and kv alike). cross: the queries of
    segment 2 have no key of their segment, so they must come out as zeros with zero gradient."""
    if kind is None:
        return None, None
    if kind == "packed":
        seg = np.zeros((B, L), np.int32)
        seg[:, 13:] = 1
        seg[:, 40:] = 2
        return jnp.asarray(seg), jnp.asarray(seg)
    q = np.zeros((B, L), np.int32)
    q[:, L // 2:] = 1
    q[:, L - 8:] = 2
    kv = np.zeros((B, S), np.int32)
    kv[:, S // 3:] = 1
    return jnp.asarray(q), jnp.asarray(kv)


def inputs(c, seed=0):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (c["B"], c["L"], c["H"], c["Dh"]), jnp.float32).astype(c["dtype"])
    k = jax.random.normal(kk, (c["B"], c["S"], c["K"], c["Dh"]), jnp.float32).astype(c["dtype"])
    v = jax.random.normal(kv, (c["B"], c["S"], c["K"], c["Dh"]), jnp.float32).astype(c["dtype"])
    cotangent = jax.random.normal(kg, q.shape, jnp.float32).astype(c["dtype"])
    return q, k, v, cotangent


def value_and_grads(attention, q, k, v, cotangent):
    """The output and d<output, cotangent>/d(q, k, v), in one jitted function."""
    def f(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_close(actual, expected, dtype, what):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=tol, rtol=tol, err_msg=what)


@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_attention_matches_reference(name):
    c = CASES[name]
    q, k, v, cotangent = inputs(c)
    q_seg, kv_seg = segment_ids(c["segments"], c["B"], c["L"], c["S"])
    opts = dict(causal=c["causal"], q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out, grads = value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, block_sizes=c["blocks"], backend=c["backend"], **opts),
        q, k, v, cotangent)
    # The reference runs in float32 on the same (possibly bfloat16-rounded) inputs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v, cotangent)]
    ref_out, ref_grads = value_and_grads(lambda q, k, v: attention_reference(q, k, v, **opts), *f32)
    assert out.dtype == c["dtype"] and out.shape == q.shape
    assert_close(out, ref_out, c["dtype"], "output")
    for g, rg, x, label in zip(grads, ref_grads, (q, k, v), "qkv"):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close(g, rg, c["dtype"], f"d{label}")
    if c["segments"] == "cross":  # queries with nothing to attend to: zero output, zero gradient
        empty = np.asarray(q_seg[0] == 2)
        assert np.all(np.asarray(out)[:, empty] == 0) and np.all(np.asarray(grads[0])[:, empty] == 0)


def test_causal_output_ignores_later_keys():
    """Changing the keys and values after position t leaves outputs up to t unchanged."""
    c = CASES["gpu-f32-d64-causal-gqa-seg-b16"]
    q, k, v, _ = inputs(c)
    f = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=BlockSizes.uniform(16),
                                                backend="gpu"))
    t = 37
    k2 = k.at[:, t + 1:].set(7.0)
    v2 = v.at[:, t + 1:].set(-3.0)
    np.testing.assert_array_equal(np.asarray(f(q, k, v))[:, :t + 1], np.asarray(f(q, k2, v2))[:, :t + 1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(q=(2, 64, 4, 64), k=(2, 64, 3, 64)), "query heads H=4 must be a multiple of key/value heads K=3"),
    (dict(q=(2, 64, 4, 64), k=(2, 64, 2, 32)), "head dims differ: q has Dh=64, k and v have Dh=32"),
    (dict(q=(2, 40, 4, 64), k=(2, 40, 2, 64)), "sequence length L=40 must be a multiple of its block size 16"),
    (dict(q=(2, 64, 4, 64), k=(1, 64, 2, 64)), "batch sizes differ: q has B=2, k and v have B=1"),
    (dict(q=(2, 64, 4, 48), k=(2, 64, 2, 48)), "head dim=48 must be a power of two >= 16 for the GPU"),
    (dict(q=(2, 48, 4, 64), k=(2, 48, 2, 64), block=64), "block_q=48 must be a power of two >= 16 for the GPU"),
])
def test_shape_errors_name_the_sizes(kwargs, message):
    q = jnp.zeros(kwargs["q"], jnp.float32)
    k = jnp.zeros(kwargs["k"], jnp.float32)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, k, block_sizes=BlockSizes.uniform(kwargs.get("block", 16)), backend="gpu")


def test_segment_ids_shape_error():
    q = jnp.zeros((2, 32, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"q_segment_ids.shape=\(2, 31\) must be \(B, L\)=\(2, 32\)"):
        flash_attention(q, q, q, q_segment_ids=jnp.zeros((2, 31), jnp.int32), block_sizes=BlockSizes.uniform(16),
                        backend="gpu")


def test_interpret_selection_on_cpu(monkeypatch):
    """On a CPU both kernel families run interpreted; JAXLM_PALLAS_INTERPRET picks the default one."""
    if platform.device_platform() != "cpu":
        pytest.skip("interpret-mode selection applies on CPU only")
    monkeypatch.delenv(platform.ENV_VAR, raising=False)
    assert platform.resolve() == ("gpu", True)
    monkeypatch.setenv(platform.ENV_VAR, "tpu")
    assert platform.resolve() == ("tpu", True)
    for bad in ("mps", "1"):  # "1" does not say which family: an error, not a silent "gpu"
        monkeypatch.setenv(platform.ENV_VAR, bad)
        with pytest.raises(platform.PallasPlatformError, match=f"JAXLM_PALLAS_INTERPRET='{bad}' is not one of gpu, tpu"):
            platform.resolve()
