"""The fused XLA:CPU attention kernel (pallas_kernels/cpu/attention.cc): forward and gradients equal
the jnp reference (model.attention.xla_attention + causal_mask) to float32 rounding, for the
shapes and masks the model produces; what it cannot run is a clear error."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import causal_mask, xla_attention
from pallas_kernels.cpu import HEAD_DIMS, cpu_attention
from pallas_kernels.cpu import build

pytestmark = pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the XLA:CPU kernel")

# float32, values O(1): the kernel sums in another order and has its own exp polynomial
ATOL = 2e-5


def qkv(B, L, S, H, K, D, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32) for _ in range(2))
    return q, k, v


def reference(q, k, v, q_pos, kv_pos):
    return xla_attention(q, k, v, causal_mask(q_pos, kv_pos))


def assert_matches_reference(q, k, v, q_pos, kv_pos):
    out = jax.jit(cpu_attention)(q, k, v, q_pos, kv_pos)
    np.testing.assert_allclose(out, reference(q, k, v, q_pos, kv_pos), atol=ATOL, rtol=ATOL)
    w = jnp.asarray(np.random.default_rng(9).standard_normal(out.shape), jnp.float32)

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, q_pos, kv_pos)) * w)  # a non-uniform cotangent

    grads = jax.jit(jax.grad(loss(cpu_attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref):
        np.testing.assert_allclose(g, r, atol=ATOL, rtol=1e-4, err_msg=f"d{name}")


def arange_positions(B, L, offset=0):
    return jnp.broadcast_to(jnp.arange(offset, offset + L, dtype=jnp.int32), (B, L))


@pytest.mark.parametrize("B, L, H, K, D", [
    (12, 64, 4, 4, 32),   # the shakespeare_char_cpu model's attention
    (2, 13, 4, 2, 16),    # grouped-query heads; L not a multiple of the 16-key blocks nor of 4 rows
    (1, 37, 6, 2, 64),    # three query heads per kv head
    (2, 20, 2, 2, 128),   # two rows per group at this head size
    (1, 9, 1, 1, 256),    # one row per group
])
def test_causal_self_attention_matches_reference(B, L, H, K, D):
    q, k, v = qkv(B, L, L, H, K, D)
    pos = arange_positions(B, L)
    assert_matches_reference(q, k, v, pos, pos)


def test_left_padding_and_fully_masked_rows_match_reference():
    """Position -1 (left padding) is never attended to; a query that sees no key averages all of
    them, as the reference's softmax over scores that are all float32's lowest value does."""
    B, L = 3, 21
    q, k, v = qkv(B, L, L, 4, 2, 32, seed=1)
    pad = np.array([0, 5, 20])[:, None]
    pos = jnp.asarray(np.where(np.arange(L)[None] < pad, -1, np.arange(L)[None] - pad), jnp.int32)
    assert_matches_reference(q, k, v, pos, pos)


def test_queries_over_a_partly_filled_key_range_match_reference():
    """Queries at positions 6..10 over 40 key slots of which 11 hold tokens (the rest -1): the
    kernel takes any positions, not only a square causal triangle."""
    B, L, S = 2, 5, 40
    q, k, v = qkv(B, L, S, 4, 4, 32, seed=2)
    q_pos = arange_positions(B, L, offset=6)
    kv_pos = jnp.asarray(np.where(np.arange(S) < 11, np.arange(S), -1)[None].repeat(B, 0), jnp.int32)
    assert_matches_reference(q, k, v, q_pos, kv_pos)


def test_bfloat16_inputs_are_computed_in_float32():
    q, k, v = qkv(2, 16, 16, 2, 2, 32)
    pos = arange_positions(2, 16)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = cpu_attention(*bf, pos, pos)
    assert out.dtype == jnp.bfloat16
    expected = reference(*[x.astype(jnp.float32) for x in bf], pos, pos)
    np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=1e-2)  # bfloat16's rounding of the output


def test_unsupported_shapes_are_clear_errors():
    q, k, v = qkv(1, 8, 8, 2, 2, 24)
    pos = arange_positions(1, 8)
    with pytest.raises(ValueError, match=re.escape(f"head_dim in {HEAD_DIMS}, not 24")):
        cpu_attention(q, k, v, pos, pos)
    q, k, v = qkv(1, 8, 8, 3, 2, 32)
    with pytest.raises(ValueError, match="H a multiple of K"):
        cpu_attention(q, k, v, pos, pos)
    q, k, v = qkv(1, 8, 8, 2, 2, 32)
    with pytest.raises(ValueError, match="positions"):
        cpu_attention(q, k, v, pos[:, :4], pos)


def test_under_a_mesh_of_several_devices_is_a_clear_error():
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices (tests/conftest.py makes eight)")
    q, k, v = qkv(2, 8, 8, 2, 2, 32)
    pos = arange_positions(2, 8)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="one device, but a mesh of 2 devices"):
        jax.jit(cpu_attention)(q, k, v, pos, pos)


def test_missing_compiler_and_compile_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(build.CpuKernelBuildError, match="need a C\\+\\+ compiler: 'no-such-compiler-xyz'"):
        build.load_library.__wrapped__("jaxlm_cpu_kernels", build.SOURCES)
    monkeypatch.delenv("CXX")
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    with pytest.raises(build.CpuKernelBuildError, match="compiling broken.cc failed"):
        build.load_library.__wrapped__("broken", (broken,))
    assert not list((tmp_path / "cpu_kernels").glob("*.so"))  # no half-written library is left


def test_build_is_cached_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
    build.load_library.__wrapped__("jaxlm_cpu_kernels", build.SOURCES)
    built = list((tmp_path / "cpu_kernels").glob("jaxlm_cpu_kernels-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    build.load_library.__wrapped__("jaxlm_cpu_kernels", build.SOURCES)  # a second process: loads, no compile
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cpu_kernels").glob("jaxlm_cpu_kernels-*.so")] == [mtime]
