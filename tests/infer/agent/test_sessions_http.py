"""Chat sessions over HTTP (issue 16's Done-when): two sessions x 200 turns from four concurrent clients
against a real server on loopback with the agent mounted, conversations ten times longer than the
window, so most turns evict: zero cross-session leaks in the stored messages and in the context the server
reports it used, every prompt within the window, and a restarted server (a new engine, store and app
over the same SQLite file, the first one shut down) lists and continues both sessions."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from infer.agent.memory import assemble
from tests.infer.server_helpers import API_KEY, CONTEXT, auth, serve_in_thread, tiny_checkpoint

WINDOW = CONTEXT  # 1024 tokens (bytes): a turn is ~70, so after ~15 turns the oldest are evicted
MAX_TOKENS = 3
TURNS = 200  # per session
CLIENTS = 2  # per session, interleaving their turns in it


class AgentServer:
    """The inference server with the agent mounted, over one engine of `model` and the conversation store
    at `path`, served by uvicorn in a thread on a free loopback port; `stop()` ends it like a process exit
    (the app's shutdown stops the engine, then the store is closed)."""

    def __init__(self, model, path):
        from infer.agent.memory import ConversationStore
        from infer.agent.route import RoutingPolicy
        from infer.agent.service import Agent
        from infer.engine import Engine
        from infer.server.app import create_app
        from model.tokenizer import ByteTokenizer

        engine = Engine(model, ByteTokenizer(), slots=4, max_queue=16, name="tiny")
        self.store = ConversationStore(path)
        agent = Agent(RoutingPolicy.default({"tiny": engine}), self.store)
        self.base, self.server, self.thread = serve_in_thread(create_app([engine], api_key=API_KEY, agent=agent))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.store.close()


@pytest.fixture(scope="module")
def tiny_model():
    """The shared tiny checkpoint's model (1 layer, byte-level, 1024-token context): the engine programs
    are the same as the shared servers' (4 slots), so in one pytest process they are compiled once."""
    from model.checkpoint import load_for_inference

    return load_for_inference(tiny_checkpoint()).model


def byte_prompt_tokens(messages: list[dict]) -> int:
    """Prompt tokens of a message list under the run's chat template (its byte tokenizer's plain text)."""
    from model.chat_template import ChatTemplate
    from model.tokenizer import ByteTokenizer

    return len(ChatTemplate(ByteTokenizer()).render(messages))


def turn(client: httpx.Client, base: str, sid: str, content: str) -> list[dict]:
    """One streamed turn: its events, in order."""
    events = []
    with client.stream("POST", f"{base}/v1/agent/sessions/{sid}/messages", headers=auth(),
                       json={"content": content, "max_tokens": MAX_TOKENS, "temperature": 0}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["x-jaxlm-backend"] == "tiny"
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    assert events[0]["type"] == "meta" and events[-1]["type"] == "done", events
    return events


def check_session(base: str, sid: str, mine: str, other: str, dones: list[dict]) -> list[dict]:
    """The stored messages: strictly user/assistant alternating, only this session's marker, and every
    context the server used made of this session's message ids, within the window."""
    got = httpx.get(f"{base}/v1/agent/sessions/{sid}", headers=auth(), timeout=30).json()
    messages = got["messages"]
    assert got["turns"] == len(messages)
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert all(mine in m["content"] for m in messages if m["role"] == "user")
    assert not any(other in m["content"] for m in messages)  # zero cross-session leaks in the store
    ids = {m["id"] for m in messages}
    for done in dones:
        assert set(done["context_ids"]) <= ids  # ... and in the context the model was given
        assert done["window"] == WINDOW and done["prompt_tokens"] + MAX_TOKENS <= WINDOW
    return messages


def test_two_sessions_of_200_concurrent_turns_stay_apart_within_the_window_and_survive_a_restart(
        tiny_model, tmp_path):
    path = tmp_path / "sessions.sqlite"
    srv = AgentServer(tiny_model, path)
    try:
        sids = []
        for body in ({"title": "first", "system": "You answer briefly."}, {"title": "second"}):
            r = httpx.post(f"{srv.base}/v1/agent/sessions", headers=auth(), json=body, timeout=30)
            assert r.status_code == 201, r.text
            sids.append(r.json()["id"])
        markers = {sid: f"mk{sid[:12]}" for sid in sids}  # session-unique, neither inside the other
        dones: dict[str, list[dict]] = {sid: [] for sid in sids}
        errors: list[BaseException] = []
        start = threading.Barrier(len(sids) * CLIENTS)

        def client(sid: str, k: int) -> None:
            try:
                with httpx.Client(timeout=120) as c:
                    start.wait()
                    for i in range(TURNS // CLIENTS):
                        events = turn(c, srv.base, sid, f"{markers[sid]} c{k} turn {i}: how are you?")
                        dones[sid].append(events[-1])
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=client, args=(sid, k)) for sid in sids for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]

        for sid, other in zip(sids, reversed(sids)):
            messages = check_session(srv.base, sid, markers[sid], markers[other], dones[sid])
            assert len(messages) == 2 * TURNS and len(dones[sid]) == TURNS
            # eviction really happened: late turns were answered from a short suffix of the conversation
            assert all(len(d["context_ids"]) < 60 for d in dones[sid][-100:])
            assert dones[sid][-1]["context_ids"][0] > messages[-60]["id"]
            # each turn's context ends with that turn's own user message
            assert sorted(max(d["context_ids"]) for d in dones[sid]) == [m["id"] for m in messages
                                                                         if m["role"] == "user"]
    finally:
        srv.stop()

    # A new server (engine, store, app) over the same SQLite file lists both sessions and continues them.
    again = AgentServer(tiny_model, path)
    try:
        listed = httpx.get(f"{again.base}/v1/agent/sessions", headers=auth(), timeout=30).json()["data"]
        assert {s["id"]: s["turns"] for s in listed} == {sid: 2 * TURNS for sid in sids}
        assert {s["title"] for s in listed} == {"first", "second"}
        with httpx.Client(timeout=120) as c:
            for sid, other, system in zip(sids, reversed(sids), ("You answer briefly.", None)):
                done = turn(c, again.base, sid, f"{markers[sid]} again")[-1]
                messages = check_session(again.base, sid, markers[sid], markers[other], [done])
                assert len(messages) == 2 * TURNS + 2 and messages[-2]["content"] == f"{markers[sid]} again"
                # the context is the stored conversation's newest turns that fit, as memory.assemble makes it
                want = assemble(system, messages[:-1], byte_prompt_tokens, WINDOW - MAX_TOKENS)
                assert done["context_ids"] == want.kept_ids and done["prompt_tokens"] == want.tokens
                assert messages[-3]["id"] in done["context_ids"]  # the turns before the restart are remembered
    finally:
        again.stop()
