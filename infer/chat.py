"""`python -m infer chat`: a terminal chat on the agent layer, with a checkpoint or a running server.

    python -m infer chat --run runs/chat_quickstart                 # loads the checkpoint, compiles, chats
    python -m infer chat --url http://127.0.0.1:8000/v1             # a running `python -m infer serve`

Each line typed is a user turn; the reply streams as it is generated, then a line says which model
answered and why. With --run the turns go through the same agent as the server's chat page
(infer/agent/service.Agent): the sanitizer, a chat session in the conversation store (in memory, or
--store FILE to keep it), and the routing policy over this checkpoint's engine; the prompt is assembled
within the model's window by the agent's memory. With --url the server's agent API (/v1/agent/...) is
used when it has one, else plain /v1/chat/completions with the conversation kept here. `/reset`
starts a new session, `/exit` (or end of input) quits. Reads standard input, so it also works piped
(`printf 'hi\\n' | python -m infer chat --run DIR`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator

HELP = "type a message; /reset starts a new conversation, /exit quits"


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="chat in the terminal with a checkpoint or a running server",
                              description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="run directory: load it and chat with its own engine through the agent layer")
    where.add_argument("--url", help="a server's base URL, e.g. http://127.0.0.1:8000/v1 (its agent API when it "
                                     "has one, else its OpenAI-compatible chat endpoint)")
    p.add_argument("--model", default=None, help="the model (backend) to ask; default: the agent routes "
                                                 "(plain OpenAI server: its first model)")
    p.add_argument("--api-key", default=None, help="with --url: the server's API key (default: $JAXLM_API_KEY)")
    p.add_argument("--system", default=None, help="a system message that starts every conversation")
    p.add_argument("--store", default=":memory:",
                   help="with --run: the SQLite file of the chat sessions (default: in memory, gone on exit)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="the first reply's seed (each next reply: +1)")
    p.add_argument("--step", type=int, default=None, help="with --run: checkpoint step (default: the latest)")
    p.set_defaults(func=cmd_chat)
    return p


class TurnError(Exception):
    """A turn the agent refused or could not answer (sanitizer, window, backend): one line, the chat goes on."""


class LocalAgentChat:
    """Turns through infer.agent.service.Agent in this process, over a one-slot engine of the checkpoint."""

    def __init__(self, run: str, step: int | None, *, store: str = ":memory:", max_tokens: int = 256):
        import asyncio
        from pathlib import Path

        from infer.agent.memory import ConversationStore
        from infer.agent.route import RoutingPolicy
        from infer.agent.service import Agent
        from infer.engine import Engine
        from model.checkpoint import load_for_inference

        path = Path(run).resolve()
        name = path.parent.name if path.name == "checkpoints" else path.name  # as `python -m infer serve` names it
        loaded = load_for_inference(run, step)
        self.engine = Engine(loaded.model, loaded.tokenizer, slots=1, max_queue=1, name=name)
        self.engine.start()
        self.store = ConversationStore(store)
        self.agent = Agent(RoutingPolicy.default({name: self.engine}), self.store, max_tokens_default=max_tokens)
        self.loop = asyncio.new_event_loop()  # one loop for every turn: the backends may keep loop-bound state

    def new_session(self, system: str | None) -> str:
        return self.store.create(title="terminal chat", system=system)["id"]

    def turn(self, session: str, text: str, *, model: str | None, max_tokens: int, temperature: float,
             seed: int) -> Iterator[dict]:
        from infer.agent import service
        from infer.agent.memory import ContextTooSmall, UnknownSession
        from infer.agent.route import RouteError
        from infer.agent.sanitize import SanitizeError

        events = self.agent.turn(session, text, model=model, max_tokens=max_tokens, temperature=temperature,
                                 seed=seed)
        try:
            while True:
                try:
                    yield self.loop.run_until_complete(events.__anext__())
                except StopAsyncIteration:
                    return
                except (SanitizeError, ContextTooSmall, UnknownSession, RouteError, service.TurnError) as e:
                    raise TurnError(str(e)) from None  # refused before the first event: one line, go on
        finally:
            self.loop.run_until_complete(events.aclose())

    def close(self) -> None:
        self.loop.close()
        self.store.close()
        self.engine.shutdown(grace_s=0)


def _auth(api_key: str | None) -> dict[str, str]:
    import os

    key = api_key or os.environ.get("JAXLM_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _error_message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except Exception:
        return f"HTTP {response.status_code}"


class RemoteAgentChat:
    """Turns through a running server's agent API (/v1/agent/sessions...), streamed over its SSE."""

    def __init__(self, url: str, api_key: str | None):
        import httpx

        self.client = httpx.Client(base_url=url.rstrip("/") + "/agent", headers=_auth(api_key),
                                   timeout=httpx.Timeout(10.0, read=600.0))

    @staticmethod
    def available(url: str, api_key: str | None) -> bool:
        """Whether the server at `url` has the agent API (a plain OpenAI server answers 404). A wrong key
        or an unreachable server raises, so the user hears about it instead of a silent fallback."""
        import httpx

        r = httpx.get(url.rstrip("/") + "/agent/sessions", headers=_auth(api_key), timeout=10.0)
        if r.status_code == 404:
            return False
        if r.status_code != 200:
            raise RuntimeError(_error_message(r))
        return True

    def new_session(self, system: str | None) -> str:
        body = {"title": "terminal chat"} | ({"system": system} if system else {})
        r = self.client.post("/sessions", json=body)
        if r.status_code != 201 and r.status_code != 200:
            raise TurnError(_error_message(r))
        return r.json()["id"]

    def turn(self, session: str, text: str, *, model: str | None, max_tokens: int, temperature: float,
             seed: int) -> Iterator[dict]:
        body = {"content": text, "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stream": True}
        if model:
            body["model"] = model
        with self.client.stream("POST", f"/sessions/{session}/messages", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise TurnError(_error_message(r))
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event and "type" not in event:  # an OpenAI error object mid-stream
                    event = {"type": "error", "message": event["error"].get("message", "the reply failed")}
                yield event

    def close(self) -> None:
        self.client.close()


class PlainChat:
    """A server without the agent API: /v1/chat/completions with the conversation kept in this process
    (the server checks the window; it answers 400 when a prompt does not fit)."""

    def __init__(self, url: str, model: str | None, api_key: str | None):
        import os

        from openai import OpenAI

        self.client = OpenAI(base_url=url, api_key=api_key or os.environ.get("JAXLM_API_KEY") or "unused",
                             max_retries=0)
        self.model = model or self.client.models.list().data[0].id
        self.sessions: dict[str, list[dict]] = {}

    def new_session(self, system: str | None) -> str:
        sid = str(len(self.sessions))
        self.sessions[sid] = [{"role": "system", "content": system}] if system else []
        return sid

    def turn(self, session: str, text: str, *, model: str | None, max_tokens: int, temperature: float,
             seed: int) -> Iterator[dict]:
        import openai

        messages = self.sessions[session] + [{"role": "user", "content": text}]
        reply = []
        try:
            stream = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                         temperature=temperature, seed=seed, stream=True)
            yield {"type": "meta", "backend": self.model, "reason": None, "removed": {}}
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    reply.append(chunk.choices[0].delta.content)
                    yield {"type": "delta", "text": reply[-1]}
        except openai.APIStatusError as e:
            raise TurnError(_error_message(e.response)) from None
        self.sessions[session] = messages + [{"role": "assistant", "content": "".join(reply)}]

    def close(self) -> None:
        self.client.close()


