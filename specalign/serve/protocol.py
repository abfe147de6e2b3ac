"""The request side: server settings, the pydantic request models, and a request's ``DecodeConfig``
(checked field by field with the CLI's rules and messages; a bad field is a ``RequestError`` naming it)."""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict, Field

from ..decode.api import DecodeConfig
from ..errors import SpecError

SELECTORS = ("best-of-n", "spec-rejection")  # methods that rank candidates; the others sample


@dataclass
class ServeConfig:
    """Server settings; YAML keys and flags beside the ``DecodeConfig`` ones."""
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on (0 = any free port, printed at start)"})
    served_model_name: str = field(default="", metadata={"help": "the model id clients send (default: --model)"})
    queue_size: int = field(default=16, metadata={"help": "requests that may wait for the worker; more get 429"})
    max_batch_size: int = field(default=8, metadata={"help": "waiting plain-sampling requests decoded as one batch"})
    max_candidates: int = field(default=64, metadata={"help": "the largest n / best_of a request may ask for"})
    scorer_cache: int = field(default=4, metadata={"help": "scorers kept loaded for per-request 'scorer'"})
    allow_python_scorers: bool = field(default=False, metadata={"help": "let requests name python:module:function "
                                                                          "scorers other than the server's"})
    keep_alive: int = field(default=75, metadata={"help": "seconds an idle connection stays open: longer than the "
                                                          "clients' own (httpx: 5), so that a client never sends on a "
                                                          "connection the server is closing"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level: debug | info | warning | error"})

    def validate(self) -> "ServeConfig":
        if not 0 <= self.port <= 65535:
            raise SpecError(f"port must be in [0, 65535], got {self.port}")
        for name in ("queue_size", "max_batch_size", "max_candidates", "scorer_cache", "keep_alive"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise SpecError(f"unknown log-level '{self.log_level}': use debug, info, warning or error")
        return self


# -- requests -----------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields this server does not use (user, metadata, ...)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # specalign's fields (``extra_body`` in the openai client)
    method: str | None = None
    best_of: int | None = None
    alpha: float | str | None = None
    decision: str | None = None
    scorer: str | None = None
    gamma: int | None = None
    shift_lambda: float | None = Field(default=None, allow_inf_nan=False)
    top_k: int | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False


class RequestError(SpecError):
    """A bad request: 400 with ``param`` naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@contextlib.contextmanager
def as_param(param: str):
    """A ``SpecError`` raised inside names the request field ``param``."""
    try:
        yield
    except RequestError:
        raise
    except SpecError as exc:
        raise RequestError(str(exc), param) from None


def request_config(base: DecodeConfig, req: _Request, serve: ServeConfig) -> tuple[DecodeConfig, int, bool]:
    """The request's ``DecodeConfig`` (checked field by field with the CLI's rules and messages), the number
    of choices to return, and whether the request fixed the seed."""
    n = 1 if req.n is None else req.n
    if n < 1:
        raise RequestError(f"n must be >= 1, got {n}", "n")
    method = req.method if req.method is not None else base.method
    steps: list[tuple[str, str, object]] = []  # (request field, DecodeConfig field, value), checked in order
    if req.method is not None:
        steps.append(("method", "method", req.method))
    if req.best_of is not None and method not in SELECTORS:
        raise RequestError(f"best_of applies to best-of-n and spec-rejection; method '{method}' returns n "
                           "independent samples: drop best_of or pick one of those methods", "best_of")
    if method in SELECTORS:
        best_of = req.best_of if req.best_of is not None else max(base.n, n)
        param = "best_of" if req.best_of is not None else "n"
        if req.best_of is not None and best_of < n:
            raise RequestError(f"best_of must be >= n ({n}), got {best_of}", "best_of")
        if best_of > serve.max_candidates:
            raise RequestError(f"{param} must be <= {serve.max_candidates} (the server's --max-candidates), "
                               f"got {best_of}", param)
        steps.append((param, "n", best_of))
    elif n > serve.max_candidates:
        raise RequestError(f"n must be <= {serve.max_candidates} (the server's --max-candidates), got {n}", "n")
    if req.alpha is not None:
        steps.append(("alpha", "alpha", str(req.alpha)))
    for name in ("decision", "gamma", "shift_lambda", "temperature", "top_p", "top_k", "scorer"):
        if getattr(req, name) is not None:
            steps.append((name, name, getattr(req, name)))
    max_tokens = getattr(req, "max_completion_tokens", None)
    tokens_param = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    max_tokens = max_tokens if max_tokens is not None else req.max_tokens
    if max_tokens is not None:
        steps.append((tokens_param, "max_new_tokens", max_tokens))
    if req.stop is not None:
        steps.append(("stop", "stop", [req.stop] if isinstance(req.stop, str) else list(req.stop)))
    seeded = req.seed is not None
    steps.append(("seed", "seed", req.seed if seeded else secrets.randbelow(2**31)))

    cfg = replace(base, stop=list(base.stop))
    for param, name, value in steps:
        setattr(cfg, name, value)
        with as_param(param):
            cfg.validate()
    spec = cfg.scorer
    if spec.startswith("python:") and spec != base.scorer and not serve.allow_python_scorers:
        raise RequestError(f"scorer '{spec}' is a Python callable: a request may name one only when the server "
                           "runs with --allow-python-scorers true", "scorer")
    return cfg, n, seeded


def message_text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text":
            raise RequestError(f"content of type '{part.type}' is not supported: send text", "messages")
        parts.append(part.text or "")
    return "".join(parts)
