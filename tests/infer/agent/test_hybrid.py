"""The hybrid deployment end to end: two real servers on loopback.

The "cloud" is `python -m infer serve` in a subprocess (its /metrics counts every HTTP request it
answers: the request log this test reads); the agent server is the same app in this process with a
local engine and a routing policy (order: cloud first). Sensitive conversations must be answered
locally with zero requests reaching the cloud; plain ones go to the cloud; after the cloud is
killed, the next turn falls back to the local engine and says why (header, event field, stored meta).
"""

import concurrent.futures
import json
import re
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.infer.server_helpers import ServeProcess, save_tiny_run, serve_in_thread

API_KEY = "agent-test-key-0123"
CONTEXT = 256
MODEL = dict(vocab_size=257, n_layers=1, d_model=32, n_heads=2, max_seq_len=CONTEXT, init_std=0.5)
TURN = {"max_tokens": 8, "temperature": 0}


def _checkpoint() -> Path:
    return save_tiny_run(Path(tempfile.mkdtemp(prefix="jaxlm-hybrid-")) / "tiny", MODEL)


class AgentServer:
    """create_app with an Agent (local engine + the policy's remote) under uvicorn in a daemon thread."""

    def __init__(self, engine, policy: dict, store_path: Path):
        from infer.agent.memory import ConversationStore
        from infer.agent.route import RoutingPolicy
        from infer.agent.service import Agent
        from infer.server.app import create_app

        self.router = RoutingPolicy.from_dict(policy, "test-policy").build({"tiny": engine})
        self.store = ConversationStore(store_path)
        self.app = create_app([engine], api_key=API_KEY, request_timeout_s=120, agent=Agent(self.router, self.store))
        self.base, self.server, self.thread = serve_in_thread(self.app, backlog=64)
        self.client = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)

    def stop(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.store.close()


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    from infer.engine import Engine
    from model.checkpoint import load_for_inference

    run = _checkpoint()
    # the cloud is `python -m infer serve` with a policy file and a memory path of its own (its agent is not used
    # by the test's routing; it checks that serve --policy/--memory load them)
    cloud_dir = tmp_path_factory.mktemp("cloud")
    (cloud_dir / "policy.yaml").write_text("backends:\n  - {name: cloud, type: local, engine: cloud, tags: [big]}\n")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the cloud compiles while the local engine does
        cloud_future = pool.submit(ServeProcess, "--run", f"cloud={run}", "--slots", "2", "--policy",
                                   str(cloud_dir / "policy.yaml"), "--memory", str(cloud_dir / "cloud.sqlite"))
        loaded = load_for_inference(run)
        engine = Engine(loaded.model, loaded.tokenizer, slots=2, max_queue=8, name="tiny")
        engine.start()
        cloud = cloud_future.result()
    policy = {"backends": [{"name": "local", "type": "local", "engine": "tiny"},
                           {"name": "cloud", "type": "remote", "url": cloud.base + "/v1", "model": "cloud",
                            "context": CONTEXT, "timeout_s": 60},
                           # the same server under a policy that overstates its window: its 413s test the fallback
                           {"name": "cloud-big", "type": "remote", "url": cloud.base + "/v1", "model": "cloud",
                            "context": 4096}],
              "order": ["cloud", "local"], "health": {"max_recent_errors": 2, "error_window_s": 600}}
    agent = AgentServer(engine, policy, tmp_path_factory.mktemp("agent") / "agent.sqlite")
    cloud.dir = cloud_dir
    yield agent, cloud
    agent.stop()
    cloud.kill()


def cloud_requests(cloud) -> float:
    """Every request the cloud answered except its own /metrics and /health: its request log."""
    text = httpx.get(cloud.base + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(r'jaxlm_http_requests_total\{endpoint="([^"]*)",status="\d+"\} (\S+)', line)
        if m and m.group(1) not in ("/metrics", "/health"):
            total += float(m.group(2))
    return total


def new_session(agent, **body) -> str:
    r = agent.client.post("/v1/agent/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def say(agent, session: str, content: str, **extra):
    """One streamed turn: (response headers, events)."""
    with agent.client.stream("POST", f"/v1/agent/sessions/{session}/messages",
                             json={"content": content, **TURN, **extra}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["type"] == "meta" and events[-1]["type"] == "done", events
    assert all(e["type"] == "delta" for e in events[1:-1])
    return r.headers, events


def test_sensitive_prompts_stay_local_and_never_reach_the_cloud(hybrid):
    agent, cloud = hybrid
    for text, words in [("Please e-mail the report to ann.lee@example.org", "e-mail address"),
                        ("My card is 4111 1111 1111 1111, is it charged?", "card number")]:
        session = new_session(agent, title="private")
        before = cloud_requests(cloud)
        headers, events = say(agent, session, text)
        assert headers["X-Jaxlm-Backend"] == "local" and events[0]["backend"] == "local"
        assert headers["X-Jaxlm-Route-Reason"] == f"privacy: {words} -> local only" == events[0]["reason"]
        # the conversation holds it from now on: a plain follow-up stays local too
        headers, _ = say(agent, session, "and what else?")
        assert headers["X-Jaxlm-Backend"] == "local"
        assert cloud_requests(cloud) == before  # the cloud's request log: zero requests for this conversation
        stored = agent.client.get(f"/v1/agent/sessions/{session}").json()["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
        assert stored[1]["meta"]["backend"] == "local" and stored[1]["meta"]["reason"].startswith("privacy: ")
        assert stored[1]["meta"]["finish_reason"] in ("stop", "length")


def test_a_plain_prompt_is_routed_by_the_other_rules_to_the_cloud(hybrid):
    agent, cloud = hybrid
    session = new_session(agent, title="plain")
    before = cloud_requests(cloud)
    headers, events = say(agent, session, "Tell me a story about a lighthouse")
    assert headers["X-Jaxlm-Backend"] == "cloud"
    assert headers["X-Jaxlm-Route-Reason"] == "order: cloud is the policy's first choice" == events[0]["reason"]
    assert cloud_requests(cloud) == before + 1
    done = events[-1]
    assert done["window"] == CONTEXT and done["finish_reason"] in ("stop", "length")
    # the same answer, not streamed: a JSON body with the same headers
    r = agent.client.post(f"/v1/agent/sessions/{session}/messages", json={"content": "again", "stream": False, **TURN})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["X-Jaxlm-Backend"] == body["backend"] == "cloud" and body["window"] == CONTEXT
    assert body["message"]["role"] == "assistant" and body["message"]["meta"]["backend"] == "cloud"
    assert len(body["context_ids"]) == 3  # user, assistant, user: the whole conversation fits


def test_context_overflow_falls_back_and_assembles_again_for_the_smaller_window(hybrid):
    agent, _ = hybrid
    session = new_session(agent, title="long")
    say(agent, session, "word " * 40)  # ~220 of the cloud's 256 tokens
    headers, events = say(agent, session, "and more " * 10, model="cloud-big")
    reason = headers["X-Jaxlm-Route-Reason"]
    assert headers["X-Jaxlm-Backend"] == "cloud"
    assert reason.startswith("fallback: cloud-big failed (HTTP 413: ")
    # planned: cloud-big (the context rule: only its stated window holds the conversation; the asked model agrees)
    assert "-> cloud (planned: context: " in reason and reason.endswith("-> cloud-big (4096))")
    done = events[-1]
    assert done["context_ids"] == [events[0]["message_id"]]  # the 256-token window: the newest turn only
    assert done["prompt_tokens"] + TURN["max_tokens"] <= CONTEXT
    assert agent.router.by_name["cloud-big"].recent_errors() == []  # an overflow is not ill health


def test_agent_api_errors_are_openai_error_objects_and_the_page_is_public(hybrid):
    agent, _ = hybrid
    r = agent.client.post("/v1/agent/sessions/nope/messages", json={"content": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    session = new_session(agent)
    r = agent.client.post(f"/v1/agent/sessions/{session}/messages", json={"content": "\u200b\u2066\u200b"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("content has no visible text")
    r = agent.client.post(f"/v1/agent/sessions/{session}/messages", json={"content": "hi", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = agent.client.post(f"/v1/agent/sessions/{session}/messages", json={"content": "hi", "colour": 1})
    assert r.status_code == 400 and "'colour' is not a field" in r.json()["error"]["message"]
    assert httpx.get(agent.base + "/v1/agent/sessions").status_code == 401  # the API needs the key ...
    page = httpx.get(agent.base + "/")  # ... the page does not
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(agent.base + "/page/app.js").status_code == 200
    assert httpx.get(agent.base + "/page/nope.js").status_code == 404
    backends = agent.client.get("/v1/agent/backends").json()["data"]
    assert [(b["name"], b["local"], b["context"]) for b in backends] == [
        ("cloud", False, CONTEXT), ("local", True, CONTEXT), ("cloud-big", False, 4096)]  # unlisted in order: last
    # `python -m infer serve` (the cloud) carries the agent too, with its --policy and its --memory file
    _, cloud = hybrid
    assert httpx.get(cloud.base + "/").status_code == 200
    assert [(b["name"], b["local"], b["tags"]) for b in httpx.get(cloud.base + "/v1/agent/backends").json()["data"]] \
        == [("cloud", True, ["big"])]
    assert (cloud.dir / "cloud.sqlite").is_file()


def test_concurrent_sessions_never_see_each_others_turns(hybrid):
    agent, _ = hybrid
    sessions = {name: new_session(agent, title=name, system=f"You are {name}.") for name in ("red", "blue")}
    contexts: dict[str, list] = {name: [] for name in sessions}

    def talk(name):
        for i in range(5):
            _, events = say(agent, sessions[name], f"{name} turn {i}")
            contexts[name].append(events[-1]["context_ids"])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two conversations interleave
        list(pool.map(talk, sessions))
    for name, sid in sessions.items():
        stored = agent.client.get(f"/v1/agent/sessions/{sid}").json()
        assert stored["system"] == f"You are {name}."
        users = [m["content"] for m in stored["messages"] if m["role"] == "user"]
        assert users == [f"{name} turn {i}" for i in range(5)]
        assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 5
        own = {m["id"] for m in stored["messages"]}
        assert all(set(ids) <= own for ids in contexts[name])  # every prompt held only this session's turns


def test_evicted_turns_are_summarized_by_the_answering_model(hybrid):
    import asyncio

    from infer.agent.memory import ConversationStore
    from infer.agent.route import RoutingPolicy
    from infer.agent.service import Agent

    engine = hybrid[0].router.by_name["local"].engine
    store = ConversationStore(":memory:")
    agent = Agent(RoutingPolicy.default({"tiny": engine}), store, summarize=True, summary_tokens=16)
    sid = store.create(system="Be brief.")["id"]

    async def talk():
        return [[e async for e in agent.turn(sid, f"turn {i}: " + "lorem ipsum " * 8, max_tokens=8, temperature=0)]
                for i in range(4)]

    dones = [events[-1] for events in asyncio.run(talk())]
    assert all(d["prompt_tokens"] + 8 <= CONTEXT for d in dones)
    text, upto = store.summary(sid)  # the turns evicted so far, in the model's words (a random model's, here)
    assert text and upto >= 1
    assert min(dones[-1]["context_ids"]) > upto  # what the summary stands for is out of the prompt


def test_killing_the_cloud_mid_conversation_makes_the_next_turn_fall_back(hybrid):
    agent, cloud = hybrid
    session = new_session(agent, title="outage")
    headers, _ = say(agent, session, "Hello, how are you?")
    assert headers["X-Jaxlm-Backend"] == "cloud"
    assert agent.router.by_name["cloud"].recent_errors() == []
    cloud.kill()  # SIGKILL: the port is closed from now on
    headers, events = say(agent, session, "Are you still there?")
    reason = headers["X-Jaxlm-Route-Reason"]
    assert headers["X-Jaxlm-Backend"] == "local" and events[0]["reason"] == reason
    assert reason.startswith("fallback: cloud failed (connection refused) -> local")
    stored = agent.client.get(f"/v1/agent/sessions/{session}").json()["messages"]
    assert [m["meta"]["backend"] for m in stored if m["role"] == "assistant"] == ["cloud", "local"]
    assert stored[-1]["meta"]["reason"] == reason
    assert events[-1]["context_ids"] == [m["id"] for m in stored[:-1]]  # the local window holds the whole conversation
    # a second failure reaches the policy's max_recent_errors (2): from then on the health rule skips the cloud
    assert say(agent, session, "Hello?")[0]["X-Jaxlm-Route-Reason"].startswith("fallback: cloud failed")
    headers, _ = say(agent, session, "Anyone?")
    assert headers["X-Jaxlm-Backend"] == "local"
    assert headers["X-Jaxlm-Route-Reason"] == "health: cloud had 2 errors in the last 600 s (connection) -> local"