def _removed_note(removed: dict | None) -> str:
    parts = [f"{n} {kind.replace('_', '-')}" for kind, n in (removed or {}).items() if n]
    return f"(removed from your message: {', '.join(parts)})\n" if parts else ""


def chat_loop(chat, lines: Iterator[str], out, *, system: str | None, model: str | None = None,
              max_tokens: int, temperature: float, seed: int) -> None:
    """Read user turns from `lines`, write the streamed replies to `out`, each followed by which model
    answered and why; `/reset` starts a new session, `/exit` or the end of `lines` stops."""
    interactive = out.isatty()
    out.write(f"({HELP})\n")
    session = chat.new_session(system)
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = next(lines, None)
        if line is None or line.strip() == "/exit":
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session = chat.new_session(system)
            out.write("(new conversation)\n")
            continue
        if not text.strip():
            continue
        meta, started = {}, False
        try:
            for event in chat.turn(session, text, model=model, max_tokens=max_tokens, temperature=temperature,
                                   seed=seed):
                if event["type"] == "meta":
                    meta = event
                    out.write(_removed_note(event.get("removed")))
                    out.write("assistant> ")
                    started = True
                elif event["type"] == "delta":
                    out.write(event["text"])
                elif event["type"] == "error":
                    raise TurnError(event.get("message") or "the reply failed")
                out.flush()
        except TurnError as e:
            out.write(("\n" if started else "") + f"error: {e}\n")
            out.flush()
            continue
        out.write("\n")
        if meta.get("backend") and meta.get("reason"):
            out.write(f"({meta['backend']}: {meta['reason']})\n")
        out.flush()
        seed += 1  # each reply its own draw, reproducible from --seed


def cmd_chat(args: argparse.Namespace) -> int:
    import math

    from infer.cli import UserError, load_checkpoint

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens={args.max_tokens} must be a positive integer")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    if args.run is not None:
        load_checkpoint(args.run, args.step)  # a missing run or step is one line
        chat = LocalAgentChat(args.run, args.step, store=args.store, max_tokens=args.max_tokens)
    else:
        try:
            if RemoteAgentChat.available(args.url, args.api_key):
                chat = RemoteAgentChat(args.url, args.api_key)
            else:
                chat = PlainChat(args.url, args.model, args.api_key)
        except Exception as e:  # connection refused, bad URL, wrong key: one line
            raise UserError(f"--url={args.url}: {type(e).__name__}: {e}") from None
    try:
        chat_loop(chat, iter(sys.stdin.readline, ""), sys.stdout, system=args.system, model=args.model,
                  max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    finally:
        chat.close()
    return 0
