"""The sampler: cached decoding equals the full forward pass, ragged batches equal single prompts,
sampling is reproducible from the seed, and EOS / length limits stop rows.

Models are tiny random float32 transformers (one with unrolled layers, one scanned) with a larger
init_std than training uses, so the logits are far from uniform and greedy argmax does not hinge on
float32 rounding (cached and uncached attention sum in different orders; differences are ~1e-6,
top-2 gaps ~1e-1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.sampler import Sampler, bucket_length, generate, generate_long, pad_prompts, sample_logits
from model import build_model, preset

V = 97


@pytest.fixture(scope="module")
def gpt2():  # learned positions, LayerNorm, GELU, tied embeddings, layers unrolled
    return build_model(preset("gpt2-nano", vocab_size=V, n_layers=2, init_std=0.5, scan_layers=False), seed=0)


@pytest.fixture(scope="module")
def llama():  # RoPE, SwiGLU, RMSNorm, grouped-query attention (4 heads, 2 kv heads), layers in a lax.scan
    cfg = preset("llama-tiny", vocab_size=V, n_layers=2, d_ff=128, max_seq_len=64, init_std=0.2, scan_layers=True)
    assert cfg.kv_heads < cfg.n_heads
    return build_model(cfg, seed=1)


def greedy_without_cache(model, prompt, n):
    """Reference: rerun the whole sequence through the model (no cache) and take argmax each step.
    The sequence sits in a fixed-length buffer (one compile); causal attention makes the zeros to
    the right of it irrelevant to the logits at its last token."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])  # (1, L) -> (1, L, V)
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        buf[0, i] = int(jnp.argmax(forward(params, jnp.asarray(buf))[0, i - 1]))
    return buf[0, len(prompt):].tolist()


PROMPTS = [[3, 14, 15, 92, 65, 35], [8, 9], [79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_cached_decode_matches_full_forward(arch, request):
    model = request.getfixturevalue(arch)
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    for prompt, new in zip(PROMPTS, out):
        assert new == greedy_without_cache(model, prompt, 10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ragged_batch_equals_each_prompt_alone(arch, request):
    model = request.getfixturevalue(arch)
    together = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    for prompt, new in zip(PROMPTS, together):
        assert new == generate(model, [prompt], max_new_tokens=10, temperature=0)[0]


def test_prompts_may_be_int_arrays(gpt2):
    as_lists = generate(gpt2, PROMPTS, max_new_tokens=5, temperature=0)
    as_arrays = generate(gpt2, [np.asarray(p, np.int32) for p in PROMPTS], max_new_tokens=5, temperature=0)
    assert as_lists == as_arrays


def test_same_seed_same_tokens_different_seed_different(gpt2):
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = generate(gpt2, PROMPTS, seed=0, **kw)
    assert a == generate(gpt2, PROMPTS, seed=0, **kw)
    assert a != generate(gpt2, PROMPTS, seed=1, **kw)
    assert all(len(row) == 16 and all(0 <= t < V for t in row) for row in a)


def test_top_k_1_equals_greedy(llama):
    greedy = generate(llama, PROMPTS, max_new_tokens=10, temperature=0)
    assert generate(llama, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=5) == greedy


def test_tiny_top_p_equals_greedy(llama):
    greedy = generate(llama, PROMPTS, max_new_tokens=10, temperature=0)
    assert generate(llama, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_filtering_keeps_only_the_allowed_tokens():
    # Row 0 logits favour tokens 0 > 1 > 2 > 3; top_k=2 may only give 0 or 1. Row 1: token 3 has
    # 0.7 of the mass, so top_p=0.5 keeps token 3 alone.
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]], jnp.float32))
    from jax import random

    seen_k, seen_p = set(), set()
    for s in range(200):
        key = random.key(s)
        t = sample_logits(logits, key, jnp.float32(1.0), jnp.int32(2), jnp.float32(1.0), greedy=False, filtered=True)
        seen_k.add(int(t[0]))
        t = sample_logits(logits, key, jnp.float32(1.0), jnp.int32(0), jnp.float32(0.5), greedy=False, filtered=True)
        seen_p.add(int(t[1]))
    assert seen_k == {0, 1}
    assert seen_p == {3}


def test_eos_stops_a_row(gpt2):
    greedy = generate(gpt2, PROMPTS, max_new_tokens=10, temperature=0)
    eos = greedy[1][0]  # row 1 stops at once; the others stop at their first occurrence of it, if any
    out = generate(gpt2, PROMPTS, max_new_tokens=10, temperature=0, eos_id=eos)
    assert out[1] == [eos]
    for full, stopped in zip(greedy, out):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert stopped == full[:cut]


def test_every_row_on_eos_ends_the_loop_early(gpt2):
    first = generate(gpt2, [PROMPTS[0]], max_new_tokens=1, temperature=0)[0][0]
    assert generate(gpt2, [PROMPTS[0]], max_new_tokens=40, temperature=0, eos_id=first) == [[first]]


def test_prompt_plus_new_tokens_beyond_max_seq_len_is_an_error(gpt2):
    max_len = gpt2.cfg.max_seq_len  # 64
    assert len(generate(gpt2, [[1] * 60], max_new_tokens=4, temperature=0)[0]) == 4  # exactly fits
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
        generate(gpt2, [[1] * 60, [2]], max_new_tokens=5, temperature=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(gpt2, [[1]], max_new_tokens=max_len, temperature=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=-1), "seed"),
    (dict(eos_id=V), "eos_id"),
])
def test_invalid_settings_are_errors(gpt2, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(gpt2, [[1, 2]], **kwargs)


def test_invalid_prompts_are_errors(gpt2):
    with pytest.raises(ValueError, match="empty"):
        generate(gpt2, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(gpt2, [[1, V]], max_new_tokens=2)


def test_repeated_calls_do_not_recompile(gpt2):
    from infer import sampler

    sampler._generate.clear_cache()
    s = Sampler(gpt2)
    s.generate([[1, 2, 3]], max_new_tokens=4, temperature=0.7, seed=0)
    # New prompt length in the same bucket, other sampling values, another Sampler of the same model.
    s.generate([[4, 5, 6, 7, 8]], max_new_tokens=4, temperature=0.9, top_k=0, seed=3, eos_id=1)
    Sampler(gpt2).generate([[9]], max_new_tokens=4, temperature=1.3, seed=7)
    assert sampler._generate._cache_size() == 1


def test_bucketing_and_left_padding():
    assert [bucket_length(n, 1000) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    assert bucket_length(100, 110) == 110  # capped by the room left in the context
    tokens, positions = pad_prompts([np.array([5, 6, 7]), np.array([9])], 4)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 9]])
    np.testing.assert_array_equal(positions, [[-1, 0, 1, 2], [-1, -1, -1, 0]])


def test_generate_long_within_the_context_is_generate(gpt2):
    assert generate_long(gpt2, PROMPTS, max_new_tokens=12, temperature=0) == \
        generate(gpt2, PROMPTS, max_new_tokens=12, temperature=0)


def test_generate_long_slides_the_window_past_the_context(gpt2):
    """gpt2 has 64 positions: 6 prompt tokens + 100 new ones need a second chunk, conditioned on
    the last 32 tokens."""
    prompt = PROMPTS[0]
    out = generate_long(gpt2, [prompt], max_new_tokens=100, temperature=0)[0]
    assert len(out) == 100
    first = generate(gpt2, [prompt], max_new_tokens=58, temperature=0)[0]
    assert out[:58] == first
    context = (prompt + first)[-32:]
    assert out[58:90] == generate(gpt2, [context], max_new_tokens=32, temperature=0)[0]
