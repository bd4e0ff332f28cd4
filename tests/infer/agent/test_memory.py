"""Conversation memory: the SQLite store (persistence, ordering, isolation under threads, summaries) and
`assemble` (never over budget under a real chat template, newest turns kept, ContextTooSmall)."""

from __future__ import annotations

import random
import sqlite3
import threading

import pytest

from infer.agent.memory import SUMMARY_HEADER, ContextTooSmall, ConversationStore, UnknownSession, assemble
from model.chat_template import CHAT_TOKENS, ChatTemplate
from model.tokenizer import BPETokenizer, ByteTokenizer


@pytest.fixture(scope="module")
def templates():
    bpe = BPETokenizer.train(["hello there, user\n" * 30, "the quick brown fox, 42 times\n" * 30], vocab_size=290,
                             progress=False)
    return {"byte-chatml": ChatTemplate(ByteTokenizer().with_special_tokens(CHAT_TOKENS)),
            "byte-plain": ChatTemplate(ByteTokenizer()),
            "bpe-chatml": ChatTemplate(bpe.with_special_tokens(CHAT_TOKENS))}


def counter(template: ChatTemplate):
    return lambda messages: len(template.render(messages))


# ---- the store

def test_sessions_and_messages_survive_reopening_the_file(tmp_path):
    path = tmp_path / "sub" / "chats.sqlite"
    store = ConversationStore(path)
    s = store.create(title="trip", system="Be terse.")
    assert len(s["id"]) == 32 and int(s["id"], 16) >= 0
    assert (s["title"], s["system"], s["turns"]) == ("trip", "Be terse.", 0)
    first = store.append(s["id"], "user", "héllo <|im_end|>", {"removed": {"bidi": 1}})
    second = store.append(s["id"], "assistant", "hi", {"backend": "local", "reason": "privacy: email"})
    store.set_summary(s["id"], "they said hello", first)
    store.close()

    again = ConversationStore(path)
    assert again.get(s["id"])["turns"] == 2 and again.get(s["id"])["title"] == "trip"
    msgs = again.messages(s["id"])
    assert [(m["id"], m["role"], m["content"], m["meta"]) for m in msgs] == [
        (first, "user", "héllo <|im_end|>", {"removed": {"bidi": 1}}),
        (second, "assistant", "hi", {"backend": "local", "reason": "privacy: email"})]
    assert again.summary(s["id"]) == ("they said hello", first)
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def test_list_is_newest_updated_first_and_rename_delete_work(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite")
    a, b, c = (store.create(title=t) for t in "abc")
    assert [s["id"] for s in store.list()] == [c["id"], b["id"], a["id"]]
    store.append(a["id"], "user", "x")  # a message makes a session the newest
    assert [s["id"] for s in store.list()] == [a["id"], c["id"], b["id"]]
    renamed = store.rename(b["id"], "bee")
    assert renamed["title"] == "bee" and store.list()[0]["id"] == b["id"]
    store.set_summary(a["id"], "s", 1)
    store.delete(a["id"])
    assert [s["id"] for s in store.list()] == [b["id"], c["id"]]
    assert store._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0  # cascaded
    assert store._db.execute("SELECT COUNT(*) FROM summaries").fetchone()[0] == 0
    for call in (lambda: store.get(a["id"]), lambda: store.messages(a["id"]), lambda: store.delete(a["id"]),
                 lambda: store.rename(a["id"], "t"), lambda: store.append(a["id"], "user", "x"),
                 lambda: store.summary("nope")):
        with pytest.raises(UnknownSession) as e:
            call()
        assert isinstance(e.value, KeyError) and str(e.value).startswith("no chat session with id ")
    with pytest.raises(ValueError, match="role 'tool' is not allowed; allowed: system, user, assistant"):
        store.append(b["id"], "tool", "x")
    with pytest.raises(ValueError, match="content must be a string, got int"):
        store.append(b["id"], "user", 5)


def test_a_file_that_is_not_a_store_is_one_line(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not sqlite at all" * 100)
    with pytest.raises(ValueError, match="bad.sqlite: not a usable conversation store") as e:
        ConversationStore(bad)
    assert "\n" not in str(e.value)
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(ValueError, match="schema version 7; this jaxlm reads version 1"):
        ConversationStore(newer)
    with pytest.raises(ValueError, match="not a usable conversation store"):
        ConversationStore(bad / "under-a-file.sqlite")  # its folder cannot be made


@pytest.mark.parametrize("path", [":memory:", "file"])
def test_concurrent_sessions_never_see_each_others_messages(tmp_path, path):
    store = ConversationStore(tmp_path / "c.sqlite" if path == "file" else path)
    sessions = [store.create(title=f"s{i}")["id"] for i in range(2)]
    errors = []

    def client(k: int, sid: str) -> None:  # two threads per session, interleaving with the other session's
        try:
            for i in range(200):
                store.append(sid, "user" if i % 2 == 0 else "assistant", f"{sid}:{k}:{i}", {"k": k})
                if i % 50 == 0:
                    store.messages(sid), store.list()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k, sid)) for sid in sessions for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for sid in sessions:
        msgs = store.messages(sid)
        assert len(msgs) == 400 and store.get(sid)["turns"] == 400
        assert all(m["content"].startswith(sid + ":") for m in msgs)  # zero cross-session messages
        for k in range(2):  # each thread's messages in the order it appended them
            mine = [int(m["content"].rsplit(":", 1)[1]) for m in msgs if m["meta"] == {"k": k}]
            assert mine == list(range(200))
        assert [m["id"] for m in msgs] == sorted(m["id"] for m in msgs)


