"""The OpenAI-compatible HTTP server over the continuous-batching engine (`python -m infer serve`).

protocol.py: request/response models and strict body parsing; app.py: the FastAPI app factory
(`create_app`); generation.py: one request's sequences in the engine, seen from the event loop;
metrics.py: Prometheus metrics; cli.py: the `serve` command. Importing this package imports no
web framework, so `python -m infer` works without the serve extra.
"""

from infer.server.cli import add_serve_parser, cmd_serve

__all__ = ["add_serve_parser", "cmd_serve"]
