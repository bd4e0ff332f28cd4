"""One HTTP request's sequences in the engine, seen from the event loop.

The engine calls `on_event` from its own thread; each call only appends to the loop's inbox
(`EventInbox`), so the loop never waits on JAX or on an engine lock. The inbox wakes the loop once
(`call_soon_threadsafe`) for all the events that arrive until the loop drains it, so a decode step
of 8 requests costs one or two loop wake-ups, not 8. A request with several prompts or `n` > 1
submits one engine request per choice and reads their events from one queue in arrival order;
`batches()` hands over everything queued at once, so a stream that fell behind writes one chunk
for several tokens (adaptive: one chunk per token when the loop keeps up). A watcher task waits
for the client's `http.disconnect` and cancels every handle at once, so a client that goes away
frees its slots before the next decode step.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import weakref
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


class EventInbox:
    """Events from engine threads to one event loop. The first event after a drain schedules one
    drain (`call_soon_threadsafe`, a write to the loop's wake-up pipe); the events that arrive
    before the loop runs it ride along, so one wake-up serves a whole decode step under load."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # its owner (the app's state) may outlive the loop
        self._lock = threading.Lock()
        self._items: list = []
        self._scheduled = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop()

    def put(self, receive, i: int, ev) -> None:
        """Engine thread: queue `receive(i, ev)` to run on the loop, in order."""
        with self._lock:
            self._items.append((receive, i, ev))
            if self._scheduled:
                return
            self._scheduled = True
        loop = self._loop()
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed (process exit): nobody is listening
            pass

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for receive, i, ev in items:
            receive(i, ev)




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
                 prompt_of: Sequence[int], deadline: float, retry_after_s: int, inbox: EventInbox | None = None):
        from infer.engine import EngineError, QueueFull, PromptTooLong

        self.served, self.metrics, self.deadline = served, metrics, deadline
        self._itl = metrics.itl.labels(served.name)  # observed per token: the labelled child looked up once
        self.loop = asyncio.get_running_loop()
        # the app's one inbox for its loop (ServerState.inbox()), so one wake-up serves every request's
        # events of a decode step; without one, this request's own
        self._inbox = inbox if inbox is not None else EventInbox(self.loop)
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
        put, receive = self._inbox.put, self._receive

        def on_event(event) -> None:  # engine thread: hand over to the loop, never touch loop state
            put(receive, i, event)

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
                    self._itl.observe(gap)
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
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self) -> AsyncIterator[list[tuple[int, Any]]]:
        """Every (choice index, Event) queued so far, in arrival order, as one list: at least one,
        more when the events came faster than the reader took them. Ends when every sequence has
        finished; raises ProtocolError 504 past the deadline (the sequences are cancelled)."""
        pending = len(self.seqs)
        queue = self.queue
        while pending:
            if queue.empty():
                remaining = self.deadline - time.monotonic()
                try:
                    batch = [await asyncio.wait_for(queue.get(), timeout=max(remaining, 0.0))]
                except asyncio.TimeoutError:
                    self.cancel()
                    raise ProtocolError("the request ran past its deadline and was cancelled", status=504,
                                        type="timeout_error", code="deadline_exceeded") from None
            else:
                batch = []
            while not queue.empty():
                batch.append(queue.get_nowait())
            pending -= sum(ev.finish_reason is not None for _, ev in batch)
            yield batch

    def check_finish(self, reason: str | None) -> None:
        """A sequence that ended for a reason the client did not cause is an error response."""
        if reason == "cancelled" and not self.cancelled:
            raise ProtocolError("the server is shutting down and cancelled the request", status=503,
                                type="unavailable_error")
        if reason == "error":
            raise ProtocolError("the engine failed on this request", status=500, type="server_error")
