"""The agent's HTTP API on the inference server (`create_app(..., agent=Agent(...))` calls `mount_agent`).

    GET    /                                  the chat page (infer/agent/page/index.html), public
    GET    /page/<file>                       its assets, public
    GET    /v1/agent/backends                 {"data": [{"name", "local", "context", "tags", "healthy", "load"}]}
    GET    /v1/agent/sessions                 {"data": [session, ...]} newest first
    POST   /v1/agent/sessions                 {"title"?, "system"?} -> session (201)
    GET    /v1/agent/sessions/{id}            session + "messages"
    PATCH  /v1/agent/sessions/{id}            {"title"} -> session
    DELETE /v1/agent/sessions/{id}            {"id", "deleted": true}
    POST   /v1/agent/sessions/{id}/messages   {"content", "model"?, "tags"?, "max_tokens"?, "temperature"?,
                                               "seed"?, "stream"? (default true)}

A message's answer streams as Server-Sent Events (`data: <json>` of each Agent.turn event, then
`data: [DONE]`) with the headers X-Jaxlm-Backend and X-Jaxlm-Route-Reason: the first event is read
before the response starts, so a refusal (sanitizer 400, unknown session 404, context 413, no
backend 503) is still an ordinary OpenAI error object with its status. /v1/* is behind the
server's API key; the page is public (it holds no data; it asks for the key to call the API).
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

PAGE_DIR = Path(__file__).resolve().parent / "page"
_PAGE_TYPES = types.MappingProxyType({".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
               ".ico": "image/x-icon", ".json": "application/json"})
_PAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MESSAGE_KEYS = ("content", "model", "tags", "max_tokens", "temperature", "seed", "stream")


def _error(message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
           type: str | None = None):
    from infer.server.protocol import ProtocolError

    kind = type or ("invalid_request_error" if status < 500 else "server_error")
    return ProtocolError(message, status=status, param=param, code=code, type=kind)


def _as_protocol_error(e: Exception):
    """The agent's exceptions as the server's OpenAI-style errors (None: not one of ours)."""
    from infer.agent.memory import ContextTooSmall, UnknownSession
    from infer.agent.route import RouteError
    from infer.agent.sanitize import SanitizeError
    from infer.agent.service import TurnError

    if isinstance(e, SanitizeError):
        return _error(str(e), 400, param=getattr(e, "param", "content"), code="invalid_content")
    if isinstance(e, UnknownSession):
        return _error(str(e), 404, param="session_id", code="session_not_found")
    if isinstance(e, ContextTooSmall):
        return _error(str(e), 413, param="content", code="context_length_exceeded")
    if isinstance(e, RouteError):
        return _error(e.message, e.status, param=e.param, code=e.code)
    if isinstance(e, TurnError):
        kind = "unavailable_error" if e.status == 503 else None
        return _error(e.message, e.status, param=e.param, code=e.code, type=kind)
    return None


def _header(text: str) -> str:
    """A header value: one line of printable ASCII (reasons may quote a remote's message)."""
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return text[:500]


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def mount_agent(app, agent) -> None:
    """Add the agent's routes (above) to the server's FastAPI `app`."""
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from infer.server.app import _read_body
    from infer.server.protocol import ProtocolError, parse_json_body

    state = app.state.jaxlm
    app.state.agent = agent
    store = agent.store

    async def body_of(request: Request, allowed: tuple[str, ...]) -> dict:
        raw = await _read_body(request, state.max_body_bytes)
        data = parse_json_body(raw) if raw.strip() else {}
        if not isinstance(data, dict):
            raise _error("the body must be a JSON object")
        for key in data:
            if key not in allowed:
                raise _error(f"{str(key)[:100]!r} is not a field of this request; allowed: {', '.join(allowed)}",
                             param=str(key)[:100])
        return data

    def text_field(data: dict, name: str, *, required: bool = False, limit: int = 200_000) -> str | None:
        value = data.get(name)
        if value is None:
            if required:
                raise _error(f"{name}: this field is required", param=name)
            return None
        if not isinstance(value, str):
            raise _error(f"{name} must be a string, got {type(value).__name__}", param=name)
        if len(value) > limit:
            raise _error(f"{name} is {len(value)} characters; at most {limit} are allowed", param=name)
        return value

    def call(fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            err = _as_protocol_error(e)
            if err is None:
                raise
            raise err from None

    def clean_title(title: str | None) -> str | None:
        if title is None:
            return None
        from infer.agent.sanitize import sanitize

        return call(lambda: sanitize(title, max_chars=200, param="title").text)

    # ---- the page

    def page_file(name: str):
        path = PAGE_DIR / name
        if not _PAGE_NAME.fullmatch(name) or not path.is_file():
            raise _error(f"no such page file: {name[:100]}", 404, code="not_found")
        return FileResponse(path, media_type=_PAGE_TYPES.get(path.suffix, "application/octet-stream"),
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    @app.get("/", include_in_schema=False)
    async def index():
        return page_file("index.html")

    @app.get("/page/{name}", include_in_schema=False)
    async def page(name: str):
        return page_file(name)

    # ---- backends and sessions

    @app.get("/v1/agent/backends")
    async def backends():
        return {"object": "list", "data": await run_in_threadpool(agent.router.describe)}

    @app.get("/v1/agent/sessions")
    async def list_sessions():
        return {"object": "list", "data": await run_in_threadpool(store.list)}

    @app.post("/v1/agent/sessions")
    async def create_session(request: Request):
        data = await body_of(request, ("title", "system"))
        title = clean_title(text_field(data, "title"))
        system = text_field(data, "system")
        if system is not None:
            from infer.agent.sanitize import sanitize

            system = call(lambda: sanitize(system, max_chars=agent.max_chars, param="system").text)
        session = await run_in_threadpool(call, store.create, title, system)
        return JSONResponse(session, status_code=201)

    @app.get("/v1/agent/sessions/{session_id}")
    async def get_session(session_id: str):
        def read():
            session = store.get(session_id)
            return {**session, "messages": store.messages(session_id)}

        return await run_in_threadpool(call, read)

    @app.patch("/v1/agent/sessions/{session_id}")
    async def rename_session(session_id: str, request: Request):
        data = await body_of(request, ("title",))
        title = clean_title(text_field(data, "title", required=True))
        return await run_in_threadpool(call, store.rename, session_id, title)

    @app.delete("/v1/agent/sessions/{session_id}")
    async def delete_session(session_id: str):
        await run_in_threadpool(call, store.delete, session_id)
        agent.forget(session_id)
        return {"id": session_id, "deleted": True}

    # ---- a turn

    @app.post("/v1/agent/sessions/{session_id}/messages")
    async def post_message(session_id: str, request: Request):
        data = await body_of(request, MESSAGE_KEYS)
        content = data.get("content")
        if content is None:
            raise _error("content: this field is required", param="content")
        model = text_field(data, "model", limit=200)
        tags = data.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags) or len(tags) > 16:
            raise _error("tags must be a list of at most 16 strings", param="tags")
        stream = data.get("stream", True)
        if not isinstance(stream, bool):
            raise _error("stream must be true or false", param="stream")
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise _error("seed must be an integer in [0, 2**63)", param="seed")
        events = agent.turn(session_id, content, model=model, tags=tags, max_tokens=data.get("max_tokens"),
                            temperature=data.get("temperature"), seed=seed)
        try:
            meta = await events.__anext__()  # refusals raise here, before any byte of the response
        except Exception as e:
            await events.aclose()
            err = _as_protocol_error(e)
            if err is None:
                raise
            raise err from None
        headers = {"X-Jaxlm-Backend": _header(meta["backend"]), "X-Jaxlm-Route-Reason": _header(meta["reason"])}
        if stream:
            async def body():
                try:
                    yield _sse(meta)
                    async for event in events:
                        yield _sse(event)
                finally:
                    await events.aclose()
                yield "data: [DONE]\n\n"

            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        last: dict = {}
        try:
            async for event in events:
                if event["type"] in ("done", "error"):
                    last = event
        finally:
            await events.aclose()
        message = next((m for m in store.messages(session_id) if m["id"] == last.get("message_id")), None)
        if last.get("type") == "error":
            raise ProtocolError(f"the backend failed mid-answer: {last['message']}", status=502, type="server_error",
                                code="backend_error")
        return JSONResponse({"message": message, "backend": meta["backend"], "reason": meta["reason"],
                             "removed": meta["removed"], "prompt_tokens": last.get("prompt_tokens"),
                             "completion_tokens": last.get("completion_tokens"), "window": last.get("window"),
                             "context_ids": last.get("context_ids"), "finish_reason": last.get("finish_reason")},
                            headers=headers)
