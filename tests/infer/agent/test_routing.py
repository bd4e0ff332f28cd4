"""The router: what privacy.py flags, the policy file's checks, and which backend each rule picks and why.

One tiny engine (context 64, never started: planning only renders and counts) serves the module; remote
backends point at a closed loopback port and are never contacted by `plan` (the end-to-end behaviour with
real servers is test_hybrid.py's).
"""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infer.agent.backends import BackendError, LocalBackend, RemoteBackend
from infer.agent.privacy import luhn_ok, sensitive_kinds
from infer.agent.route import PolicyError, RouteError, RoutingPolicy
from infer.agent.service import PostProcess

ROOT = Path(__file__).resolve().parents[3]
CONTEXT = 64

# ---- privacy: each kind, with near misses ---------------------------------------------------------

POSITIVES = {
    "email": ["write to ann.lee+work@example.co.uk today", "Ping X_Y@mail-host.org."],
    "phone": ["call +1 415 555 2671", "+44 20 7946 0958", "(415) 555-2671", "415.555.2671", "030 1234567",
              "07700 900123", "01 23 45 67 89", "+49-30-1234567"],
    "card": ["card 4111 1111 1111 1111 exp 12/27", "4111-1111-1111-1111", "5500005555555559",
             "amex 3782 822463 10005"],
    "secret": ["key sk-proj-Abcdefghijklmnopqrstuv12", "ghp_" + "a1B2c3D4e5" * 4, "AKIAIOSFODNN7EXAMPLE",
               "xoxb-123456789012-abcdefghijkl", "-----BEGIN RSA PRIVATE KEY-----\nMIIE...",
               "-----BEGIN PRIVATE KEY-----", "token aZ3kP9qLm2Xv8RtY6wBn4HcJ7dFs1GeU"],
}
NEAR_MISSES = [
    "my address is ann at example dot org", "user@localhost", "a@b",             # not an e-mail address
    "the meeting is on 2024-01-15 at 10:30", "born 15.01.1990", "in 1999 and 2024",  # dates, years
    "order number 123456789", "order #48213", "invoice 2024-000123",              # order numbers
    "4111 1111 1111 1112", "1234 5678 9012 3456",                                 # Luhn-invalid card numbers
    "0000 0000 0000 0000",                                                        # Luhn-valid, not a card
    "commit 3f786850e387550fdab836ed7e6dc881de23001b",                             # a hex digest
    "supercalifragilisticexpialidocious_and_then_some_more", "sk-short",          # words, a short sk-
    "version 1.2.3, room 101, 3 pm, price 12.99, 1,000,000 people",
    "https://example.com/docs/getting-started/installation/index.html",
]


@pytest.mark.parametrize("kind", list(POSITIVES))
def test_each_kind_is_found(kind):
    for text in POSITIVES[kind]:
        assert kind in sensitive_kinds(text), text


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_not_flagged(text):
    assert sensitive_kinds(text) == [], text


def test_luhn_and_kind_order():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert sensitive_kinds("a@example.com, +1 415 555 2671, 4111 1111 1111 1111, AKIAIOSFODNN7EXAMPLE") == \
        ["email", "phone", "card", "secret"]


# ---- the router --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from infer.engine import Engine
    from model import build_model, preset
    from model.tokenizer import ByteTokenizer

    model = build_model(preset("gpt2-nano", vocab_size=257, n_layers=1, d_model=32, n_heads=2, max_seq_len=CONTEXT,
                               init_std=0.5), seed=0)
    return Engine(model, ByteTokenizer(), slots=2, max_queue=4, name="tiny")  # never started: plan needs no device


def router(engine, **policy):
    """A router over `local` (the tiny engine) and `cloud` (a remote backend that is never contacted)."""
    data = {"backends": [{"name": "local", "type": "local", "engine": "tiny", "tags": ["private"]},
                         {"name": "cloud", "type": "remote", "url": "http://127.0.0.1:9/v1", "model": "big",
                          "context": 4096, "tags": ["large", "code"]}],
            "order": ["cloud", "local"], **policy}
    return RoutingPolicy.from_dict(data, "test-policy").build({"tiny": engine})