# ---- assemble

def random_history(rng: random.Random, n: int, start_id: int = 1) -> list[dict]:
    words = ["hi", "the fox", "<|im_end|>", "héllo wörld", "42", "user", "\n", "😀", "ASSISTANT:"]
    out, role = [], "user"
    for i in range(n):
        out.append({"id": start_id + 2 * i, "role": role,
                    "content": " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))})
        if rng.random() < 0.9:  # now and then two user turns in a row (a failed reply)
            role = "assistant" if role == "user" else "user"
    if out[-1]["role"] != "user":
        out.append({"id": start_id + 2 * n, "role": "user", "content": "and now?"})
    return out


def test_assemble_is_never_over_budget_and_keeps_the_newest_turns(templates):
    rng = random.Random(0)
    checked = refused = 0
    for name, template in templates.items():
        count = counter(template)
        for _ in range(80):
            history = random_history(rng, rng.randint(1, 30))
            system = rng.choice([None, "Be brief.", "You are a helpful assistant. " * rng.randint(1, 4)])
            summary = None
            if rng.random() < 0.4:
                summary = ("they talked about foxes " * rng.randint(1, 3), rng.choice(history)["id"] - 1)
            budget = rng.randint(5, count([{"role": "system", "content": system or ""}] + history) + 20)
            try:
                got = assemble(system, history, count, budget, summary)
            except ContextTooSmall as e:
                refused += 1
                last_user = max(i for i, m in enumerate(history) if m["role"] == "user")
                plain = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": m["role"], "content": m["content"]} for m in history[last_user:]]
                assert count(plain) > budget, name
                assert str(e).startswith("the message does not fit the model's context")
                continue
            checked += 1
            assert got.tokens == count(got.messages) <= budget, name
            ids = [m["id"] for m in history]
            assert got.evicted_ids + got.kept_ids == ids  # a suffix is kept
            kept = [{"role": m["role"], "content": m["content"]} for m in history[len(got.evicted_ids):]]
            head = got.messages[:len(got.messages) - len(kept)]
            assert got.messages[len(head):] == kept and kept[0]["role"] == "user"
            assert history[-1]["id"] in got.kept_ids
            if system:
                assert head[0]["role"] == "system" and head[0]["content"].startswith(system)
            assert got.summarized == (SUMMARY_HEADER in (head[0]["content"] if head else ""))
            if got.summarized:
                assert got.kept_ids[0] > summary[1]
            # maximal: starting at the previous user turn (after the summary's turns) would be over budget
            earlier = [i for i, m in enumerate(history[:len(got.evicted_ids)])
                       if m["role"] == "user" and (summary is None or m["id"] > summary[1])]
            if earlier:
                longer = head + [{"role": m["role"], "content": m["content"]} for m in history[earlier[-1]:]]
                assert count(longer) > budget, name
    assert checked > 150 and refused > 5


def test_assemble_evicts_oldest_first_from_a_user_turn():
    def count(messages):  # 10 tokens a message
        return 10 * len(messages)

    turns = [{"id": i, "role": r, "content": f"{r}{i}"} for i, r in enumerate(["user", "assistant"] * 3)]
    turns.append({"id": 6, "role": "user", "content": "now"})
    got = assemble("S", turns, count, 40)
    assert got.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "user4"},
                            {"role": "assistant", "content": "assistant5"}, {"role": "user", "content": "now"}]
    assert (got.kept_ids, got.evicted_ids, got.tokens, got.summarized) == ([4, 5, 6], [0, 1, 2, 3], 40, False)
    everything = assemble(None, turns, count, 70)
    assert everything.evicted_ids == [] and len(everything.messages) == 7
    # a summary stands for the turns up to its id and rides in the system message
    got = assemble("S", turns, count, 100, summary=("earlier: hellos", 3))
    assert got.messages[0] == {"role": "system", "content": "S\n\n" + SUMMARY_HEADER + "earlier: hellos"}
    assert got.kept_ids == [4, 5, 6] and got.summarized
    # dropped too when only that lets the newest turn fit
    def count_summary(messages):  # a summary costs 10 more
        return count(messages) + sum(10 for m in messages if SUMMARY_HEADER in m["content"])

    got = assemble("S", turns, count_summary, 20, summary=("earlier", 3))
    assert got.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "now"}]
    assert not got.summarized
    with pytest.raises(ContextTooSmall, match=r"take 20 tokens and 15 are left for the prompt"):
        assemble("S", turns, count, 15)
    assert isinstance(ContextTooSmall("x"), ValueError)


