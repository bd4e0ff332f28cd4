"""Shared by the server tests: a tiny byte-level checkpoint and the real server on a loopback port.

The in-process server (uvicorn in a thread, `shared_server()`) is started once per pytest process
and shared by test_server.py and test_server_hostile.py: compiling the engine is the slow part.
The subprocess server (`ServeProcess`) is `python -m infer serve` itself, for what needs a process
of its own (SIGTERM, start-up refusals).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
CONTEXT = 1024  # long enough that a 1000-token generation outlasts a disconnect or a burst of requests
MODEL = dict(vocab_size=257, n_layers=1, d_model=32, n_heads=2, max_seq_len=CONTEXT, init_std=0.5)

_lock = threading.RLock()
_checkpoint: Path | None = None
_server: "InProcessServer | None" = None
_agent_server: "InProcessServer | None" = None


def save_tiny_run(run: Path, model: dict) -> Path:
    """Save a random gpt2-nano byte-level model with the settings `model` as run directory `run`
    (one checkpoint, step 1), as `python -m infer serve --run` reads it; returns `run`."""
    from flax import nnx

    from model import build_model, preset
    from model.checkpoint import save_model
    from model.tokenizer import ByteTokenizer

    weights = nnx.to_pure_dict(nnx.state(build_model(preset("gpt2-nano", **model), seed=0)))
    save_model(run / "checkpoints", 1, weights, {"model": {"preset": "gpt2-nano", **model}}, ByteTokenizer().to_json())
    return run


def serve_in_thread(app, *, backlog: int = 128):
    """Serve `app` with uvicorn in a daemon thread on a free 127.0.0.1 port, once /health answers 200.
    Returns (base URL, uvicorn server, thread); stop with `server.should_exit = True; thread.join()`."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_healthy(base)
    return base, server, thread


def tiny_checkpoint() -> Path:
    """A run directory holding a random 1-layer byte-level model (init_std 0.5: peaked logits, so
    greedy outputs do not hinge on float rounding), made once per process."""
    global _checkpoint
    with _lock:
        if _checkpoint is None:
            run = save_tiny_run(Path(tempfile.mkdtemp(prefix="jaxlm-serve-")) / "tiny", MODEL)
            _checkpoint = run
        return _checkpoint


def wait_healthy(base: str, timeout: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base}/health did not answer 200 within {timeout} s")


class InProcessServer:
    """create_app over one engine, served by uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, *, slots: int = 4, max_queue: int = 16, api_key: str | None = API_KEY, name: str = "tiny",
                 model=None, tokenizer=None, agent: bool = False):
        """Serves `model` (default: the tiny checkpoint's, loaded as `python -m infer serve` does); with
        `agent`, also the agent layer (the chat page, /v1/agent/*) over its engine, sessions in a temp SQLite file."""
        from infer.engine import Engine
        from infer.server.app import create_app
        from model.checkpoint import load_for_inference

        if model is None:
            loaded = load_for_inference(tiny_checkpoint())
            model, tokenizer = loaded.model, loaded.tokenizer
        self.tokenizer = tokenizer
        self.model = model
        self.engine = Engine(model, tokenizer, slots=slots, max_queue=max_queue, name=name)
        self.agent = None
        if agent:
            from infer.agent.memory import ConversationStore
            from infer.agent.route import RoutingPolicy
            from infer.agent.service import Agent

            store = ConversationStore(Path(tempfile.mkdtemp(prefix="jaxlm-agent-")) / "sessions.sqlite")
            self.agent = Agent(RoutingPolicy.default({name: self.engine}), store, max_tokens_default=48)
        self.app = create_app([self.engine], api_key=api_key, request_timeout_s=120, agent=self.agent)
        self.base, self.server, self.thread = serve_in_thread(self.app)
        self.port = int(self.base.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def shared_server() -> InProcessServer:
    global _server
    with _lock:
        if _server is None:
            _server = InProcessServer()
            atexit.register(_server.stop)
        return _server


def shared_agent_server() -> InProcessServer:
    """Like shared_server(), with the agent layer mounted (`.agent`: its Agent; replies 48 tokens by default)."""
    global _agent_server
    with _lock:
        if _agent_server is None:
            _agent_server = InProcessServer(agent=True)
            atexit.register(_agent_server.stop)
        return _agent_server


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


class ServeProcess:
    """`python -m infer serve ... --port 0` in a subprocess; the port is read from its stderr line."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "infer", "serve", "--port", "0", "--log-level", "warning",
                                      *args], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port: int | None = None
        found = threading.Event()

        def read():  # keep draining stderr so the child never blocks on a full pipe
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(120) or self.port is None:
            self.kill()
            raise RuntimeError("the server did not report its port:\n" + "".join(self.lines[-20:]))
        self.base = f"http://127.0.0.1:{self.port}"
        wait_healthy(self.base, proc=self.proc)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