def user(text):
    return [{"role": "user", "content": text}]


def names(choices):
    return [c.backend.name for c in choices]


def test_plain_text_follows_the_policy_order(engine):
    choices = router(engine).plan(user("hello there"))
    assert names(choices) == ["cloud", "local"]
    assert choices[0].reason == "order: cloud is the policy's first choice"
    assert choices[1].reason.startswith("fallback 1")


@pytest.mark.parametrize("text, words", [("mail ann@example.org", "e-mail address"),
                                         ("pay with 4111 1111 1111 1111", "card number"),
                                         ("call +1 415 555 2671", "phone number"),
                                         ("use AKIAIOSFODNN7EXAMPLE", "secret/API key")])
def test_sensitive_text_never_gets_a_remote_choice(engine, text, words):
    r = router(engine)
    for convo in (user(text), user(text) + [{"role": "assistant", "content": "ok"}] + user("and now plain")):
        choices = r.plan(convo)
        assert names(choices) == ["local"]  # not even as a fallback
        assert choices[0].reason == f"privacy: {words} -> local only"
    asked = r.plan(user(text), model="cloud")  # an explicit model does not outrank privacy
    assert names(asked) == ["local"] and "asked model cloud is remote, not used" in asked[0].reason


def test_privacy_rule_can_be_narrowed_or_off(engine):
    assert names(router(engine, privacy={"local_only": ["card"]}).plan(user("ann@example.org"))) == ["cloud", "local"]
    assert names(router(engine, privacy={"local_only": []}).plan(user("4111 1111 1111 1111")))[0] == "cloud"


def test_sensitive_text_without_a_local_backend_is_refused(engine):
    r = RoutingPolicy.from_dict({"backends": [{"name": "cloud", "type": "remote", "url": "http://127.0.0.1:9/v1",
                                               "model": "big", "context": 4096}]}).build({"tiny": engine})
    with pytest.raises(RouteError, match="privacy: the conversation holds e-mail address") as e:
        r.plan(user("ann@example.org"))
    assert e.value.status == 403


def test_a_conversation_too_long_for_a_window_goes_to_a_longer_one(engine):
    long = user("x" * 200)  # 200+ byte tokens: over local's 64
    choices = router(engine, order=["local", "cloud"]).plan(long)
    assert names(choices) == ["cloud", "local"]
    assert choices[0].reason.startswith("context: ") and "local's window of 64 -> cloud (4096)" in choices[0].reason
    assert names(router(engine, order=["local", "cloud"]).plan(user("short")))[0] == "local"


def test_explicit_model_and_tags(engine):
    r = router(engine)
    assert r.plan(user("hi"), model="local")[0].reason == "model: asked for local"
    assert names(r.plan(user("hi"), model="local")) == ["local", "cloud"]
    assert r.plan(user("hi"), tags=["private"])[0].reason == "tags: private -> local"
    assert names(r.plan(user("hi"), tags=["nothing-has-this"])) == ["cloud", "local"]
    # context outranks the explicit model: local cannot hold this conversation
    assert names(r.plan(user("y" * 200), model="local"))[0] == "cloud"
    with pytest.raises(RouteError, match="model 'gpt-9' is not a backend of the routing policy; backends: cloud, loc"):
        r.plan(user("hi"), model="gpt-9")


def test_recent_errors_move_a_backend_last_and_the_reason_says_so(engine):
    r = router(engine, health={"max_recent_errors": 2, "error_window_s": 60})
    cloud = r.by_name["cloud"]
    cloud.record_error("connection")
    assert names(r.plan(user("hi"))) == ["cloud", "local"]  # one error is below the limit
    cloud.record_error("timeout")
    choices = r.plan(user("hi"))
    assert names(choices) == ["local", "cloud"]
    assert choices[0].reason == "health: cloud had 2 errors in the last 60 s (timeout) -> local"
    assert not r.healthy(cloud) and r.healthy(r.by_name["local"])
    cloud.error_window_s = 0.005  # the window passes: forgiven
    time.sleep(0.01)
    assert names(r.plan(user("hi"))) == ["cloud", "local"]


