"""The OpenAI-compatible server, driven over loopback HTTP by the real `openai` client and httpx.

One in-process server (slots 4, API key) answers the protocol tests; `python -m infer serve` in a
subprocess (slots 1, queue 1, no key) answers the tests of a full queue, a client that disconnects
and SIGTERM. Outputs are checked against the engine itself (greedy, so exact) and the model's own
forward pass."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from infer.engine import SamplingOptions
from tests.infer.server_helpers import (API_KEY, CONTEXT, ROOT, InProcessServer, ServeProcess, auth, metric,
                                        shared_server, tiny_checkpoint)

LONG = CONTEXT - 24  # tokens of a generation that takes a while (about a second on 2 CPU cores)


@pytest.fixture(scope="module")
def srv():
    return shared_server()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def greedy(srv, prompt: str, max_tokens: int, **kw) -> tuple[str, list[int], object]:
    ids = [int(t) for t in srv.tokenizer.encode(prompt)]
    return srv.engine.generate(ids, SamplingOptions(max_tokens=max_tokens, temperature=0, **kw))


def test_health_and_models(srv, client):
    assert httpx.get(srv.base + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model"


def test_completion_equals_the_engine_and_counts_usage(srv, client):
    text, ids, final = greedy(srv, "Hello", 12)
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == final.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, len(ids))
    assert out.usage.total_tokens == 5 + len(ids)


def test_prompt_shapes_token_ids_and_lists(srv, client):
    text, _, _ = greedy(srv, "Hi", 6)
    by_ids = client.completions.create(model="tiny", prompt=[72, 105], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == text
    several = client.completions.create(model="tiny", prompt=["Hi", "Hello"], max_tokens=6, temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == text
    assert several.choices[1].text == greedy(srv, "Hello", 6)[0]
    lists = client.completions.create(model="tiny", prompt=[[72, 105], [72, 101, 108, 108, 111]], max_tokens=6,
                                      temperature=0)
    assert [c.text for c in lists.choices] == [c.text for c in several.choices]
    assert lists.usage.prompt_tokens == 2 + 5


def test_chat_completion_uses_the_chat_template(srv, client):
    from model.chat_template import chat_stop_strings, chat_stop_token_ids, render_chat

    tok = srv.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = render_chat(tok, messages)
    text, gen_ids, final = srv.engine.generate(ids, SamplingOptions(
        max_tokens=10, temperature=0, stop=tuple(chat_stop_strings(tok)), stop_token_ids=tuple(chat_stop_token_ids(tok))))
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == final.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(gen_ids))


def test_streaming_completion_with_usage_equals_the_whole_text(srv, client):
    whole = client.completions.create(model="tiny", prompt="Stream me", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Stream me", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # the raw stream: server-sent events ending with [DONE]
    with httpx.stream("POST", srv.base + "/v1/completions", headers=auth(),
                      json={"prompt": "Stream me", "max_tokens": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: {") for line in lines[:-1])


def test_streaming_chat_with_usage(srv, client):
    messages = [{"role": "user", "content": "Tell me"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_and_seed_reproducibility(client):
    kw = dict(model="tiny", prompt="Once upon", max_tokens=24, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) == 3  # but the n choices differ from each other
    assert a.usage.prompt_tokens == 9  # the prompt counts once
    other = client.completions.create(**{**kw, "seed": 4321, "n": 1})
    assert other.choices[0].text != a.choices[0].text
    chat = dict(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=16, temperature=1.0, seed=7)
    assert client.chat.completions.create(**chat).choices[0].message.content == \
        client.chat.completions.create(**chat).choices[0].message.content


def test_completion_logprobs(srv, client):
    text, ids, final = greedy(srv, "Hello", 8, logprobs=3)
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    np.testing.assert_allclose(lp.token_logprobs, [x.logprob for x in final.logprobs], rtol=0, atol=1e-6)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy takes the most likely token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_logprobs_equal_the_models_log_softmax(srv, client):
    prompt = "The cat sat on the mat"
    ids = [int(t) for t in srv.tokenizer.encode(prompt)]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == prompt and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [srv.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.text_offset == list(range(len(ids)))
    logits, _ = srv.model(jnp.asarray([ids], jnp.int32))  # (1, L, V)
    want = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(lp.token_logprobs[1:], np.asarray(want), rtol=0, atol=1e-4)
    # echo with generation: the prompt's logprobs, then the generated ones; text = prompt + completion
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + out.usage.completion_tokens
    assert lp.text_offset[len(ids)] == len(prompt)


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6)


def test_stop_strings_are_trimmed(srv, client):
    text, _, _ = greedy(srv, "Hello", 40)
    # the first ASCII letter after the start of the output: the output must end right before it
    cut = next(i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isalnum())
    stop = text[cut]
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert out.choices[0].text == text[:cut]
    assert out.choices[0].finish_reason == "stop"


def test_metrics_count_the_requests_sent(srv, client):
    before = httpx.get(srv.base + "/metrics", headers=auth()).text
    prompt_tokens = completion_tokens = 0
    for i in range(3):
        out = client.completions.create(model="tiny", prompt="count " * (i + 1), max_tokens=3 + i, temperature=0)
        prompt_tokens += out.usage.prompt_tokens
        completion_tokens += out.usage.completion_tokens
    for _ in range(2):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "m"}], max_tokens=2)
        prompt_tokens += out.usage.prompt_tokens
        completion_tokens += out.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, n=99)
    after = httpx.get(srv.base + "/metrics", headers=auth())
    assert after.headers["content-type"].startswith("text/plain")
    after = after.text

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("jaxlm_http_requests_total", endpoint="/v1/completions", status="200") == 3
    assert delta("jaxlm_http_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert delta("jaxlm_http_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("jaxlm_prompt_tokens_total", model="tiny") == prompt_tokens
    assert delta("jaxlm_generation_tokens_total", model="tiny") == completion_tokens
    assert delta("jaxlm_time_to_first_token_seconds_count", model="tiny") == 5
    assert delta("jaxlm_e2e_request_latency_seconds_count", model="tiny") == 5
    assert delta("jaxlm_request_queue_time_seconds_count", model="tiny") == 5
    assert delta("jaxlm_inter_token_latency_seconds_count", model="tiny") == completion_tokens - 5
    assert metric(after, "jaxlm_requests_running", model="tiny") == 0
    assert metric(after, "jaxlm_slots_total", model="tiny") == 4
    assert httpx.get(srv.base + "/metrics").status_code == 401  # the key guards the metrics too


def test_a_request_past_its_deadline_is_cancelled(srv):
    state = srv.app.state.jaxlm
    # this server's --request-timeout, shortened for the test: far below what LONG tokens take (the
    # engine's host work alone is ~0.1 ms a step); 0.3 s was once enough, until the steps got faster
    state.request_timeout_s = 0.02
    try:
        body = {"prompt": "Hello", "max_tokens": LONG, "temperature": 0}
        r = httpx.post(srv.base + "/v1/completions", json=body, headers=auth(), timeout=60)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        with httpx.stream("POST", srv.base + "/v1/completions", json={**body, "stream": True}, headers=auth(),
                          timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "deadline_exceeded"
    finally:
        state.request_timeout_s = 120
    t0 = time.monotonic()
    while metric(httpx.get(srv.base + "/metrics", headers=auth()).text, "jaxlm_requests_running", model="tiny"):
        assert time.monotonic() - t0 < 5
        time.sleep(0.01)


def test_streamed_multibyte_text_has_no_split_characters():
    """A model that writes multi-byte UTF-8 characters one byte per token (the engine tests' "cycle"
    model): no delta holds U+FFFD and the deltas add up to the text of the same request unstreamed."""
    from tests.infer.test_engine_batching import CYCLE, TOK, cycle_model

    server = InProcessServer(model=cycle_model(), tokenizer=TOK, name="cycle", api_key=None)
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)
        n = 2 * len(CYCLE.encode())
        for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
            whole = client.completions.create(model="cycle", prompt="é€", max_tokens=n, **kw).choices[0].text
            deltas = [c.choices[0].text for c in client.completions.create(model="cycle", prompt="é€", max_tokens=n,
                                                                          stream=True, **kw)]
            assert whole == (CYCLE * 3)[2:2 + 2 * len(CYCLE)]
            assert "".join(deltas) == whole and not any("\ufffd" in d for d in deltas)
    finally:
        server.stop()


def test_non_loopback_bind_without_a_key_is_refused():
    run = tiny_checkpoint()
    out = subprocess.run([sys.executable, "-m", "infer", "serve", "--run", str(run), "--host", "0.0.0.0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=_env_without_key())
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "API key" in lines[0] and "0.0.0.0" in lines[0]


def _env_without_key():
    import os

    return {k: v for k, v in os.environ.items() if k != "JAXLM_API_KEY"}


# ---- python -m infer serve in a subprocess: one slot, a queue of one ----------------------------

@pytest.fixture(scope="module")
def busy():
    proc = ServeProcess("--run", f"tiny={tiny_checkpoint()}", "--slots", "1", "--max-queue", "1",
                        "--drain-timeout", "60")
    yield proc
    proc.kill()


def _long(stream: bool = False) -> dict:
    return {"model": "tiny", "prompt": "Hello", "max_tokens": LONG, "temperature": 0, "stream": stream}


def test_full_queue_gives_429_with_retry_after(busy):
    clients = [httpx.Client(base_url=busy.base, timeout=120) for _ in range(6)]
    for c in clients:
        c.get("/health")  # connect first, so the requests below arrive together
    barrier = threading.Barrier(len(clients))
    results = [None] * len(clients)

    def send(i):
        barrier.wait()
        results[i] = clients[i].post("/v1/completions", json=_long())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 1 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
    for c in clients:
        c.close()
    # a request after the burst is served
    assert httpx.post(busy.base + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_disconnect_frees_the_slot(busy):
    before = httpx.get(busy.base + "/metrics").text
    with httpx.Client(base_url=busy.base, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=_long(stream=True)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            assert metric(httpx.get(busy.base + "/metrics").text, "jaxlm_requests_running", model="tiny") == 1
        # leaving the block closes the connection mid-stream
    t0 = time.monotonic()
    while metric(httpx.get(busy.base + "/metrics").text, "jaxlm_requests_running", model="tiny") != 0:
        assert time.monotonic() - t0 < 5, "the slot was not freed after the client left"
        time.sleep(0.01)
    after = httpx.get(busy.base + "/metrics").text
    assert metric(after, "jaxlm_requests_total", model="tiny", finish_reason="cancelled") - \
        metric(before, "jaxlm_requests_total", model="tiny", finish_reason="cancelled") == 1
    # the same for a request that is not streamed: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(busy.base + "/v1/completions", json={**_long(), "max_tokens": LONG}, timeout=0.3)
    t0 = time.monotonic()
    while metric(httpx.get(busy.base + "/metrics").text, "jaxlm_requests_running", model="tiny") != 0:
        assert time.monotonic() - t0 < 5, "the slot was not freed after the client left"
        time.sleep(0.01)


def test_sigterm_drains_running_requests_and_exits_0(busy):
    """Last test of the module: it ends the subprocess."""
    with httpx.Client(base_url=busy.base, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=_long(stream=True)) as r:
            lines = r.iter_lines()
            first = next(lines)
            busy.terminate()
            t0 = time.monotonic()
            while httpx.get(busy.base + "/health").status_code != 503:
                assert time.monotonic() - t0 < 10
                time.sleep(0.02)
            refused = httpx.post(busy.base + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "unavailable_error"
            rest = [line for line in lines if line]
    events = [json.loads(line[len("data: "):]) for line in [first] + rest[:-1]]
    assert rest[-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "length"  # the running request finished in full
    assert busy.proc.wait(timeout=60) == 0
