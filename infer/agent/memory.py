"""Conversation memory: chat sessions in SQLite, and the prompt that fits a model's window.

    store = ConversationStore("runs/agent/conversations.sqlite")     # or ":memory:" in tests
    s = store.create(title="trip", system="You are terse.")
    store.append(s["id"], "user", "hello")
    a = assemble(s["system"], store.messages(s["id"]), backend.count_tokens, budget=context - max_tokens)
    a.messages   # [{"role", "content"}] for the chat template; a.tokens <= budget, always

The store is one SQLite file in WAL mode (readers do not block the writer; a committed turn survives a
crash of the process) with foreign keys on, so deleting a session deletes its messages and summary.
One connection serves every thread under a lock: FastAPI runs handlers on worker threads, each
operation is a short transaction, and one connection is what lets ":memory:" work at all. Each
message belongs to exactly one session and every read is by session id, which is what keeps
concurrent sessions from ever seeing each other's turns.

`assemble` is the one implementation of "keep the system message and the newest turns that fit"
(`python -m infer chat` uses it too): turns are evicted oldest first, the kept part always starts at a
user turn, and the result is counted with the model's own chat template, so it is never over budget.
When turns have been evicted, `ConversationStore.context` can ask a caller's `summarize` function
(e.g. the model itself) for a summary of them, stored with `set_summary` and placed in the system
message from then on; without one, eviction alone keeps the prompt within the window.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SCHEMA_VERSION = 1
SUMMARY_HEADER = "Summary of the earlier conversation:\n"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id      TEXT PRIMARY KEY,
    title   TEXT,
    system  TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    touched INTEGER NOT NULL            -- store-wide counter: a total order of updates for list()
);
CREATE TABLE IF NOT EXISTS messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content    TEXT NOT NULL,
    meta       TEXT NOT NULL,           -- JSON object
    created    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_touched ON sessions(touched);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, id);
CREATE TABLE IF NOT EXISTS summaries (
    session_id      TEXT PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    text            TEXT NOT NULL,
    upto_message_id INTEGER NOT NULL    -- the summary stands for this session's messages with id <= this
);
"""


class UnknownSession(KeyError):
    """No session with this id (HTTP 404)."""

    def __init__(self, session_id: str):
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"no chat session with id {self.session_id!r}"


class ContextTooSmall(ValueError):
    """Even the system message and the newest user turn alone do not fit the prompt budget (HTTP 413)."""


class Assembled(NamedTuple):
    """A prompt within budget: the messages for the chat template, which history ids are in it and
    which are not (oldest first), its token count, and whether the stored summary is in it."""

    messages: list[dict]
    kept_ids: list[int]
    evicted_ids: list[int]
    tokens: int
    summarized: bool = False


def assemble(system: str | None, history: list[dict], count_tokens: Callable[[list[dict]], int], budget: int,
             summary: tuple[str, int] | None = None) -> Assembled:
    """The system message (if any), the summary (if any) and the newest turns of `history` whose rendering
    takes at most `budget` tokens by `count_tokens` (a message list -> its token count under the model's
    chat template). Turns are evicted oldest first and the kept turns start at a user turn.

    `history` items are {"role", "content"} with an optional "id" (default: the position). A summary
    `(text, upto_id)` stands for the turns with id <= upto_id: those are left out and the text joins the
    system message; it is dropped as well when only that makes the newest user turn fit. ContextTooSmall
    when the system message and the newest user turn (with what follows it) are over budget."""
    turns = [{"role": m["role"], "content": m["content"]} for m in history]
    ids = [int(m.get("id", i)) for i, m in enumerate(history)]
    first = 0
    if summary is not None:
        while first < len(ids) and ids[first] <= summary[1]:
            first += 1
    # Where a prompt may start: each user turn from `first` on (a conversation restarts at a user turn).
    starts = [i for i in range(first, len(turns)) if turns[i]["role"] == "user"] or [first]

    def head(with_summary: bool) -> list[dict]:
        text = system or ""
        if with_summary and summary is not None and summary[0]:
            text = (text + "\n\n" if text else "") + SUMMARY_HEADER + summary[0]
        return [{"role": "system", "content": text}] if text else []

    def attempt(start: int, with_summary: bool) -> Assembled | None:
        messages = head(with_summary) + turns[start:]
        n = count_tokens(messages)
        if n > budget:
            return None
        return Assembled(messages, ids[start:], ids[:start], n, with_summary and summary is not None)

    def search(with_summary: bool) -> Assembled | None:
        # The earliest start that fits: gallop back from the newest user turn (1, 2, 4, ... starts back),
        # then bisect between the last start that fitted and the first that did not. A later start keeps
        # fewer turns, so (for any template where dropping messages never adds tokens) it fits whenever an
        # earlier one does; and the cost follows the size of the window, not the length of the history.
        # The result is always one that was counted and fits, whatever the template does.
        best, fit, fail, step = None, len(starts), -1, 1
        i = len(starts) - 1
        while True:
            if (got := attempt(starts[i], with_summary)) is None:
                fail = i
                break
            best, fit = got, i
            if i == 0:
                return best
            i, step = max(0, i - step), step * 2
        lo, hi = fail + 1, fit - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if (got := attempt(starts[mid], with_summary)) is not None:
                best, hi = got, mid - 1
            else:
                lo = mid + 1
        return best

    with_summary = summary is not None and first > 0
    if (got := search(with_summary)) is not None or (with_summary and (got := search(False)) is not None):
        return got
    need = count_tokens(head(False) + turns[starts[-1]:])
    raise ContextTooSmall(f"the message does not fit the model's context: the system message and the newest turn "
                          f"take {need} tokens and {budget} are left for the prompt; shorten it or start a new "
                          "conversation")


