"""Where a chat turn is generated: an engine in this process or a remote OpenAI-compatible endpoint,
behind one streaming interface the router and the agent use.

    local = LocalBackend(engine)                                   # infer.engine.Engine, started by the server
    cloud = RemoteBackend("cloud", "http://10.0.0.2:8000/v1", "big", context=4096)
    async for text in local.stream_chat(messages, max_tokens=64, temperature=0.7, info=info): ...
    # info afterwards: {"finish_reason", "prompt_tokens", "completion_tokens"}

Every failure is a BackendError with a `kind` the router's fallback chain reads: "connection"
(refused, reset, the engine shutting down), "timeout", "server" (5xx, 429, an engine error, a full
queue), "context_overflow" (the prompt does not fit: 400/413 with code context_length_exceeded) and
"client" (any other 4xx: a configuration error, not worth a fallback). Each backend keeps its
recent connection, timeout and server errors (a short window) for the router's health rule: `load()`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from typing import Any, AsyncIterator, Iterable, Sequence

KINDS = ("connection", "timeout", "server", "context_overflow", "client")
FALLBACK_KINDS = frozenset({"connection", "timeout", "server", "context_overflow"})
HEALTH_KINDS = frozenset({"connection", "timeout", "server"})  # the errors the router's health rule counts
ERROR_WINDOW_S = 60.0
# Control-token strings a remote model might leak into its text; local backends hide their own tokenizer's.
COMMON_CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|begin_of_text|>", "<|end_of_text|>", "</s>", "<s>")


class BackendError(Exception):
    """A backend could not serve a turn. kind: one of KINDS; str(e): one line for people."""

    def __init__(self, kind: str, message: str):
        if kind not in KINDS:
            raise ValueError(f"BackendError kind {kind!r} is not one of {', '.join(KINDS)}")
        super().__init__(message)
        self.kind, self.message = kind, message

    @property
    def fallback(self) -> bool:
        """Whether the next backend in the route should be tried (connection, timeout, 5xx, context)."""
        return self.kind in FALLBACK_KINDS


class Backend:
    """What the router and the agent see of a model: name, locality, window, tags, a token count, a
    text stream and its load. Subclasses implement `_stream` and `count_tokens`."""

    local: bool = False

    def __init__(self, name: str, *, context: int, tags: Iterable[str] = (), error_window_s: float = ERROR_WINDOW_S):
        self.name = name
        self.context = int(context)
        self.tags = frozenset(tags)
        self.error_window_s = error_window_s
        self.stop_strings: tuple[str, ...] = ()
        self.hidden_strings: tuple[str, ...] = COMMON_CONTROL_TOKENS
        self._errors: collections.deque[tuple[float, str]] = collections.deque(maxlen=256)
        self._in_flight = 0
        self._lock = threading.Lock()

    def count_tokens(self, messages: Sequence[dict]) -> int:
        """Prompt tokens of `messages` rendered for this backend (an upper bound where it cannot know)."""
        raise NotImplementedError

    async def stream_chat(self, messages: Sequence[dict], *, max_tokens: int, temperature: float,
                          seed: int | None = None, info: dict | None = None) -> AsyncIterator[str]:
        """Text deltas of the assistant's reply to `messages`. Fills `info` (if given) with
        finish_reason, prompt_tokens and completion_tokens when the reply ends. Raises BackendError."""
        with self._lock:
            self._in_flight += 1
        try:
            async for text in self._stream(list(messages), max_tokens, temperature, seed,
                                           info if info is not None else {}):
                yield text
        except BackendError as e:
            if e.kind in HEALTH_KINDS:  # a prompt too long or a refused request says nothing of the backend's health
                self.record_error(e.kind)
            raise
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _stream(self, messages, max_tokens, temperature, seed, info) -> AsyncIterator[str]:
        raise NotImplementedError
        yield  # pragma: no cover

    def record_error(self, kind: str) -> None:
        with self._lock:
            self._errors.append((time.monotonic(), kind))

    def recent_errors(self) -> list[str]:
        """The kinds of the errors of the last `error_window_s` seconds, oldest first."""
        cutoff = time.monotonic() - self.error_window_s
        with self._lock:
            return [kind for t, kind in self._errors if t >= cutoff]

    def load(self) -> dict:
        """{"queue": requests waiting, "running": requests generating, "in_flight": turns this process
        has open on it, "recent_errors": errors in the window, "error_window_s"}."""
        return {"queue": 0, "running": self._in_flight, "in_flight": self._in_flight,
                "recent_errors": len(self.recent_errors()), "error_window_s": self.error_window_s}

    def describe(self) -> dict:
        return {"name": self.name, "local": self.local, "context": self.context, "tags": sorted(self.tags)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, context={self.context})"


class LocalBackend(Backend):
    """An engine in this process (infer.engine.Engine, started by the server). The conversation is
    rendered with the model's chat template (model/chat_template.py: contents tokenized with
    special-token parsing off), its end-of-turn tokens and strings stop the reply, and the
    tokenizer's control-token strings are hidden from the text."""

    local = True

    def __init__(self, engine, chat_template: str | None = None, name: str | None = None, tags: Iterable[str] = (),
                 error_window_s: float = ERROR_WINDOW_S):
        from model.chat_template import chat_template_for

        super().__init__(name or engine.name, context=engine.max_context, tags=tags, error_window_s=error_window_s)
        self.engine = engine
        self.template = chat_template_for(engine.tokenizer, chat_template)
        self.stop_strings = tuple(self.template.stop_strings)
        self.hidden_strings = tuple(sorted(engine.tokenizer.special_tokens, key=len, reverse=True))

    def count_tokens(self, messages: Sequence[dict]) -> int:
        return len(self.template.render(messages))

    @property
    def ready(self) -> bool:
        return bool(self.engine.ready)

    def load(self) -> dict:
        out = super().load()
        stats = self.engine.stats()
        out.update(queue=stats["waiting"], running=stats["running"], slots=stats["slots"])
        return out

    async def _stream(self, messages, max_tokens, temperature, seed, info):
        from infer.engine import EngineError, PromptTooLong, QueueFull, SamplingOptions

        loop = asyncio.get_running_loop()
        try:
            ids = await asyncio.to_thread(self.template.render, messages)
        except ValueError as e:  # a character the vocabulary lacks, a template that refuses the conversation
            raise BackendError("client", f"{self.name}: {str(e).splitlines()[0]}") from None
        if len(ids) + max_tokens > self.context:
            raise BackendError("context_overflow", f"{self.name}: prompt of {len(ids)} tokens + max_tokens "
                                                   f"{max_tokens} exceeds its context of {self.context}")
        options = SamplingOptions(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                  stop=self.template.stop_strings, stop_token_ids=self.template.stop_token_ids)
        events: asyncio.Queue = asyncio.Queue()

        def on_event(event) -> None:  # the engine thread: hand the event to the loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

        if not self.engine.ready:
            raise BackendError("connection", f"{self.name}: the engine is not running")
        try:
            handle = self.engine.submit(ids, options, on_event)
        except QueueFull as e:
            raise BackendError("server", f"{self.name}: {e}") from None
        except PromptTooLong as e:
            raise BackendError("context_overflow", f"{self.name}: {e}") from None
        except EngineError as e:
            kind = "connection" if "shutting down" in str(e) else "client"
            raise BackendError(kind, f"{self.name}: {e}") from None
        try:
            while True:
                event = await events.get()
                if event.text:
                    yield event.text
                if event.finish_reason is not None:
                    info.update(finish_reason=event.finish_reason, prompt_tokens=event.prompt_tokens,
                                completion_tokens=event.completion_tokens)
                    if event.finish_reason == "error":
                        raise BackendError("server", f"{self.name}: the engine failed on this request")
                    if event.finish_reason == "cancelled":
                        raise BackendError("connection", f"{self.name}: the engine shut down and cancelled the turn")
                    return
        finally:
            if not handle.done:
                handle.cancel()  # the reader left early (client gone, error): free the slot


