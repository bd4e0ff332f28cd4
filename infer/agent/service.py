"""`Agent`: one chat turn from a person's text to a stored, streamed answer.

    agent = Agent(router, ConversationStore(path))
    async for event in agent.turn(session_id, "hello", max_tokens=64):
        ...   # {"type": "meta", ...}, {"type": "delta", "text"}, ..., {"type": "done", ...}

A turn: sanitize the text (infer/agent/sanitize.py) -> append it to the session (memory.py) -> plan
the route over the whole stored conversation (route.py: privacy, context, model/tags, health) ->
for the chosen backend, assemble the prompt within its window (prompt + max_tokens <= context; a
fallback to another backend assembles again for that one's window) -> stream; a BackendError
before the first token moves on to the next choice, with the failure stated in the reason -> trim
stop strings and hide control-token strings from the text -> store the answer with meta
{backend, reason, finish_reason, removed}.

Errors the person caused or that no backend could serve leave `turn` before its first event (so
the HTTP layer can still answer 4xx/5xx): SanitizeError (400), UnknownSession (404), RouteError,
ContextTooSmall (413), TurnError (every backend failed: 502/503). A backend that fails after the
first token ends the stream with {"type": "error"} and the partial answer is stored with
finish_reason "error". Turns of one session run one at a time (a lock per session); different
sessions run concurrently and read only their own messages (every store read is by session id).
"""

from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator, Sequence

from infer.agent.backends import BackendError
from infer.agent.memory import ConversationStore
from infer.agent.route import RouteError, Router
from infer.agent.sanitize import sanitize

MAX_TOKENS_DEFAULT = 256
SUMMARY_TOKENS = 128  # longest summary asked of a model
SUMMARY_INSTRUCTION = ("Summarize the conversation below in at most three sentences for whoever continues it. "
                       "Keep names, numbers and decisions.")


