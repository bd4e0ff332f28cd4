"""`python -m infer serve`: load checkpoints, start one engine per model, serve the HTTP app.

    python -m infer serve --run runs/quickstart --port 8000
    JAXLM_API_KEY=secret python -m infer serve --run a=runs/a --run b=runs/b --host 0.0.0.0
    python -m infer serve --run runs/llama --mesh tensor=8 --slots 32   # one model over 8 devices
    python -m infer serve --run tiny=runs/tiny --policy experiments/hybrid.yaml --memory chats.sqlite

Every server also carries the agent layer (infer/agent/): the chat page at `/` and /v1/agent/*,
routing over the policy file given with --policy (default: every served model as a local
backend), conversations in the SQLite file --memory (default: agent.sqlite in the first run dir).

Safe defaults: binds 127.0.0.1; any other address needs an API key (refused at start-up otherwise).
SIGTERM drains: new requests get 503, running ones finish within --drain-timeout, then the process
exits 0 (a second SIGTERM or Ctrl-C stops at once).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

API_KEY_ENV = "JAXLM_API_KEY"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on `python -m infer`'s subcommands."""
    p = subparsers.add_parser("serve", help="serve checkpoints over an OpenAI-compatible HTTP API",
                              description="Continuous-batching engine(s) behind /v1/completions, "
                                          "/v1/chat/completions, /v1/models, /health and /metrics.")
    p.add_argument("--run", action="append", required=True, metavar="[NAME=]RUN_DIR",
                   help="run directory (or its checkpoints/ directory) to serve, as model NAME (default: the "
                        "directory's name); repeat for several models")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed on stderr)")
    p.add_argument("--slots", type=int, default=8, help="sequences generated together per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a slot before 429 (default 64)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: ${API_KEY_ENV})")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take before it is cancelled (default 600)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish (default 30)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help="int8: weight-only int8 weights")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser origin allowed by CORS (repeatable; no wildcard; default: none)")
    p.add_argument("--policy", default=None, metavar="FILE",
                   help="routing policy (YAML) of the agent layer: local and remote backends and the rules over "
                        "them (default: every served model as a local backend, in --run order)")
    p.add_argument("--memory", default=None, metavar="SQLITE_PATH",
                   help="the agent's conversation store, a SQLite file (default: agent.sqlite in the first --run "
                        "directory; ':memory:' keeps nothing)")
    p.add_argument("--summarize", action="store_true",
                   help="agent: turns that no longer fit a prompt are summarized by the answering model and the "
                        "summary kept in the system message (default: they are only left out)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    from infer.cli import add_mesh_arguments

    add_mesh_arguments(p)  # --mesh tensor=8: weights and KV cache split over this host's devices
    p.set_defaults(func=cmd_serve)
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def parse_runs(values: list[str]) -> dict[str, str]:
    """{model name: run dir} from `--run [NAME=]DIR` values."""
    from infer.cli import UserError

    runs: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name or not name:
            name, path = None, value
        if name is None:
            p = Path(path).resolve()
            name = p.parent.name if p.name == "checkpoints" else p.name
        if name in runs:
            raise UserError(f"--run: the model name {name!r} is given twice; name them with NAME=DIR")
        runs[name] = path
    return runs


def check_serve_args(args: argparse.Namespace) -> str | None:
    """Reject impossible settings before anything heavy runs; the API key (flag or environment)."""
    from infer.cli import UserError

    if not 1 <= args.slots <= 1024:
        raise UserError(f"--slots={args.slots} must be in [1, 1024]")
    if not 1 <= args.max_queue <= 100_000:
        raise UserError(f"--max-queue={args.max_queue} must be in [1, 100000]")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port={args.port} must be in [0, 65535]")
    if not args.request_timeout > 0:
        raise UserError(f"--request-timeout={args.request_timeout} must be > 0 seconds")
    if not args.drain_timeout >= 0:
        raise UserError(f"--drain-timeout={args.drain_timeout} must be >= 0 seconds")
    if "*" in args.allow_origin:
        raise UserError("--allow-origin: a wildcard origin is not allowed; name the origins (e.g. http://localhost:3000)")
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        raise UserError("--api-key must not be empty")
    if not _is_loopback(args.host) and key is None:
        raise UserError(f"--host={args.host} is not a loopback address; serving it without an API key would let "
                        f"anyone on the network use the model: set --api-key or {API_KEY_ENV}, or bind 127.0.0.1")
    return key


def _bind(host: str, port: int) -> socket.socket:
    from infer.cli import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot bind {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    from infer.cli import UserError, load_on_mesh

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"{e.name} is not installed; install the serve extra: pip install -e \".[serve]\"") from None
    key = check_serve_args(args)
    runs = parse_runs(args.run)
    for name, path in runs.items():
        if not Path(path).is_dir():
            raise UserError(f"--run={path}: no such run or checkpoint directory")
    if args.mesh:  # its syntax before binding; whether it splits each model, before each loads
        from sharding.mesh import parse_mesh
        from sharding.rules import ShardingError

        try:
            parse_mesh(args.mesh)
        except ShardingError as e:
            raise UserError(str(e)) from None
    policy = _read_policy(args.policy, runs)  # a wrong policy file: one line, before any model loads
    store = _open_store(_memory_path(args.memory, runs))
    sock = _bind(args.host, args.port)  # before loading: a taken port fails in a second, not after minutes

    from infer.engine import Engine
    from infer.server.app import create_app

    engines = []
    for name, path in runs.items():
        # the chat template travels in the tokenizer (jaxlm's own, or an imported model's Jinja one)
        loaded, layout = load_on_mesh(path, None, args.mesh, args.rules, args.slots)
        if layout is not None:
            print(f"{name}: weights and KV cache split over {layout.describe()}, rules {args.rules}",
                  file=sys.stderr, flush=True)
        engines.append(Engine(loaded.model, loaded.tokenizer, slots=args.slots, max_queue=args.max_queue, name=name,
                              quantize=None if args.quantize == "none" else args.quantize, layout=layout))
    agent = _make_agent(policy, engines, store, summarize=args.summarize)
    app = create_app(engines, api_key=key, request_timeout_s=args.request_timeout,
                     cors_origins=args.allow_origin, shutdown_grace_s=args.drain_timeout, agent=agent)
    state = app.state.jaxlm
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, lifespan="on",
                            access_log=args.log_level == "debug")
    server = _DrainingServer(config, state, args.drain_timeout, engines)
    host, port = sock.getsockname()[:2]
    print(f"serving {', '.join(runs)} on http://{host}:{port} (GET /health is 200 once compiled)",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        agent.store.close()
    return 0


def _read_policy(path: str | None, runs: dict[str, str]):
    """The parsed --policy file checked against the served model names (None: the default policy)."""
    from infer.agent.route import PolicyError, RoutingPolicy
    from infer.cli import UserError

    if path is None:
        return None
    try:
        policy = RoutingPolicy.load(path)
        policy.check_engines(runs)
        policy.check_environment()
    except PolicyError as e:
        raise UserError(f"--policy {e}") from None
    return policy


def _memory_path(path: str | None, runs: dict[str, str]) -> str:
    """--memory, or agent.sqlite in the first run directory (its parent when given checkpoints/)."""
    if path is not None:
        return path
    first = Path(next(iter(runs.values()))).resolve()
    return str((first.parent if first.name == "checkpoints" else first) / "agent.sqlite")


def _open_store(path: str):
    from infer.agent.memory import ConversationStore
    from infer.cli import UserError

    try:
        return ConversationStore(path)
    except (ValueError, OSError) as e:
        raise UserError(f"--memory={path}: {str(e).splitlines()[0]}") from None


def _make_agent(policy, engines, store, summarize: bool = False):
    """The agent layer over the loaded engines: its router and the conversation store."""
    from infer.agent.route import PolicyError, RoutingPolicy
    from infer.agent.service import Agent
    from infer.cli import UserError

    try:
        router = RoutingPolicy.default(engines) if policy is None else policy.build(engines)
    except PolicyError as e:
        raise UserError(f"--policy {e}") from None
    return Agent(router, store, summarize=summarize)


class _DrainingServer:
    """uvicorn.Server whose first SIGTERM drains instead of stopping at once."""

    def __new__(cls, config, state, grace_s: float, engines):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if sig == signal.SIGTERM and not state.draining:
                    state.draining = True  # from here on: 503 for new requests, /health 503
                    threading.Thread(target=self._drain, name="drain", daemon=True).start()
                    return  # not recorded: uvicorn re-raises recorded signals after its shutdown
                super().handle_exit(sig, frame)

            def _drain(self):
                logging.getLogger("infer.server").info("SIGTERM: draining (up to %.0f s)", grace_s)
                if not state.idle.wait(grace_s):
                    for engine in engines:  # past the grace period: cancel what still runs
                        engine.shutdown(grace_s=0.0)
                    state.idle.wait(5.0)
                self.should_exit = True

        return Server(config)
