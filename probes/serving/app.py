"""`create_app`: the OpenAI-compatible HTTP server whose answers carry a calibrated confidence.

Endpoints
- `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI request/response bodies; every choice has an
  extra `confidence` object {p_correct, abstained, threshold, score, layer, position} (higher `p_correct`
  = more likely correct). An abstained answer keeps `finish_reason` "stop" (clients only know OpenAI's
  values) and says so in `confidence.abstained`.
  `stream: true` answers with Server-Sent Events (see `serving.py`); `n` > 1 gives several choices.
- `POST /v1/score` {prompt | messages, completion, stop?}: the confidence of a completion another engine
  generated (text or token ids), equal to what generation here would give for the same tokens.
- `POST /v1/feedback` {id, correct, index?}: labels a served response (unknown id: 404; a repeated label
  replaces the previous one, the response says which label it replaced).
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format; ECE per domain, current vs
  previous artifact).
- `POST /admin/reload` {probe_dir}: hot reload of the probe artifact (verified off the event loop, swapped
  between two batches; a bad artifact gets 400 and the old one keeps serving). Protection: with
  `serve.admin_token` set, the request must carry `Authorization: Bearer <token>` (401 otherwise); without a
  token only loopback clients may call it, and never through a forwarding proxy (403).
With `serve.upstream` set, the two completion endpoints forward to that engine (`upstream.py`).
The routes (`api_router.py`) only route: the work is in `serving.Server` / `upstream.UpstreamProxy`, the
schemas in `protocol.py`; this module assembles the app (middleware, error shapes, lifespan).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from probes.serving.api_router import router
from probes.serving.autorecal import AutoRecalibrator
from probes.serving.batcher import Batcher
from probes.serving.exposition import ServerMetrics
from probes.serving.feedback import FeedbackStore
from probes.serving.protocol import APIError, ProbedModelLike, validation_error
from probes.serving.serving import Server, echo
from probes.serving.settings import ServeSettings
from probes.serving.upstream import UpstreamProxy

log = logging.getLogger("probecal.serve")


class _MetricsMiddleware:
    """Pure ASGI middleware: counts requests by endpoint/status, times them, and refuses bodies over
    `max_request_bytes` while reading them, whatever the framing (Content-Length or chunked)."""

    def __init__(self, app: Any, metrics: ServerMetrics, known_paths: set[str], max_request_bytes: int):
        self.app, self.metrics, self.known, self.max_bytes = app, metrics, known_paths, max_request_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.known else "other"  # bounded label cardinality
        start, status = time.perf_counter(), [500]

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                err = APIError(
                    413,
                    f"The request body is larger than {self.max_bytes} bytes (serve.max_request_bytes).",
                    code="request_too_large",
                )
                await err.response()(scope, receive, send_and_record)
                return
            replayed = [False]

            async def replay() -> dict:  # the body once, then the client's own messages (disconnects)
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_and_record)
        finally:
            self.metrics.observe_request(endpoint, status[0], time.perf_counter() - start)

    async def _read_body(self, scope: dict, receive: Callable) -> bytes | None:
        """The whole body, or None as soon as it passes the limit (nothing more is read)."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def create_app(probed_model: ProbedModelLike, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving `probed_model` (or proxying to `settings.upstream` and scoring with it).
    One lifespan per app: shutdown closes its database and upstream client."""
    settings.validate()
    if settings.auto_recalibrate and not all(
        hasattr(probed_model, name) for name in ("artifact", "load_artifact", "swap_artifact")
    ):
        raise ValueError(
            "serve.auto_recalibrate=true needs a model that can hot reload its probe artifact "
            "(probes.runtime.ProbedModel); this one cannot"
        )
    if settings.auto_recalibrate:  # e.g. prior=cross_domain on an artifact trained without it: say so now
        from probes.recalibration import check_prior

        check_prior(probed_model.artifact, settings.auto_recalibrate_kind, settings.auto_recalibrate_prior)
    metrics = ServerMetrics(settings.metrics_max_domains)
    batcher = Batcher(
        probed_model,
        max_batch_size=max(1, min(settings.max_batch_size, probed_model.max_batch_size)),
        batch_wait_s=settings.batch_wait_ms / 1000,
        max_queue_size=settings.max_queue_size,
        on_batch=metrics.observe_batch,
        on_error=metrics.observe_model_error,
    )
    server = Server(
        probed_model,
        settings,
        FeedbackStore(settings.db_path),
        batcher,
        metrics,
        settings.model_name or probed_model.model_name,
        probe_dir=settings.probe_dir,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        digest = getattr(probed_model, "artifact_digest", None)
        if digest:
            await asyncio.to_thread(server.store.record_artifact, digest, settings.probe_dir)
        if settings.upstream:
            app.state.proxy = UpstreamProxy(
                server, settings.upstream, settings.upstream_connect_timeout_s, settings.upstream_timeout_s
            )
        if settings.auto_recalibrate:
            server.auto = AutoRecalibrator(server, asyncio.get_running_loop())
            server.auto.start()
        try:
            yield
        finally:
            if server.auto is not None:  # off the loop: a refit in flight may still await a reload on it
                await asyncio.to_thread(server.auto.stop)
            if app.state.proxy is not None:
                await app.state.proxy.close()
            await batcher.stop()
            server.store.close()

    app = FastAPI(title="probecal", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server, app.state.proxy = server, None  # the proxy is opened by the lifespan (proxy mode)
    app.state.settings, app.state.store, app.state.batcher, app.state.metrics = (
        settings,
        server.store,
        batcher,
        metrics,
    )
    _error_handlers(app)
    app.include_router(router)

    # the metrics' endpoint labels; newer FastAPI keeps an included router as one entry of app.routes
    known = {route.path for route in (*app.routes, *router.routes) if hasattr(route, "path")}
    app.add_middleware(
        _MetricsMiddleware, metrics=metrics, known_paths=known, max_request_bytes=settings.max_request_bytes
    )
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's {"error": {...}} body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        path = echo(request.url.path)
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {path}", code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return APIError(
            500, f"Internal server error ({type(exc).__name__}).", type_="server_error"
        ).response()


def build_probed_model(model_spec: Any, settings: ServeSettings) -> ProbedModelLike:
    """Load the model `model_spec` names and wrap it with the probe saved in `serve.probe_dir`."""
    if not settings.probe_dir:
        raise ValueError(
            "serve.probe_dir is required: the folder of a saved probe artifact "
            "(e.g. probecal serve serve.probe_dir=outputs/.../probe)"
        )
    from probes.runtime.wrapper import DEFAULT_ABSTENTION_MESSAGE, ProbedModel

    return ProbedModel.from_config(
        model_spec,
        settings.probe_dir,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        abstention_message=settings.abstention_message or DEFAULT_ABSTENTION_MESSAGE,
    )


def serve(settings: ServeSettings, probed_model: ProbedModelLike) -> None:
    """Run uvicorn on `create_app(probed_model, settings)` until stopped."""
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the server has no authentication, put it behind one", settings.host)
    uvicorn.run(create_app(probed_model, settings), host=settings.host, port=settings.port, log_level="info")
