"""Text on a device: an export artifact's tokenizer and chat template in the standard library + numpy.

    text = OnDeviceText.from_meta(ExportedModel("model.jaxlm").meta)
    ids = text.tokenizer.encode("Hi <|im_end|>")                   # plain text: never a control-token id
    prompt = text.chat.render([{"role": "user", "content": "Hi"}])  # == ChatTemplate(tok).render(...)
    text.tokenizer.decode(reply_ids)

`python -m infer export` writes the tokenizer (jaxlm's own JSON: byte, char, or a Hugging Face
byte-level BPE with its vocabulary, merges and added tokens) and the chat template's scaffold
(`meta["chat"]`: each role's header and end-of-turn text, the generation prompt, the stop ids and
stop strings) into the artifact, so a device with only jax and numpy can hold a conversation. This
module re-implements what model/tokenizer.py gets from Hugging Face `tokenizers` and what
model/chat_template.py renders, token for token (tests/infer/test_ondevice.py compares them), and
imports nothing from jaxlm's model/ or train/, flax, `tokenizers` or jinja2. As in the chat
template, the scaffold is encoded with control-token strings parsed and every message's content on
its own with them off: a user who types `<|im_end|>` gets those characters, not a control token.

Supported: byte and char tokenizers; byte-level BPE (GPT-2's pre-tokenizer regex, no normalizer),
which is every BPE jaxlm trains and GPT-2-style imports; jaxlm's ChatML and plain-text templates.
An imported model's Jinja chat template is not rendered here (the export records no `chat`).
Letter/number classes come from Python's `unicodedata`; characters newer than its Unicode version
may be split differently from `tokenizers`.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Sequence

EOS_TEXT = "<|endoftext|>"
ROLES = ("system", "user", "assistant")


class UnsupportedText(ValueError):
    """The artifact's tokenizer or template is one this module does not implement."""


# ---- tokenizers ---------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids. `encode` never yields a control-token id; `encode_special` parses
    control-token strings (for template scaffolds only)."""

    special_tokens: dict[str, int]
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _strip_flags(self) -> dict[int, tuple[bool, bool]]:
        return {}

    def encode_special(self, text: str) -> list[int]:
        """As model/tokenizer.py's `Tokenizer.encode_special`: the longest control string wins at a
        position; Hugging Face lstrip/rstrip tokens absorb the whitespace beside them."""
        specials = self.special_tokens
        if not specials:
            return self.encode(text)
        alts = sorted(specials, key=len, reverse=True)
        pieces: list = []
        pos = start = 0
        while pos < len(text):
            hit = next((a for a in alts if text.startswith(a, pos)), None)
            if hit is None:
                pos += 1
                continue
            pieces += [text[start:pos], specials[hit]]
            pos = start = pos + len(hit)
        pieces.append(text[start:])
        strip = self._strip_flags()
        for k in range(1, len(pieces), 2):
            lstrip, rstrip = strip.get(pieces[k], (False, False))
            if lstrip:
                pieces[k - 1] = pieces[k - 1].rstrip()
            if rstrip:
                pieces[k + 1] = pieces[k + 1].lstrip()
        out: list[int] = []
        for p in pieces:
            if isinstance(p, int):
                out.append(p)
            elif p:
                out += self.encode(p)
        return out

    def _check(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return ids


def _decode_runs(ids: list[int], first_special: int, texts: Sequence[str], run) -> str:
    out, cur = [], []
    for i in ids:
        if i >= first_special:
            out += [run(cur), texts[i - first_special]]
            cur = []
        else:
            cur.append(i)
    out.append(run(cur))
    return "".join(out)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, `<|endoftext|>` = 256, reserved control tokens from 257."""

    def __init__(self, added: Sequence[str] = ()):
        self.added = tuple(added)
        self.vocab_size = 257 + len(self.added)
        self.special_tokens = {EOS_TEXT: 256, **{t: 257 + i for i, t in enumerate(self.added)}}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_runs(self._check(ids), 256, (EOS_TEXT,) + self.added,
                            lambda run: bytes(run).decode("utf-8", errors="replace"))


