"""The ASGI app: OpenAI-compatible routes over a `Batcher`, the playground page, health and metrics.

Starlette rather than FastAPI: the OpenAI error shapes and field-by-field validation are written out in
`protocol.py` anyway (FastAPI's automatic 422 bodies would have to be overridden), so FastAPI's pydantic layer
would add a dependency and a second validation path for nothing. uvicorn runs it (`illada serve`).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from illada.errors import IlladaError
from illada.sampling.config import SamplingConfig
from illada.serving.batcher import Batcher, GenerationFailed, QueueFull, ServingError, ShuttingDown, Ticket
from illada.serving.metrics import Metrics
from illada.serving.protocol import (
    ApiError,
    GenerationRequest,
    Limits,
    RowResult,
    chunk,
    parse_json,
    parse_request,
    response_body,
    sse,
    usage_chunk,
)

log = logging.getLogger("illada.serve")


@dataclass
class ServerSettings:
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on every route but / and /health
    max_batch: int = 8  # rows sharing one forward pass
    queue_size: int = 64  # queued rows before requests get 429
    timeout: float = 600.0  # seconds per request, queueing included
    limits: Limits = field(default_factory=Limits)
    model_name: str | None = None  # the id clients use; default: the checkpoint directory's name
    # what a request's fields start from; None: the model's generation_config.json defaults over the sampler's
    sampling: SamplingConfig | None = None


def api_error(error: ServingError) -> ApiError:
    """The HTTP answer to a batcher's error."""
    if isinstance(error, QueueFull):
        return ApiError(429, str(error), "rate_limit_error", None, "queue_full")
    if isinstance(error, ShuttingDown):
        return ApiError(503, str(error), "server_error")
    assert isinstance(error, GenerationFailed), error
    return ApiError(500, str(error), "server_error")


