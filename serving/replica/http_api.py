"""The OpenAI-compatible HTTP API of a replica: FastAPI routes on the replica's own engine,
scheduler, keys and metrics, so HTTP and gRPC requests share the same step batches and the
same tenant rules.

Serve serves it as the deployment's HTTP ingress (serving/replica/app.py: `serve.ingress()`
calls `build_http_app(replica)` in the replica). Routes:
- `POST /v1/completions`: OpenAI's completions (serving/rpc/openai_schema.py says what is
  taken and how `model` names a task), unary or streamed as server-sent events ending with
  `data: [DONE]`;
- `GET /v1/models`: the tasks the caller can call, as ListTasks lists them, paged the same
  way (`?page_size=&page_token=`; `next_page_token` in the reply);
- `/v1/chat/completions`: 404 saying T5 is not a chat model; every other path a short JSON 404.

Auth: `Authorization: Bearer <key>`, the gRPC key file. Errors: OpenAI's error body with the
status of the error (401, 403, 404, 400, 413, 429, 503, ...). Bounds before work: the body's
size before it is parsed (413), the number of completions and each text's bytes before any
text is tokenized (400), as on gRPC. Metrics: the RPC metrics' names, `protocol="http"`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from promptmux.prompts.errors import InvalidRequestError, PromptmuxError, TaskNotFoundError

from ..rpc.message_limits import http_max_body_bytes
from ..rpc.openai_schema import (
    FINISH_REASON,
    PayloadTooLargeError,
    completion_body,
    completion_call,
    error_body,
    model_entry,
    stream_chunk,
    usage_chunk,
)
from ..rpc.pagination import page
from ..rpc.streaming import TextDeltas
from .metrics import task_label

if TYPE_CHECKING:
    from .server import PromptmuxServer

ROUTES = "POST /v1/completions and GET /v1/models (health: GET /-/healthz)"


class _HTTPCall:
    """One HTTP call's metrics, recorded once on the way out (as _Observed does for gRPC)."""

    def __init__(self, server: "PromptmuxServer", method: str) -> None:
        self.server, self.method = server, method
        self.started = time.perf_counter()
        self.tenant = self.task = ""
        self.status = "OK"

    def finish(self, status: str | None = None) -> None:
        status, seconds = status or self.status, time.perf_counter() - self.started
        self.server._metrics.rpc_finished(self.method, self.tenant, self.task, status, seconds, protocol="http")
        self.server._access.record("http", self.method, self.tenant, status, seconds)


def _error(error: PromptmuxError, call: _HTTPCall | None = None) -> JSONResponse:
    status, body = error_body(error)
    if call is not None:
        call.finish(error.status)
    return JSONResponse(body, status_code=status)


def _not_found(message: str) -> JSONResponse:
    return _error(TaskNotFoundError(message))