class CharTokenizer(Tokenizer):
    """One id per character of a sorted character set; reserved control tokens after it."""

    def __init__(self, chars: str, added: Sequence[str] = ()):
        self.chars, self.added = chars, tuple(added)
        self.vocab_size = len(chars) + len(self.added)
        self._ids = {c: i for i, c in enumerate(chars)}
        self.special_tokens = {t: len(chars) + i for i, t in enumerate(self.added)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char tokenizer's vocabulary "
                             f"({len(self.chars)} characters)") from None

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_runs(self._check(ids), len(self.chars), self.added,
                            lambda run: "".join(self.chars[i] for i in run))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what Hugging Face's ByteLevel uses)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# Oniguruma's \s (the Unicode White_Space property), which `tokenizers` uses; str.isspace differs.
_WHITE_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                         + "".join(map(chr, range(0x2000, 0x200B))))
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _cls(c: str) -> str:
    """'s' whitespace, 'L' letter, 'N' number, 'o' anything else (GPT-2's regex classes)."""
    if c in _WHITE_SPACE:
        return "s"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "o"


def gpt2_pre_tokenize(text: str) -> list[str]:
    """GPT-2's pre-tokenizer, `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`,
    as a scanner over character classes (Python's `re` has no \\p{L})."""
    classes = [_cls(c) for c in text]
    out, i, n = [], 0, len(text)
    while i < n:
        c = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if c is not None:
            out.append(c)
            i += len(c)
            continue
        j = i + 1 if text[i] == " " and i + 1 < n and classes[i + 1] != "s" else i
        if classes[j] != "s":  # ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: a run of one class
            k = j + 1
            while k < n and classes[k] == classes[j]:
                k += 1
            out.append(text[i:k])
            i = k
            continue
        k = i  # whitespace: the run, less its last character when a non-space follows (\s+(?!\S))
        while k < n and classes[k] == "s":
            k += 1
        if k < n and k - i > 1:
            k -= 1
        out.append(text[i:k])
        i = k
    return out


