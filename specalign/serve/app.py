"""The asyncio side: ``Server`` (the bounded queue, its one dispatcher, request handling, server-sent
events) and ``create_app`` (FastAPI routes and OpenAI-style errors)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from starlette.exceptions import HTTPException

from ..decode.api import DecodeConfig
from .protocol import ChatCompletionRequest, CompletionRequest, RequestError, ServeConfig, message_text, \
    request_config
from .worker import Job, Worker

log = logging.getLogger("specalign.serve")

PING_SECONDS = 15  # a comment event on a stream with nothing else to send for this long


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None):
    kind = {404: "not_found_error", 429: "rate_limit_error"}.get(status, "invalid_request_error"
                                                                  if status < 500 else "server_error")
    return JSONResponse(error_body(message, param, kind, code), status_code=status, headers=headers)


async def client_gone(request) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    def __init__(self, worker: Worker, config: DecodeConfig, serve: ServeConfig, port: int):
        self.worker, self.config, self.serve, self.port = worker, config, serve, port
        self.name = serve.served_model_name or config.model
        self.created = int(time.time())
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specalign-worker")
        self.current: list[Job] = []
        self.counts = {"completed": 0, "cancelled": 0, "invalid": 0, "failed": 0, "rejected": 0}
        self.seconds_per_run = 1.0  # moving average, for Retry-After

    # -- the queue and its one consumer ----------------------------------------------------------
    async def dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        carry: Job | None = None
        while True:
            job, carry = carry or await self.queue.get(), None
            if job.cancelled.is_set():
                self.counts["cancelled"] += 1
                continue
            batch, key = [job], job.batch_key
            while key is not None and len(batch) < self.serve.max_batch_size and not self.queue.empty():
                nxt = self.queue.get_nowait()
                if nxt.batch_key == key:
                    batch.append(nxt)
                else:
                    carry = nxt
                    break
            self.current = batch
            start = time.monotonic()
            try:
                outcomes = await loop.run_in_executor(self.executor, self.worker.run, batch)
            except Exception:  # Worker.run answers every job itself; this only keeps the dispatcher alive
                log.exception("worker failed")
                outcomes = ["failed"] * len(batch)
            finally:
                self.current = []
            self.seconds_per_run = 0.8 * self.seconds_per_run + 0.2 * (time.monotonic() - start)
            for outcome in outcomes:
                self.counts[outcome] += 1
            if carry is None and self.queue.empty():
                await loop.run_in_executor(self.executor, self.worker.release, True)

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self.seconds_per_run * (self.queue.qsize() + 1))))

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "method": self.config.method,
                "queue": {"waiting": self.queue.qsize() if self.queue else 0, "size": self.serve.queue_size,
                          "running": len(self.current)},
                "requests": dict(self.counts)}

    # -- one request -----------------------------------------------------------------------------
    def make_job(self, kind: str, req) -> Job:
        if kind == "chat":
            if req.logprobs:
                raise RequestError("logprobs are not supported by this server", "logprobs")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content)}
                        for m in req.messages]
            if not any(m["content"].strip() for m in messages):
                raise RequestError("empty prompt: every prompt must contain text", "messages")
            payload = messages
        else:
            if req.logprobs or req.echo:
                raise RequestError("logprobs and echo are not supported by this server",
                                   "logprobs" if req.logprobs else "echo")
            payload = req.prompt
            if isinstance(payload, list) and payload and isinstance(payload[0], str):
                if len(payload) != 1:
                    raise RequestError(f"send one prompt per request, got {len(payload)}", "prompt")
                payload = payload[0]
            if not payload or isinstance(payload, str) and not payload.strip():
                raise RequestError("empty prompt: every prompt must contain text", "prompt")
        cfg, n, seeded = request_config(self.config, req, self.serve)
        return Job(kind, cfg, n, seeded, req.stream, payload, asyncio.get_running_loop())

    async def next_event(self, job: Job, gone: asyncio.Future):
        """The job's next event, or None (and the job cancelled) if the client disconnects first."""
        get = asyncio.ensure_future(job.events.get())
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        job.cancel()
        return None

    async def handle(self, kind: str, req, request: Request):
        if req.model not in (self.name, self.config.model):
            return error_response(404, f"The model '{req.model}' does not exist: this server serves '{self.name}' "
                                  "(GET /v1/models)", "model", "model_not_found")
        try:
            job = self.make_job(kind, req)
        except RequestError as exc:
            self.counts["invalid"] += 1
            return error_response(exc.status, str(exc), exc.param)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counts["rejected"] += 1
            wait = self.retry_after()
            return error_response(429, f"the server is busy ({self.serve.queue_size} requests waiting): retry in "
                                  f"{wait} s", code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
        gone = asyncio.ensure_future(client_gone(request))
        try:
            event = await self.next_event(job, gone)
            if event is not None and event[0] == "started":
                if job.stream:
                    return StreamingResponse(self.events(job, kind, req), media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache"})
                event = await self.next_event(job, gone)
            if event is None:
                return Response(status_code=499)  # nobody is listening any more
            if event[0] == "error":
                return error_response(event[1].status, str(event[1]), event[1].param)
            return JSONResponse(self.body(job, kind, event[1]))
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            gone.cancel()

    def body(self, job: Job, kind: str, result: dict) -> dict:
        choices = result["choices"]
        completion = sum(c["tokens"] for c in choices)
        usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": completion,
                 "total_tokens": result["prompt_tokens"] + completion}
        if kind == "chat":
            out = [{"index": k, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                    "finish_reason": c["finish_reason"]} for k, c in enumerate(choices)]
        else:
            out = [{"index": k, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
                   for k, c in enumerate(choices)]
        return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
                "model": self.name, "choices": out, "usage": usage, "specalign": result["specalign"]}

    async def events(self, job: Job, kind: str, req):
        """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``."""
        head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.name}
        started: set[int] = set()

        def chunk(index: int, text: str | None, finish: str | None = None, **extra) -> bytes:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if index not in started:
                    delta = {"role": "assistant", **delta}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            started.add(index)
            return format_sse_event(data_str=json.dumps({**head, "choices": [choice], **extra}))

        try:
            if kind == "chat":
                yield chunk(0, "")  # the role at once, as OpenAI does; a ranked answer follows at the end
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), PING_SECONDS)
                except asyncio.TimeoutError:
                    yield format_sse_event(comment="ping")  # keeps proxies from closing a quiet stream
                    continue
                if event[0] == "delta":
                    yield chunk(event[1], event[2])
                elif event[0] == "error":
                    exc = event[1]
                    yield format_sse_event(data_str=json.dumps(error_body(str(exc), exc.param)))
                    return
                elif event[0] == "result":
                    result = event[1]
                    choices = result["choices"]
                    for k, c in enumerate(choices):
                        extra = {"specalign": result["specalign"]} if k == len(choices) - 1 else {}
                        yield chunk(k, None, c["finish_reason"], **extra)
                    if req.stream_options is not None and req.stream_options.include_usage:
                        usage = self.body(job, kind, result)["usage"]
                        yield format_sse_event(data_str=json.dumps({**head, "choices": [], "usage": usage}))
                    yield format_sse_event(data_str="[DONE]")
                    return
        finally:
            job.cancel()  # a client that disconnects mid-stream stops the work; after the result it is a no-op


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.queue = asyncio.Queue(server.serve.queue_size)
        task = asyncio.create_task(server.dispatch())
        print(f"specalign serve: '{server.name}' ({server.config.method}) on "
              f"http://{server.serve.host}:{server.port}/v1", file=sys.stderr, flush=True)
        yield
        for job in server.current:
            job.cancel()
        while not server.queue.empty():
            server.queue.get_nowait().cancel()
        task.cancel()
        server.executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="specalign", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        server.counts["invalid"] += 1
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        return error_response(400, f"{where}: {first['msg']}" if where else first["msg"], loc[0] if loc else None)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        log.exception("request failed")
        return error_response(500, f"{type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "specalign"}]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model not in (server.name, server.config.model):
            return error_response(404, f"The model '{model}' does not exist", "model", "model_not_found")
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "specalign"}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await server.handle("chat", req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await server.handle("completion", req, request)

    return app