def build_http_app(server: "PromptmuxServer") -> FastAPI:
    """The ASGI app of one replica, bound to it."""
    config = server._config
    body_limit = http_max_body_bytes(config)
    api = FastAPI(title="promptmux", docs_url=None, redoc_url=None, openapi_url=None)

    async def read_json(request: Request) -> Any:
        """The body, refused with 413 as soon as it passes the limit (before it is parsed)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > body_limit:
            raise PayloadTooLargeError(_too_large(int(declared), body_limit))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > body_limit:
                raise PayloadTooLargeError(_too_large(size, body_limit))
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidRequestError(f"the request body is not valid JSON ({error}); send a JSON object") from None

    def authenticate(request: Request, call: _HTTPCall):
        principal = server._keys.authenticate(request.headers.items())
        call.tenant = principal.tenant
        return principal

    @api.post("/v1/completions")
    async def completions(request: Request):
        call = _HTTPCall(server, "Completions")
        try:
            principal = authenticate(request, call)
            parsed = completion_call(await read_json(request), principal.tenant,
                                     config.serving.max_in_flight_per_tenant)
            call.task = task_label(parsed.rows[0])
            # Validated and tokenized once each by the replica's preparer, as gRPC requests are (bytes first).
            prepared = await asyncio.gather(*(server._preparer.prepare(r) for r in parsed.rows))
        except PromptmuxError as error:
            return _error(error, call)
        created, call_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        if parsed.stream:
            return await _stream(server, call, parsed, prepared, call_id, created)
        jobs = [asyncio.ensure_future(server._scheduler.submit(p)) for p in prepared]
        try:
            results = await asyncio.gather(*jobs)
        except PromptmuxError as error:
            return _error(error, call)
        finally:
            for job in jobs:
                job.cancel()  # no-op once done; frees the others' places when one failed
        for row, result in zip(parsed.rows, results):
            server._metrics.tokens(row, result)
        call.finish()
        return completion_body(call_id, created, parsed.model, results, server._engine.context.eos_token_id)

    @api.get("/v1/models")
    async def models(request: Request, page_size: int = 0, page_token: str = ""):
        call = _HTTPCall(server, "Models")
        try:
            principal = authenticate(request, call)
            visible = await asyncio.to_thread(server._prompts.visible_to, principal.tenant)
            chosen, next_token = page([(name, (name, meta)) for name, meta in visible], page_size, page_token,
                                      f"tasks:{principal.tenant}")
        except PromptmuxError as error:
            return _error(error, call)
        call.finish()
        return {"object": "list", "data": [model_entry(name, meta) for name, meta in chosen],
                "has_more": bool(next_token), "next_page_token": next_token}

    @api.api_route("/v1/chat/completions", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def chat(request: Request):
        return _not_found("/v1/chat/completions is not served: the model is T5, an encoder-decoder that maps an input "
                          "text to an output text, not a chat model; send the text as `prompt` to POST /v1/completions")

    @api.exception_handler(HTTPException)
    async def unknown_route(request: Request, error: HTTPException):
        if error.status_code == 404:
            return _not_found(f"no route {request.method} {request.url.path[:200]}; this server answers {ROUTES}")
        if error.status_code == 405:
            return JSONResponse(error_body(PromptmuxError(
                f"{request.method} is not allowed on {request.url.path[:200]}; this server answers {ROUTES}"))[1],
                status_code=405)
        return JSONResponse({"error": {"message": str(error.detail), "type": "invalid_request_error",
                                       "param": None, "code": None}}, status_code=error.status_code)

    return api


def _too_large(size: int, limit: int) -> str:
    return (f"the request body is {size} bytes or more, over the limit of {limit} (the largest legal completions call: "
            "serving.max_in_flight_per_tenant texts of engine.max_input_bytes each); send fewer or shorter prompts")


async def _stream(server: "PromptmuxServer", call: _HTTPCall, parsed, prepared, call_id: str,
                  created: int):
    """Server-sent events: each row's text deltas as its tokens come, its last chunk with its
    finish_reason, the usage if asked, then `data: [DONE]`. Refusals at admission (a full
    queue, the tenant's limit) still answer with their status: nothing is sent before every
    row is queued."""
    events: asyncio.Queue = asyncio.Queue()  # (row, token ids or None: the row ended)
    jobs = []
    for row, item in enumerate(prepared):
        job = asyncio.ensure_future(server._scheduler.submit(item, on_token=lambda t, r=row: events.put_nowait((r, t))))
        job.add_done_callback(lambda _, r=row: events.put_nowait((r, None)))
        jobs.append(job)
    await asyncio.sleep(0)  # each submit runs up to its queue place: an admission refusal is raised by now
    refused = next((job.exception() for job in jobs if job.done() and job.exception() is not None), None)
    if refused is not None:
        for job in jobs:
            job.cancel()
        return _error(refused if isinstance(refused, PromptmuxError) else PromptmuxError(str(refused)), call)
    model = parsed.model

    async def body() -> AsyncIterator[bytes]:
        deltas = [TextDeltas(server._engine.detokenize, p.params.stop) for p in prepared]
        results: list = [None] * len(prepared)
        open_rows, status = len(prepared), "OK"
        try:
            while open_rows:
                row, token = await events.get()
                if token is not None:
                    delta = deltas[row].push([token])
                    if delta:
                        yield _sse(stream_chunk(call_id, created, model, row, delta, None))
                    continue
                open_rows -= 1
                job = jobs[row]
                if job.cancelled() or job.exception() is not None:
                    error = job.exception() if not job.cancelled() else PromptmuxError("cancelled")
                    status = getattr(error, "status", "INTERNAL")
                    yield _sse(error_body(error if isinstance(error, PromptmuxError) else PromptmuxError(str(error)))[1])
                    continue
                result = results[row] = job.result()
                server._metrics.tokens(parsed.rows[row], result)
                yield _sse(stream_chunk(call_id, created, model, row, deltas[row].finish(result.text),
                                        FINISH_REASON.get(result.finish_reason, "stop")))
            if parsed.include_usage and status == "OK":
                yield _sse(usage_chunk(call_id, created, model, results))
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        finally:
            for job in jobs:
                job.cancel()  # the client went away: its rows leave the queue or their slots
            call.finish(status)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