class RemoteBackend(Backend):
    """An OpenAI-compatible endpoint (`/v1/chat/completions`, streamed), e.g. another
    `python -m infer serve`. Its tokenizer is unknown here, so `count_tokens` is an upper bound
    (UTF-8 bytes plus an allowance per message for the template's scaffold, and one for the
    assistant's header: no tokenizer in use yields more tokens than bytes, no common template more
    than 16 tokens of scaffold per message); the remote server checks the window itself and answers
    context_length_exceeded, which falls back to the next backend."""

    local = False
    PER_MESSAGE_TOKENS = 16

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None = None, *, context: int,
                 timeout_s: float = 60.0, connect_timeout_s: float = 5.0, tags: Iterable[str] = (),
                 error_window_s: float = ERROR_WINDOW_S):
        super().__init__(name, context=context, tags=tags, error_window_s=error_window_s)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)

    def count_tokens(self, messages: Sequence[dict]) -> int:
        return sum(len(m["content"].encode("utf-8")) + self.PER_MESSAGE_TOKENS for m in messages) + \
            self.PER_MESSAGE_TOKENS

    def describe(self) -> dict:
        return {**super().describe(), "url": self.base_url, "model": self.model}

    async def _stream(self, messages, max_tokens, temperature, seed, info):
        import httpx

        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if seed is not None:
            body["seed"] = seed
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        url = self.base_url + "/chat/completions"
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                async with client.stream("POST", url, json=body, headers=headers) as r:
                    if r.status_code != 200:
                        raise self._status_error(r.status_code, await r.aread())
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            return
                        text = self._chunk(data, info)
                        if text:
                            yield text
        except httpx.TimeoutException as e:
            raise BackendError("timeout", f"{self.name}: timed out ({type(e).__name__}, limit "
                                          f"{self.timeout_s:g} s)") from None
        except httpx.ConnectError as e:
            raise BackendError("connection", f"{self.name}: {_reason(e, 'connection failed')}") from None
        except httpx.TransportError as e:  # reset, closed mid-stream, protocol errors
            raise BackendError("connection", f"{self.name}: {_reason(e, type(e).__name__)}") from None
        except httpx.HTTPError as e:  # anything else httpx raises (a body it cannot decode, ...)
            raise BackendError("server", f"{self.name}: {type(e).__name__}: {str(e)[:200]}") from None

    def _chunk(self, data: str, info: dict) -> str:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise BackendError("server", f"{self.name}: sent a stream line that is not JSON") from None
        if not isinstance(chunk, dict):
            raise BackendError("server", f"{self.name}: sent a stream line that is not a JSON object")
        if "error" in chunk:  # an error in-band (deadline, shutdown) after the 200
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise BackendError("server", f"{self.name}: {str(err.get('message', 'error'))[:200]}")
        if isinstance(chunk.get("usage"), dict):
            info.update(prompt_tokens=chunk["usage"].get("prompt_tokens"),
                        completion_tokens=chunk["usage"].get("completion_tokens"))
        text = ""
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text += delta.get("content") or ""
            if choice.get("finish_reason"):
                info["finish_reason"] = choice["finish_reason"]
        return text

    def _status_error(self, status: int, raw: bytes) -> BackendError:
        message, code = "", None
        try:
            err = json.loads(raw)["error"]
            message, code = str(err.get("message") or "")[:200], err.get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            message = raw[:200].decode("utf-8", "replace")
        where = f"{self.name}: HTTP {status}" + (f": {message}" if message else "")
        if status in (400, 413) and code == "context_length_exceeded":
            return BackendError("context_overflow", where)
        if status >= 500 or status == 429:
            return BackendError("server", where)
        return BackendError("client", where)


def _reason(e: Exception, default: str) -> str:
    """A short reason from an httpx error ("connection refused" rather than the errno soup): the
    innermost cause says most (httpx over anyio reports "All connection attempts failed")."""
    import errno

    seen, x = 0, e
    while x is not None and seen < 16:
        if isinstance(x, ConnectionRefusedError) or getattr(x, "errno", None) == errno.ECONNREFUSED:
            return "connection refused"
        if isinstance(x, ConnectionResetError):
            return "connection reset"
        x, seen = x.__cause__ or x.__context__, seen + 1
    text = str(e) or default
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "reset" in low:
        return "connection reset"
    if "name or service not known" in low or "nodename" in low:
        return "unknown host"
    return text.splitlines()[0][:200]
