"""Streaming under load: a stream that falls behind the engine gets several tokens per chunk, and
the per-chunk JSON template writes exactly what the protocol's pydantic models write."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from infer.engine import SamplingOptions
from infer.server.app import _ChunkJSON, _sse
from infer.server.generation import Generation
from infer.server.protocol import (ChatCompletionChunk, ChatDelta, ChatStreamChoice, CompletionChoice,
                                   CompletionResponse)
from tests.infer.server_helpers import shared_server


@pytest.fixture(scope="module")
def srv():
    return shared_server()


TEXTS = ["", "a", 'quote " and \\ backslash', "new\nline\ttab", "é€😀 \u2028", "\x00\x1f", None]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_chunk_template_writes_what_the_pydantic_model_writes(kind):
    def build(i, text, finish):
        if kind == "completion":
            return CompletionResponse(id="cmpl-1", created=7, model="m", choices=[
                CompletionChoice(index=i, text=text, finish_reason=finish)])
        return ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", choices=[
            ChatStreamChoice(index=i, delta=ChatDelta(content=text), finish_reason=finish)])

    fast = _ChunkJSON(build)
    for i in (0, 3):
        for text in TEXTS if kind == "chat" else TEXTS[:-1]:
            for finish in (None, "stop", "length"):
                assert fast(i, text, finish) == _sse(build(i, text, finish))
    # a sentinel in the model name: the template cannot be cut, the slow way gives the same
    odd = _ChunkJSON(lambda i, text, finish: CompletionResponse(id="x", created=1, model="\ue000", choices=[
        CompletionChoice(index=i, text=text, finish_reason=finish)]))
    assert json.loads(odd(0, "hi", "stop")[len("data: "):])["choices"][0]["text"] == "hi"


def test_a_reader_that_falls_behind_gets_every_queued_event_in_one_batch(srv):
    """The loop is blocked while the engine generates (as a busy server's loop is): the events wait
    in the inbox, and the stream then reads all of them at once, in order, the same text."""
    state = srv.app.state.jaxlm
    served = state.model("tiny")
    prompt = list(b"Batch me")
    options = SamplingOptions(max_tokens=24, temperature=0)
    whole, ids, _ = srv.engine.generate(prompt, options)

    async def read():
        gen = Generation(served, state.metrics, [prompt], [options], [0], time.monotonic() + 60, 1)
        handle = gen.seqs[0].handle
        t0 = time.monotonic()
        while not handle.done:  # block this loop until the engine has produced every event
            assert time.monotonic() - t0 < 30
            time.sleep(0.005)
        return [b async for b in gen.batches()]

    batches = asyncio.run(read())
    assert len(batches) == 1 and len(batches[0]) == len(ids)
    events = [ev for _, ev in batches[0]]
    assert "".join(ev.text for ev in events) == whole
    assert [t for ev in events for t in ev.token_ids] == ids
    assert [ev.finish_reason for ev in events][-1] is not None and all(ev.finish_reason is None for ev in events[:-1])