class TurnError(RuntimeError):
    """No backend could serve the turn, or the request cannot be served as asked: HTTP `status`."""

    def __init__(self, message: str, *, status: int = 503, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param


class PostProcess:
    """Streamed text with stop strings trimmed (the text ends before the first one) and control-token
    strings removed wherever they appear, across delta boundaries (a possible prefix is held back)."""

    def __init__(self, stops: Sequence[str], hidden: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.hidden = tuple(sorted((h for h in hidden if h), key=len, reverse=True))
        self._held = ""
        self.stopped = False
        self._longest = max((len(s) for s in self.stops + self.hidden), default=0)

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        cuts = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self._held = True, ""
            return self._hide(buf[:min(cuts)])
        buf = self._hide(buf)
        keep = 0
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[len(buf) - k:]
            if any(s.startswith(tail) for s in self.stops + self.hidden):
                keep = k
                break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _hide(self, text: str) -> str:
        changed = True
        while changed:  # removing one may join the halves of another
            changed = False
            for h in self.hidden:
                if h in text:
                    text, changed = text.replace(h, ""), True
        return text


class Agent:
    """The agent layer over a router (backends and rules) and a conversation store."""

    def __init__(self, router: Router, store: ConversationStore, *, max_chars: int = 32_000,
                 max_tokens_default: int = MAX_TOKENS_DEFAULT, temperature_default: float = 0.7,
                 summarize: bool = False, summary_tokens: int = SUMMARY_TOKENS):
        """summarize: turns evicted from a prompt for the first time are summarized by the backend that
        answers the turn (the one the route already allows to see them) and the summary rides in the
        system message from then on (memory.ConversationStore.context); off, evicted turns are dropped."""
        self.router, self.store = router, store
        self.summarize, self.summary_tokens = summarize, summary_tokens
        self.max_chars = max_chars
        self.max_tokens_default = max_tokens_default
        self.temperature_default = temperature_default
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    def forget(self, session_id: str) -> None:
        """Drop a deleted session's lock."""
        self._locks.pop(session_id, None)

    async def turn(self, session_id: str, content: str, *, model: str | None = None, tags: Sequence[str] = (),
                   max_tokens: int | None = None, temperature: float | None = None, seed: int | None = None
                   ) -> AsyncIterator[dict]:
        """The events of one turn (see the module docstring); raises before the first event when it
        cannot be served at all."""
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise TurnError(f"max_tokens={max_tokens!r} must be a positive integer", status=400, param="max_tokens")
        if temperature is not None and (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                                        or not math.isfinite(temperature) or not 0 <= temperature <= 2):
            raise TurnError(f"temperature={temperature!r} must be a number in [0, 2]", status=400,
                            param="temperature")
        clean = sanitize(content, max_chars=self.max_chars)
        self.router.check_model(model)  # an unknown model: RouteError before anything is stored
        temperature = self.temperature_default if temperature is None else float(temperature)
        async with self._lock(session_id):
            session = self.store.get(session_id)  # UnknownSession before anything is stored
            user_meta = {"removed": clean.removed} if clean.removed else None
            user_id = self.store.append(session_id, "user", clean.text, user_meta)
            route = self._route(session, user_id, clean.removed, model, tags, max_tokens, temperature, seed)
            try:
                async for event in route:
                    yield event
            except (RouteError, TurnError) as e:
                # the turn is refused after the user's text was stored: store the refusal as the answer, so
                # the conversation keeps alternating (some chat templates refuse two user turns in a row)
                self.store.append(session_id, "assistant", "", {"backend": None, "reason": e.message,
                                                                "finish_reason": "error", "error": e.message})
                raise
            finally:  # the reader left: the answer's own cleanup (store what came) runs now, not at GC
                await route.aclose()

    async def _route(self, session, user_id, removed, model, tags, max_tokens, temperature, seed):
        """Plan, assemble, stream with fallback (the part of a turn after the user's text is stored)."""
        session_id = session["id"]
        system = [{"role": "system", "content": session["system"]}] if session.get("system") else []
        convo = system + [{"role": m["role"], "content": m["content"]} for m in self.store.messages(session_id)]
        choices = await asyncio.to_thread(self.router.plan, convo, model=model, tags=tuple(tags))
        failed: list[str] = []
        too_small: list[str] = []
        for choice in choices:
            b = choice.backend
            want = max_tokens if max_tokens is not None else min(self.max_tokens_default, b.context // 2)
            if want >= b.context:
                too_small.append(f"{b.name}: max_tokens={want} leaves no room in its context of {b.context}")
                continue
            summarize = self._summarizer(b, asyncio.get_running_loop()) if self.summarize else None
            try:
                assembled = await asyncio.to_thread(self.store.context, session_id, b.count_tokens,
                                                    b.context - want, summarize=summarize)
            except ValueError as e:  # ContextTooSmall, or text this backend's vocabulary cannot encode
                too_small.append(f"{b.name}: {str(e).splitlines()[0]}")
                continue
            info: dict = {}
            stream = b.stream_chat(assembled.messages, max_tokens=want, temperature=temperature, seed=seed,
                                   info=info).__aiter__()
            post = PostProcess(b.stop_strings, b.hidden_strings)
            try:
                first = await _first_text(stream, post)
            except BaseException as e:
                await stream.aclose()  # now, not at GC: a local engine frees the slot
                if not isinstance(e, BackendError):  # cancelled (the reader left), or a bug
                    raise
                if not e.fallback:
                    raise TurnError(f"backend {e}", status=502, code="backend_error") from None
                failed.append(f"{b.name} failed ({_strip_name(str(e), b.name)})")
                continue
            reason = choice.reason
            if failed:
                reason = f"fallback: {'; '.join(failed)} -> {b.name} (planned: {choices[0].reason})"
            answer = self._answer(session_id, user_id, removed, b, reason, stream, post, first, info,
                                  assembled)
            try:
                async for event in answer:
                    yield event
            finally:  # the reader left: the answer's own cleanup (store what came) runs now, not at GC
                await answer.aclose()
            return
        if failed:
            raise TurnError(f"no backend could answer: {'; '.join(failed + too_small)}", status=503,
                            code="backends_unavailable")
        raise TurnError(f"the conversation does not fit any backend: {'; '.join(too_small)}", status=413,
                        code="context_length_exceeded", param="content")

    def _summarizer(self, b, loop):
        """summarize(previous_summary, evicted_messages) -> text, by backend `b`, for the store's worker
        thread: the request runs on the event loop, the thread waits for it. The transcript is cut from
        its oldest end until the request fits b's window."""
        def summarize(previous: str | None, evicted: list[dict]) -> str:
            lines = [f"{m['role']}: {m['content']}" for m in evicted]
            room = b.context - min(self.summary_tokens, b.context // 4)

            def request(lines):
                text = (f"Earlier summary: {previous}\n\n" if previous else "") + "\n".join(lines)
                return [{"role": "system", "content": SUMMARY_INSTRUCTION}, {"role": "user", "content": text}]

            while lines and b.count_tokens(request(lines)) > room:
                lines = lines[len(lines) // 2:] if len(lines) > 1 else [lines[0][max(1, len(lines[0]) // 2):]]
                if lines == [""]:
                    return ""
            future = asyncio.run_coroutine_threadsafe(
                _collect(b, request(lines), min(self.summary_tokens, b.context // 4)), loop)
            return future.result(timeout=600).strip()

        return summarize

    async def _answer(self, session_id, user_id, removed, b, reason, stream, post, first, info, assembled):
        meta = {"type": "meta", "backend": b.name, "reason": reason, "removed": removed, "message_id": user_id}
        yield meta
        parts: list[str] = []
        finish, error = None, None
        try:
            if first:
                parts.append(first)
                yield {"type": "delta", "text": first}
            if not post.stopped:
                async for text in stream:
                    out = post.push(text)
                    if out:
                        parts.append(out)
                        yield {"type": "delta", "text": out}
                    if post.stopped:
                        break
            tail = post.flush()
            if tail:
                parts.append(tail)
                yield {"type": "delta", "text": tail}
            finish = "stop" if post.stopped else info.get("finish_reason", "stop")
        except BackendError as e:
            finish, error = "error", str(e)
        finally:
            if finish is None:  # the reader went away (stop button, client gone)
                finish = "cancelled"
            await stream.aclose()
            stored = {"backend": b.name, "reason": reason, "finish_reason": finish}
            if removed:
                stored["removed"] = removed
            if error:
                stored["error"] = error
            message_id = self.store.append(session_id, "assistant", "".join(parts), stored)
        if error:
            yield {"type": "error", "message": error, "message_id": message_id}
            return
        yield {"type": "done", "finish_reason": finish, "prompt_tokens": info.get("prompt_tokens") or assembled.tokens,
               "completion_tokens": info.get("completion_tokens"), "window": b.context,
               "context_ids": assembled.kept_ids, "message_id": message_id}


async def _collect(b, messages, max_tokens: int) -> str:
    """A whole reply of backend `b`, post-processed (a summary)."""
    post = PostProcess(b.stop_strings, b.hidden_strings)
    parts = []
    stream = b.stream_chat(messages, max_tokens=max_tokens, temperature=0.0)
    try:
        async for text in stream:
            parts.append(post.push(text))
            if post.stopped:
                break
    finally:
        await stream.aclose()
    return "".join(parts) + post.flush()


async def _first_text(stream, post: PostProcess) -> str:
    """Read until the first visible text (or the end): a failure up to here may still fall back."""
    async for text in stream:
        out = post.push(text)
        if out or post.stopped:
            return out
    return ""


def _strip_name(message: str, name: str) -> str:
    prefix = f"{name}: "
    return message[len(prefix):] if message.startswith(prefix) else message
