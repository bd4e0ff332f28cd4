"""Structured output end to end: `response_format` on the real server (8 slots, the tiny byte-level
model of server_helpers) through the real `openai` client; every output is checked with `json` and
`jsonschema`. Bad and pathological schemas are 400s within the compile time limit while other
requests keep streaming. The compiler's bounded cache and time limit are checked on their own."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import jsonschema
import pytest

from tests.infer.server_helpers import API_KEY, InProcessServer, auth

MAX_TOKENS = 400  # above every schema's longest output (strings of 4-byte characters included)
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"], "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "items": {"type": "array", "maxItems": 3, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 6},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"], "additionalProperties": False}},
            "paid": {"type": "boolean"},
        },
        "required": ["id", "items", "paid"], "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "meta": {"type": "object", "properties": {
                "level": {"enum": [1, 2, 3]},
                "owner": {"type": "object", "properties": {"tag": {"type": "string", "maxLength": 4}},
                          "required": ["tag"], "additionalProperties": False}},
                "required": ["level", "owner"], "additionalProperties": False},
            "scores": {"type": "array", "minItems": 1, "maxItems": 4,
                       "items": {"type": "integer", "minimum": -50, "maximum": 50}},
        },
        "required": ["meta", "scores"], "additionalProperties": False,
    },
    "choice": {"enum": ["red", "green", "blue", None, 7]},
    "code": {  # a regex pattern, and the catastrophic-backtracking shape that a derivative lexer runs linearly
        "type": "object",
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                       "word": {"type": "string", "pattern": "^(a+)+$", "maxLength": 6},
                       "flags": {"type": "array", "maxItems": 2, "items": {"type": "boolean"}}},
        "required": ["zip", "word", "flags"], "additionalProperties": False,
    },
}
BAD = {  # name -> (schema, the words the 400's message must name)
    "invalid type": ({"type": "strin"}, "strin"),
    "missing $ref": ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    "unsatisfiable": ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    "broken regex": ({"type": "string", "pattern": "[a-z"}, "regex"),
    "huge repetition": ({"type": "string", "pattern": "^(a{1000}){1000}$"}, "regex limits"),
    "nested huge repetition": ({"type": "object", "properties": {"q": {"type": "string", "pattern": "x{1000}{1000}"}},
                                "required": ["q"]}, "regex limits"),
}
# Building these takes ~0.1 s of CPU until llguidance's fuel runs out; on a machine loaded many
# times over that can exceed the wall-clock limit, and the 400 then says so instead
OVER_TIME = "did not compile within"
TIME_LIMIT_S = 5.0  # infer.structured.DEFAULT_TIMEOUT_S


@pytest.fixture(scope="module")
def server():
    srv = InProcessServer(slots=8, max_queue=64)
    yield srv
    srv.stop()


def _fmt(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_200_json_schema_requests_all_validate(server):
    """200 requests over five schemas, chat and completions, greedy and sampled, 8 slots busy: every
    output ends because its JSON is complete, parses and validates. The masks add no compiled
    program, and a plain request running among them gets the same tokens as alone."""
    from openai import AsyncOpenAI

    from infer.engine import _decode

    plain = {"prompt": "plain text", "max_tokens": 40, "temperature": 0}
    alone = httpx.post(server.base + "/v1/completions", headers=auth(), json=plain, timeout=60).json()
    programs = _decode._cache_size()

    async def run():
        client = AsyncOpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        gate = asyncio.Semaphore(24)

        async def one(i: int):
            name = list(SCHEMAS)[i % len(SCHEMAS)]
            temperature = 0.0 if i % 4 == 0 else 1.0
            async with gate:
                if i % 2:
                    r = await client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"Give me a {name} #{i}"}],
                        response_format=_fmt(name), max_tokens=MAX_TOKENS, temperature=temperature, seed=i)
                    text, reason = r.choices[0].message.content, r.choices[0].finish_reason
                else:
                    r = await client.completions.create(
                        model="tiny", prompt=f"{name} {i}:", max_tokens=MAX_TOKENS, temperature=temperature,
                        seed=i, extra_body={"response_format": _fmt(name)})
                    text, reason = r.choices[0].text, r.choices[0].finish_reason
            return name, text, reason

        async def beside():  # sent with the first constrained requests, so it shares steps with them
            async with httpx.AsyncClient(timeout=120) as h:
                return (await h.post(server.base + "/v1/completions", headers=auth(), json=plain)).json()

        try:
            return await asyncio.gather(beside(), *(one(i) for i in range(200)))
        finally:
            await client.close()

    among, *results = asyncio.run(run())
    assert among["choices"][0]["text"] == alone["choices"][0]["text"]
    assert _decode._cache_size() == programs
    assert len(results) == 200
    for name, text, reason in results:
        assert reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])  # raises on any violation
    assert len({text for _, text, _ in results}) > 50  # sampled outputs differ: the masks do not force one answer


def test_streamed_chat_and_json_object(server):
    """A streamed json_schema chat joins into a valid document; json_object outputs are objects."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "stream"}],
                                            response_format=_fmt("order"), max_tokens=MAX_TOKENS, temperature=0.7,
                                            seed=1, stream=True)
    parts, reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert reasons[-1] == "stop"
    jsonschema.validate(json.loads("".join(parts)), SCHEMAS["order"])
    # max_tokens before the JSON is complete: "length", and the text is the schema's beginning
    cut = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "short"}],
                                         response_format=_fmt("order"), max_tokens=4, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == '{"id'

    # json_object is any object: a random model may write a key for ever, so only outputs that ended
    # (finish_reason "stop": the object closed) are complete; those must all be objects
    ended = []
    for i in range(24):
        r = client.completions.create(model="tiny", prompt=f"object {i}:", max_tokens=48, temperature=0,
                                      extra_body={"response_format": {"type": "json_object"}})
        c = r.choices[0]
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            ended.append(json.loads(c.text))
        else:
            assert c.finish_reason == "length"
    assert ended and all(isinstance(x, dict) for x in ended)


