"""Supervised fine-tuning data: conversations -> packed rows with a loss mask and segments.

    data = prepare_sft(cfg.data, run_dir, tokenizer)    # PreparedData whose train/val are PackedRows
    row = data.train[i]   # {"inputs", "targets", "positions", "segment_ids": int32[L], "weights": float32[L]}

Input: JSONL, one `{"messages": [{"role", "content"}, ...]}` per line (the OpenAI fine-tuning format),
from `data.path` (`data.source=chat_jsonl`: a file whose last `data.val_fraction` of conversations is
held out, or a directory with train.jsonl and val.jsonl), or the embedded instruction set derived from
the standard library (`data.source=stdlib_chat`, train/data/instructions.py; built once into
`data.cache_dir`). Each conversation is rendered with the one chat template the server uses
(model/chat_template.py); the loss weight of a target is 1 only on assistant content and its end of
turn. Conversations are packed first-fit into rows of `data.seq_len`: each keeps its own segment id
and positions from 0, so with the segment mask (model/attention.py) no example attends to another;
padding is segment 0 with weight 0.

Bad lines (not JSON, messages that `validate_messages` rejects, no assistant turn, longer than
`data.seq_len` + 1 tokens) are skipped with a warning naming the first few line numbers; a file with
more than `finetune.max_bad_fraction` of its lines bad is a ConfigError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from model.chat_template import ChatTemplate, validate_messages
from model.config import ConfigError
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ROW_FIELDS = ("inputs", "targets", "positions", "segment_ids", "weights")
SHOW_BAD = 5  # bad lines named in a warning or an error


@dataclass(frozen=True)
class BadLine:
    line: int  # 1-based line number in its file
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class ChatFile:
    """The conversations of one JSONL file with their line numbers, and its bad lines."""

    path: str
    conversations: list[list[dict]]
    lines: list[int]
    bad: list[BadLine]
    n_lines: int  # non-blank lines


def read_chat_jsonl(path: str | os.PathLike) -> ChatFile:
    """Parse a chat JSONL file; blank lines are ignored, bad ones recorded with their line numbers."""
    p = Path(path)
    convs, lines, bad, n = [], [], [], 0
    try:
        f = p.open(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"data.path: cannot read {p}: {e.strerror}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            n += 1
            try:
                obj = json.loads(line)
            except ValueError as e:
                bad.append(BadLine(number, f"invalid JSON ({str(e).split(':')[0]})"))
                continue
            if not isinstance(obj, dict) or "messages" not in obj:
                bad.append(BadLine(number, 'not an object with "messages"'))
                continue
            try:
                messages = validate_messages(obj["messages"])
            except ValueError as e:
                bad.append(BadLine(number, str(e)))
                continue
            if not any(m["role"] == "assistant" for m in messages):
                bad.append(BadLine(number, "no assistant message to learn from"))
                continue
            convs.append(messages)
            lines.append(number)
    return ChatFile(str(p), convs, lines, bad, n)


def encode_conversations(template: ChatTemplate, chat: ChatFile, seq_len: int, progress: bool = False
                         ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[BadLine]]:
    """Each conversation -> (ids int32[N], assistant mask bool[N]); one longer than `seq_len` + 1
    tokens (it would not fit a row as inputs/targets) is a bad line."""
    out, bad = [], []
    for messages, line in tqdm(list(zip(chat.conversations, chat.lines)), desc=f"encoding {Path(chat.path).name}",
                               disable=not progress, leave=False):
        try:
            ids, mask = template.render_with_mask(messages)
        except ValueError as e:  # a Jinja template refusing the conversation
            bad.append(BadLine(line, str(e)))
            continue
        if len(ids) - 1 > seq_len:
            bad.append(BadLine(line, f"{len(ids)} tokens, more than data.seq_len + 1 = {seq_len + 1}"))
            continue
        if not mask[1:].any():
            bad.append(BadLine(line, "no assistant token to learn from"))
            continue
        out.append((ids, mask))
    return out, bad


def check_bad_lines(path: str, bad: list[BadLine], n_lines: int, max_bad_fraction: float) -> None:
    """Warn about skipped lines (the first few by number); too many is a ConfigError."""
    if n_lines == 0:
        raise ConfigError(f"data.path: {path} holds no conversations")
    if not bad:
        return
    bad = sorted(bad, key=lambda b: b.line)
    shown = "; ".join(map(str, bad[:SHOW_BAD])) + ("; ..." if len(bad) > SHOW_BAD else "")
    fraction = len(bad) / n_lines
    if fraction > max_bad_fraction:
        raise ConfigError(f"{path}: {len(bad)} of {n_lines} lines are bad ({fraction:.0%}, more than "
                          f"finetune.max_bad_fraction={max_bad_fraction}): {shown}")
    log.warning("%s: skipped %d of %d lines: %s", path, len(bad), n_lines, shown)


class PackedRows:
    """Conversations packed into rows of L tokens: a Grain random-access source (row i -> a dict of
    `ROW_FIELDS`, each [L]) over arrays [R, L]."""

    def __init__(self, arrays: dict[str, np.ndarray], n_examples: int):
        self.arrays = arrays
        self.n_examples = n_examples
        h = hashlib.sha256()
        for k in ROW_FIELDS:
            h.update(np.ascontiguousarray(arrays[k]).tobytes())
        self._digest = h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.arrays["inputs"])

    @property
    def seq_len(self) -> int:
        return self.arrays["inputs"].shape[1]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: self.arrays[k][int(i)] for k in ROW_FIELDS}

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `rows` as one batch; an index of -1 is a padding row (weight 0, segment 0)."""
        out = {k: self.arrays[k][np.maximum(rows, 0)] for k in ROW_FIELDS}  # [B, L] each
        pad = rows < 0
        for k in ROW_FIELDS:
            out[k][pad] = 0
        return out

    @property
    def n_target_tokens(self) -> int:
        """Tokens with a loss weight (assistant tokens)."""
        return int(self.arrays["weights"].sum())

    def __repr__(self) -> str:
        return f"PackedRows(rows={len(self)}, seq_len={self.seq_len}, examples={self.n_examples}, sha256={self._digest!r})"


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> PackedRows:
    """First-fit packing in order: example (ids[N], mask[N]) becomes N - 1 consecutive slots of the first
    row with room: inputs ids[:-1], targets ids[1:], weights mask[1:], positions 0..N-2, its own segment."""
    if not examples:
        raise ConfigError("no usable conversation to train on")
    room = np.zeros(0, np.int64)  # free slots per row
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for ids, mask in examples:
        need = len(ids) - 1
        if need > seq_len:
            raise ValueError(f"an example of {len(ids)} tokens does not fit a row of {seq_len} (+1)")
        fits = np.flatnonzero(room >= need)
        if len(fits):
            r = int(fits[0])
        else:
            r = len(rows)
            rows.append([])
            room = np.append(room, seq_len)
        rows[r].append((ids, mask))
        room[r] -= need
    R = len(rows)
    arrays = {k: np.zeros((R, seq_len), np.float32 if k == "weights" else np.int32) for k in ROW_FIELDS}
    for r, row in enumerate(rows):
        at = 0
        for seg, (ids, mask) in enumerate(row, 1):
            n = len(ids) - 1
            sl = slice(at, at + n)
            arrays["inputs"][r, sl] = ids[:-1]
            arrays["targets"][r, sl] = ids[1:]
            arrays["weights"][r, sl] = mask[1:]
            arrays["positions"][r, sl] = np.arange(n)
            arrays["segment_ids"][r, sl] = seg
            at += n
    return PackedRows(arrays, len(examples))