class BPETokenizer(Tokenizer):
    """Byte-level BPE from a Hugging Face tokenizer.json (vocabulary, merges, added tokens)."""

    def __init__(self, spec: dict):
        model = spec.get("model") or {}
        pre = spec.get("pre_tokenizer") or {}
        problems = []
        if model.get("type") != "BPE":
            problems.append(f"model type {model.get('type')!r}")
        if spec.get("normalizer") is not None:
            problems.append("a normalizer")
        if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
            problems.append(f"pre-tokenizer {pre.get('type')!r} (only ByteLevel without a prefix space)")
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            problems.append("a decoder other than ByteLevel")
        if model.get("dropout") not in (None, 0, 0.0) or model.get("byte_fallback") \
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            problems.append("BPE dropout, byte fallback or subword affixes")
        if problems:
            raise UnsupportedText("the on-device tokenizer implements byte-level BPE only; this one has "
                                  + ", ".join(problems))
        self.vocab: dict[str, int] = model["vocab"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.ignore_merges = bool(model.get("ignore_merges"))
        added = spec.get("added_tokens") or []
        self.special_tokens = {t["content"]: t["id"] for t in sorted(added, key=lambda t: t["id"])}
        self._strip = {t["id"]: (bool(t.get("lstrip")), bool(t.get("rstrip"))) for t in added
                       if t.get("lstrip") or t.get("rstrip")}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.id_to_token.update({i: t for t, i in self.special_tokens.items()})
        self.vocab_size = max(self.id_to_token) + 1
        self.byte_char = _bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self._cache: dict[str, list[int]] = {}

    def _strip_flags(self) -> dict[int, tuple[bool, bool]]:
        return self._strip

    def _bpe(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        parts = list(word)
        while len(parts) > 1:  # merge the lowest-ranked pair everywhere, left to right
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        try:
            ids = [self.vocab[p] for p in parts]
        except KeyError as e:
            raise ValueError(f"the BPE vocabulary has no token {e.args[0]!r} (and no unknown token)") from None
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in gpt2_pre_tokenize(text):
            word = "".join(self.byte_char[b] for b in piece.encode("utf-8", errors="surrogatepass"))
            out += self._bpe(word)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        # Hugging Face's ByteLevel decoder: a token whose characters all map to bytes gives those
        # bytes, any other (an added token such as "<|im_end|>" with no mapped form) its UTF-8;
        # then one lossy UTF-8 decode of the whole stream.
        data = bytearray()
        for i in self._check(ids):
            tok = self.id_to_token.get(i, "")
            mapped = [self.char_byte.get(c) for c in tok]
            data += bytes(mapped) if None not in mapped else tok.encode("utf-8")
        return data.decode("utf-8", errors="replace")


def tokenizer_from_json(s: str) -> Tokenizer:
    """The on-device twin of model.tokenizer.tokenizer_from_json (jaxlm's serialized tokenizer)."""
    obj = json.loads(s)
    kind, added = obj.get("kind"), obj.get("special_tokens", [])
    if kind == "byte":
        return ByteTokenizer(added)
    if kind == "char":
        return CharTokenizer(obj["chars"], added)
    if kind == "bpe":
        return BPETokenizer(obj["tokenizer"])
    raise UnsupportedText(f"unknown tokenizer kind {kind!r}; known: byte, char, bpe")


# ---- chat ---------------------------------------------------------------------------------------

class ChatFormat:
    """A per-message template: each message is `header[role] + content + end[role]`, the prompt
    ends with the generation prompt; adjacent scaffold text is joined before it is encoded (as
    model/chat_template.py does), so the ids are the same."""

    def __init__(self, chat: dict, tokenizer: Tokenizer):
        self.kind = chat["kind"]
        self.headers = {r: chat["roles"][r]["header"] for r in ROLES}
        self.ends = {r: chat["roles"][r]["end"] for r in ROLES}
        self.generation_prompt = chat["generation_prompt"]
        self.stop_ids = tuple(chat["stop_ids"])
        self.stop_strings = tuple(chat["stop_strings"])
        self.tokenizer = tokenizer

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` ({"role": system|user|assistant, "content": str})."""
        segments: list[tuple[str, bool]] = []  # (text, is content)

        def scaffold(text: str) -> None:
            if segments and not segments[-1][1]:
                segments[-1] = (segments[-1][0] + text, False)
            elif text:
                segments.append((text, False))

        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"messages[{i}] needs a role in {ROLES} and a string content")
            scaffold(self.headers[role])
            segments.append((content, True))
            scaffold(self.ends[role])
        if add_generation_prompt:
            scaffold(self.generation_prompt)
        ids: list[int] = []
        for text, is_content in segments:
            ids += self.tokenizer.encode(text) if is_content else self.tokenizer.encode_special(text)
        return ids


class OnDeviceText:
    """An artifact's tokenizer and (when it has one) chat format."""

    def __init__(self, tokenizer: Tokenizer, chat: ChatFormat | None, why_no_chat: str = ""):
        self.tokenizer, self.chat, self.why_no_chat = tokenizer, chat, why_no_chat

    @classmethod
    def from_meta(cls, meta: dict) -> "OnDeviceText":
        """UnsupportedText (one line) when the artifact carries no usable tokenizer."""
        if not meta.get("tokenizer"):
            raise UnsupportedText("the artifact carries no tokenizer (it was exported without one); use --ids")
        tok = tokenizer_from_json(meta["tokenizer"])
        chat = meta.get("chat")
        if not chat:
            why = meta.get("chat_unsupported") or "the artifact records no chat template (export it again)"
            return cls(tok, None, why)
        return cls(tok, ChatFormat(chat, tok))