class _ClientGone(Exception):
    pass


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already, so receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Waiter:
    """Reads a ticket's results on the event loop, watching for a disconnect and the request's deadline; a
    request that ends any other way than complete cancels its ticket, which the worker sees at its next step."""

    def __init__(self, request: Request, ticket: Ticket, timeout: float, metrics: Metrics) -> None:
        self.ticket, self.timeout, self.metrics = ticket, timeout, metrics
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout
        self.gone = asyncio.ensure_future(_client_gone(request))
        self.complete = False

    async def next(self) -> tuple[int, str, object]:
        get = asyncio.ensure_future(self.ticket.queue.get())
        try:
            done, _ = await asyncio.wait({get, self.gone}, timeout=max(self.deadline - self.loop.time(), 0),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        if get in done:
            index, kind, payload = get.result()
            if kind == "error" and isinstance(payload, ServingError):
                payload = api_error(payload)
            return index, kind, payload
        if self.gone in done:
            raise _ClientGone()
        self.metrics.add(timed_out=1)
        raise ApiError(504, f"the request did not finish within the server's timeout of {self.timeout:g} s",
                       "timeout_error", None, "timeout")

    async def results(self) -> list[RowResult]:
        """Every row's result (non-streaming requests)."""
        rows = len(self.ticket.request.rows)
        results: list[RowResult | None] = [None] * rows
        remaining = rows
        while remaining:
            index, kind, payload = await self.next()
            if kind == "error":
                raise payload  # an ApiError from the worker
            if kind == "done":
                results[index] = payload
                remaining -= 1
        self.complete = True
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.gone.cancel()
        if not self.complete:
            self.ticket.cancelled = True


def _playground() -> str:
    return resources.files("illada.serving").joinpath("playground.html").read_text(encoding="utf-8")


def create_app(handle, settings: ServerSettings | None = None) -> Starlette:
    """The server app for a loaded `DiffusionLM` handle (illada.load). Its model worker starts with the app
    (ASGI lifespan) and stops with it. An autoregressive (`--objective ar`) model is refused: the worker batches
    diffusion canvases."""
    if handle.config.causal:
        raise IlladaError(f"{handle.name} is an autoregressive model (--objective ar): illada serve batches diffusion "
                          "canvases; use illada generate or chat for it")
    settings = settings or ServerSettings()
    metrics = Metrics()
    batcher = Batcher(handle, settings.max_batch, settings.queue_size, metrics)
    model_id = settings.model_name or Path(str(handle.name)).name or str(handle.name)
    model_ids = (model_id, str(handle.name))
    created = int(time.time())
    page = _playground()

    def authorized(request: Request) -> bool:
        if not settings.api_key:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.api_key.encode())

    def route(name: str, auth: bool = True):
        """Wraps an endpoint: API key, OpenAI error objects for every failure, request counting."""
        def wrap(endpoint: Callable[[Request], Awaitable[Response]]):
            async def handler(request: Request) -> Response:
                try:
                    if auth and not authorized(request):
                        raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                       "invalid_request_error", None, "invalid_api_key")
                    response = await endpoint(request)
                except ApiError as error:
                    response = JSONResponse(error.body(), status_code=error.status)
                except ClientDisconnect:
                    response = Response(status_code=499)
                except Exception:  # never a traceback to the client; the server stays up
                    log.exception("error in %s", name)
                    response = JSONResponse(ApiError(500, "internal server error", "server_error").body(), 500)
                metrics.request(name, response.status_code)
                return response
            return handler
        return wrap

    async def read_body(request: Request) -> bytes:
        limit = settings.limits.max_body_bytes
        too_big = ApiError(413, f"the request body exceeds {limit} bytes", "invalid_request_error", None,
                           "body_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise too_big
            chunks.append(piece)
        return b"".join(chunks)

    async def generation(request: Request, chat: bool) -> Response:
        raw = await read_body(request)

        def parse() -> GenerationRequest:
            return parse_request(parse_json(raw), chat=chat, handle=handle, model_ids=model_ids,
                                 limits=settings.limits, defaults=settings.sampling)

        parsed = await asyncio.to_thread(parse)  # tokenising a long prompt must not stall the event loop
        try:
            ticket = batcher.submit(parsed, asyncio.get_running_loop())
        except ServingError as error:
            raise api_error(error) from None
        waiter = _Waiter(request, ticket, settings.timeout, metrics)
        if parsed.stream:
            return StreamingResponse(_event_stream(parsed, waiter), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(response_body(parsed, await waiter.results()))
        except _ClientGone:
            return Response(status_code=499)  # nobody is there to read it
        finally:
            waiter.close()

    @route("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, chat=False)

    @route("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, chat=True)

    @route("/v1/models")
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "illada",
             "context_length": handle.config.max_seq_len}]})

    @route("/health", auth=False)
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "queue_depth": batcher.queue_depth})

    @route("/metrics")
    async def metrics_route(request: Request) -> Response:
        if request.query_params.get("format") == "json":
            return JSONResponse(metrics.snapshot())
        return PlainTextResponse(metrics.prometheus(), media_type="text/plain; version=0.0.4")

    @route("/", auth=False)  # a static page with no data: its API calls carry the key the user types in
    async def playground(request: Request) -> Response:
        return HTMLResponse(page)

    async def http_error(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 500)
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(status, str(getattr(error, "detail", "error")))
        return JSONResponse(ApiError(status, message, "invalid_request_error").body(), status_code=status)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = Starlette(routes=[
        Route("/", playground, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ], exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.settings = batcher, metrics, settings
    app.state.model_id = model_id
    return app


async def _event_stream(request: GenerationRequest, waiter: _Waiter) -> AsyncIterator[bytes]:
    """The SSE body: chunks as the worker sends them, then (opt-in) usage, then [DONE]. An error after the 200
    went out becomes an error event, as OpenAI's API sends it."""
    rows = len(request.rows)
    results: list[RowResult | None] = [None] * rows
    remaining = rows
    try:
        if request.chat:
            for index in range(rows):
                yield sse(chunk(request, index, "", role=True))
        while remaining:
            index, kind, payload = await waiter.next()
            if kind == "error":
                raise payload  # an ApiError from the worker
            if kind == "text":
                yield sse(chunk(request, index, payload))
            elif kind == "canvas":
                yield sse(chunk(request, index, None, extra=payload))
            elif kind == "done":
                results[index] = payload
                remaining -= 1
                yield sse(chunk(request, index, None, finish_reason=payload.finish_reason,
                                extra={"nfe": payload.nfe, "completion_tokens": payload.completion_tokens}))
        waiter.complete = True
        if request.include_usage:
            yield sse(usage_chunk(request, results))  # type: ignore[arg-type]
    except ApiError as error:
        yield sse(error.body())
    except _ClientGone:
        return
    finally:
        waiter.close()
    yield sse("[DONE]")


@contextmanager
def serve_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (for notebooks, tests and benchmarks); yields its base URL
    (port 0: a free port) and stops the server on exit."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="illada-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start")
        time.sleep(0.01)
    bound = sock.getsockname()
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
