"""The HTTP app: OpenAI's endpoints over one served model, plus /health, /metrics and the playground page.

`create_app(served, settings)` is importable by tests and by `tokenmill serve`. Bodies are read here (with a
size limit) and validated by `schema`, not by FastAPI, so that every bad request gets OpenAI's error JSON
rather than FastAPI's 422 shape. Streams are a plain `StreamingResponse` of `data: <json>\\n\\n` events, the
framing every OpenAI client parses. Generation runs on the scheduler's worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenmill.serve import completions, schema
from tokenmill.serve.metrics import ServerMetrics
from tokenmill.serve.scheduler import Scheduler

if TYPE_CHECKING:
    from tokenmill.serve.config import ServeSettings
    from tokenmill.serve.loading import ServedModel

LOG = logging.getLogger("tokenmill.serve")
OPEN_PATHS = ("/health", "/")  # the playground page holds no data; its requests carry the key the user types
DISCONNECT_POLL_S = 0.2
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def create_app(served: ServedModel, settings: ServeSettings) -> FastAPI:
    """A FastAPI app serving `served`; its scheduler starts and stops with the app's lifespan."""
    scheduler = Scheduler(served.generator, settings.max_batch, settings.max_queue)
    metrics = ServerMetrics(scheduler.queue_depth, scheduler.running)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        LOG.info(
            "serving %s (context %d tokens, chat %s) with batches of up to %d",
            settings.model_name,
            served.context_tokens,
            "on" if served.chat_template else "off (base model)",
            settings.max_batch,
        )
        yield
        scheduler.stop(settings.shutdown_timeout_s)

    app = FastAPI(title="tokenmill", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_name,
            "queue_depth": scheduler.queue_depth(),
            "running": scheduler.running(),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served.model_card(settings)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        completions.check_model_name(model_id, settings)
        return served.model_card(settings)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        page = resources.files("tokenmill.serve").joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL}}", html.escape(settings.model_name)))

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await _answer(request, "/v1/completions", schema.CompletionRequest, completions.plan_completion)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await _answer(request, "/v1/chat/completions", schema.ChatRequest, completions.plan_chat)

    async def _answer(request: Request, endpoint: str, request_cls: type, plan_fn: Any) -> Response:
        arrived = time.perf_counter()
        record = completions.RequestRecord(endpoint, 200, queue_depth=scheduler.queue_depth())
        try:
            body = await _read_body(request, settings.max_body_bytes)
            plan = plan_fn(schema.parse_request(body, request_cls), served, settings)
            plan.record = record
            record.request_id, record.prompt_tokens = plan.env.id, plan.prompt_tokens()
            job = scheduler.submit(plan.prompts, plan.params, arrived, settings.retry_after_s)
            record.prompt_tokens = job.prompt_tokens()
        except schema.APIError as err:
            record.status, record.outcome = err.status, "rejected"
            record.latency_s = time.perf_counter() - arrived
            metrics.record(record)
            raise
        if plan.stream:
            return StreamingResponse(
                _recorded(completions.stream(plan, job), job, record, arrived),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            answer = await completions.collect(plan, job)
        except BaseException as err:  # a failure, or the handler cancelled
            failed = isinstance(err, schema.APIError)
            record.status, record.outcome = (err.status, "error") if failed else (499, "cancelled")
            job.cancel()
            raise
        finally:
            watcher.cancel()
            if watcher.done() and not watcher.cancelled() and watcher.result():
                record.status, record.outcome = 499, "cancelled"  # nginx's code for "client closed request"
            record.queue_wait_s = job.queue_wait_s()
            record.latency_s = time.perf_counter() - arrived
            metrics.record(record)
        return JSONResponse(answer)

    async def _recorded(events: Any, job: Any, record: Any, arrived: float):
        """Pass the stream through, and log/count the request once it ended however it ended."""
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()
            record.queue_wait_s = job.queue_wait_s()
            record.latency_s = time.perf_counter() - arrived
            metrics.record(record)

    return app


async def _cancel_on_disconnect(request: Request, job: Any) -> bool:
    """Cancel `job` if the client of a non-streamed request goes away before the answer (True if it did).

    A streamed response notices a disconnect itself (Starlette cancels the stream); a plain one would
    otherwise keep its batch rows until the whole completion is generated for nobody.
    """
    while not job.finished():
        if await request.is_disconnected():
            job.cancel()
            return True
        await asyncio.sleep(DISCONNECT_POLL_S)
    return False


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise schema.APIError(413, f"the request body is {declared} bytes, above this server's limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise schema.APIError(413, f"the request body is above this server's limit of {limit} bytes")
    return bytes(body)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, including unknown paths and wrong methods, in OpenAI's error JSON shape."""

    @app.exception_handler(schema.APIError)
    async def api_error(request: Request, err: schema.APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(
            schema.error_body(message, "invalid_request_error"),
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            schema.error_body(f"{param}: {first['msg']}", "invalid_request_error", param), status_code=400
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        LOG.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(
            schema.error_body(f"internal server error: {type(err).__name__}", "server_error"), status_code=500
        )


class BearerAuth:
    """ASGI middleware: `Authorization: Bearer <key>` on every path but OPEN_PATHS, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "incorrect API key provided"
        response = JSONResponse(
            schema.error_body(message, "invalid_request_error", None, "invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
