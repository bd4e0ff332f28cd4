"""Chat templates: a conversation -> token ids, in one place for the server, fine-tuning data and the agent.

    template = ChatTemplate(tokenizer)                       # the tokenizer's own template (see below)
    ids = template.render(messages)                          # list[int], ends with the assistant's header
    ids, mask = template.render_with_mask(messages)          # int32[N], bool[N]: the SFT loss mask
    render_chat(tokenizer, messages)                         # the server's one call
    chat_stop_strings(tokenizer), chat_stop_token_ids(tokenizer)

Messages are `{"role": "system" | "user" | "assistant", "content": str}`. A template produces a list
of segments: scaffold text (headers, control tokens) and message contents. The scaffold is encoded
with control-token strings parsed (`Tokenizer.encode_special`); each content is encoded on its own
with `Tokenizer.encode`, which never yields a control-token id. So a user who types
`<|im_end|><|im_start|>system` gets those characters, not a forged system turn (the hole of
Hugging Face's render-then-tokenize, transformers #29279). Content and scaffold meet at a token
boundary, so the ids at a content's edges can differ from tokenizing the rendered text whole.

Which template a tokenizer gets:
- an imported Hugging Face model's `chat_template` (Jinja, kept in the tokenizer's JSON by
  `python -m infer import-hf`), rendered in Jinja's `ImmutableSandboxedEnvironment` with the helpers
  transformers provides (`raise_exception`, `strftime_now`, `tojson`, `{% generation %}`), output
  bounded. Every content is replaced by a unique marker, the output is split at the markers and the
  real content encoded in its place (`trim`/`strip` on content are honoured; other transformations
  of content are an error).
- jaxlm's own, when the tokenizer has the chat control tokens reserved
  (`tokenizer.with_special_tokens(CHAT_TOKENS)`): ChatML, `<|im_start|>role\\n{content}<|im_end|>\\n`.
- otherwise (every model pretrained so far) a plain-text scaffold, `USER:\\n{content}\\n\\n` per turn
  (an assistant turn ends with EOS where the tokenizer has one), with stop strings at the next header.
  Plain text cannot stop a user from typing `\\n\\nSYSTEM:\\n` into a message: only reserved tokens
  can, which is why a model fine-tuned for chat reserves them.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from model.tokenizer import Tokenizer

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # reserve with tokenizer.with_special_tokens(CHAT_TOKENS)
ROLES = ("system", "user", "assistant")
PLAIN_HEADERS = {"system": "SYSTEM:\n", "user": "USER:\n", "assistant": "ASSISTANT:\n"}
MAX_RENDER_CHARS = 1 << 20  # a Jinja template's output (contents are markers, so this is scaffold only)


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation: scaffold text (`message` None) or message `message`'s content."""

    text: str
    message: int | None = None


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts (other keys dropped), or a one-line ValueError
    naming the message index and what is allowed."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role {_short(role)} is not allowed; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


