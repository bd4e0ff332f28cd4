"""The inference engine beyond plain sampling: min-p, repetition penalty, per-row stops and limits,
streaming, text stop strings, int8 weights, the jax.export artifact and speculative decoding.

Models are tiny random float32 transformers with a large init_std (see test_sampler.py: logits far
from uniform, so greedy choices do not hinge on float32 rounding)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.quantize import QTensor, dequantize_params, quantize_params, weight_bytes
from infer.sampler import Sampler, generate, generate_long, penalize_repeats, sample_logits
from infer.speculative import speculative_generate
from model import build_model, preset

ROOT = Path(__file__).resolve().parents[2]
V = 61
PROMPTS = [[3, 14, 15, 9, 26], [8], [2, 7, 18, 28, 18, 28, 45, 9, 4, 5]]


@pytest.fixture(scope="module")
def gpt2():
    return build_model(preset("gpt2-nano", vocab_size=V, n_layers=2, d_model=64, max_seq_len=48, init_std=0.5), seed=0)


@pytest.fixture(scope="module")
def greedy(gpt2):
    return generate(gpt2, PROMPTS, max_new_tokens=12, temperature=0)


def test_min_p_keeps_only_tokens_near_the_top():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    seen = {int(sample_logits(logits, jax.random.key(s), jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0),
                              greedy=False, filtered=False, min_p=jnp.float32(0.5))[0]) for s in range(200)}
    assert seen == {0, 1}  # 0.3 >= 0.5 * 0.5, 0.15 is not


def test_repetition_penalty_rule():
    logits = jnp.asarray([[2.0, -1.0, 3.0]])
    out = penalize_repeats(logits, jnp.asarray([[True, True, False]]), jnp.float32(2.0))
    np.testing.assert_allclose(out, [[1.0, -2.0, 3.0]])


def test_repetition_penalty_changes_greedy_away_from_repeats(gpt2, greedy):
    out = generate(gpt2, PROMPTS, max_new_tokens=12, temperature=0, repetition_penalty=1e6)
    for prompt, row in zip(PROMPTS, out):
        # with a huge penalty every seen token loses to any unseen one with a positive logit
        assert len(set(row) & set(prompt)) <= 1 and len(set(row)) >= len(row) - 1
    assert out != greedy


def test_per_row_stop_tokens_and_limits(gpt2, greedy):
    stops = [[greedy[0][3]], [], [greedy[2][0]]]
    out = generate(gpt2, PROMPTS, max_new_tokens=[12, 5, 12], temperature=0, stop_tokens=stops)
    assert out[0] == greedy[0][:greedy[0].index(stops[0][0]) + 1]
    assert out[1] == greedy[1][:5]
    assert out[2] == greedy[2][:1]


def test_stop_sequences_per_row(gpt2, greedy):
    seq = greedy[1][4:7]
    out = generate(gpt2, PROMPTS, max_new_tokens=12, temperature=0, stop_sequences=[[], [seq], []])
    assert out[0] == greedy[0] and out[2] == greedy[2]
    assert out[1] == greedy[1][:7]


def test_streaming_delivers_the_tokens_as_produced(gpt2, greedy):
    got = [[] for _ in PROMPTS]

    def on_token(step, tokens, emitted):
        for i, (t, e) in enumerate(zip(tokens, emitted)):
            if e:
                got[i].append(int(t))

    out = generate(gpt2, PROMPTS, max_new_tokens=[12, 3, 12], temperature=0, on_token=on_token)
    assert got == out == [greedy[0], greedy[1][:3], greedy[2]]


def test_sliding_window_equals_manual_chunks(gpt2):
    """48 positions: the window slides inside the compiled loop at position 47 to the last 24 tokens."""
    prompt = PROMPTS[0]
    out = generate_long(gpt2, [prompt], max_new_tokens=80, temperature=0)[0]
    first = generate(gpt2, [prompt], max_new_tokens=43, temperature=0)[0]
    assert out[:43] == first
    second = generate(gpt2, [(prompt + first)[-24:]], max_new_tokens=24, temperature=0)[0]
    assert out[43:67] == second
    assert out[67:80] == generate(gpt2, [(prompt + first + second)[-24:]], max_new_tokens=13, temperature=0)[0]


def test_generate_text_stop_strings():
    from train.data.tokenizers import CharTokenizer

    tok = CharTokenizer("".join(sorted(set("abcdefghijklmnopqrstuvwxyz :\n"))))
    model = build_model(preset("gpt2-nano", vocab_size=tok.vocab_size, n_layers=1, d_model=32, max_seq_len=32,
                               init_std=0.5), seed=3)
    from infer.sampler import generate_text

    full = generate_text(model, tok, ["ab"], max_new_tokens=20, temperature=0)[0]
    stop = full[5:7]
    cut = generate_text(model, tok, ["ab"], max_new_tokens=20, temperature=0, stop=[stop])[0]
    assert cut == full[:full.index(stop)]


# ---- int8 -------------------------------------------------------------------------------------

def test_int8_weights_memory_and_agreement(gpt2):
    params = nnx.to_pure_dict(nnx.state(gpt2))
    q = quantize_params(params)
    assert isinstance(q["blocks"]["attn"]["wq"], QTensor) and q["blocks"]["attn"]["wq"].q.dtype == jnp.int8
    assert weight_bytes(q) <= 0.30 * weight_bytes(params)
    err = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)), params,
                       dequantize_params(q))
    assert max(jax.tree.leaves(err)) <= 1 / 127 * 0.51  # half a quantization step of the channel's range
    tokens = np.random.default_rng(0).integers(0, V, (4, 48)).astype(np.int32)
    graphdef, _ = nnx.split(gpt2)
    f = jax.jit(lambda p: nnx.merge(graphdef, dequantize_params(p))(tokens)[0].argmax(-1))
    agree = float(np.mean(np.asarray(f(params)) == np.asarray(f(q))))
    assert agree >= 0.9  # random weights at init_std 0.5 have many near-ties; the trained model: results.md


def test_int8_sampler_runs_and_mostly_agrees(gpt2, greedy):
    out = Sampler(gpt2, quantize="int8").generate(PROMPTS, max_new_tokens=12, temperature=0)
    assert [len(r) for r in out] == [12, 12, 12]
    assert np.mean([a == b for ra, rb in zip(out, greedy) for a, b in zip(ra, rb)]) >= 0.5
    with pytest.raises(ValueError, match="quantize"):
        Sampler(gpt2, quantize="int4")


# ---- export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [None, "int8"])
def test_exported_artifact_generates_the_sampler_tokens(gpt2, tmp_path, quantize):
    from infer.export import export_model

    path = export_model(gpt2, None, tmp_path / "m.jaxlm", quantize=quantize)
    prompt, n = PROMPTS[2], 70  # past the 48-position context: the window slides twice
    expected = Sampler(gpt2, quantize).generate([prompt], max_new_tokens=n, temperature=0, slide=True)[0]
    if quantize is None:
        # The loader in a fresh interpreter where flax and jaxlm's model/train packages cannot be imported.
        code = ("import sys; [sys.modules.__setitem__(m, None) for m in ('flax', 'model', 'train', 'optax', 'orbax')];"
                "from infer.load_exported import main; raise SystemExit(main(sys.argv[1:]))")
        r = subprocess.run([sys.executable, "-c", code, str(path), "--ids", *map(str, prompt), "--max-new-tokens",
                            str(n)], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        got = [int(x) for x in r.stdout.split()]
    else:
        from infer.load_exported import ExportedModel

        got = ExportedModel(str(path)).generate([prompt], n)[0]
    assert got == expected


# ---- speculative --------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_plain_greedy(gpt2, k):
    draft = build_model(preset("gpt2-nano", vocab_size=V, n_layers=1, d_model=32, max_seq_len=48, init_std=0.5), seed=7)
    prompt = PROMPTS[0]
    plain = generate(gpt2, [prompt], max_new_tokens=30, temperature=0)[0]
    out, stats = speculative_generate(gpt2, draft, prompt, max_new_tokens=30, k=k)
    assert out == plain
    assert stats["rounds"] >= 1


def test_speculative_with_itself_as_draft_accepts_everything(gpt2):
    out, stats = speculative_generate(gpt2, gpt2, PROMPTS[2], max_new_tokens=25, k=4)
    assert out == generate(gpt2, [PROMPTS[2]], max_new_tokens=25, temperature=0)[0]
    assert stats["acceptance"] == 1.0 and stats["rounds"] == 5  # 1 + 5 rounds x 5 tokens >= 25
