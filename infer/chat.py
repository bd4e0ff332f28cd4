"""`python -m infer chat`: a terminal chat with a checkpoint (its own engine) or a running server.

    python -m infer chat --run runs/chat_quickstart                 # loads the checkpoint, compiles, chats
    python -m infer chat --url http://127.0.0.1:8000/v1 --model chat_quickstart

Each line typed is a user turn; the reply streams as it is generated. The conversation is rendered with
the model's chat template (model/chat_template.py) and kept within the model's context: the system
message and the newest turns stay, the oldest turns are dropped, and a single turn too long for the
window is refused with one line. `/reset` starts over, `/exit` (or end of input) quits. Reads standard
input, so it also works piped (`printf 'hi\\n' | python -m infer chat --run DIR`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterator

HELP = "type a message; /reset starts a new conversation, /exit quits"


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="chat in the terminal with a checkpoint or a running server",
                              description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="run directory: load it and chat with its own engine")
    where.add_argument("--url", help="an OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="with --url: the model name (default: the server's first)")
    p.add_argument("--api-key", default=None, help="with --url: the server's API key (default: $JAXLM_API_KEY)")
    p.add_argument("--system", default=None, help="a system message that starts every conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="with --run: checkpoint step (default: the latest)")
    p.set_defaults(func=cmd_chat)
    return p


def fit_to_window(messages: list[dict], count: Callable[[list[dict]], int], budget: int) -> list[dict]:
    """The system message (if any) and the newest turns whose rendering takes at most `budget`
    tokens; the oldest turns go first. Raises ValueError when even the newest user turn alone does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while turns:
        if count(system + turns) <= budget:
            return system + turns
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # a conversation restarts at a user turn
            turns = turns[1:]
    raise ValueError(f"the message does not fit the model's context ({budget} tokens left for the prompt); "
                     "shorten it or /reset")


class LocalChat:
    """Replies from a checkpoint through a one-slot engine of its own."""

    def __init__(self, run: str, step: int | None):
        from infer.engine import Engine
        from model.chat_template import ChatTemplate
        from model.checkpoint import load_for_inference

        loaded = load_for_inference(run, step)
        self.tokenizer = loaded.tokenizer
        self.template = ChatTemplate(loaded.tokenizer)
        self.engine = Engine(loaded.model, loaded.tokenizer, slots=1, max_queue=1, name="chat")
        self.engine.start()
        self.context = self.engine.max_context

    def count(self, messages: list[dict]) -> int:
        return len(self.template.render(messages))

    def reply(self, messages: list[dict], max_tokens: int, temperature: float, seed: int) -> Iterator[str]:
        import queue

        from infer.engine import SamplingOptions

        ids = self.template.render(messages)
        options = SamplingOptions(max_tokens=min(max_tokens, self.context - len(ids)), temperature=temperature,
                                  seed=seed, stop=self.template.stop_strings,
                                  stop_token_ids=self.template.stop_token_ids)
        events: queue.Queue = queue.Queue()
        self.engine.submit(ids, options, events.put)
        while True:
            event = events.get()
            if event.text:
                yield event.text
            if event.finish_reason is not None:
                return

    def close(self) -> None:
        self.engine.shutdown(grace_s=0)


class RemoteChat:
    """Replies from a running OpenAI-compatible server (`python -m infer serve`)."""

    def __init__(self, url: str, model: str | None, api_key: str | None):
        import os

        from openai import OpenAI

        self.client = OpenAI(base_url=url, api_key=api_key or os.environ.get("JAXLM_API_KEY") or "unused",
                             max_retries=0)
        self.model = model or self.client.models.list().data[0].id
        self.context = None  # the server checks the window; it answers 400 when a prompt does not fit

    def count(self, messages: list[dict]) -> int:
        return 0

    def reply(self, messages: list[dict], max_tokens: int, temperature: float, seed: int) -> Iterator[str]:
        stream = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                     temperature=temperature, seed=seed, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    def close(self) -> None:
        self.client.close()


def chat_loop(backend, lines: Iterator[str], out, *, system: str | None, max_tokens: int, temperature: float,
              seed: int) -> None:
    """Read user turns from `lines`, write replies to `out`, keep the conversation within the window."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = out.isatty()
    out.write(f"({HELP})\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = next(lines, None)
        if line is None or line.strip() == "/exit":
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(start)
            out.write("(new conversation)\n")
            continue
        if not text.strip():
            continue
        candidate = messages + [{"role": "user", "content": text}]
        if backend.context is not None:
            try:
                candidate = fit_to_window(candidate, backend.count, backend.context - max(1, min(max_tokens, 64)))
            except ValueError as e:
                out.write(f"error: {e}\n")
                continue
        out.write("assistant> ")
        reply = []
        for piece in backend.reply(candidate, max_tokens, temperature, seed):
            reply.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        messages = candidate + [{"role": "assistant", "content": "".join(reply)}]
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
        backend = LocalChat(args.run, args.step)
    else:
        try:
            backend = RemoteChat(args.url, args.model, args.api_key)
        except Exception as e:  # connection refused, bad URL, wrong key: one line
            raise UserError(f"--url={args.url}: {type(e).__name__}: {e}") from None
    try:
        chat_loop(backend, iter(sys.stdin.readline, ""), sys.stdout, system=args.system,
                  max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    finally:
        backend.close()
    return 0