# ---- where the conversations come from ----------------------------------------------------

def stdlib_chat_dir(cache_dir: str, progress: bool = True) -> Path:
    """The embedded instruction set (train/data/instructions.py) as train.jsonl / val.jsonl, built once
    (about 40 s) into `cache_dir`, keyed by the Python version and the generator's source."""
    from train.data import instructions

    key = hashlib.sha256(Path(instructions.__file__).read_bytes()
                         + sys.version.encode() + sys.prefix.encode()).hexdigest()[:12]
    cache = Path(os.path.expanduser(cache_dir))
    target = cache / f"stdlib_chat-py{sys.version_info[0]}.{sys.version_info[1]}-{key}"
    if (target / "val.jsonl").is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.cache_dir={cache_dir!r} cannot be created: {e.strerror}") from None
    log.info("building the standard-library instruction set into %s (once)", target)
    train, val = instructions.stdlib_instructions()
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{target.name}."))
    try:
        instructions.write_jsonl(tmp / "train.jsonl", train)
        instructions.write_jsonl(tmp / "val.jsonl", val)
        try:
            os.replace(tmp, target)  # atomic: a half-written set never looks cached
        except OSError:  # another process made it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def chat_files(source: str, path: str, cache_dir: str, progress: bool = True) -> tuple[Path, Path | None]:
    """(train file, val file or None = hold out the train file's tail)."""
    if source == "stdlib_chat":
        d = stdlib_chat_dir(cache_dir, progress)
        return d / "train.jsonl", d / "val.jsonl"
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        train, val = p / "train.jsonl", p / "val.jsonl"
        if not train.is_file():
            raise ConfigError(f"data.path={path!r} is a directory without train.jsonl")
        return train, val if val.is_file() else None
    if not p.is_file():
        raise ConfigError(f"data.path={path!r} does not exist (a .jsonl file, or a directory with train.jsonl "
                          "and val.jsonl)")
    return p, None


