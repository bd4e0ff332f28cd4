"""`python -m infer chat`: the terminal chat, on a checkpoint (its own engine) and against a running
server (the real one, on loopback), through standard input."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from openai import OpenAI

from infer.chat import LocalChat, RemoteChat, chat_loop, fit_to_window
from tests.infer.server_helpers import API_KEY, ROOT, shared_server, tiny_checkpoint

ONE = {"role": "user", "content": "hello"}


def test_fit_to_window_keeps_the_system_message_and_the_newest_turns():
    system = {"role": "system", "content": "S"}
    turns = [{"role": r, "content": f"{r}{i}"} for i in range(4) for r in ("user", "assistant")] + [ONE]

    def count(messages):  # 10 tokens a message
        return 10 * len(messages)

    kept = fit_to_window([system] + turns, count, 40)
    assert kept == [system, turns[-3], turns[-2], turns[-1]]  # starts at a user turn
    assert fit_to_window([ONE], count, 10) == [ONE]
    with pytest.raises(ValueError, match="does not fit the model's context"):
        fit_to_window([system, ONE], count, 15)


def run_loop(backend, text: str, **kw) -> str:
    out = io.StringIO()
    chat_loop(backend, iter(io.StringIO(text).readline, ""), out, system=kw.get("system"), max_tokens=12,
              temperature=0.0, seed=0)
    return out.getvalue()


def test_local_and_remote_chat_give_the_servers_greedy_replies():
    srv = shared_server()
    client = OpenAI(base_url=srv.base + "/v1", api_key=API_KEY, max_retries=0)
    want = client.chat.completions.create(model="tiny", messages=[ONE], max_tokens=12, temperature=0)
    want = want.choices[0].message.content

    remote = RemoteChat(srv.base + "/v1", None, API_KEY)
    try:
        assert "".join(remote.reply([ONE], 12, 0.0, 0)) == want
        transcript = run_loop(remote, "hello\n/reset\nhello\n")
    finally:
        remote.close()
    # the same first turn before and after /reset
    assert transcript.count("assistant> " + want + "\n") == 2 and "(new conversation)" in transcript

    local = LocalChat(str(tiny_checkpoint()), None)  # its own engine over the same checkpoint
    try:
        assert "".join(local.reply([ONE], 12, 0.0, 0)) == want
        assert run_loop(local, "hello\n").count("assistant> " + want + "\n") == 1
    finally:
        local.close()


def test_chat_command_against_a_server_through_stdin():
    srv = shared_server()
    env = {**os.environ, "JAXLM_API_KEY": API_KEY}
    r = subprocess.run([sys.executable, "-m", "infer", "chat", "--url", srv.base + "/v1", "--temperature", "0",
                        "--max-tokens", "8"], input="hello\nsecond turn\n/exit\nnever read\n", capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("assistant> ") == 2 and "Traceback" not in r.stderr


def test_chat_command_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "infer", "chat", "--url", "http://127.0.0.1:9/v1"], input="",
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--url=" in r.stderr
    r = subprocess.run([sys.executable, "-m", "infer", "chat", "--run", str(tmp_path / "none")], input="",
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith("no such run or checkpoint directory")