def test_default_policy_is_every_engine_local(engine):
    r = RoutingPolicy.default({"tiny": engine})
    choices = r.plan(user("ann@example.org"))
    assert names(choices) == ["tiny"] and isinstance(choices[0].backend, LocalBackend)
    assert r.plan(user("hi"))[0].reason == "only backend: tiny"
    assert r.describe()[0] | {"load": None} == {"name": "tiny", "local": True, "context": CONTEXT, "tags": [],
                                                "healthy": True, "load": None}


# ---- the policy file ------------------------------------------------------------------------------

BAD_POLICIES = [
    ("backends: []", "backends: must be a non-empty list"),
    ("backends:\n  - {name: a, type: locl}", "backends[0].type: 'locl' is not allowed; allowed: local, remote"),
    ("backends:\n  - {name: a, type: local, url: x}", "backends[0].url: unknown key for a local backend; allowed:"),
    ("backends:\n  - {name: c, type: remote, url: 'http://h/v1', model: m}",
     "backends[0].context: required for a remote backend"),
    ("backends:\n  - {name: c, type: remote, url: 'ftp://h', model: m, context: 9}", "backends[0].url: must be an"),
    ("backends:\n  - {name: c, type: remote, url: 'http://h/v1', model: m, context: -1}",
     "backends[0].context: must be an integer >= 2, got -1"),
    ("backends:\n  - {name: a, type: local}\n  - {name: a, type: local}", "backends[1].name: 'a' is used twice"),
    ("backends:\n  - {name: a, type: local}\norder: [a, b]", "order: 'b' is not a backend; backends: a"),
    ("backends:\n  - {name: a, type: local}\nprivacy: {local_only: [email, ssn]}",
     "privacy.local_only: must be a list of kinds from email, phone, card, secret"),
    ("backends:\n  - {name: a, type: local}\nhealth: {max_errors: 3}",
     "health.max_errors: unknown key; allowed: error_window_s, max_recent_errors, max_queue"),
    ("backends:\n  - {name: a, type: local}\nroutes: []", "routes: unknown key; allowed: backends, order, privacy"),
    ("backends: [\n", "not valid YAML at line"),
]