class ChatTemplate:
    """One tokenizer's chat template. `source` is Jinja source (a Hugging Face `chat_template`);
    None takes the tokenizer's own (`tokenizer.chat_template`, else jaxlm's ChatML or plain text)."""

    def __init__(self, tokenizer: Tokenizer, source: str | None = None):
        self.tokenizer = tokenizer
        self.source = source if source is not None else tokenizer.chat_template
        specials = tokenizer.special_tokens
        self.control_ids = frozenset(specials.values())
        if self.source is not None:
            self.kind = "jinja"
            self._jinja = _compile(self.source)
        elif all(t in specials for t in CHAT_TOKENS):
            self.kind = "chatml"
        else:
            self.kind = "plain"
        self._end_ids: tuple[int, ...] | None = None

    # ---- rendering

    def segments(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[Segment]:
        """The conversation as scaffold and content segments (adjacent scaffold merged)."""
        messages = validate_messages(messages)
        if self.kind == "jinja":
            segs = self._jinja_segments(messages, add_generation_prompt)
        else:
            segs = []
            eos = self.tokenizer.eos_token if self.kind == "plain" else None
            for i, m in enumerate(messages):
                if self.kind == "chatml":
                    segs += [Segment(f"{CHAT_TOKENS[0]}{m['role']}\n"), Segment(m["content"], i),
                             Segment(f"{CHAT_TOKENS[1]}\n")]
                else:  # plain text; an assistant turn ends with EOS (learnable, and always a stop)
                    end = (eos or "") if m["role"] == "assistant" else ""
                    segs += [Segment(PLAIN_HEADERS[m["role"]]), Segment(m["content"], i), Segment(end + "\n\n")]
            if add_generation_prompt:
                segs.append(Segment(f"{CHAT_TOKENS[0]}assistant\n" if self.kind == "chatml"
                                    else PLAIN_HEADERS["assistant"]))
        merged: list[Segment] = []
        for s in segs:
            if merged and s.message is None and merged[-1].message is None:
                merged[-1] = Segment(merged[-1].text + s.text)
            elif s.text or s.message is not None:
                merged.append(s)
        return merged

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation, ending with the assistant's header when `add_generation_prompt`."""
        return self.render_with_mask(messages, add_generation_prompt)[0].tolist()

    def render_with_mask(self, messages: Sequence[dict], add_generation_prompt: bool = False
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32[N], assistant_mask bool[N]): the mask is True on every assistant message's
        content tokens and on its end of turn (the scaffold after the content up to and including
        its first control token, e.g. `<|im_end|>` or EOS), the tokens an SFT loss trains on."""
        messages = validate_messages(messages)
        return self._encode(self.segments(messages, add_generation_prompt), messages)

    def _encode(self, segs: list[Segment], messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer
        ids, mask = [], []
        prev_assistant = False
        for s in segs:
            if s.message is None:
                piece = tok.encode_special(s.text)  # L
                m = np.zeros(len(piece), bool)
                if prev_assistant:  # the assistant's end of turn: up to its first control token
                    hits = np.flatnonzero(np.isin(piece, list(self.control_ids)))
                    if hits.size:
                        m[:hits[0] + 1] = True
                prev_assistant = False
            else:
                piece = tok.encode(s.text)  # L; never a control id
                prev_assistant = messages[s.message]["role"] == "assistant"
                m = np.full(len(piece), prev_assistant)
            ids.append(piece)
            mask.append(m)
        if not ids:
            return np.zeros((0,), np.int32), np.zeros((0,), bool)
        return np.concatenate(ids).astype(np.int32), np.concatenate(mask)

    # ---- stopping

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: the template's end-of-turn token and EOS."""
        if self._end_ids is None:
            ends: list[int] = []
            if self.kind == "chatml":
                ends.append(self.tokenizer.special_tokens[CHAT_TOKENS[1]])
            elif self.kind == "jinja":
                ends += self._probe_end_of_turn()
            if self.tokenizer.eos_id is not None:
                ends.append(self.tokenizer.eos_id)
            self._end_ids = tuple(dict.fromkeys(ends))
        return self._end_ids

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings that end an assistant turn in generated text: the stop tokens' text, and for the
        plain-text scaffold the next turn's header."""
        texts = tuple(self.tokenizer.decode([i]) for i in self.stop_token_ids)
        if self.kind == "plain":
            texts += tuple("\n" + h.rstrip("\n") for h in PLAIN_HEADERS.values())
        return tuple(dict.fromkeys(texts))

    def _probe_end_of_turn(self) -> list[int]:
        """The first control token after an assistant's content in a rendered conversation."""
        for convo in ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                      [{"role": "system", "content": "s"}, {"role": "user", "content": "x"},
                       {"role": "assistant", "content": "y"}]):
            try:
                ids, mask = self.render_with_mask(convo, add_generation_prompt=False)
            except ValueError:
                continue
            hits = [int(t) for t, m in zip(ids, mask) if m and int(t) in self.control_ids]
            return hits[:1]
        return []

    # ---- Jinja

    def _jinja_segments(self, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
        markers = _Markers()
        view = [{"role": m["role"], "content": markers.content(m["content"], i)} for i, m in enumerate(messages)]
        tok = self.tokenizer
        text = _render_jinja(self._jinja, messages=view, add_generation_prompt=add_generation_prompt,
                             bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        return markers.split(text)

    def __repr__(self) -> str:
        return f"ChatTemplate(kind={self.kind!r}, tokenizer={self.tokenizer!r})"


# ---- module functions (what the server calls) -----------------------------------------------------

_CACHE: "weakref.WeakKeyDictionary[Tokenizer, dict]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def chat_template_for(tokenizer: Tokenizer, chat_template: str | None = None) -> ChatTemplate:
    """The (cached) ChatTemplate of `tokenizer`, with Jinja source `chat_template` if given."""
    with _CACHE_LOCK:
        per = _CACHE.setdefault(tokenizer, {})
        if chat_template not in per:
            if len(per) >= 8:
                per.clear()
            per[chat_template] = ChatTemplate(tokenizer, chat_template)
        return per[chat_template]


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict], chat_template: str | None = None) -> list[int]:
    """Prompt ids for `messages`, ending with the assistant's header (ValueError, one line, for bad
    messages or a template that refuses them)."""
    return chat_template_for(tokenizer, chat_template).render(messages, add_generation_prompt=True)


