"""The serving engine (infer/engine.py): continuous batching gives each request exactly what it gets
alone, prompt and token logprobs equal the model's own log-softmax, text streams without split
characters or stop strings, cancel / queue / context limits, and nothing compiles after start().

Two byte-level models share one architecture (so one set of compiled programs): a random one with a
large init_std (logits far from uniform, so greedy choices do not hinge on float32 rounding: the
engine attends over a longer cache than the sampler and batches rows) and a "cycle" model whose
weights are set by hand to continue any byte of CYCLE with the next one, so it writes multi-byte
UTF-8 characters whatever the temperature.
"""

from __future__ import annotations

import collections
import random
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.detokenize import IncrementalDecoder
from infer.engine import Engine, EngineError, PromptTooLong, QueueFull, SamplingOptions, prefill_buckets
from infer.sampler import generate
from infer.stops import StopMatcher
from model import build_model, preset
from model.tokenizer import BPETokenizer, ByteTokenizer
from model.transformer import KVCache

CFG = preset("gpt2-nano", vocab_size=257, n_layers=2, d_model=64, max_seq_len=64, init_std=0.5,
             tie_embeddings=False)
TOK = ByteTokenizer()
CYCLE = "é€漢字ab"  # 13 bytes, all different: a byte alone says which comes next
PROMPTS = [[72, 101], [5], list(range(30, 50)), [200, 13, 7, 99, 41, 250, 3], list(range(100, 111)),
           [66] * 15, list(range(1, 34)), [17, 170, 71]]


def cycle_model():
    """Blocks that add nothing (attention and MLP outputs zeroed), no position embedding, and an
    output head whose column for byte CYCLE[i+1] is the normalized embedding of byte CYCLE[i]:
    that logit is ~d_model = 64, every other one ~N(0, 8) or 0, so the next byte is certain."""
    model = build_model(CFG, seed=1)
    state = nnx.state(model)
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    p["blocks"]["attn"]["wo"] = np.zeros_like(p["blocks"]["attn"]["wo"])
    p["blocks"]["mlp"]["w_down"] = np.zeros_like(p["blocks"]["mlp"]["w_down"])
    p["pos_embed"] = np.zeros_like(p["pos_embed"])
    e = p["embed"]
    normed = (e - e.mean(-1, keepdims=True)) / e.std(-1, keepdims=True)  # the final LayerNorm (scale 1, bias 0)
    head = np.zeros_like(p["lm_head"])
    cycle = list(CYCLE.encode())
    for b, nxt in zip(cycle, cycle[1:] + cycle[:1]):
        head[:, nxt] = normed[b]
    p["lm_head"] = head
    nnx.replace_by_pure_dict(state, p)
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, TOK, slots=4, max_queue=64, name="random")
    eng.start()
    yield eng
    eng.shutdown(grace_s=5)


@pytest.fixture(scope="module")
def cycle_engine():
    eng = Engine(cycle_model(), TOK, slots=4, name="cycle")
    eng.start()  # the same architecture: the programs compiled for `engine` are reused
    yield eng
    eng.shutdown(grace_s=5)


def stream(engine, prompt, options):
    """Submit and wait; returns every event, in order."""
    events, done = [], threading.Event()

    def on_event(e):
        events.append(e)
        if e.finish_reason is not None:
            done.set()

    engine.submit(prompt, options, on_event)
    assert done.wait(120)
    return events