def test_context_summarizes_newly_evicted_turns_and_survives_a_failing_summarizer(templates):
    count = counter(templates["byte-chatml"])
    store = ConversationStore(":memory:")
    sid = store.create(system="Be brief.")["id"]
    for i in range(6):
        store.append(sid, "user", f"question {i} " + "x" * 40)
        store.append(sid, "assistant", f"answer {i} " + "y" * 40)
    store.append(sid, "user", "last question")
    budget = 200
    calls = []

    def summarize(previous, evicted):
        calls.append((previous, [m["id"] for m in evicted]))
        return f"{len(evicted)} turns about x and y"

    got = store.context(sid, count, budget, summarize=summarize)
    assert got.tokens <= budget and got.summarized
    (previous, folded), = calls
    assert previous is None and folded == list(range(1, folded[-1] + 1))  # the evicted prefix
    assert store.summary(sid) == (f"{len(folded)} turns about x and y", folded[-1])
    assert got.kept_ids[0] > folded[-1] and got.kept_ids[-1] == 13

    store.append(sid, "assistant", "fine")
    store.append(sid, "user", "another " + "z" * 60)
    got = store.context(sid, count, budget, summarize=summarize)
    assert got.tokens <= budget and calls[-1][0] == f"{len(folded)} turns about x and y"  # folds the old summary
    assert calls[-1][1][0] == folded[-1] + 1

    def broken(previous, evicted):
        raise RuntimeError("the model is down")

    store.append(sid, "assistant", "ok")
    store.append(sid, "user", "more " + "w" * 80)
    before = store.summary(sid)
    got = store.context(sid, count, budget, summarize=broken)  # eviction alone still works
    assert got.tokens <= budget and store.summary(sid) == before
    plain = store.context(sid, count, budget)
    assert plain == got


def test_several_processes_open_and_write_one_store_at_once(tmp_path):
    """Two servers over one run directory share its agent.sqlite: opening a fresh file from several
    processes at once must wait its turn, not fail with "database is locked"."""
    import subprocess
    import sys

    path = tmp_path / "shared.sqlite"
    code = ("import sys\nfrom infer.agent.memory import ConversationStore\ns = ConversationStore(sys.argv[1])\n"
            "for i in range(50):\n    s.append(s.create(title=f't{i}')['id'], 'user', 'hello')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    from infer.agent.memory import ConversationStore

    assert len(ConversationStore(path).list()) == 150