def chat_stop_strings(tokenizer: Tokenizer, chat_template: str | None = None) -> list[str]:
    """Stop strings that end the assistant's turn (trimmed from the reply)."""
    return list(chat_template_for(tokenizer, chat_template).stop_strings)


def chat_stop_token_ids(tokenizer: Tokenizer, chat_template: str | None = None) -> list[int]:
    """Token ids that end the assistant's turn (its end-of-turn token and EOS)."""
    return list(chat_template_for(tokenizer, chat_template).stop_token_ids)


# ---- Jinja machinery ------------------------------------------------------------------------------

class _TemplateRefused(Exception):
    """raise_exception() in a template: the template's own message for a conversation it rejects."""


class _Markers:
    """Unique per-render markers standing in for message contents inside a Jinja render."""

    def __init__(self):
        self.nonce = secrets.token_hex(8)
        self.values: list[tuple[int, str]] = []  # marker number -> (message index, text)
        self._re = re.compile(rf"\u27e6{self.nonce}:(\d+)\u27e7")

    def content(self, text: str, message: int) -> "_Content":
        self.values.append((message, text))
        return _Content(f"\u27e6{self.nonce}:{len(self.values) - 1}\u27e7", self, len(self.values) - 1)

    def split(self, rendered: str) -> list[Segment]:
        segs, pos = [], 0
        for m in self._re.finditer(rendered):
            message, text = self.values[int(m.group(1))]
            segs += [Segment(rendered[pos:m.start()]), Segment(text, message)]
            pos = m.end()
        segs.append(Segment(rendered[pos:]))
        for s in segs:
            if s.message is None and (self.nonce in s.text.lower() or "\u27e6" in s.text or "\u27e7" in s.text):
                raise ValueError("the chat template transforms message content beyond trim/strip (e.g. slicing "
                                 "or upper); jaxlm cannot keep content apart from the scaffold")
        return segs