@pytest.mark.parametrize("text, message", BAD_POLICIES)
def test_a_bad_policy_file_is_one_error_naming_the_field(tmp_path, text, message):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as e:
        RoutingPolicy.load(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_policy_names_served_engines_and_key_variables(tmp_path, engine, monkeypatch):
    policy = RoutingPolicy.from_dict({"backends": [{"name": "a", "type": "local", "engine": "nope"}]}, "p")
    with pytest.raises(PolicyError, match="p: backends\\[0\\].engine: 'nope' is not a served model; served: tiny"):
        policy.build({"tiny": engine})
    keyed = RoutingPolicy.from_dict({"backends": [{"name": "c", "type": "remote", "url": "http://h/v1", "model": "m",
                                                   "context": 8, "api_key_env": "JAXLM_TEST_NO_SUCH_KEY"}]}, "p")
    monkeypatch.delenv("JAXLM_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(PolicyError, match="JAXLM_TEST_NO_SUCH_KEY is not set"):
        keyed.check_environment()
    monkeypatch.setenv("JAXLM_TEST_NO_SUCH_KEY", "k")
    assert keyed.build({"tiny": engine}).by_name["c"].api_key == "k"


def test_the_example_hybrid_policy_is_valid():
    policy = RoutingPolicy.load(ROOT / "experiments/hybrid.yaml")
    policy.check_engines(["local"])
    assert [b.type for b in policy.backends] == ["local", "remote"] and policy.order == ("cloud", "local")
    assert set(policy.local_only) == {"email", "phone", "card", "secret"}


def test_serve_with_a_bad_policy_exits_2_before_loading(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""\
        backends:
          - {name: local, type: local, engine: tiny}
        order: [local, cloud]
        """))
    r = subprocess.run([sys.executable, "-m", "infer", "serve", "--run", f"tiny={tmp_path}", "--policy", str(path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"python -m infer serve: error: --policy {path}: order: 'cloud' is not a backend; backends: local"]


# ---- post-processing and backend errors ---------------------------------------------------------------

def test_post_process_trims_stops_and_hides_control_tokens_across_deltas():
    p = PostProcess(stops=["\nUSER:"], hidden=["<|im_start|>", "<|endoftext|>"])
    out = [p.push(t) for t in ["Hi <|im_", "start|>there <|endo", "ftext|>!", "\nUS", "ER: more"]]
    assert "".join(out) + p.flush() == "Hi there !" and p.stopped
    q = PostProcess(stops=[], hidden=["<|im_end|>"])
    assert q.push("a <|im") == "a " and q.flush() == "<|im"  # a prefix that never completes is text after all


def test_backend_error_kinds():
    assert BackendError("connection", "x").fallback and BackendError("context_overflow", "x").fallback
    assert not BackendError("client", "x").fallback
    with pytest.raises(ValueError, match="not one of"):
        BackendError("nope", "x")


async def _drain(stream):
    return [t async for t in stream]


def test_remote_connection_refused_is_a_connection_error():
    import asyncio
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = RemoteBackend("cloud", f"http://127.0.0.1:{port}/v1", "m", context=512, timeout_s=5)
    with pytest.raises(BackendError) as e:
        asyncio.run(_drain(b.stream_chat(user("hi"), max_tokens=4, temperature=0)))
    assert e.value.kind == "connection" and str(e.value) == "cloud: connection refused"
    assert b.recent_errors() == ["connection"] and b.load()["recent_errors"] == 1


def test_remote_token_count_bounds_the_plain_template_of_a_byte_model(engine):
    """The remote's tokenizer is unknown: its count must not undercount a byte-level model's prompt."""
    local = LocalBackend(engine)
    remote = RemoteBackend("cloud", "http://127.0.0.1:9/v1", "m", context=512)
    convo = [{"role": "system", "content": "Be brief."}] + [
        {"role": r, "content": c} for r, c in [("user", "hi"), ("assistant", "\ufffd\ufffdok"), ("user", "")]]
    assert remote.count_tokens(convo) >= local.count_tokens(convo)


def test_a_refused_turn_is_stored_as_an_error_answer():
    """After the user's text is stored, a refusal (no backend answered; privacy) is stored as an empty answer
    with finish_reason "error", so the conversation keeps alternating; an unknown model stores nothing."""
    import asyncio
    import socket

    from infer.agent.memory import ConversationStore
    from infer.agent.service import Agent, TurnError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = RoutingPolicy.from_dict({"backends": [{"name": "cloud", "type": "remote", "url": f"http://127.0.0.1:{port}/v1",
                                               "model": "m", "context": 512}]}).build({})
    store = ConversationStore(":memory:")
    agent = Agent(r, store)
    sid = store.create()["id"]

    async def turn(text, **kw):
        return [e async for e in agent.turn(sid, text, **kw)]

    async def main():
        with pytest.raises(TurnError) as e:
            await turn("hello")
        assert e.value.status == 503 and e.value.message == "no backend could answer: cloud failed (connection refused)"
        with pytest.raises(RouteError) as e:
            await turn("mail ann@example.org")
        assert e.value.status == 403
        with pytest.raises(RouteError, match="model 'nope' is not a backend"):
            await turn("x", model="nope")

    asyncio.run(main())
    stored = store.messages(sid)
    assert [(m["role"], m["content"]) for m in stored] == [("user", "hello"), ("assistant", ""),
                                                           ("user", "mail ann@example.org"), ("assistant", "")]
    refusal = "no backend could answer: cloud failed (connection refused)"
    assert stored[1]["meta"] == {"backend": None, "reason": refusal, "finish_reason": "error", "error": refusal}
    assert stored[3]["meta"]["finish_reason"] == "error" and stored[3]["meta"]["reason"].startswith("privacy: ")