class ConversationStore:
    """Chat sessions and their messages in one SQLite file; safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable across a process crash
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise ValueError(f"schema version {version}; this jaxlm reads version {SCHEMA_VERSION}")
            # IMMEDIATE: a deferred BEGIN would take its write lock only at the first CREATE, and a second
            # process opening the same file then gets "database is locked" at once (SQLite does not wait
            # on a read-to-write upgrade); IMMEDIATE waits its turn under the busy timeout
            self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except (sqlite3.Error, OSError, ValueError) as e:
            raise ValueError(f"{self.path}: not a usable conversation store ({e})") from None

    # ---- sessions

    def create(self, title: str | None = None, system: str | None = None) -> dict:
        """A new empty session; its id is a uuid4 hex string."""
        _check_text("title", title, optional=True)
        _check_text("system", system, optional=True)
        sid, now = uuid.uuid4().hex, time.time()
        with self._tx() as db:
            db.execute("INSERT INTO sessions (id, title, system, created, updated, touched) VALUES (?, ?, ?, ?, ?, ?)",
                       (sid, title, system, now, now, self._next_touch(db)))
            return self._session(db, sid)

    def list(self) -> list[dict]:
        """Every session, the most recently updated first."""
        with self._tx() as db:
            rows = db.execute(_SESSION_SELECT + " GROUP BY s.id ORDER BY s.touched DESC").fetchall()
            return [_session_dict(r) for r in rows]

    def get(self, session_id: str) -> dict:
        """{"id", "title", "system", "created", "updated", "turns"} (turns: stored messages); UnknownSession."""
        with self._tx() as db:
            return self._session(db, session_id)

    def rename(self, session_id: str, title: str) -> dict:
        _check_text("title", title)
        with self._tx() as db:
            self._touch(db, session_id, title=title)
            return self._session(db, session_id)

    def delete(self, session_id: str) -> None:
        """Deletes the session, its messages and its summary."""
        with self._tx() as db:
            if db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount == 0:
                raise UnknownSession(session_id)

    # ---- messages

    def append(self, session_id: str, role: str, content: str, meta: dict | None = None) -> int:
        """Stores a message at the end of the session; returns its id (ids increase store-wide)."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not allowed; allowed: {', '.join(ROLES)}")
        _check_text("content", content)
        meta_json = json.dumps(meta or {}, ensure_ascii=False)
        with self._tx() as db:
            now = self._touch(db, session_id)
            cur = db.execute("INSERT INTO messages (session_id, role, content, meta, created) VALUES (?, ?, ?, ?, ?)",
                             (session_id, role, content, meta_json, now))
            return int(cur.lastrowid)

    def messages(self, session_id: str) -> list[dict]:
        """[{"id", "role", "content", "meta", "created"}], oldest first; UnknownSession."""
        with self._tx() as db:
            self._exists(db, session_id)
            rows = db.execute("SELECT id, role, content, meta, created FROM messages WHERE session_id = ? "
                              "ORDER BY id", (session_id,)).fetchall()
        return [{"id": r["id"], "role": r["role"], "content": r["content"], "meta": json.loads(r["meta"]),
                 "created": r["created"]} for r in rows]

    def set_summary(self, session_id: str, text: str, upto_message_id: int) -> None:
        """Stores `text` as the summary of this session's messages with id <= upto_message_id."""
        _check_text("summary", text)
        with self._tx() as db:
            self._exists(db, session_id)
            db.execute("INSERT INTO summaries (session_id, text, upto_message_id) VALUES (?, ?, ?) "
                       "ON CONFLICT(session_id) DO UPDATE SET text = excluded.text, "
                       "upto_message_id = excluded.upto_message_id", (session_id, text, int(upto_message_id)))

    def summary(self, session_id: str) -> tuple[str, int] | None:
        with self._tx() as db:
            self._exists(db, session_id)
            row = db.execute("SELECT text, upto_message_id FROM summaries WHERE session_id = ?",
                             (session_id,)).fetchone()
        return None if row is None else (row["text"], row["upto_message_id"])

    def context(self, session_id: str, count_tokens: Callable[[list[dict]], int], budget: int, *,
                summarize: Callable[[str | None, list[dict]], str] | None = None) -> Assembled:
        """The session's prompt within `budget` (see `assemble`). With `summarize(previous_summary,
        newly_evicted_messages) -> text`, turns evicted for the first time are folded into the stored
        summary, which then takes their place; an error in `summarize` is logged and eviction alone
        stands (so a failing model call never loses the turn)."""
        session = self.get(session_id)
        history, summary = self.messages(session_id), self.summary(session_id)
        got = assemble(session["system"], history, count_tokens, budget, summary)
        done = summary[1] if summary else -1
        evicted = set(got.evicted_ids)
        fresh = [m for m in history if done < m["id"] and m["id"] in evicted]
        if summarize is None or not fresh:
            return got
        try:
            text = summarize(summary[0] if summary else None, fresh)
        except Exception:  # the model is down, out of context, ...: evicting is enough
            log.exception("summarizing session %s failed; the evicted turns are dropped unsummarized", session_id)
            return got
        if not isinstance(text, str) or not text.strip():
            return got
        summary = (text, fresh[-1]["id"])
        self.set_summary(session_id, *summary)
        return assemble(session["system"], history, count_tokens, budget, summary)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- internals

    def _tx(self):
        return _Transaction(self._lock, self._db)

    @staticmethod
    def _next_touch(db: sqlite3.Connection) -> int:
        return db.execute("SELECT COALESCE(MAX(touched), 0) + 1 FROM sessions").fetchone()[0]

    def _touch(self, db: sqlite3.Connection, session_id: str, **columns) -> float:
        now = time.time()
        sets = "".join(f", {c} = ?" for c in columns)
        cur = db.execute(f"UPDATE sessions SET updated = ?, touched = ?{sets} WHERE id = ?",
                         (now, self._next_touch(db), *columns.values(), session_id))
        if cur.rowcount == 0:
            raise UnknownSession(session_id)
        return now

    @staticmethod
    def _exists(db: sqlite3.Connection, session_id: str) -> None:
        if db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
            raise UnknownSession(session_id)

    @staticmethod
    def _session(db: sqlite3.Connection, session_id: str) -> dict:
        row = db.execute(_SESSION_SELECT + " WHERE s.id = ? GROUP BY s.id", (session_id,)).fetchone()
        if row is None:
            raise UnknownSession(session_id)
        return _session_dict(row)


_SESSION_SELECT = ("SELECT s.id, s.title, s.system, s.created, s.updated, COUNT(m.id) AS turns "
                   "FROM sessions s LEFT JOIN messages m ON m.session_id = s.id")


def _session_dict(row: sqlite3.Row) -> dict:
    return {k: row[k] for k in ("id", "title", "system", "created", "updated", "turns")}


def _check_text(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")


class _Transaction:
    """The store's lock held for one transaction: committed on success, rolled back on an exception."""

    def __init__(self, lock: threading.Lock, db: sqlite3.Connection):
        self.lock, self.db = lock, db

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, kind, value, tb) -> None:
        try:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.lock.release()
