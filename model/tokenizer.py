"""Tokenizers, part of what a trained model *is*: byte, char (nanoGPT's shakespeare_char) and byte-level
BPE (Hugging Face `tokenizers`).

Every tokenizer serializes itself to a self-contained JSON string (`to_json`), stored in the run
directory and in every checkpoint, so a checkpoint alone can encode prompts and decode samples:

    same = tokenizer_from_json(tok.to_json())
    ids = same.encode("def f(x):")        # int32[N]
    text = same.decode(ids)

`encode` never produces a special token from text (the literal string "<|endoftext|>" in a document is
encoded as ordinary characters). Fitting a tokenizer to a corpus for a run is the data code's job
(train/data/tokenizers.py: build_tokenizer).
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

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32[N]."""
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def _check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the {self.kind} vocabulary [0, {self.vocab_size})")
        return arr


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus `<|endoftext|>` = 256 (vocab 257)."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        # surrogatepass: text read with errors="surrogateescape" still encodes instead of raising.
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = self._check_ids(ids)
        # EOS is not a byte: decode the runs between EOS ids and join them with its text.
        cuts = np.flatnonzero(arr == self.eos_id)
        pieces = np.split(arr, cuts)
        texts = [pieces[0].astype(np.uint8).tobytes().decode("utf-8", errors="replace")]
        texts += [p[1:].astype(np.uint8).tobytes().decode("utf-8", errors="replace") for p in pieces[1:]]
        return EOS_TEXT.join(texts)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind})


class CharTokenizer(Tokenizer):
    """nanoGPT's shakespeare_char: one id per character of the sorted character set; no EOS."""

    kind = "char"
    eos_id = None

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("a char tokenizer needs at least one character")
        if list(chars) != sorted(set(chars)):
            raise ValueError("char tokenizer characters must be sorted and unique")
        self.chars = chars
        self.vocab_size = len(chars)
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
                f"character {bad!r} is not in the char tokenizer's vocabulary ({self.vocab_size} characters)"
            )
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = self._check_ids(ids)
        return self._codes[arr].tobytes().decode("utf-32-le", errors="surrogatepass")

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "chars": self.chars})


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) backed by a Hugging Face `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        # Special tokens in the text are ordinary text; EOS only comes from encode_documents.
        self._tok.encode_special_tokens = True
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = hf_tokenizer.token_to_id(EOS_TEXT)
        spec = json.loads(hf_tokenizer.to_str())
        pre = spec.get("pre_tokenizer") or {}
        # With GPT-2's byte-level regex (and nothing before it) no pre-token spans a single "\n"
        # between two non-space characters, so a long text cut there encodes to the same ids, and
        # the pieces encode in parallel. Any other pipeline is encoded whole.
        self._splittable = spec.get("normalizer") is None and pre.get("type") == "ByteLevel" \
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", True)

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
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs on all cores in Rust; long texts are cut into pieces so they do too.
        pieces = [_split_text(t) if self._splittable else [t] for t in texts]
        flat = [p for ps in pieces for p in ps]
        ids = [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(flat, add_special_tokens=False)]
        out, i = [], 0
        for ps in pieces:
            out.append(ids[i] if len(ps) == 1 else np.concatenate(ids[i:i + len(ps)]))
            i += len(ps)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = self._check_ids(ids)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": json.loads(self._tok.to_str())})


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


def tokenizer_from_json(s: str) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_json()` output."""
    try:
        obj = json.loads(s)
        kind = obj["kind"]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise ValueError("not a serialized jaxlm tokenizer (expected JSON with a 'kind')") from None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(obj["chars"])
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(obj["tokenizer"])))
    raise ValueError(f"unknown tokenizer kind {kind!r}; known: byte, char, bpe")
