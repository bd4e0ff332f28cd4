"""`python -m infer chat`: the terminal chat on the agent layer, on a checkpoint (its own engine, through
infer.agent.service.Agent, sessions in a --store file) and against running servers (the real one, on
loopback): one with the agent API (sessions on the server) and a plain OpenAI-compatible one; through
standard input and through a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from openai import OpenAI

from tests.infer.server_helpers import API_KEY, ROOT, shared_agent_server, shared_server, tiny_checkpoint

ONE = {"role": "user", "content": "hello"}


def greedy_reply(base: str) -> str:
    client = OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
    out = client.chat.completions.create(model="tiny", messages=[ONE], max_tokens=12, temperature=0)
    return out.choices[0].message.content


def test_chat_command_on_a_checkpoint_runs_on_the_agent(tmp_path):
    """`--run`: its own engine behind the Agent; the sessions land in the --store file."""
    want = greedy_reply(shared_server().base)
    store = tmp_path / "sessions.sqlite"
    r = subprocess.run([sys.executable, "-m", "infer", "chat", "--run", str(tiny_checkpoint()), "--store", str(store),
                        "--temperature", "0", "--max-tokens", "12"], input="hello\n\u200b\u200d\n/reset\nhello\n",
                       capture_output=True, text=True, encoding="utf-8", cwd=ROOT, timeout=600,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr[-2000:]
    # the same greedy reply as the server's chat endpoint, before and after /reset, each with its route
    assert r.stdout.count("assistant> " + want + "\n(tiny: ") == 2, r.stdout
    assert "(new conversation)" in r.stdout
    # the sanitizer refused the invisible-only line in one line, and the chat went on
    assert r.stdout.count("error: ") == 1 and "no visible text" in r.stdout
    # /reset started a second session in the agent's store; each holds its own turn
    from infer.agent.memory import ConversationStore

    kept = ConversationStore(store)
    try:
        sessions = kept.list()
        stored = [kept.messages(s["id"]) for s in sessions]
    finally:
        kept.close()
    assert len(sessions) == 2
    assert [[(m["role"], m["content"]) for m in msgs] for msgs in stored] == [[("user", "hello"),
                                                                                ("assistant", want)]] * 2
    assert stored[0][1]["meta"]["backend"] == "tiny" and stored[0][1]["meta"]["reason"]


def chat_command(base: str, stdin: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAXLM_API_KEY": API_KEY}
    return subprocess.run([sys.executable, "-m", "infer", "chat", "--url", base + "/v1", "--temperature", "0",
                           "--max-tokens", "12"], input=stdin, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def test_chat_command_against_servers_through_stdin():
    want = greedy_reply(shared_server().base)
    # a server with the agent API: the turns land in a session there, routed, with the reason printed
    agent = shared_agent_server()
    before = {s["id"] for s in agent.agent.store.list()}
    r = chat_command(agent.base, "hello\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("assistant> ") == 1 and "assistant> " + want + "\n(tiny: " in r.stdout, r.stdout
    new = [s for s in agent.agent.store.list() if s["id"] not in before]
    assert len(new) == 1
    assert [m["content"] for m in agent.agent.store.messages(new[0]["id"])] == ["hello", want]
    # a plain OpenAI-compatible server (no /v1/agent): /v1/chat/completions, the conversation kept here
    r = chat_command(shared_server().base, "hello\nsecond turn\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("assistant> ") == 2 and "assistant> " + want + "\n" in r.stdout
    assert "Traceback" not in r.stderr


def read_until(fd: int, marker: bytes, timeout: float = 120.0) -> bytes:
    out, deadline = b"", time.monotonic() + timeout
    while marker not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} not seen in {out[-500:]!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out


def test_chat_command_in_a_terminal():
    """Interactive use: a prompt, a streamed reply with its route, /reset, /exit."""
    agent = shared_agent_server()
    want = greedy_reply(shared_server().base)
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "infer", "chat", "--url", agent.base + "/v1", "--temperature",
                             "0", "--max-tokens", "12"], stdin=child, stdout=child, stderr=child, cwd=ROOT,
                            env={**os.environ, "JAXLM_API_KEY": API_KEY}, close_fds=True)
    os.close(child)
    try:
        read_until(main, b"you> ")
        os.write(main, b"hello\n")
        seen = read_until(main, b"you> ").decode(errors="replace").replace("\r\n", "\n")
        assert "assistant> " + want + "\n(tiny: " in seen, seen
        os.write(main, b"/reset\n")
        assert b"(new conversation)" in read_until(main, b"you> ")
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)


def test_chat_command_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "infer", "chat", "--url", "http://127.0.0.1:9/v1"], input="",
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--url=" in r.stderr
    r = subprocess.run([sys.executable, "-m", "infer", "chat", "--url", shared_agent_server().base + "/v1"],
                       input="", capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "JAXLM_API_KEY": "wrong-key"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "wrong API key" in r.stderr
    r = subprocess.run([sys.executable, "-m", "infer", "chat", "--run", str(tmp_path / "none")], input="",
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith("no such run or checkpoint directory")
