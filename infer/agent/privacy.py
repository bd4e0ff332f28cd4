"""Which kinds of sensitive data a text holds: the privacy rule of the router keeps such text on local backends.

    sensitive_kinds("mail me at ann@example.org")   # -> ["email"]
    describe(["email", "card"])                     # -> "e-mail address, card number"

Kinds, always reported in this order:
- "email": local@domain.tld.
- "phone": an international number (`+` and 8-15 digits, separators allowed) or a common national
  format: North American `(415) 555-2671` / `415-555-2671`, or a trunk-prefixed European one
  (`030 1234567`, `07700 900123`, `01 23 45 67 89`). A bare run of digits is not a phone number
  (order numbers, years), nor is a date (`2024-01-15`, `15.01.2024`).
- "card": 13-19 digits, spaces or dashes between groups allowed, that pass the Luhn check (a
  mistyped or made-up number does not).
- "secret": strings shaped like credentials: OpenAI-style `sk-...`, GitHub `ghp_`/`gho_`/`ghs_`/
  `ghu_`/`ghr_`/`github_pat_` tokens, AWS access key ids (`AKIA...`), Slack `xox[bpars]-` tokens,
  PEM private keys (`-----BEGIN ... PRIVATE KEY-----`), and long high-entropy tokens (32+ characters
  mixing upper case, lower case and digits with >= 4 bits of entropy per character; hex digests
  and ordinary words stay below that).

The detectors are regular expressions with bounded repetition over plain text: linear time, no
backtracking blow-up on hostile input (the sanitizer bounds the length first).
"""

from __future__ import annotations

import math
import re
import types
from collections import Counter

KINDS = ("email", "phone", "card", "secret")
DESCRIPTIONS = types.MappingProxyType({"email": "e-mail address", "phone": "phone number", "card": "card number",
                                       "secret": "secret/API key"})

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
                    r"\.[A-Za-z]{2,24}\b")

_SEP = r"[ .\-]?"
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .\-]?\(?\d{1,5}\)?){2,6}(?!\w)")
_PHONE_NANP = re.compile(r"(?<![\w(])(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w-])")
_PHONE_TRUNK = re.compile(r"(?<![\w.\-])0\d{1,4}(?:[ /\-]\d{2,8}){1,4}(?![\w.\-])")

_CARD = re.compile(r"(?<![\d-])\d(?:[ \-]?\d){12,18}(?![\d-])")

_SECRET_SHAPES = re.compile(
    r"\bsk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_\-]{20,}"                 # OpenAI-style (sk-..., sk-proj-...)
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{30,}"  # GitHub tokens
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"                              # AWS access key ids
    r"|\bxox[bpars]-[A-Za-z0-9\-]{10,}"                            # Slack tokens
    r"|-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")                 # PEM private keys
_TOKEN = re.compile(r"[A-Za-z0-9+/_\-=]{32,}")
MIN_ENTROPY_BITS = 4.0


def luhn_ok(digits: str) -> bool:
    """Whether a string of digits passes the Luhn check (the checksum of every payment card number)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _entropy(s: str) -> float:
    """Shannon entropy of the characters of `s`, in bits per character."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _has_card(text: str) -> bool:
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ \-]", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
            return True
    return False


def _has_phone(text: str) -> bool:
    for m in _PHONE_INTL.finditer(text):
        if 8 <= sum(ch.isdigit() for ch in m.group()) <= 15:
            return True
    if _PHONE_NANP.search(text):
        return True
    for m in _PHONE_TRUNK.finditer(text):
        if 9 <= sum(ch.isdigit() for ch in m.group()) <= 12:
            return True
    return False


def _has_secret(text: str) -> bool:
    if _SECRET_SHAPES.search(text):
        return True
    for m in _TOKEN.finditer(text):
        tok = m.group()
        classes = sum((any(c.islower() for c in tok), any(c.isupper() for c in tok), any(c.isdigit() for c in tok)))
        if classes == 3 and _entropy(tok) >= MIN_ENTROPY_BITS:
            return True
    return False


def sensitive_kinds(text: str) -> list[str]:
    """The kinds of sensitive data in `text` (a subset of KINDS, in that order; empty when none)."""
    found = []
    if "@" in text and _EMAIL.search(text):
        found.append("email")
    if _has_phone(text):
        found.append("phone")
    if _has_card(text):
        found.append("card")
    if _has_secret(text):
        found.append("secret")
    return found


def describe(kinds) -> str:
    """Human words for kinds: ["email", "card"] -> "e-mail address, card number"."""
    return ", ".join(DESCRIPTIONS[k] for k in kinds)
