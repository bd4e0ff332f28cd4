"""Tokenizers, part of what a trained model *is*: byte, char (nanoGPT's shakespeare_char) and byte-level
BPE (Hugging Face `tokenizers`).

Every tokenizer serializes itself to a self-contained JSON string (`to_json`), stored in the run
directory and in every checkpoint, so a checkpoint alone can encode prompts and decode samples:

    same = tokenizer_from_json(tok.to_json())
    ids = same.encode("def f(x):")        # int32[N]
    text = same.decode(ids)

`encode` never produces a special token from text (the literal string "<|endoftext|>" in a document is
encoded as ordinary characters); `encode_special` parses special-token strings and is meant only for
a chat template's scaffold (model/chat_template.py), never for user, system or retrieved text.
`special_tokens` maps every control-token string to its id (EOS, tokens reserved with
`with_special_tokens`, and all added tokens of an imported Hugging Face tokenizer). A tokenizer also
carries the chat template of an imported model (`chat_template`, `bos_token`, `eos_token`).
Fitting a tokenizer to a corpus for a run is the data code's job (train/data/tokenizers.py:
build_tokenizer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

EOS_TEXT = "<|endoftext|>"


class Tokenizer:
    """Text <-> int32 token ids. Subclasses set `kind`, `vocab_size` and `eos_id`."""

    kind: str = ""
    vocab_size: int = 0
    eos_id: int | None = None
    # An imported model's Hugging Face chat template (Jinja source) and the token strings it refers
    # to; None for jaxlm's own tokenizers, whose template is model/chat_template.py's.
    chat_template: str | None = None
    bos_token: str | None = None
    _eos_token: str | None = None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32[N]; never a special-token id."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 decode as U+FFFD."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` over many texts (subclasses override when a batched path is faster)."""
        return [self.encode(t) for t in texts]

    def to_json(self) -> str:
        """A self-contained JSON string; `tokenizer_from_json` rebuilds an identical tokenizer."""
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every control-token string -> its id (EOS included where there is one). `encode` never
        yields these ids; `encode_special` turns these strings into them."""
        return {EOS_TEXT: self.eos_id} if self.eos_id is not None else {}

    @property
    def eos_token(self) -> str | None:
        """The text of the EOS token (what a chat template calls `eos_token`), None without one."""
        if self._eos_token is not None:
            return self._eos_token
        return EOS_TEXT if self.eos_id is not None else None

    def with_special_tokens(self, tokens: Sequence[str]) -> "Tokenizer":
        """A copy with `tokens` reserved as control tokens, each a new id appended after the
        vocabulary (a string that already is a control token keeps its id). Ids of all existing
        tokens are unchanged, so a model trained with this tokenizer can grow its embedding."""
        tokens = _check_token_strings(tokens)
        new = [t for t in dict.fromkeys(tokens) if t not in self.special_tokens]
        return self._with_added(new) if new else self

    def with_chat_template(self, template: str | None, bos_token: str | None = None,
                           eos_token: str | None = None) -> "Tokenizer":
        """A copy carrying a Hugging Face chat template and the bos/eos token strings it uses
        (both must be control tokens of this tokenizer); serialized by `to_json`."""
        for name, tok in (("bos_token", bos_token), ("eos_token", eos_token)):
            if tok is not None and tok not in self.special_tokens:
                raise ValueError(f"{name} {tok!r} is not a special or added token of this tokenizer")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"chat_template must be a string (Jinja source), got {type(template).__name__}")
        new = tokenizer_from_json(self.to_json())
        new.chat_template, new.bos_token, new._eos_token = template, bos_token, eos_token
        new._chat_changed()
        return new

    def encode_special(self, text: str) -> np.ndarray:
        """Token ids of `text` with control-token strings parsed into their ids, int32[N]. Only for
        template scaffolds: text from users, system prompts or documents goes through `encode`."""
        specials = self.special_tokens
        if not specials:
            return self.encode(text)
        pattern = self.__dict__.get("_special_re")
        if pattern is None:  # longest first: at one position the longest control string wins
            alts = sorted(specials, key=len, reverse=True)
            pattern = self.__dict__["_special_re"] = re.compile("|".join(map(re.escape, alts)))
        strip = self._strip_flags()
        pieces: list[str | int] = []
        pos = 0
        for m in pattern.finditer(text):
            pieces += [text[pos:m.start()], specials[m.group()]]
            pos = m.end()
        pieces.append(text[pos:])
        # Hugging Face added tokens with lstrip/rstrip absorb the whitespace beside them.
        for k in range(1, len(pieces), 2):
            lstrip, rstrip = strip.get(pieces[k], (False, False))
            if lstrip:
                pieces[k - 1] = pieces[k - 1].rstrip()
            if rstrip:
                pieces[k + 1] = pieces[k + 1].lstrip()
        out = [np.asarray([p], np.int32) if isinstance(p, int) else self.encode(p) for p in pieces if p != ""]
        return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    # ---- helpers for subclasses

    def _with_added(self, tokens: list[str]) -> "Tokenizer":
        raise NotImplementedError

    def _strip_flags(self) -> dict[int, tuple[bool, bool]]:
        return {}

    def _chat_changed(self) -> None:
        """Called after the chat fields change (BPE derives its EOS id from `eos_token`)."""
        self.__dict__.pop("_special_re", None)

    def _chat_json(self) -> dict:
        out = {}
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.bos_token is not None:
            out["bos_token"] = self.bos_token
        if self._eos_token is not None:
            out["eos_token"] = self._eos_token
        return out

    def _check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the {self.kind} vocabulary [0, {self.vocab_size})")
        return arr


def _check_token_strings(tokens) -> list[str]:
    if isinstance(tokens, str) or not all(isinstance(t, str) and t for t in tokens):
        raise ValueError("special tokens must be a list of non-empty strings")
    return list(tokens)


def _decode_with_specials(arr: np.ndarray, first_special: int, texts: Sequence[str], decode_run) -> str:
    """Decode runs of ordinary ids with `decode_run` and ids >= `first_special` as `texts[id - first]`."""
    cuts = np.flatnonzero(arr >= first_special)
    if cuts.size == 0:
        return decode_run(arr)
    out, start = [], 0
    for c in cuts:
        out += [decode_run(arr[start:c]), texts[int(arr[c]) - first_special]]
        start = c + 1
    out.append(decode_run(arr[start:]))
    return "".join(out)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus `<|endoftext|>` = 256 (vocab 257); reserved control tokens follow
    from 257."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def __init__(self, added: Sequence[str] = ()):
        self.added = tuple(_check_token_strings(added)) if added else ()
        self.vocab_size = 257 + len(self.added)

    def encode(self, text: str) -> np.ndarray:
        # surrogatepass: text read with errors="surrogateescape" still encodes instead of raising.
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = self._check_ids(ids)
        # EOS and reserved tokens are not bytes: decode the runs between them and join with their text.
        return _decode_with_specials(arr, 256, (EOS_TEXT,) + self.added,
                                     lambda run: run.astype(np.uint8).tobytes().decode("utf-8", errors="replace"))

    @property
    def special_tokens(self) -> dict[str, int]:
        return {EOS_TEXT: 256, **{t: 257 + i for i, t in enumerate(self.added)}}

    def _with_added(self, tokens: list[str]) -> "ByteTokenizer":
        return _copy_chat(self, ByteTokenizer(self.added + tuple(tokens)))

    def to_json(self) -> str:
        extra = {"special_tokens": list(self.added)} if self.added else {}
        return json.dumps({"kind": self.kind, **extra, **self._chat_json()})


class CharTokenizer(Tokenizer):
    """nanoGPT's shakespeare_char: one id per character of the sorted character set; no EOS."""

    kind = "char"
    eos_id = None

    def __init__(self, chars: str, added: Sequence[str] = ()):
        if not chars:
            raise ValueError("a char tokenizer needs at least one character")
        if list(chars) != sorted(set(chars)):
            raise ValueError("char tokenizer characters must be sorted and unique")
        self.chars = chars
        self.added = tuple(_check_token_strings(added)) if added else ()  # reserved control tokens
        self.vocab_size = len(chars) + len(self.added)
        # Sorted code points: encoding is a vectorized binary search (a lookup table over all of
        # Unicode would be 4 MB per tokenizer for no gain).
        self._codes = _code_points(chars)  # uint32[V], ascending

    @classmethod
    def train(cls, documents: Iterable[str]) -> "CharTokenizer":
        """The vocabulary is the sorted set of characters in `documents`."""
        seen: set[str] = set()
        for doc in documents:
            seen.update(doc)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> np.ndarray:
        codes = _code_points(text)  # uint32[N]
        ids = np.searchsorted(self._codes, codes)  # [N]
        ok = ids < self.vocab_size
        ok[ok] = self._codes[ids[ok]] == codes[ok]
        if not ok.all():
            bad = chr(int(codes[np.argmin(ok)]))
            raise ValueError(
                f"character {bad!r} is not in the char tokenizer's vocabulary ({len(self.chars)} characters)"
            )
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = self._check_ids(ids)
        return _decode_with_specials(arr, len(self.chars), self.added,
                                     lambda run: self._codes[run].tobytes().decode("utf-32-le", errors="surrogatepass"))

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t: len(self.chars) + i for i, t in enumerate(self.added)}

    def _with_added(self, tokens: list[str]) -> "CharTokenizer":
        return _copy_chat(self, CharTokenizer(self.chars, self.added + tuple(tokens)))

    def to_json(self) -> str:
        extra = {"special_tokens": list(self.added)} if self.added else {}
        return json.dumps({"kind": self.kind, "chars": self.chars, **extra, **self._chat_json()})


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) backed by a Hugging Face `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        # Special tokens in the text are ordinary text; EOS only comes from encode_documents.
        self._tok.encode_special_tokens = True
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        added = hf_tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        # Every added token is a control token, special or not (an imported tokenizer may add
        # "[INST]" or "<think>" as non-special tokens, which `encode_special_tokens` does not
        # protect): text is encoded by a copy in which all of them are special.
        self._specials = {t.content: i for i, t in sorted(added.items())}
        self._strip = {i: (t.lstrip, t.rstrip) for i, t in added.items() if t.lstrip or t.rstrip}
        spec = json.loads(hf_tokenizer.to_str())
        self._text_tok = hf_tokenizer
        if any(not t.special for t in added.values()):
            from tokenizers import Tokenizer as HFTokenizer

            all_special = dict(spec, added_tokens=[dict(t, special=True) for t in spec.get("added_tokens", [])])
            self._text_tok = HFTokenizer.from_str(json.dumps(all_special))
            self._text_tok.encode_special_tokens = True
        self._chat_changed()
        pre = spec.get("pre_tokenizer") or {}
        # With GPT-2's byte-level regex (and nothing before it) no pre-token spans a single "\n"
        # between two non-space characters, so a long text cut there encodes to the same ids, and
        # the pieces encode in parallel. Any other pipeline is encoded whole.
        self._splittable = spec.get("normalizer") is None and pre.get("type") == "ByteLevel" \
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", True)

    def _chat_changed(self) -> None:
        # An imported tokenizer names its EOS (Llama's "</s>"); jaxlm's BPE uses "<|endoftext|>".
        super()._chat_changed()
        self.eos_id = self._specials.get(self._eos_token) if self._eos_token is not None \
            else self._tok.token_to_id(EOS_TEXT)

    @property
    def special_tokens(self) -> dict[str, int]:
        out = dict(self._specials)
        if self.eos_id is not None:
            out.setdefault(self.eos_token, self.eos_id)
        return out

    def _strip_flags(self) -> dict[int, tuple[bool, bool]]:
        return self._strip

    def _with_added(self, tokens: list[str]) -> "BPETokenizer":
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return _copy_chat(self, BPETokenizer(tok))

    @classmethod
    def train(cls, documents: Sequence[str], vocab_size: int, progress: bool = True) -> "BPETokenizer":
        """Train a byte-level BPE with `vocab_size` ids (including `<|endoftext|>`) on `documents`."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TEXT],
            # All 256 byte symbols, so any text encodes even if a byte never occurs in training.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        """Load a Hugging Face `tokenizer.json`."""
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path).expanduser()
        if not p.is_file():
            raise ValueError(f"{str(path)!r} does not exist (a Hugging Face tokenizer.json)")
        try:
            return cls(HFTokenizer.from_file(str(p)))
        except Exception as e:  # the HF error type is not public; its message says what is wrong
            raise ValueError(f"{str(path)!r} is not a valid tokenizer.json: {e}") from None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._text_tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs on all cores in Rust; long texts are cut into pieces so they do too.
        pieces = [_split_text(t) if self._splittable else [t] for t in texts]
        flat = [p for ps in pieces for p in ps]
        ids = [np.asarray(e.ids, dtype=np.int32) for e in self._text_tok.encode_batch(flat, add_special_tokens=False)]
        out, i = [], 0
        for ps in pieces:
            out.append(ids[i] if len(ps) == 1 else np.concatenate(ids[i:i + len(ps)]))
            i += len(ps)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = self._check_ids(ids)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": json.loads(self._tok.to_str()), **self._chat_json()})


_PIECE_CHARS = 1 << 18
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")  # after a lone "\n" between non-space characters


def _split_text(text: str, piece_chars: int = _PIECE_CHARS) -> list[str]:
    """`text` cut at safe points into pieces of about `piece_chars` characters (one piece if short)."""
    if len(text) <= 2 * piece_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > 2 * piece_chars:
        m = _SAFE_CUT.search(text, start + piece_chars)
        if m is None:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


def _copy_chat(src: Tokenizer, dst: Tokenizer) -> Tokenizer:
    dst.chat_template, dst.bos_token, dst._eos_token = src.chat_template, src.bos_token, src._eos_token
    dst._chat_changed()
    return dst


def tokenizer_from_json(s: str) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_json()` output (JSON written before special tokens and
    chat templates existed loads as it always did)."""
    try:
        obj = json.loads(s)
        kind = obj["kind"]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise ValueError("not a serialized jaxlm tokenizer (expected JSON with a 'kind')") from None
    added = obj.get("special_tokens", [])
    if not isinstance(added, list) or (added and kind == "bpe"):
        raise ValueError("serialized tokenizer: 'special_tokens' is a list of strings, for byte and char tokenizers")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer(added)
    elif kind == "char":
        tok = CharTokenizer(obj["chars"], added)
    elif kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        tok = BPETokenizer(HFTokenizer.from_str(json.dumps(obj["tokenizer"])))
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: byte, char, bpe")
    for key in ("chat_template", "bos_token", "eos_token"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise ValueError(f"serialized tokenizer: {key!r} must be a string")
    if any(obj.get(k) is not None for k in ("chat_template", "bos_token", "eos_token")):
        tok.chat_template, tok.bos_token, tok._eos_token = obj.get("chat_template"), obj.get("bos_token"), \
            obj.get("eos_token")
        tok._chat_changed()
    return tok