class _Content(str):
    """A content marker as the template sees it. Its strip methods give markers of the stripped
    content, and concatenation keeps track of the parts, so `message['content'] | trim` and
    `('[INST] ' + content).strip()` strip the real content as they would in transformers."""

    def __new__(cls, marker: str, markers: _Markers, key: int):
        obj = super().__new__(cls, marker)
        obj._markers, obj._key = markers, key
        return obj

    def _text(self) -> str:
        return self._markers.values[self._key][1]

    def __bool__(self) -> bool:  # `{% if message['content'] %}` tests the real content
        return bool(self._text())

    def _derive(self, fn) -> "_Content":
        message, text = self._markers.values[self._key]
        return self._markers.content(fn(text), message)

    def strip(self, chars=None):
        return self._derive(lambda t: t.strip(chars))

    def lstrip(self, chars=None):
        return self._derive(lambda t: t.lstrip(chars))

    def rstrip(self, chars=None):
        return self._derive(lambda t: t.rstrip(chars))

    def __add__(self, other):
        return _Joined.of(self, other) if isinstance(other, str) else NotImplemented

    def __radd__(self, other):
        return _Joined.of(other, self) if isinstance(other, str) else NotImplemented


class _Joined(str):
    """Text concatenated from scaffold strings and content markers (see `_Content`)."""

    def __new__(cls, parts: tuple):
        obj = super().__new__(cls, "".join(str.__str__(p) for p in parts))
        obj._parts = parts
        return obj

    @classmethod
    def of(cls, a: str, b: str) -> "_Joined":
        return cls(getattr(a, "_parts", (a,)) + getattr(b, "_parts", (b,)))

    def __add__(self, other):
        return _Joined.of(self, other) if isinstance(other, str) else NotImplemented

    def __radd__(self, other):
        return _Joined.of(other, self) if isinstance(other, str) else NotImplemented

    def lstrip(self, chars=None):
        parts = list(self._parts)
        while parts:
            first = parts[0]
            parts[0] = first.lstrip(chars)
            if (first._text().lstrip(chars) if isinstance(first, _Content) else parts[0]):
                break
            if not isinstance(first, _Content):
                parts.pop(0)
            else:  # an all-whitespace content: keep its (empty) marker, strip on into the next part
                parts = [parts.pop(0)] + list(_Joined(tuple(parts)).lstrip(chars)._parts) if len(parts) > 1 \
                    else parts
                break
        return _Joined(tuple(parts))

    def rstrip(self, chars=None):
        parts = list(self._parts)
        while parts:
            last = parts[-1]
            parts[-1] = last.rstrip(chars)
            if (last._text().rstrip(chars) if isinstance(last, _Content) else parts[-1]):
                break
            if not isinstance(last, _Content):
                parts.pop()
            else:
                tail = parts.pop()
                parts = (list(_Joined(tuple(parts)).rstrip(chars)._parts) if parts else []) + [tail]
                break
        return _Joined(tuple(parts))

    def strip(self, chars=None):
        return self.lstrip(chars).rstrip(chars)


def _raise_exception(message):
    raise _TemplateRefused(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment():
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("rendering a Hugging Face chat template needs jinja2: pip install jinja2") from None

    class GenerationTag(Extension):
        """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2

    env = _environment()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {_one_line(e.message)} (line {e.lineno})") from None


def _render_jinja(template, **context) -> str:
    import jinja2

    out, n = [], 0
    try:
        for piece in template.generate(**context):
            n += len(piece)
            if n > MAX_RENDER_CHARS:
                break
            out.append(piece)
    except _TemplateRefused as e:
        raise ValueError(f"chat template refused the conversation: {_one_line(str(e))}") from None
    except jinja2.TemplateError as e:  # includes SecurityError (sandbox) and UndefinedError
        raise ValueError(f"chat template failed: {_one_line(str(e))}") from None
    except Exception as e:  # a Python error inside the template ('a' + 1, a bad index, ...)
        raise ValueError(f"chat template failed: {type(e).__name__}: {_one_line(str(e))}") from None
    if n > MAX_RENDER_CHARS:
        raise ValueError(f"chat template output exceeds {MAX_RENDER_CHARS} characters")
    return "".join(out)


def _one_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:300] if (text or "").strip() else "(no message)"


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."
