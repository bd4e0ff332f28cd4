"""Run an artifact written by `python -m infer export` with only jax and numpy installed.

    python -m infer.load_exported model.jaxlm --chat [--system TEXT]    # a terminal chat: stdin lines -> replies
    python -m infer.load_exported model.jaxlm --prompt "ROMEO:" --max-new-tokens 100
    python -m infer.load_exported model.jaxlm --ids 5 6 7 --max-new-tokens 100
    art = ExportedModel("model.jaxlm"); art.generate([[5, 6, 7]], max_new_tokens=100)   # greedy

This module and infer/ondevice.py (the artifact's tokenizer and chat template, re-implemented in
the standard library) import nothing from jaxlm's model/ or train/, flax, `tokenizers` or jinja2:
a device needs `pip install jax flatbuffers` (jax.export's deserializer imports flatbuffers) and
these two files in an `infer/` folder.
Generation follows `infer.sampler.generate_long`: prompts left-padded into a window of
P = max_seq_len // 2 tokens (longer prompts keep their last P), one prefill, then one decode call
per token; when the token to feed would take the last position (max_seq_len - 1), the last P
tokens are prefilled again. Rows slide together, as in the sampler.

The chat keeps every prompt within the prefill window: the system message and the newest turns
that fit in P tokens (older turns are dropped, said on stderr), and a reply of at most
max_seq_len - len(prompt) tokens, so the window never slides inside a turn. A reply ends at the
template's stop ids or stop strings (never shown) or at --max-new-tokens; text streams to stdout
as it is generated, one reply per turn followed by a newline.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Iterator, TextIO

import jax
import numpy as np

from infer.ondevice import OnDeviceText, UnsupportedText


class ExportedModel:
    """An artifact's prefill and decode programs and its `meta`: `B` rows per call, a prompt window
    of `P` tokens, a context of `S` positions."""

    def __init__(self, path: str):
        with np.load(path, allow_pickle=False) as z:
            self.meta = json.loads(bytes(z["meta"]).decode())
            if self.meta.get("format") != "jaxlm-export-1":
                raise ValueError(f"{path}: not a jaxlm export artifact")
            self._prefill = jax.export.deserialize(bytearray(z["prefill"].tobytes()))
            self._decode = jax.export.deserialize(bytearray(z["decode"].tobytes()))
        self.B, self.P, self.S = self.meta["batch"], self.meta["prompt_window"], self.meta["max_seq_len"]

    def _prefill_window(self, rows: list[list[int]]):
        tokens = np.zeros((self.B, self.P), np.int32)
        positions = np.full((self.B, self.P), -1, np.int32)
        for i, r in enumerate(rows):
            r = r[-self.P:]
            tokens[i, self.P - len(r):] = r
            positions[i, self.P - len(r):] = np.arange(len(r))
        logits, *cache = self._prefill.call(tokens, positions)
        return logits, cache, np.max(positions, axis=1) + 1

    def _steps(self, rows: list[list[int]], max_new_tokens: int,
               pick: Callable[[np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
        """The (B,) token ids of each step; `pick` maps logits (B, V) to them."""
        if max(len(r) for r in rows) + max_new_tokens > self.S:  # as generate_long: long prompts keep their last P
            rows = [r[-self.P:] for r in rows]
        new: list[list[int]] = [[] for _ in rows]
        logits, cache, positions = self._prefill_window(rows)
        for step in range(max_new_tokens):
            token = pick(np.asarray(logits)).astype(np.int32)  # (B,)
            for i, t in enumerate(token):
                new[i].append(int(t))
            yield token
            if step + 1 == max_new_tokens:
                return
            if positions.max() >= self.S - 1:  # slide: prefill the last P tokens of every row
                logits, cache, positions = self._prefill_window([r + n for r, n in zip(rows, new)])
            else:
                logits, *cache = self._decode.call(token, positions.astype(np.int32), *cache)
                positions = positions + 1

    def _rows(self, prompts: list[list[int]]) -> list[list[int]]:
        if not 1 <= len(prompts) <= self.B:
            raise ValueError(f"give 1 to {self.B} prompts (the artifact was exported for batch {self.B})")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must not be empty")
        return [list(p) for p in prompts] + [[0]] * (self.B - len(prompts))

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of up to `batch` prompts by max_new_tokens tokens each."""
        steps = list(self._steps(self._rows(prompts), max_new_tokens, lambda logits: np.argmax(logits, axis=-1)))
        return [[int(s[i]) for s in steps] for i in range(len(prompts))]

    def stream(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
               rng: np.random.Generator | None = None) -> Iterator[int]:
        """The continuation of one prompt token by token (greedy at temperature 0, else sampled
        from softmax(logits / temperature) with `rng`); stop iterating to stop generating."""
        rng = rng if rng is not None else np.random.default_rng(0)

        def pick(logits):  # (B, V); only row 0 is a prompt
            token = np.argmax(logits, axis=-1)
            if temperature > 0:
                z = logits[0].astype(np.float64) / temperature
                p = np.exp(z - z.max())
                token[0] = rng.choice(len(p), p=p / p.sum())
            return token

        for token in self._steps(self._rows([prompt]), max_new_tokens, pick):
            yield int(token[0])


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` may still become a stop string or a UTF-8 character."""
    n = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    while n < len(text) and text[len(text) - 1 - n] == "\ufffd":  # an incomplete UTF-8 sequence so far
        n += 1
    return n


def reply(model: ExportedModel, text: OnDeviceText, prompt: list[int], max_new_tokens: int, out: TextIO,
          temperature: float = 0.0, rng: np.random.Generator | None = None) -> str:
    """Generate one assistant turn for `prompt`, streaming its text to `out`; returns the text (cut
    before the first stop id or stop string, which are never written)."""
    chat = text.chat
    ids: list[int] = []
    shown, done = 0, ""
    for token in model.stream(prompt, max_new_tokens, temperature, rng):
        if token in chat.stop_ids:
            break
        ids.append(token)
        done = text.tokenizer.decode(ids)
        cut = min((i for i in (done.find(s) for s in chat.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            done = done[:cut]
            break
        end = len(done) - _held_back(done, chat.stop_strings)
        if end > shown:
            out.write(done[shown:end])
            out.flush()
            shown = end
    out.write(done[shown:])
    out.flush()
    return done


def fit_window(render: Callable[[list[dict]], list[int]], system: list[dict], history: list[dict],
               user: dict, window: int) -> tuple[list[int], int]:
    """The prompt of the system message(s), the newest turns of `history` and `user` that fits in
    `window` tokens, and how many history messages were left out (oldest first, a user message
    with the replies after it). ValueError when even the system message and `user` do not fit."""
    start = 0
    while True:
        ids = render(system + history[start:] + [user])
        if len(ids) <= window:
            return ids, start
        if start >= len(history):
            raise ValueError(f"the message is {len(ids)} tokens with the system prompt; this model's prompt "
                             f"window holds {window}")
        start += 1
        while start < len(history) and history[start]["role"] != "user":
            start += 1


def chat(model: ExportedModel, text: OnDeviceText, *, system: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.0, seed: int = 0, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
         stderr: TextIO = sys.stderr) -> int:
    """A terminal chat: each stdin line is a user turn, its reply streams to stdout (then a newline)."""
    if text.chat is None:
        raise UnsupportedText(text.why_no_chat)
    sys_msgs = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    rng = np.random.default_rng(seed)
    interactive = stdin.isatty()
    while True:
        if interactive:
            stderr.write("> ")
            stderr.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        user = {"role": "user", "content": line}
        try:
            prompt, dropped = fit_window(text.chat.render, sys_msgs, history, user, model.P)
        except ValueError as e:  # too long, or a character the tokenizer cannot encode
            stderr.write(f"error: {e}\n")
            continue
        if dropped:
            history = history[dropped:]
            stderr.write(f"(context: the {dropped} oldest messages left the {model.P}-token window)\n")
        answer = reply(model, text, prompt, min(max_new_tokens, model.S - len(prompt)), stdout, temperature, rng)
        stdout.write("\n")
        stdout.flush()
        history += [user, {"role": "assistant", "content": answer}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.load_exported", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ids", type=int, nargs="+", help="prompt token ids (prints the new ids)")
    what.add_argument("--prompt", help="prompt text (prints the continuation)")
    what.add_argument("--chat", action="store_true", help="a chat: each stdin line is a user turn")
    p.add_argument("--system", default=None, help="--chat: a system message kept in every prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per prompt or reply (default 64; --chat 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens={args.max_new_tokens} must be a positive integer")
    if not args.temperature >= 0:
        p.error(f"--temperature={args.temperature} must be >= 0")
    n = args.max_new_tokens or (256 if args.chat else 64)
    try:
        model = ExportedModel(args.artifact)
        if args.ids:
            print(" ".join(map(str, model.generate([args.ids], n)[0])))
            return 0
        text = OnDeviceText.from_meta(model.meta)
        if args.chat:
            return chat(model, text, system=args.system, max_new_tokens=n, temperature=args.temperature,
                        seed=args.seed)
        ids = text.tokenizer.encode(args.prompt)
        rng = np.random.default_rng(args.seed)
        out = list(model.stream(ids, n, args.temperature, rng))
        print(text.tokenizer.decode(out))
        return 0
    except (OSError, ValueError) as e:  # includes UnsupportedText
        print(f"python -m infer.load_exported: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
