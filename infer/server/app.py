"""The OpenAI-compatible HTTP app over one or more engines (FastAPI; thin: parse, check, submit,
format). `python -m infer serve` runs it with uvicorn (infer/server/cli.py).

    app = create_app([engine], api_key=None)        # engine: infer.engine.Engine, started or not

Every request body is read here (bounded: Content-Length and the bytes actually received) and
parsed strictly (protocol.parse_json_body), so FastAPI's own body validation (422) never runs;
every error, whatever raised it, leaves as an OpenAI error object. Tokenizing and chat templating
run in worker threads and the engine is reached only through `submit`, which never blocks: the
event loop never waits on JAX.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from infer.server.generation import Generation, choice_seed
from infer.server.metrics import CONTENT_TYPE, ServerMetrics
from infer.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                   ChatDelta, ChatLogprobs, ChatResponseMessage, ChatStreamChoice, ChatTokenLogprob,
                                   CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                   ModelCard, ModelList, ProtocolError, TopLogprob, UsageInfo, new_id, now,
                                   parse_json_body, parse_request)

log = logging.getLogger("infer.server")

MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServedModel:
    """One engine under its model name, with what the HTTP layer needs to prepare its prompts."""

    name: str
    engine: Any
    chat_template: str | None = None
    created: int = field(default_factory=now)
    grammars: Any = None  # infer.structured.GrammarCompiler, made at the first response_format

    @property
    def tokenizer(self):
        return self.engine.tokenizer


@dataclass
class ServerState:
    models: dict[str, ServedModel]
    metrics: ServerMetrics
    api_key: bytes | None
    request_timeout_s: float
    max_body_bytes: int
    retry_after_s: int
    draining: bool = False
    start_error: str | None = None
    in_flight: int = 0
    idle: threading.Event = field(default_factory=threading.Event)
    _inbox: Any = None

    def inbox(self):
        """The engine-event inbox of the loop serving this app (infer/server/generation.py), made on
        first use on that loop: app state, not module state, so two apps never share one."""
        import asyncio

        from infer.server.generation import EventInbox

        loop = asyncio.get_running_loop()
        if self._inbox is None or self._inbox.loop is not loop:
            self._inbox = EventInbox(loop)
        return self._inbox

    @property
    def ready(self) -> bool:
        return all(m.engine.ready for m in self.models.values())

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ProtocolError(f"model: this field is required; this server serves {self._names()}", param="model")
        if name not in self.models:
            raise ProtocolError(f"model {name[:100]!r} does not exist; this server serves {self._names()}",
                                status=404, param="model", code="model_not_found")
        return self.models[name]

    def _names(self) -> str:
        return ", ".join(repr(n) for n in self.models)


# ---- cross-cutting checks: one pure ASGI middleware ---------------------------------------------

async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class _Guard:
    """Before any route: API key (401), draining or loading (503), Content-Length over the limit
    (413); around every request: the HTTP counter and the in-flight count SIGTERM waits on."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = path.startswith("/v1/") and scope["method"] == "POST"
        try:
            error = self._precheck(scope, path)
            if error is not None:
                headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
                if error.status == 401:
                    headers = {"WWW-Authenticate": "Bearer"}
                await _send_json(send_status, error.status, error.body(), headers)
                return
            if counted:
                self.state.in_flight += 1
                self.state.idle.clear()
            try:
                await self.app(scope, receive, send_status)
            finally:
                if counted:
                    self.state.in_flight -= 1
                    if self.state.in_flight == 0:
                        self.state.idle.set()
        finally:
            self.state.metrics.http_requests.labels(path if path in ENDPOINTS else "other", str(status[0])).inc()

    def _precheck(self, scope, path: str) -> ProtocolError | None:
        st = self.state
        headers = dict(scope["headers"])
        if st.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            given = headers.get(b"authorization", b"")
            scheme, _, key = given.partition(b" ")
            # compare_digest: the time taken does not tell how much of the key was right
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), st.api_key)):
                what = "a wrong API key" if given else "no API key"
                return ProtocolError(f"{what}: send the header 'Authorization: Bearer <key>'", status=401,
                                     type="authentication_error", code="invalid_api_key")
        if path.startswith("/v1/") and scope["method"] == "POST":
            if st.draining:
                return ProtocolError("the server is shutting down and takes no new requests", status=503,
                                     type="unavailable_error", retry_after=st.retry_after_s)
            if not st.ready:
                return ProtocolError(st.start_error or "the model is still loading and compiling; see /health",
                                     status=503, type="unavailable_error", retry_after=st.retry_after_s)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return ProtocolError("the Content-Length header is not a number")
            if len(length) > 15 or int(length) > st.max_body_bytes:  # (a 5,000-digit length is no int to parse)
                return ProtocolError(f"the body has {length[:20].decode()} bytes; at most {st.max_body_bytes} are "
                                     "allowed", status=413, code="body_too_large")
        return None