def run_concurrently(engine, jobs, seed=0, threads=4, max_delay=0.03):
    """Send (prompt, options) jobs in a random order with random delays from several threads.
    Returns the generated ids per job, the handles, and the most requests seen waiting at once."""
    rng = random.Random(seed)
    order = list(range(len(jobs)))
    rng.shuffle(order)
    delays = {i: rng.uniform(0, max_delay) for i in order}
    results, handles, finished = {}, {}, threading.Semaphore(0)
    peak = {"waiting": 0, "running": 0}

    def submit(i):
        prompt, options = jobs[i]
        ids = []

        def on_event(e):
            ids.extend(e.token_ids)
            s = engine.stats()
            peak["waiting"] = max(peak["waiting"], s["waiting"])
            peak["running"] = max(peak["running"], s["running"])
            if e.finish_reason is not None:
                results[i] = (ids, e.finish_reason)
                finished.release()

        handles[i] = engine.submit(prompt, options, on_event)

    def worker(mine):
        for i in mine:
            threading.Event().wait(delays[i])  # arrival gap (the point of the test, not a wait for a result)
            submit(i)

    workers = [threading.Thread(target=worker, args=(order[k::threads],)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for _ in jobs:
        assert finished.acquire(timeout=120)
    return [results[i] for i in range(len(jobs))], [handles[i] for i in range(len(jobs))], peak


# ------------------------------------------------------------------ continuous batching


def test_requests_joining_mid_batch_get_what_they_get_alone(engine, model):
    jobs = [(p, SamplingOptions(max_tokens=8 + 3 * i, temperature=0)) for i, p in enumerate(PROMPTS)]
    alone = [engine.generate(p, o)[1] for p, o in jobs]
    # the sampler's greedy output (one ragged batch: equal to each prompt alone, see test_sampler.py)
    assert alone == generate(model, PROMPTS, max_new_tokens=[o.max_tokens for _, o in jobs], temperature=0,
                             eos_id=TOK.eos_id)
    together, handles, peak = run_concurrently(engine, jobs)
    assert [ids for ids, _ in together] == alone
    assert peak["waiting"] > 0 and peak["running"] > 1  # some waited for a slot, several shared steps
    # requests joined while others were running (not one batch start to end)
    spans = sorted((h.started_at, h.finished_at) for h in handles)
    assert any(a[0] < b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert engine.stats() == {"running": 0, "waiting": 0, "slots": 4, "slots_used": 0}


def test_mixed_sampling_settings_share_a_batch_and_seeds_reproduce(engine):
    settings = [dict(temperature=0), dict(temperature=0.8, top_k=5), dict(temperature=1.0, top_p=0.9),
                dict(temperature=1.2, min_p=0.1), dict(temperature=0.7, repetition_penalty=1.5),
                dict(temperature=1.0, logprobs=3), dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05),
                dict(temperature=1.0)]
    jobs = [(PROMPTS[i], SamplingOptions(max_tokens=12, seed=100 + i, **s)) for i, s in enumerate(settings)]
    alone = [engine.generate(p, o)[1] for p, o in jobs]
    together, _, _ = run_concurrently(engine, jobs, seed=1)
    assert [ids for ids, _ in together] == alone  # same seed: same tokens, whatever slot and neighbours
    again, _, _ = run_concurrently(engine, jobs, seed=2)
    assert [ids for ids, _ in again] == alone
    other_seed = engine.generate(PROMPTS[7], SamplingOptions(max_tokens=12, seed=999, temperature=1.0))[1]
    assert other_seed != alone[7]
    # the settings act: top_k=1 is greedy; a strong repetition penalty never repeats a token of the row
    greedy = engine.generate(PROMPTS[2], SamplingOptions(max_tokens=10, temperature=0))[1]
    assert engine.generate(PROMPTS[2], SamplingOptions(max_tokens=10, temperature=1.0, top_k=1, seed=3))[1] == greedy
    prompt = [120, 121, 122]
    ids = engine.generate(prompt, SamplingOptions(max_tokens=20, temperature=0, repetition_penalty=1e6))[1]
    ids = ids[:-1] if ids[-1] == TOK.eos_id else ids
    assert len(set(ids + prompt)) == len(ids) + len(prompt)


def test_no_compile_after_start(engine):
    compiles = []

    def listener(event, duration, **kwargs):
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        lengths = [1, 2, 8, 9, 16, 17, 33, 40]  # every prefill bucket
        opts = [dict(temperature=0, echo_logprobs=True), dict(temperature=0.5, top_p=0.8, logprobs=20),
                dict(temperature=1.0, top_k=3, repetition_penalty=1.2), dict(temperature=1.0, min_p=0.2, logprobs=0),
                dict(temperature=0), dict(temperature=2.0, stop=("a",), stop_token_ids=(5,)),
                dict(temperature=0, max_tokens=0, echo_logprobs=True), dict(temperature=0.3, seed=7)]
        jobs = [(list(range(3, 3 + n)), SamplingOptions(**{"max_tokens": 64 - n - 1, **o}))
                for n, o in zip(lengths, opts)]
        results, _, _ = run_concurrently(engine, jobs, seed=3)
        assert compiles == []
        jax.jit(lambda x: x * 3 + 1)(np.float32(2))  # the listener does see a compile
        assert compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert all(reason in ("stop", "length") for _, reason in results)
    assert {bucket for bucket in prefill_buckets(64)} == {8, 16, 32, 64}


def test_the_decode_step_updates_each_kv_layer_in_place_and_copies_none(engine):
    """At more than one slot the cache is one buffer per layer (KVCache per_layer): in the compiled
    decode step the only values shaped like a cache layer are the donated buffers themselves and
    one in-place row write (scatter) each. With the stacked cache XLA:CPU added a copy of every
    layer, cut out of the stack after the write for attention to read (a fifth of the 8-row step
    of the quickstart model; experiments/results.md)."""
    from infer.engine import _decode

    state = engine._state
    assert state.cache.per_layer and len(state.cache.k) == len(state.cache.v) == CFG.n_layers
    compiled = _decode.lower(engine._rest, engine._layers, state, np.ones(engine.slots, bool), engine._all_allowed,
                             graphdef=engine._graphdef, filtered=False, top=False, layout=None).compile()
    shapes = {"f32[%s]" % ",".join(map(str, x.shape)) for x in (*state.cache.k, *state.cache.v)}
    made = collections.Counter()
    for line in compiled.as_text().split("\nENTRY ", 1)[1].splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (f32\[[0-9,]+\])\S* (\S+?)\(", line)
        if m and m.group(2) in shapes:
            made["scatter" if m.group(3) == "fusion" and "scatter" in m.group(1) else m.group(3)] += 1
    assert made == {"parameter": 2 * CFG.n_layers, "scatter": 2 * CFG.n_layers}, made


# ------------------------------------------------------------------ logprobs


@pytest.fixture(scope="module")
def full_forward_logprobs(model):
    """ids -> (L, V) float32 log-softmax of a plain forward pass (no cache) at each position. The ids
    sit in a buffer of the whole context (one compile); causal attention ignores what follows."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, t: jax.nn.log_softmax(nnx.merge(graphdef, p)(t)[0][0].astype(jnp.float32), axis=-1))

    def logprobs(ids):
        buf = np.zeros((1, CFG.max_seq_len), np.int32)
        buf[0, :len(ids)] = ids
        return np.asarray(forward(params, buf))[:len(ids)]

    return logprobs


def test_echo_logprobs_equal_the_models_log_softmax(engine, full_forward_logprobs):
    prompt = list(range(40, 60)) + [7, 7, 250]
    text, ids, summary = engine.generate(prompt, SamplingOptions(max_tokens=0, echo_logprobs=True))
    assert ids == [] and text == "" and summary.finish_reason == "length"
    ref = full_forward_logprobs(prompt)
    got = summary.prompt_logprobs
    assert got[0] is None and len(got) == len(prompt)
    np.testing.assert_allclose(got[1:], [ref[j - 1, prompt[j]] for j in range(1, len(prompt))], atol=1e-4)
    # with generation the first event carries them too, and each generated token's logprob (raw
    # model distribution) and alternatives match the forward pass over prompt + generated tokens
    events = stream(engine, prompt, SamplingOptions(max_tokens=6, temperature=0.9, seed=1, logprobs=5,
                                                    echo_logprobs=True))
    np.testing.assert_allclose(events[0].prompt_logprobs[1:], got[1:], atol=1e-4)
    assert all(e.prompt_logprobs is None for e in events[1:])
    gen = [t for e in events for t in e.token_ids]
    lps = [lp for e in events for lp in e.logprobs]
    ref = full_forward_logprobs(prompt + gen)
    for i, (t, lp) in enumerate(zip(gen, lps)):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == t and lp.text == TOK.decode([t])
        np.testing.assert_allclose(lp.logprob, row[t], atol=1e-4)
        assert [a for a, _, _ in lp.top] == list(np.argsort(-row)[:5])
        np.testing.assert_allclose([v for _, _, v in lp.top], np.sort(row)[::-1][:5], atol=1e-4)


# ------------------------------------------------------------------ text: UTF-8 and stop strings


def test_multibyte_characters_are_never_split(cycle_engine):
    prompt = TOK.encode("é€").tolist()
    n = 3 * len(CYCLE.encode())  # ends on a character boundary
    expected = (CYCLE * 4)[2:2 + 3 * len(CYCLE)]  # continues after "é€"
    for options in (SamplingOptions(max_tokens=n, temperature=0), SamplingOptions(max_tokens=n, temperature=1.0,
                                                                                     seed=5)):
        events = stream(cycle_engine, prompt, options)
        deltas = [e.text for e in events]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == expected == cycle_engine.generate(prompt, options)[0]
        assert "" in deltas[:-1]  # the first bytes of a character produced no text yet
        assert sum(len(e.token_ids) for e in events) == n and events[-1].finish_reason == "length"


def test_stop_strings_across_token_boundaries_are_trimmed(cycle_engine):
    prompt = TOK.encode("é€").tolist()
    # "字a" is four byte tokens; nothing of it (not even "字") reaches the client
    events = stream(cycle_engine, prompt, SamplingOptions(max_tokens=40, temperature=0, stop=("字a",)))
    assert "".join(e.text for e in events) == "漢" and events[-1].finish_reason == "stop"
    assert all("字" not in e.text for e in events)
    assert sum(len(e.token_ids) for e in events) == 7  # 漢 (3 bytes) + 字a (4): the last one matched
    # a held-back prefix that turns out not to be a stop is released, in order
    text, ids, last = cycle_engine.generate(prompt, SamplingOptions(max_tokens=13, temperature=0, stop=("字b", "bé€x")))
    assert text == "漢字abé€" and last.finish_reason == "length"
    # the earliest of several stops wins; a stop token id ends the text (its own text excluded)
    assert cycle_engine.generate(prompt, SamplingOptions(max_tokens=40, temperature=0, stop=("bé", "a")))[0] == "漢字"
    text, ids, last = cycle_engine.generate(prompt, SamplingOptions(max_tokens=40, temperature=0,
                                                                    stop_token_ids=(ord("b"),)))
    assert text == "漢字a" and ids[-1] == ord("b") and last.finish_reason == "stop"


def test_stop_matcher_and_incremental_decoder_units():
    m = StopMatcher(("\n\n", "END"))
    assert m.push("Hello\n") == ("Hello", False)
    assert m.push("E") == ("\n", False)  # "\nE" starts no stop: the newline goes out, "E" may start "END"
    assert m.push("Nx") == ("ENx", False)
    assert m.push("y\n") == ("y", False)
    assert m.push("\nmore") == ("", True)
    # a byte-level BPE: ids pushed one at a time give exactly decode(ids), never a partial character
    docs = ["naïve café déjà vu — 漢字 かな €100 😀 " * 3, "plain ascii text here " * 3]
    bpe = BPETokenizer.train(docs, vocab_size=300, progress=False)
    text = "café 漢字 😀 déjà — かな €"
    ids = bpe.encode(text).tolist()
    dec = IncrementalDecoder(bpe)
    deltas = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(deltas) == bpe.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    byte_ids = TOK.encode(text).tolist()
    dec = IncrementalDecoder(TOK)
    deltas = [dec.push(t) for t in byte_ids]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    dec = IncrementalDecoder(TOK)
    assert [dec.push(t) for t in "€".encode()[:2]] == ["", ""] and dec.flush() == "\ufffd"  # cut off at the end


# ------------------------------------------------------------------ limits, cancel, queue


def test_cancel_frees_the_slot_within_a_step(engine):
    first, done = threading.Event(), threading.Event()
    events = []

    def on_event(e):
        events.append(e)
        first.set()
        if e.finish_reason is not None:
            done.set()

    handle = engine.submit([1, 2, 3], SamplingOptions(max_tokens=60, temperature=1.0, seed=0,
                                                      stop_token_ids=()), on_event)
    assert first.wait(60)
    handle.cancel()
    n_at_cancel = len(events)
    assert done.wait(60)
    assert events[-1].finish_reason == "cancelled" and handle.finish_reason == "cancelled"
    assert len(events) - n_at_cancel <= 2  # at most the step under way, then the final event
    assert events[-1].completion_tokens < 60
    assert engine.stats()["running"] == 0
    # a request cancelled while it waits for a slot ends with no tokens
    blockers = [engine.submit([9] * 4, SamplingOptions(max_tokens=50, temperature=0.0), lambda e: None)
                for _ in range(4)]
    got, waiting_done = [], threading.Event()
    waiting = engine.submit([4, 5], SamplingOptions(max_tokens=5),
                            lambda e: (got.append(e), e.finish_reason and waiting_done.set()))
    waiting.cancel()
    assert waiting_done.wait(60)
    assert got[-1].finish_reason == "cancelled" and got[-1].completion_tokens == 0 and got[-1].token_ids == []
    for b in blockers:
        b.cancel()


def test_queue_full_prompt_too_long_and_bad_options(model):
    eng = Engine(model, TOK, slots=4, max_queue=2)  # not started: requests stay queued
    finals = []
    for _ in range(2):
        eng.submit([1, 2], SamplingOptions(), finals.append)
    with pytest.raises(QueueFull, match="queue is full"):
        eng.submit([1, 2], SamplingOptions(), finals.append)
    with pytest.raises(PromptTooLong, match="60 tokens.*max_tokens 5.*65.*64"):
        eng.submit(list(range(60)), SamplingOptions(max_tokens=5), finals.append)
    bad = [(dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
           (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=1.0), "min_p"),
           (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logprobs=21), "logprobs"),
           (dict(max_tokens=-1), "max_tokens"), (dict(stop=("",)), "stop"), (dict(stop_token_ids=(257,)), "stop_token_ids"),
           (dict(seed=1.5), "seed"), (dict(stop=("x",) * 65), "stop")]
    for kw, field in bad:
        with pytest.raises(EngineError, match=field):
            eng.submit([1], SamplingOptions(**kw), finals.append)
    with pytest.raises(EngineError, match="empty"):
        eng.submit([], SamplingOptions(), finals.append)
    with pytest.raises(EngineError, match="vocabulary"):
        eng.submit([257], SamplingOptions(), finals.append)
    for prompt in ([1.5, 2.0], [[1, 2]], [True], ["a"]):
        with pytest.raises(EngineError, match="integer token ids"):
            eng.submit(prompt, SamplingOptions(), finals.append)
    eng.shutdown(grace_s=0)
    assert [e.finish_reason for e in finals] == ["cancelled", "cancelled"]
    with pytest.raises(EngineError, match="shutting down"):
        eng.submit([1], SamplingOptions(), finals.append)


def test_prompt_filling_the_context_runs_to_its_last_position(engine, full_forward_logprobs):
    prompt = list(range(2, 62))  # 60 + 4 = the whole context of 64
    text, ids, last = engine.generate(prompt, SamplingOptions(max_tokens=4, temperature=0))
    seq = list(prompt)
    for _ in range(4):  # greedy from the full forward pass
        seq.append(int(np.argmax(full_forward_logprobs(seq)[-1])))
    assert ids == seq[len(prompt):len(prompt) + len(ids)] and (len(ids) == 4 or ids[-1] == TOK.eos_id)
    assert last.prompt_tokens == 60 and last.completion_tokens == len(ids)


# ------------------------------------------------------------------ the model hook: a write index per row


def test_per_row_cache_index_decodes_each_row_at_its_own_position():
    """KVCache.index of shape (B,): rows at different positions in one batch (the engine's slots)
    decode exactly as a plain forward pass of each sequence. Llama-style (RoPE, grouped-query
    attention, scanned layers), the other half of what the engine tests cover."""
    cfg = preset("llama-tiny", vocab_size=97, n_layers=2, d_ff=128, max_seq_len=32, init_std=0.2, scan_layers=True)
    assert cfg.kv_heads < cfg.n_heads
    model = build_model(cfg, seed=1)
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, t, pos, c: nnx.merge(graphdef, p)(t, pos, cache=c))
    full = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
    prompts = [[3, 14, 15, 92, 65], [8, 9]]
    tokens = np.array([p + [0] * (5 - len(p)) for p in prompts], np.int32)  # (2, 5) right-padded
    positions = np.array([[i if i < len(p) else -1 for i in range(5)] for p in prompts], np.int32)
    cache = KVCache.init(cfg, batch=2, length=16)
    cache = KVCache(cache.k, cache.v, cache.positions, jnp.zeros((2,), jnp.int32))
    logits, cache = step(params, tokens, positions, cache)
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache = KVCache(cache.k, cache.v, cache.positions, jnp.asarray(lengths))  # row 1's padding gets overwritten
    nxt = np.asarray(logits)[np.arange(2), lengths - 1].argmax(-1)
    out = [[int(t)] for t in nxt]
    for i in range(5):
        logits, cache = step(params, nxt[:, None].astype(np.int32), (lengths + i)[:, None], cache)
        nxt = np.asarray(logits)[:, 0].argmax(-1)
        for row, t in zip(out, nxt):
            row.append(int(t))
    for p, row in zip(prompts, out):
        buf = np.zeros((1, 16), np.int32)
        seq = list(p)
        for _ in range(6):
            buf[0, :len(seq)] = seq
            seq.append(int(np.asarray(full(params, buf))[0, len(seq) - 1].argmax()))
        assert row == seq[len(p):]
