"""``specalign serve``: an OpenAI-compatible HTTP server over the decode API.

    specalign serve --config x.yaml [--host 127.0.0.1 --port 8000 --queue-size 16]

loads the models of a ``DecodeConfig`` once and serves ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models`` and ``GET /health`` (FastAPI on uvicorn).

Design, in three modules:

- ``worker.py``: ``Worker`` owns the models and runs in one thread. It keeps the target, its tokenizer,
  one generator per kind (sample / speculative / sss, drafts loaded once) and a small cache of scorers
  by spec; a request's overrides (method, n, alpha, scorer, ...) give a new ``DecodeConfig`` and a new
  selector over them, never a reload of the target. Generators call ``on_step`` after every step:
  ``Progress`` streams the new text from there and stops the work of a client that went away.
- ``app.py``: the asyncio side. A request becomes a ``Job`` in a bounded ``asyncio.Queue`` (full: 429
  with Retry-After); one dispatcher task hands jobs to the worker thread, one at a time, except that
  waiting plain-sampling requests with the same settings go together as one batch. Each job has an
  event queue (started, delta, result, error) that the request handler reads; ``create_app`` has the
  routes, OpenAI-style errors (``{"error": {"message", "type", "param", "code"}}``) and server-sent
  events for ``stream: true``.
- ``protocol.py``: the server settings (``ServeConfig``), the pydantic request models, and a request's
  ``DecodeConfig``, checked field by field with the CLI's rules and messages.
"""

from __future__ import annotations

import socket
from dataclasses import replace

from ..decode.api import DecodeConfig
from ..errors import SpecError
from .protocol import ServeConfig

__all__ = ["ServeConfig", "main"]


def listen(host: str, port: int) -> socket.socket:
    """Bind the port before any model loads: a port in use fails at once, with the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SpecError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port "
                        "(0 = any free port)") from None
    sock.listen(2048)
    return sock


def main(args: list[str]) -> int:
    import uvicorn
    from ..cli import parse_config
    from .app import Server, create_app
    from .worker import Worker
    serve, config = parse_config([ServeConfig, DecodeConfig], args, "specalign serve")
    serve.validate()
    if config.num_processes != 1:
        raise SpecError("serve runs one worker that owns the models: remove num-processes")
    config = replace(config, prompt=None, prompts=None, out=None, shard="", return_candidates=False).validate()
    sock = listen(serve.host, serve.port)
    worker = Worker(config, serve)
    server = Server(worker, config, serve, sock.getsockname()[1])
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level=serve.log_level, timeout_graceful_shutdown=5,
                                       timeout_keep_alive=serve.keep_alive))
    uv.run(sockets=[sock])
    return 0
