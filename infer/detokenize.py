"""Incremental detokenization: token ids in one at a time, text out, never half a character.

    dec = IncrementalDecoder(tokenizer)
    for t in ids:
        out += dec.push(t)      # only complete characters
    out += dec.flush()          # the end: whatever is still held ("\\ufffd" for a cut-off character)

A byte tokenizer emits UTF-8 one byte per token, so a character may span up to four tokens: the
bytes go through Python's incremental UTF-8 decoder, which holds an incomplete sequence until it is
complete (and turns invalid bytes into U+FFFD at once, as `bytes.decode(errors="replace")` does).
Any other tokenizer (BPE, char) is decoded as a growing window of ids, as vLLM and TGI do: the text
of ids[prefix:] minus that of ids[prefix:read] is new, and it is emitted only when it does not end
in U+FFFD (a byte-level BPE token can hold part of a character; the next token completes it).
Decoding a few ids before the new ones keeps tokenizers whose text depends on the previous token
(a leading space) right. Concatenating everything pushed and flushed equals `tokenizer.decode(ids)`
(for the window method: as long as the tokenizer's decode is consistent on sub-lists, which
byte-level BPE is).
"""

from __future__ import annotations

import codecs

REPLACEMENT = "\ufffd"
_PREFIX_IDS = 6  # ids decoded before the new ones, for context
_MAX_HELD = 8  # a longer run that still ends in U+FFFD is genuinely invalid text: emit it


class IncrementalDecoder:
    """Token ids -> text deltas for one sequence (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes = getattr(tokenizer, "kind", "") == "byte"
        if self._bytes:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] is context already emitted
        self._read = 0  # ids[read:] not emitted yet

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes ("" while a character is incomplete)."""
        token_id = int(token_id)
        if self._bytes:
            if 0 <= token_id < 256:
                return self._utf8.decode(bytes((token_id,)))
            return self._utf8.decode(b"", final=True) + self.tokenizer.decode([token_id])  # EOS: its text
        self._ids.append(token_id)
        before = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(self._ids[self._prefix:])
        if text.endswith(REPLACEMENT) and len(self._ids) - self._read < _MAX_HELD:
            return ""
        self._prefix = max(0, len(self._ids) - _PREFIX_IDS)
        self._read = len(self._ids)
        return text[len(before):]

    def flush(self) -> str:
        """The end of the sequence: the held text, an incomplete character as U+FFFD."""
        if self._bytes:
            return self._utf8.decode(b"", final=True)
        if self._read == len(self._ids):
            return ""
        before = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):]
