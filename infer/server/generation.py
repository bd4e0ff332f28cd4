"""One HTTP request's sequences in the engine, seen from the event loop.

The engine calls `on_event` from its own thread; each call only schedules `queue.put_nowait` on
the loop (`call_soon_threadsafe`), so the loop never waits on JAX or on an engine lock. A request
with several prompts or `n` > 1 submits one engine request per choice and reads their events from
one queue in arrival order. A watcher task waits for the client's `http.disconnect` and cancels
every handle at once, so a client that goes away frees its slots before the next decode step.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from infer.server.protocol import ProtocolError


def choice_seed(seed: int | None, index: int) -> int | None:
    """The engine seed of choice `index` of a request with `seed`: the seed itself for the first
    choice (same number, same output as `python -m infer sample --seed`), a hash of (seed, index)
    for the others, so `n` > 1 gives different samples and the same request gives the same ones."""
    if seed is None:
        return None
    if index == 0:
        return seed % 2**32
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


@dataclass
class Sequence_:
    """What the server tracks of one engine request (one choice)."""

    prompt_index: int
    prompt_ids: list[int]
    handle: Any = None
    first_time: float | None = None
    last_time: float | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: list[str] = field(default_factory=list)


class Generation:
    """Submit the sequences of one request; iterate their events; cancel them on disconnect,
    deadline or exit. Engine errors at submit become ProtocolErrors (429 for a full queue)."""

    def __init__(self, served, metrics, prompts: Sequence[list[int]], options: Sequence[Any],
                 prompt_of: Sequence[int], deadline: float, retry_after_s: int):
        from infer.engine import EngineError, QueueFull, PromptTooLong

        self.served, self.metrics, self.deadline = served, metrics, deadline
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs = [Sequence_(p, list(prompts[p])) for p in prompt_of]
        self.cancelled = False
        self._watcher: asyncio.Task | None = None
        engine = served.engine
        try:
            for i, (seq, opts) in enumerate(zip(self.seqs, options)):
                seq.handle = engine.submit(seq.prompt_ids, opts, self._callback(i))
        except QueueFull as e:
            self.cancel()
            raise ProtocolError(f"the server is busy: {e}; retry later", status=429, type="rate_limit_error",
                                code="queue_full", retry_after=retry_after_s) from None
        except PromptTooLong as e:
            self.cancel()
            raise ProtocolError(str(e), param="max_tokens") from None
        except EngineError as e:
            self.cancel()
            if "shutting down" in str(e):
                raise ProtocolError("the server is shutting down", status=503, type="unavailable_error") from None
            raise ProtocolError(str(e)) from None

    def _callback(self, i: int):
        def on_event(event) -> None:  # engine thread: hand over to the loop, never touch loop state
            try:
                self.loop.call_soon_threadsafe(self._receive, i, event)
            except RuntimeError:  # the loop is closed (process exit): nobody is listening
                pass

        return on_event

    def _receive(self, i: int, ev) -> None:
        """On the loop, for every event whether or not a response still reads them (a client that
        left is cancelled, and its sequences still count): metrics, then the queue."""
        seq, m, name = self.seqs[i], self.metrics, self.served.name
        if ev.token_ids:
            if seq.first_time is None:
                m.ttft.labels(name).observe(max(ev.time - seq.handle.submitted_at, 0.0))
                if seq.handle.started_at is not None:
                    m.queue_time.labels(name).observe(max(seq.handle.started_at - seq.handle.submitted_at, 0.0))
                seq.first_time = ev.time
            else:
                gap = max(ev.time - seq.last_time, 0.0) / len(ev.token_ids)
                for _ in ev.token_ids:
                    m.itl.labels(name).observe(gap)
            seq.last_time = ev.time
        seq.text.append(ev.text)
        seq.prompt_tokens, seq.completion_tokens = ev.prompt_tokens, ev.completion_tokens
        if ev.finish_reason is not None:
            seq.finish_reason = ev.finish_reason
            m.requests.labels(name, ev.finish_reason).inc()
            m.prompt_tokens.labels(name).inc(ev.prompt_tokens)
            m.generation_tokens.labels(name).inc(ev.completion_tokens)
        self.queue.put_nowait((i, ev))

    def watch_disconnect(self, request) -> None:
        """Cancel every sequence when the client disconnects (started after the body is read)."""

        async def watch():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    self.cancel()
                    return

        self._watcher = asyncio.ensure_future(watch())

    def cancel(self) -> None:
        self.cancelled = True
        for seq in self.seqs:
            if seq.handle is not None and seq.finish_reason is None:
                seq.handle.cancel()

    def close(self) -> None:
        """Called when the response ends, however it ends: nothing keeps running for it."""
        if any(s.finish_reason is None for s in self.seqs):
            self.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, Event) in arrival order until every sequence has finished. Raises
        ProtocolError 504 past the deadline (the sequences are cancelled)."""
        pending = len(self.seqs)
        while pending:
            remaining = self.deadline - time.monotonic()
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.0))
            except asyncio.TimeoutError:
                self.cancel()
                raise ProtocolError("the request ran past its deadline and was cancelled", status=504,
                                    type="timeout_error", code="deadline_exceeded") from None
            if ev.finish_reason is not None:
                pending -= 1
            yield i, ev

    def check_finish(self, reason: str | None) -> None:
        """A sequence that ended for a reason the client did not cause is an error response."""
        if reason == "cancelled" and not self.cancelled:
            raise ProtocolError("the server is shutting down and cancelled the request", status=503,
                                type="unavailable_error")
        if reason == "error":
            raise ProtocolError("the engine failed on this request", status=500, type="server_error")