def test_bad_schemas_are_400_within_the_limit_while_others_flow(server):
    """Invalid and pathological schemas answer 400 (OpenAI error objects naming the field) within
    the compile time limit, and streaming requests running meanwhile keep getting tokens."""
    gaps: list[float] = []
    done: list[str | None] = []

    def normal(i: int):
        last, reason = time.perf_counter(), None
        with httpx.stream("POST", server.base + "/v1/completions", headers=auth(), timeout=120,
                          json={"prompt": f"keep flowing {i}", "max_tokens": 300, "temperature": 1.0, "seed": i,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now
                    reason = json.loads(line[6:])["choices"][0]["finish_reason"] or reason
        done.append(reason)

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    bad_times = {}
    for label, (schema, words) in BAD.items():
        for path, extra in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                            ("/v1/completions", {"prompt": "x"})):
            t0 = time.perf_counter()
            r = httpx.post(server.base + path, headers=auth(), timeout=60, json={
                **extra, "max_tokens": 20,
                "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}})
            bad_times[label, path] = time.perf_counter() - t0
            assert r.status_code == 400, (label, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"].startswith("response_format"), err
            assert (words in err["message"] or OVER_TIME in err["message"]) and "\n" not in err["message"], err
            assert bad_times[label, path] < TIME_LIMIT_S + 2, (label, bad_times[label, path])
    for t in threads:
        t.join(120)
    assert done == ["length"] * 6  # every normal request ran to its max_tokens
    assert max(gaps) < 3.0, max(gaps)  # and none of them stalled while the bad schemas compiled


def test_compiler_cache_is_bounded_and_compiles_are_timed():
    """The LRU keeps at most cache_size schemas (a repeat is a hit, the oldest is evicted), a repeat
    of a bad schema is answered from the cache, and a compile over the time limit is an error."""
    from infer.structured import GrammarCompiler, StructuredOutputError
    from model.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    c = GrammarCompiler(tok, cache_size=3, timeout_s=120)  # the limit is not what this part checks
    fmts = [{"type": "json_schema", "json_schema": {"name": "s", "schema": {"enum": [f"v{i}"]}}} for i in range(5)]
    for f in fmts:
        c.compile(f)
    assert c.compiled == 5 and len(c._cache) == 3
    c.compile(fmts[-1])
    assert c.compiled == 5  # hit
    c.compile(fmts[0])
    assert c.compiled == 6  # evicted, compiled again
    # the key is the schema alone: another name is the same entry; another key order is another
    # entry (properties are written in the schema's order)
    a = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "integer", "minimum": 0}}}
    b = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "integer", "minimum": 0}}}
    assert c.compile(a) is c.compile(b)
    assert c.compile({"type": "json_schema", "json_schema": {"name": "a", "schema": {"minimum": 0, "type": "integer"}}}
                     ) is not c.compile(a)
    bad = {"type": "json_schema",
           "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "^a{1000}{1000}$"}}}
    with pytest.raises(StructuredOutputError, match="regex limits"):
        c.compile(bad)
    n = c.compiled
    with pytest.raises(StructuredOutputError, match="regex limits"):
        c.compile(bad)
    assert c.compiled == n  # the refusal is cached too
    slow = GrammarCompiler(tok, timeout_s=0.001)  # building the huge repetition takes tens of ms
    t0 = time.perf_counter()
    with pytest.raises(StructuredOutputError, match="did not compile within"):
        slow.compile({"type": "json_schema", "json_schema": {"name": "p", "schema": {
            "type": "string", "pattern": "^(b{1000}){1000}$"}}})
    assert time.perf_counter() - t0 < 1.0
