"""Sanitize text a person sends before it reaches a model, a prompt or the conversation store.

    clean = sanitize(text, max_chars=32_000)   # Sanitized(text, removed={"zero_width": 2, ...})

Invisible characters are how text says one thing to a reader and another to a model: tag characters
(U+E0000-E007F) spell out hidden ASCII instructions ("ASCII smuggling"), bidi overrides reorder what a
reader sees (Trojan Source, CVE-2021-42574), zero-width characters hide payloads between visible
letters, and controls corrupt terminals and logs. The rules, in order:

1. Unicode NFC (a decomposed e + U+0301 becomes é), so equal-looking text is equal text.
2. Line ends: `\\r\\n`, a lone `\\r`, U+2028 and U+2029 become `\\n` (normalization, not removal; a lone
   `\\r` would otherwise let text overwrite a terminal line).
3. Removed, counted per class in `removed` (only classes with a count > 0 appear):
   - "control": C0 U+0000-U+001F except tab and newline, DEL U+007F, C1 U+0080-U+009F (NEL included).
   - "tag": U+E0000-U+E007F. Trade-off: emoji subdivision flags (England, Scotland, Wales) become a
     plain black flag.
   - "bidi": the embeddings and overrides U+202A-U+202E, the isolates U+2066-U+2069, and also the
     marks U+200E (LRM), U+200F (RLM), U+061C (ALM): they carry no text, only display order, and can
     reorder neutral characters as the overrides do. Right-to-left text stays readable without them.
   - "zero_width": U+200B ZWSP, U+200C ZWNJ, U+200D ZWJ, U+2060 word joiner, U+2061-U+2064 (invisible
     operators), U+FEFF (BOM / zero-width no-break space), U+180E Mongolian vowel separator, U+00AD
     soft hyphen. Trade-off: ZWJ emoji sequences fall apart into their parts (a family emoji becomes
     its people, which a model still reads), and ZWNJ is lost in Persian and Indic words (they stay
     readable); an exception for joiners between emoji would leave a hidden channel, so there is none.
   - "variation_selector": a variation selector (U+FE00-U+FE0F, U+E0100-U+E01EF) right after another.
     One selector after a character is legitimate (emoji presentation, ideographic variants) and stays;
     runs of them are the "emoji smuggling" channel (one byte per selector).
   - "surrogate": lone surrogates U+D800-U+DFFF (JSON can carry them; they are not text and cannot
     be encoded to UTF-8 for the store).
4. NFC again (a removal can leave a base letter next to a combining mark).

Refused with SanitizeError (HTTP 400, one line, `.param` names the field): a non-string, an input over
`max_chars` characters (before or after normalization), and content with no visible character left
(empty, whitespace only, or nothing but removed characters).
"""

from __future__ import annotations

import re
import types
import unicodedata
from typing import NamedTuple

MAX_CHARS = 32_000

_LINE_ENDS = re.compile("\r\n|[\r\u2028\u2029]")
_VS = "\ufe00-\ufe0f\U000e0100-\U000e01ef"
# class -> what it removes (order matters only for the counts' order)
CLASSES: "types.MappingProxyType[str, re.Pattern]" = types.MappingProxyType({
    "control": re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]"),
    "tag": re.compile("[\U000e0000-\U000e007f]"),
    "bidi": re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]"),
    "zero_width": re.compile("[\u200b-\u200d\u2060-\u2064\ufeff\u180e\u00ad]"),
    "variation_selector": re.compile(f"(?<=[{_VS}])[{_VS}]"),
    "surrogate": re.compile("[\ud800-\udfff]"),
})


class SanitizeError(ValueError):
    """Text the agent refuses: one line for the client (HTTP 400); `param` names the request field."""

    def __init__(self, message: str, param: str = "content"):
        super().__init__(message)
        self.param = param


class Sanitized(NamedTuple):
    """The cleaned text and how many characters of each class were removed (classes with count > 0)."""

    text: str
    removed: dict[str, int]


def sanitize(text: str, *, max_chars: int = MAX_CHARS, param: str = "content") -> Sanitized:
    """`text` normalized (NFC, `\\n` line ends) with control, tag, bidi, zero-width, repeated variation
    selector and lone surrogate characters removed; SanitizeError when it is too long or nothing visible
    is left. `param` is the field name the error reports."""
    if not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars={max_chars!r} must be a positive integer")
    if not isinstance(text, str):
        raise SanitizeError(f"{param} must be a string, got {type(text).__name__}", param)
    if len(text) > max_chars:
        raise SanitizeError(f"{param} is {len(text)} characters; at most {max_chars} are allowed", param)
    out = _LINE_ENDS.sub("\n", unicodedata.normalize("NFC", text))
    removed: dict[str, int] = {}
    for name, pattern in CLASSES.items():
        out, n = pattern.subn("", out)
        if n:
            removed[name] = n
    if removed:
        out = unicodedata.normalize("NFC", out)
    if len(out) > max_chars:  # NFC can lengthen text (composition exclusions decompose)
        raise SanitizeError(f"{param} is {len(out)} characters after Unicode normalization; at most {max_chars} "
                            "are allowed", param)
    if not out.strip():
        if not removed:
            raise SanitizeError(f"{param} is empty", param)
        what = ", ".join(f"{n} {name.replace('_', '-')}" for name, n in removed.items())
        raise SanitizeError(f"{param} has no visible text: it is only removed characters ({what})", param)
    return Sanitized(out, removed)