def conversation_texts(chats: list[ChatFile]) -> list[str]:
    """Every message content, to learn a tokenizer from when no `finetune.init_from` brings one."""
    return [m["content"] for c in chats for conv in c.conversations for m in conv]


def fingerprint_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def split_tail(chat: ChatFile, val_fraction: float) -> tuple[ChatFile, ChatFile]:
    """(head, tail): the last `val_fraction` of the file's good conversations held out for validation."""
    n = len(chat.conversations)
    n_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
    if n_val == 0:
        raise ConfigError(f"{chat.path}: {n} usable conversation(s) cannot be split into train and validation; "
                          "add conversations or give a directory with train.jsonl and val.jsonl")
    cut = n - n_val
    head = ChatFile(chat.path, chat.conversations[:cut], chat.lines[:cut], chat.bad, chat.n_lines)
    tail = ChatFile(chat.path, chat.conversations[cut:], chat.lines[cut:], [], chat.n_lines)
    return head, tail


def encode_and_pack(tokenizer: Tokenizer, train: ChatFile, val: ChatFile, seq_len: int,
                    max_bad_fraction: float, progress: bool = True) -> tuple[PackedRows, PackedRows, dict]:
    """Render, mask and pack both splits; bad lines are counted per file (warning or ConfigError)."""
    template = ChatTemplate(tokenizer)
    split = {}
    bad_by_file: dict[str, list[BadLine]] = {}
    lines_by_file: dict[str, int] = {}
    for name, chat in (("train", train), ("val", val)):
        examples, too_long = encode_conversations(template, chat, seq_len, progress)
        bad_by_file.setdefault(chat.path, []).extend(chat.bad + too_long)
        lines_by_file[chat.path] = chat.n_lines
        split[name] = examples
    for path, bad in bad_by_file.items():
        check_bad_lines(path, bad, lines_by_file[path], max_bad_fraction)
    if not split["val"]:
        raise ConfigError(f"{val.path}: no usable validation conversation")
    rows = {name: pack(examples, seq_len) for name, examples in split.items()}
    stats = {"template": template.kind, "bad_lines": sum(len(b) for b in bad_by_file.values())}
    for name, r in rows.items():
        stats.update({f"n_{name}_conversations": r.n_examples, f"n_{name}_rows": len(r),
                      f"n_{name}_target_tokens": r.n_target_tokens,
                      f"{name}_fill": float((r.arrays["segment_ids"] > 0).mean())})
    return rows["train"], rows["val"], stats