# ---- helpers ------------------------------------------------------------------------------------

async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"the body has more than {limit} bytes, the limit", status=413,
                                    code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ProtocolError("the client disconnected while sending the body") from None
    return b"".join(chunks)


def _encode_text(served: ServedModel, text: str, param: str) -> list[int]:
    try:
        return [int(t) for t in served.tokenizer.encode(text)]
    except ValueError as e:  # e.g. a character a char-level vocabulary does not have
        raise ProtocolError(f"{param}: {str(e).splitlines()[0]}", param=param) from None


def _encode_prompts(served: ServedModel, prompts: list) -> list[list[int]]:
    vocab = served.tokenizer.vocab_size
    out = []
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            out.append(_encode_text(served, p, param))
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ProtocolError(f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
            out.append(list(p))
    return out


def _render_chat(served: ServedModel, messages: list[dict]) -> list[int]:
    from model.chat_template import render_chat

    try:
        return [int(t) for t in render_chat(served.tokenizer, messages, served.chat_template)]
    except ValueError as e:  # a conversation the template refuses, a character the vocabulary lacks
        raise ProtocolError(f"messages: {str(e).splitlines()[0]}", param="messages") from None


def _chat_stops(served: ServedModel) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Stop strings and token ids that end the assistant's turn under the model's template."""
    from model.chat_template import chat_stop_strings, chat_stop_token_ids

    return (tuple(chat_stop_strings(served.tokenizer, served.chat_template)),
            tuple(chat_stop_token_ids(served.tokenizer, served.chat_template)))


def _max_tokens(served: ServedModel, prompt_len: int, asked: int | None, default: int | None, param: str,
                prompt_param: str) -> int:
    """Check prompt + max_tokens against the context; an unset max_tokens is the default clipped
    to what fits (None: everything that fits)."""
    ctx = served.engine.max_context
    if prompt_len >= ctx:
        raise ProtocolError(f"{prompt_param}: the prompt has {prompt_len} tokens; the model's context is {ctx} "
                            f"tokens (prompt + max_tokens must fit)", status=413, param=prompt_param,
                            code="context_length_exceeded")
    room = ctx - prompt_len
    if asked is None:
        return room if default is None else min(default, room)
    if asked > room:
        raise ProtocolError(f"{param}={asked} does not fit: the prompt has {prompt_len} tokens and the model's context "
                            f"is {ctx}, so at most {room}", param=param, code="context_length_exceeded")
    return asked


async def _grammar(served: ServedModel, response_format):
    """The compiled response_format (None for text): compiled in the compiler's own threads under
    its time limit, never on the event loop or the engine thread; a bad schema is a 400."""
    if response_format is None or response_format.type == "text":
        return None
    from infer.structured import GrammarCompiler, StructuredOutputError

    if served.grammars is None:
        served.grammars = GrammarCompiler(served.tokenizer)
    try:
        return await served.grammars.compile_async(response_format.as_dict())
    except StructuredOutputError as e:
        raise ProtocolError(str(e), param=e.param, code="invalid_response_format") from None


def _options(req, served: ServedModel, max_tokens: int, index: int, extra_stop: tuple[str, ...] = (),
             stop_ids: tuple[int, ...] = (), logprobs: int | None = None, echo_logprobs: bool = False,
             grammar=None):
    from infer.engine import SamplingOptions

    return SamplingOptions(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_k=min(req.top_k, served.tokenizer.vocab_size), top_p=1.0 if req.top_p is None else req.top_p,
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, seed=choice_seed(req.seed, index),
        stop=tuple(req.stop) + extra_stop, stop_token_ids=stop_ids, logprobs=logprobs, echo_logprobs=echo_logprobs,
        grammar=grammar)


def _check_capacity(served: ServedModel, count: int) -> None:
    cap = getattr(served.engine, "max_queue", None)
    if cap is not None and count > max(cap, 1):
        raise ProtocolError(f"this request asks for {count} sequences (prompts x n); the server queues at most {cap}",
                            param="n")


def _sse(obj: Any) -> str:
    data = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Offsets:
    """Completions logprobs of one choice, built incrementally (streamed or not)."""

    def __init__(self):
        self.offset = 0

    def prompt(self, lp: CompletionLogprobs, tokenizer, ids: list[int], logprobs: list, prompt_text: str) -> None:
        for t, value in zip(ids, logprobs):
            text = tokenizer.decode([t])
            lp.tokens.append(text)
            lp.token_logprobs.append(value)
            lp.top_logprobs.append(None if value is None else {text: value})
            lp.text_offset.append(self.offset)
            self.offset += len(text)
        self.offset = len(prompt_text)  # generated text starts right after the echoed prompt

    def generated(self, lp: CompletionLogprobs, token_logprobs) -> None:
        for tl in token_logprobs or ():
            lp.tokens.append(tl.text)
            lp.token_logprobs.append(tl.logprob)
            top: dict[str, float] = {}
            for _, text, value in tl.top:  # tokens with the same text (bytes that decode to U+FFFD): keep the likeliest
                top.setdefault(text, value)
            lp.top_logprobs.append(top)
            lp.text_offset.append(self.offset)
            self.offset += len(tl.text)


def _chat_logprobs(token_logprobs) -> list[ChatTokenLogprob]:
    return [ChatTokenLogprob(token=tl.text, logprob=tl.logprob, bytes=list(tl.text.encode("utf-8")),
                             top_logprobs=[TopLogprob(token=text, logprob=value, bytes=list(text.encode("utf-8")))
                                           for _, text, value in tl.top])
            for tl in token_logprobs or ()]


# ---- the app ------------------------------------------------------------------------------------

def create_app(engines: Sequence[Any], *, api_key: str | None = None, chat_templates: dict[str, str] | None = None,
               request_timeout_s: float = 600.0, max_body_bytes: int = MAX_BODY_BYTES, retry_after_s: int = 1,
               cors_origins: Sequence[str] = (), start_engines: bool = True, shutdown_grace_s: float = 30.0,
               agent: Any = None) -> FastAPI:
    """The HTTP app serving `engines` (each under its `name`). With `start_engines`, engines not yet
    started are started (compiled) in a background thread at app start-up; /health answers 503
    until all are ready. At app shutdown every engine is shut down. `agent` (infer.agent.service.Agent)
    adds the chat page at `/` and the /v1/agent/* API (infer/agent/http.py)."""
    names = [e.name for e in engines]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    models = {e.name: ServedModel(e.name, e, (chat_templates or {}).get(e.name)) for e in engines}
    metrics = ServerMetrics({name: m.engine.stats for name, m in models.items()})
    state = ServerState(models, metrics, api_key.encode() if api_key else None, request_timeout_s, max_body_bytes,
                        retry_after_s)
    state.idle.set()

    def start_all():
        for m in models.values():
            if not m.engine.ready:
                try:
                    m.engine.start()
                except Exception as e:  # noqa: BLE001: reported by /health and every request
                    state.start_error = f"model {m.name!r} failed to start: {str(e).splitlines()[0]}"
                    log.exception("engine %s failed to start", m.name)
                    return

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if start_engines:
            threading.Thread(target=start_all, name="engine-start", daemon=True).start()
        yield
        await run_in_threadpool(lambda: [m.engine.shutdown(grace_s=shutdown_grace_s) for m in models.values()])

    app = FastAPI(title="jaxlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jaxlm = state

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request, e: ProtocolError):
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"no such endpoint: {request.url.path[:200]}; see /v1/models, /v1/completions, " \
                      "/v1/chat/completions, /health, /metrics"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:200]}"
        else:
            message = str(e.detail)
        err = ProtocolError(message, status=e.status_code, type="invalid_request_error")
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):  # not reached: bodies are parsed by hand
        return JSONResponse(ProtocolError(f"invalid request: {str(e)[:300]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        err = ProtocolError("internal server error", status=500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse(ProtocolError("shutting down", status=503, type="unavailable_error").body(), 503)
        if not state.ready:
            message = state.start_error or "loading and compiling"
            return JSONResponse(ProtocolError(message, status=503, type="unavailable_error").body(), 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return ModelList(data=[ModelCard(id=m.name, created=m.created, max_model_len=m.engine.max_context)
                               for m in models.values()])

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _completions(state, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _chat(state, request)

    if agent is not None:
        from infer.agent.http import mount_agent

        mount_agent(app, agent)
    app.add_middleware(_Guard, state=state)
    if cors_origins:  # outside the guard: a browser's preflight carries no API key
        from starlette.middleware.cors import CORSMiddleware

        if "*" in cors_origins:
            raise ValueError("a wildcard CORS origin is not allowed; name the origins")
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


async def _start(state: ServerState, request: Request, schema):
    """Read and validate the body; the served model; the deadline."""
    deadline = time.monotonic() + state.request_timeout_s
    raw = await _read_body(request, state.max_body_bytes)
    # parsing up to 2 MB of JSON takes milliseconds: off the event loop, like tokenizing
    req = await run_in_threadpool(lambda: parse_request(parse_json_body(raw), schema))
    return req, state.model(req.model), deadline


async def _completions(state: ServerState, request: Request):
    arrival = time.perf_counter()
    req, served, deadline = await _start(state, request, CompletionRequest)
    prompts = await run_in_threadpool(_encode_prompts, served, req.prompt)
    texts = [p if isinstance(p, str) else None for p in req.prompt]  # echoed text: as sent, else decoded
    grammar = await _grammar(served, req.response_format)
    options, prompt_of = [], []
    for p, ids in enumerate(prompts):
        max_tokens = _max_tokens(served, len(ids), req.max_tokens, DEFAULT_COMPLETION_TOKENS, "max_tokens",
                                 "prompt" if len(prompts) == 1 else f"prompt.{p}")
        for j in range(req.n):
            options.append(_options(req, served, max_tokens, p * req.n + j, logprobs=req.logprobs,
                                    echo_logprobs=req.echo and req.logprobs is not None, grammar=grammar))
            prompt_of.append(p)
    _check_capacity(served, len(options))
    if req.echo:
        texts = [t if t is not None else served.tokenizer.decode(ids) for t, ids in zip(texts, prompts)]
    gen = Generation(served, state.metrics, prompts, options, prompt_of, deadline, state.retry_after_s, state.inbox())
    gen.watch_disconnect(request)
    rid, created = new_id("cmpl"), now()
    if req.stream:
        return _event_stream(_stream_completion(state, gen, req, served, texts, rid, created, arrival))

    lps = [CompletionLogprobs() if req.logprobs is not None else None for _ in gen.seqs]
    offsets = [_Offsets() for _ in gen.seqs]
    try:
        async for i, ev in gen.events():
            seq = gen.seqs[i]
            if lps[i] is not None:
                if ev.prompt_logprobs is not None:
                    offsets[i].prompt(lps[i], served.tokenizer, seq.prompt_ids, ev.prompt_logprobs,
                                      texts[seq.prompt_index])
                offsets[i].generated(lps[i], ev.logprobs)
    finally:
        gen.close()
    if gen.cancelled:
        return _client_gone()
    choices = []
    for i, seq in enumerate(gen.seqs):
        gen.check_finish(seq.finish_reason)
        text = "".join(seq.text)
        if req.echo:
            text = texts[seq.prompt_index] + text
        choices.append(CompletionChoice(index=i, text=text, logprobs=lps[i], finish_reason=seq.finish_reason))
    state.metrics.e2e.labels(served.name).observe(time.perf_counter() - arrival)
    return CompletionResponse(id=rid, created=created, model=served.name, choices=choices, usage=_usage(gen))


def _usage(gen: Generation) -> UsageInfo:
    prompt = {}
    for seq in gen.seqs:  # a prompt counts once, however many choices it has (OpenAI's rule)
        prompt[seq.prompt_index] = seq.prompt_tokens or len(seq.prompt_ids)
    completion = sum(s.completion_tokens for s in gen.seqs)
    return UsageInfo(prompt_tokens=sum(prompt.values()), completion_tokens=completion,
                     total_tokens=sum(prompt.values()) + completion)


def _client_gone() -> Response:
    # nobody reads this: the client disconnected (nginx's 499 "client closed request")
    return JSONResponse(ProtocolError("the client disconnected", status=499).body(), status_code=499)


def _event_stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _ChunkJSON:
    """The SSE event of a one-choice chunk without logprobs, from a template the protocol's own
    pydantic model makes once per (stream, choice): per chunk only the text and finish_reason are
    serialized (a model built and dumped per token cost more than the rest of the chunk's trip)."""

    _TEXT, _FINISH = "\ue000text\ue000", "\ue000finish\ue000"

    def __init__(self, build):
        self._build = build  # build(index, text, finish_reason) -> the chunk's pydantic model
        self._parts: dict[int, tuple[str, str, str] | None] = {}

    def __call__(self, index: int, text: str | None, finish_reason: str | None) -> str:
        if index not in self._parts:
            whole = _sse(self._build(index, self._TEXT, self._FINISH))
            a, t, rest = whole.partition(json.dumps(self._TEXT, ensure_ascii=False))
            b, f, c = rest.partition(json.dumps(self._FINISH))
            self._parts[index] = (a, b, c) if t and f and whole.count("\ue000") == 4 else None
        parts = self._parts[index]
        if parts is None:  # a sentinel also in the model name or id: the slow way
            return _sse(self._build(index, text, finish_reason))
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1] + json.dumps(finish_reason) + parts[2]


def _by_choice(batch: list) -> list[tuple[int, list]]:
    """A batch of (choice index, Event) grouped by choice, each group in arrival order, the groups
    in the order of their first event: the events one chunk per choice will carry."""
    groups: dict[int, list] = {}
    for i, ev in batch:
        groups.setdefault(i, []).append(ev)
    return list(groups.items())


async def _stream_completion(state, gen: Generation, req: CompletionRequest, served, texts, rid, created, arrival):
    """One SSE chunk per choice per batch of events (gen.batches()): per token while the client
    keeps up, several tokens' text (and logprobs) in one chunk when it falls behind."""
    offsets = [_Offsets() for _ in gen.seqs]
    first = [True] * len(gen.seqs)
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    fast = _ChunkJSON(lambda i, text, finish: CompletionResponse(id=rid, created=created, model=served.name, choices=[
        CompletionChoice(index=i, text=text, finish_reason=finish)]))
    try:
        async for batch in gen.batches():
            out, error = [], None
            for i, evs in _by_choice(batch):
                finish = evs[-1].finish_reason  # only a sequence's last event has one
                try:
                    gen.check_finish(finish)
                except ProtocolError as e:
                    error = e
                    break
                seq = gen.seqs[i]
                text = "".join(ev.text for ev in evs)
                if first[i] and req.echo:
                    text = texts[seq.prompt_index] + text
                first[i] = False
                if req.logprobs is not None:
                    lp = CompletionLogprobs()
                    for ev in evs:
                        if ev.prompt_logprobs is not None:
                            offsets[i].prompt(lp, served.tokenizer, seq.prompt_ids, ev.prompt_logprobs,
                                              texts[seq.prompt_index])
                        offsets[i].generated(lp, ev.logprobs)
                    if text or lp.tokens or finish:
                        out.append(_sse(CompletionResponse(id=rid, created=created, model=served.name, choices=[
                            CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)])))
                elif text or finish:
                    out.append(fast(i, text, finish))
            if out:
                yield "".join(out)
            if error is not None:
                raise error
        state.metrics.e2e.labels(served.name).observe(time.perf_counter() - arrival)
        if include_usage:
            yield _sse(CompletionResponse(id=rid, created=created, model=served.name, choices=[], usage=_usage(gen)))
    except ProtocolError as e:  # past the deadline, or the engine shut down: tell the client in-band
        yield _sse(e.body())
    finally:
        gen.close()
    yield "data: [DONE]\n\n"


async def _chat(state: ServerState, request: Request):
    arrival = time.perf_counter()
    req, served, deadline = await _start(state, request, ChatCompletionRequest)
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    ids = await run_in_threadpool(_render_chat, served, messages)
    max_tokens = _max_tokens(served, len(ids), req.max_tokens or req.max_completion_tokens, None,
                             "max_tokens" if req.max_tokens is not None else "max_completion_tokens", "messages")
    stops, stop_ids = await run_in_threadpool(_chat_stops, served)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    grammar = await _grammar(served, req.response_format)
    options = [_options(req, served, max_tokens, j, stops, stop_ids, logprobs=logprobs, grammar=grammar)
               for j in range(req.n)]
    _check_capacity(served, len(options))
    gen = Generation(served, state.metrics, [ids], options, [0] * req.n, deadline, state.retry_after_s, state.inbox())
    gen.watch_disconnect(request)
    rid, created = new_id("chatcmpl"), now()
    if req.stream:
        return _event_stream(_stream_chat(state, gen, req, served, rid, created, arrival))

    content: list[list[ChatTokenLogprob]] = [[] for _ in gen.seqs]
    try:
        async for i, ev in gen.events():
            if req.logprobs:
                content[i] += _chat_logprobs(ev.logprobs)
    finally:
        gen.close()
    if gen.cancelled:
        return _client_gone()
    choices = []
    for i, seq in enumerate(gen.seqs):
        gen.check_finish(seq.finish_reason)
        choices.append(ChatChoice(index=i, message=ChatResponseMessage(content="".join(seq.text)),
                                  logprobs=ChatLogprobs(content=content[i]) if req.logprobs else None,
                                  finish_reason=seq.finish_reason))
    state.metrics.e2e.labels(served.name).observe(time.perf_counter() - arrival)
    return ChatCompletionResponse(id=rid, created=created, model=served.name, choices=choices, usage=_usage(gen))


async def _stream_chat(state, gen: Generation, req: ChatCompletionRequest, served, rid, created, arrival):
    """As _stream_completion: one chunk per choice per batch of events."""
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    def chunk(choices, usage=None):
        return _sse(ChatCompletionChunk(id=rid, created=created, model=served.name, choices=choices, usage=usage))

    fast = _ChunkJSON(lambda i, text, finish: ChatCompletionChunk(id=rid, created=created, model=served.name, choices=[
        ChatStreamChoice(index=i, delta=ChatDelta(content=text), finish_reason=finish)]))
    try:
        yield chunk([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                     for i in range(len(gen.seqs))])
        async for batch in gen.batches():
            out, error = [], None
            for i, evs in _by_choice(batch):
                finish = evs[-1].finish_reason
                try:
                    gen.check_finish(finish)
                except ProtocolError as e:
                    error = e
                    break
                text = "".join(ev.text for ev in evs)
                if req.logprobs:
                    lp = ChatLogprobs(content=[c for ev in evs for c in _chat_logprobs(ev.logprobs)])
                    if text or lp.content or finish:
                        delta = ChatDelta(content=text) if text else ChatDelta()
                        out.append(chunk([ChatStreamChoice(index=i, delta=delta, logprobs=lp, finish_reason=finish)]))
                elif text or finish:
                    out.append(fast(i, text or None, finish))
            if out:
                yield "".join(out)
            if error is not None:
                raise error
        state.metrics.e2e.labels(served.name).observe(time.perf_counter() - arrival)
        if include_usage:
            yield chunk([], usage=_usage(gen))
    except ProtocolError as e:
        yield _sse(e.body())
    finally:
        gen.close()
    yield "data: [DONE]\n\n"
