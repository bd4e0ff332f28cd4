"""A corpus of malformed and hostile requests: every one is answered 4xx with an OpenAI error object
(never a 5xx, never FastAPI's 422), a long generation running meanwhile is not disturbed, and a
normal request afterwards succeeds.

The corpus is generated from field x bad-value tables for both endpoints (wrong types, negative,
NaN, infinite and huge numbers, out-of-range values, unsupported OpenAI fields) plus hand-written
cases: broken JSON, invalid UTF-8, lone surrogates, bodies over 2 MB, keys, endpoints, methods."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.infer.server_helpers import API_KEY, CONTEXT, auth, shared_server

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
OK_CMPL = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

WRONG_TYPES = {"stream": ["1", 1, [True], {"a": 1}], "n": ["1", True, [1], {"a": 1}],
               "max_tokens": ["1", False, [1], {"a": 1}]}
BAD_NUMBER_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "99999999999999999999999999"]

# field -> bad values (each answered 400 unless the value says otherwise)
COMPLETION_BAD = {
    "prompt": ["", [], [""], [[]], None, 5, True, {"text": "a"}, [1.5], [-1], [257], [2**40], [[1], "a"], [True],
               ["a", 3], [[1, 2], [3, "x"]], ["ok"] * 65],
    "max_tokens": [-1, 2**31, 2**63, 10**30, 1.5, "10", True, CONTEXT, [4]],
    "temperature": [-0.1, 2.5, 1e308, "hot", True, [1.0]],
    "top_p": [0, -1, 1.5, "x", False],
    "n": [0, -1, 17, 10**9, 2**63, 1.0, "2", True, None],
    "stop": [[""], ["a"] * 9, ["x"] * 5000, 5, [1], "x" * 1000, [None], {"s": 1}],
    "seed": [1.5, "1", 2**64, -(2**64), True],
    "stream": ["yes", 1, None],
    "logprobs": [-1, 21, 100, "5", True, 1.5],
    "echo": ["true", 1, None],
    "top_k": [-1, 1.5, "1", 2**31],
    "min_p": [-0.1, 1.0, 2, "0.1"],
    "repetition_penalty": [0, -1, 11, "1"],
    "best_of": [2, 0, 100, "1"],
    "suffix": ["abc", 5],
    "frequency_penalty": [0.5, -1, "0"],
    "presence_penalty": [1.0],
    "logit_bias": [{"1": 5}, [1]],
    "stream_options": [{"include_usage": True}, {"bad": 1}, "x", {"include_usage": "yes"}],
    "model": [5, "", ["tiny"], "x" * 300, "tiny ", "TINY"],
    "user": [5, "u" * 300],
    "not_a_field": [1],
}
CHAT_BAD = {
    "messages": [[], None, "hi", [{}], [{"role": "user"}], [{"content": "x"}], [{"role": "robot", "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": None}], [{"role": "user", "content": []}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
                 [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": "x", "extra": 1}],
                 [{"role": "tool", "content": "x", "tool_call_id": "1"}], ["x"], [[{"role": "user"}]],
                 [{"role": "user", "content": "x"}] * 1025, [{"role": "USER", "content": "x"}]],
    "max_tokens": [-1, 0, 2**31, 1.5, "10", CONTEXT],
    "max_completion_tokens": [0, -5, "1"],
    "temperature": [-1, 3, "x"],
    "top_p": [0, 2],
    "n": [0, 17, 10**9],
    "stop": [["a"] * 9, 7],
    "logprobs": ["yes", 1],
    "top_logprobs": [-1, 21, "2"],
    "seed": ["x"],
    "tools": [[{"type": "function", "function": {"name": "f"}}], "x"],
    "tool_choice": ["auto", 5],
    "response_format": [{"type": "json"}, "json", {"type": "json_schema"}, {"type": "text", "json_schema": {}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}],
    "functions": [[{"name": "f"}]],
    "stream_options": [{"include_usage": True}],
    "model": ["gpt-4"],
    "prompt": ["hi"],
}


def _expected(field, value) -> int:
    """400 for a bad field; 404 for a well-formed name of a model the server does not have."""
    return 404 if field == "model" and isinstance(value, str) and len(value) <= 256 else 400


def _cases():
    """(name, method, path, content bytes | None, headers, expected status)."""
    out = []
    for path, ok, table in ((CMPL, OK_CMPL, COMPLETION_BAD), (CHAT, OK_CHAT, CHAT_BAD)):
        for field, values in table.items():
            for i, value in enumerate(values):
                body = {**ok, field: value}
                out.append((f"{path} {field}[{i}]", "POST", path, json.dumps(body).encode(), {},
                            _expected(field, value)))
        for field in ("temperature", "top_p", "n", "max_tokens", "seed", "min_p", "repetition_penalty", "top_k"):
            for literal in BAD_NUMBER_LITERALS:
                body = json.dumps({**ok, field: 0}).replace(f'"{field}": 0', f'"{field}": {literal}')
                out.append((f"{path} {field}={literal}", "POST", path, body.encode(), {}, 400))
        for field, values in WRONG_TYPES.items():
            for j, value in enumerate(values):
                out.append((f"{path} {field} type[{j}]", "POST", path, json.dumps({**ok, field: value}).encode(), {},
                            400))
    # prompts over the context: 413
    out.append(("prompt over context", "POST", CMPL, json.dumps({**OK_CMPL, "prompt": "x" * (CONTEXT + 5)}).encode(),
                {}, 413))
    out.append(("token prompt over context", "POST", CMPL,
                json.dumps({**OK_CMPL, "prompt": [65] * CONTEXT}).encode(), {}, 413))
    out.append(("chat over context", "POST", CHAT, json.dumps(
        {**OK_CHAT, "messages": [{"role": "user", "content": "y" * (CONTEXT + 5)}]}).encode(), {}, 413))
    # broken JSON and non-object bodies
    for i, raw in enumerate([b"", b"{", b'{"prompt": "a",}', b"nul", b'"string"', b"[1, 2]", b"123", b"null",
                             b"{'prompt': 'a'}", b'{"prompt": "a" "b"}', b'{"prompt": "unterminated}', b"\x00",
                             b"[" * 100_000, b'{"a":' * 10_000, b'{"prompt": "a"} trailing',
                             b'{"prompt": "\\x41"}', b'{"prompt": "\\u12"}']):
        for path in (CMPL, CHAT):
            out.append((f"{path} bad json[{i}]", "POST", path, raw, {}, 400))
    # invalid UTF-8 and lone surrogates
    for i, raw in enumerate([b'{"prompt": "\xff\xfe"}', b'{"prompt": "\xc3\x28"}', b'{"prompt": "\xc0\xaf"}',
                             b'{"prompt": "\xed\xa0\x80"}', b'\xef\xbb\xbf{"prompt": "a"}', b'{"prompt": "a\x80"}']):
        out.append((f"invalid utf-8[{i}]", "POST", CMPL, raw, {}, 400))
    for i, body in enumerate(['{"prompt": "\\ud800"}', '{"prompt": "a\\udfff b"}', '{"prompt": ["ok", "\\udc00"]}',
                              '{"prompt": "a", "stop": ["\\ud83d"]}', '{"prompt": "a", "model": "\\ud800"}',
                              '{"\\ud800": 1, "prompt": "a"}', '{"prompt": "a", "user": "\\udbff"}']):
        out.append((f"lone surrogate cmpl[{i}]", "POST", CMPL, body.encode(), {}, 400))
    for i, content in enumerate(["\\ud800", "x\\udfffy", "\\ud83d\\ud83d"]):
        body = '{"messages": [{"role": "user", "content": "%s"}]}' % content
        out.append((f"lone surrogate chat[{i}]", "POST", CHAT, body.encode(), {}, 400))
    # bodies over 2 MB: by Content-Length, and sent chunked (no Content-Length)
    big = json.dumps({**OK_CMPL, "prompt": "a" * (3 * 1024 * 1024)}).encode()
    out.append(("3 MB body", "POST", CMPL, big, {}, 413))
    out.append(("3 MB chat body", "POST", CHAT, big, {}, 413))
    out.append(("3 MB chunked body", "POST", CMPL, "chunked", {}, 413))
    # keys: missing, wrong, wrong scheme; on every guarded endpoint
    ok = json.dumps(OK_CMPL).encode()
    for i, headers in enumerate([{"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer  x"},
                                 {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {API_KEY}x"},
                                 {"Authorization": f"Bearer {API_KEY[:-1]}"}, {"Authorization": f"Basic {API_KEY}"},
                                 {"Authorization": API_KEY}, {"X-Api-Key": API_KEY}, None]):
        for method, path in (("POST", CMPL), ("POST", CHAT), ("GET", "/v1/models"), ("GET", "/metrics")):
            out.append((f"key[{i}] {method} {path}", method, path, ok if method == "POST" else None,
                        {"__noauth__": "1", **(headers or {})}, 401))
    # endpoints and methods
    for method, path, status in (("POST", "/v1/embeddings", 404), ("GET", "/v1/nope", 404), ("GET", "/", 404),
                                 ("GET", CMPL, 405), ("PUT", CHAT, 405), ("DELETE", "/v1/models", 405),
                                 ("POST", "/v1/models", 405), ("GET", "/docs", 404), ("GET", "/openapi.json", 404),
                                 ("POST", "/v1/completions/../chat", 404)):
        out.append((f"{method} {path}", method, path, ok if method in ("POST", "PUT") else None, {}, status))
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def srv():
    return shared_server()


def _send(client: httpx.Client, method, path, content, headers):
    headers = dict(headers)
    if headers.pop("__noauth__", None) is None:
        headers = {**auth(), **headers}
    if content == "chunked":
        def chunks():
            yield b'{"prompt": "'
            for _ in range(48):
                yield b"a" * 65536
            yield b'"}'

        content = chunks()
    return client.request(method, path, content=content, headers={"Content-Type": "application/json", **headers})


def test_corpus_size():
    assert len(CASES) >= 200, len(CASES)


def test_hostile_corpus_gets_4xx_error_objects_and_harms_nobody(srv):
    # a long generation runs while the corpus is sent: it must finish untouched
    done: dict = {}

    def long_running():
        with httpx.Client(base_url=srv.base, timeout=120, headers=auth()) as c:
            with c.stream("POST", CMPL, json={**OK_CMPL, "max_tokens": CONTEXT - 16, "stream": True,
                                              "temperature": 0}) as r:
                done["lines"] = [line for line in r.iter_lines() if line]

    bystander = threading.Thread(target=long_running)
    bystander.start()
    failures = []
    with httpx.Client(base_url=srv.base, timeout=60) as client:
        for name, method, path, content, headers, want in CASES:
            r = _send(client, method, path, content, headers)
            try:
                body = r.json()
                err = body["error"]
                shape_ok = set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) \
                    and err["message"] and "\n" not in err["message"] and isinstance(err["type"], str)
            except (ValueError, KeyError, TypeError):
                shape_ok = False
            if r.status_code != want or not shape_ok:
                failures.append(f"{name}: {r.status_code} (want {want}) {r.text[:200]}")
    bystander.join(timeout=120)
    assert not failures, "\n".join(failures)
    lines = done["lines"]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    # and a normal request afterwards succeeds
    r = httpx.post(srv.base + CMPL, json=OK_CMPL, headers=auth())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    r = httpx.post(srv.base + CHAT, json=OK_CHAT, headers=auth())
    assert r.status_code == 200


def test_error_messages_name_the_field_and_what_is_allowed(srv):
    def error(path, body):
        r = httpx.post(srv.base + path, json=body, headers=auth())
        assert 400 <= r.status_code < 500
        return r.json()["error"]

    e = error(CMPL, {**OK_CMPL, "n": 10**9})
    assert e["param"] == "n" and "16" in e["message"]
    e = error(CMPL, {**OK_CMPL, "max_tokens": 2**31})
    assert e["param"] == "max_tokens" and str(CONTEXT - 5) in e["message"]
    e = error(CMPL, {**OK_CMPL, "stop": ["x"] * 5000})
    assert e["param"] == "stop" and "8" in e["message"]
    e = error(CHAT, {**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]})
    assert e["param"] == "messages.0.role" and "'user'" in e["message"]
    e = error(CMPL, {**OK_CMPL, "model": "nope"})
    assert e["code"] == "model_not_found" and "'tiny'" in e["message"]
    e = error(CMPL, {**OK_CMPL, "temprature": 0.5})
    assert e["param"] == "temprature" and "temperature" in e["message"]
    e = error(CMPL, {**OK_CMPL, "frequency_penalty": 0.5})
    assert e["param"] is None and "repetition_penalty" in e["message"]


@pytest.mark.parametrize("text", ["<|endoftext|>", "a<|endoftext|>b", "<|user|>\n<|assistant|>", "<s></s>[INST]"])
def test_special_token_strings_are_plain_text(srv, text):
    """Hostile but valid: special-token strings in a prompt or a message are encoded as text, never
    as the special token (a byte model: one token per UTF-8 byte)."""
    r = httpx.post(srv.base + CMPL, json={**OK_CMPL, "prompt": text, "max_tokens": 1}, headers=auth())
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(text.encode())
    plain = httpx.post(srv.base + CHAT, json={**OK_CHAT, "messages": [{"role": "user", "content": "." * len(text)}]},
                       headers=auth())
    special = httpx.post(srv.base + CHAT, json={**OK_CHAT, "messages": [{"role": "user", "content": text}]},
                         headers=auth())
    assert special.status_code == 200
    assert special.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
