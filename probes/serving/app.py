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
Routes only route: the work is in `serving.py` / `upstream.py`, the schemas in `protocol.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from probes.serving import serving
from probes.serving.batcher import Batcher
from probes.serving.exposition import ServerMetrics
from probes.serving.feedback import FeedbackStore
from probes.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    ProbedModelLike,
    ReloadRequest,
    ScoreRequest,
    _chat_prompt,
    _completion_prompt,
    _reject_unsupported,
    _sampling,
    _validation_error,
)
from probes.serving.settings import ServeSettings
from probes.serving.upstream import Upstream, proxy

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
    metrics = ServerMetrics()
    batcher = Batcher(
        probed_model,
        max_batch_size=max(1, min(settings.max_batch_size, probed_model.max_batch_size)),
        batch_wait_s=settings.batch_wait_ms / 1000,
        max_queue_size=settings.max_queue_size,
        on_batch=metrics.observe_batch,
        on_error=metrics.observe_model_error,
    )
    server = serving.Server(
        probed_model,
        settings,
        FeedbackStore(settings.db_path),
        batcher,
        metrics,
        settings.model_name or probed_model.model_name,
        probe_dir=settings.probe_dir,
    )
    upstream: Upstream | None = None
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal upstream
        await batcher.start()
        digest = getattr(probed_model, "artifact_digest", None)
        if digest:
            await asyncio.to_thread(server.store.record_artifact, digest, settings.probe_dir)
        if settings.upstream:
            upstream = Upstream(
                settings.upstream, settings.upstream_connect_timeout_s, settings.upstream_timeout_s
            )
        try:
            yield
        finally:
            if upstream is not None:
                await upstream.close()
            await batcher.stop()
            server.store.close()

    app = FastAPI(title="probecal", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.store, app.state.batcher, app.state.metrics = (
        settings,
        server.store,
        batcher,
        metrics,
    )
    _error_handlers(app)

    async def complete(
        endpoint: str, body: Any, request: Request, prompt: Any, max_tokens: int | None, param: str
    ) -> Any:
        server.check_model(body.model)
        _reject_unsupported(body, settings.max_n)
        sampling = _sampling(body, max_tokens, settings)
        if upstream is not None:
            return await proxy(server, upstream, endpoint, body, await request.json(), prompt, param)
        return await serving.generate(server, endpoint, body, prompt, sampling, param)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await complete(
            "completions", body, request, _completion_prompt(body.prompt), body.max_tokens, "prompt"
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await complete(
            "chat.completions", body, request, _chat_prompt(body.messages), max_tokens, "messages"
        )

    @app.post("/v1/score")
    async def score(body: ScoreRequest) -> dict:
        return await serving.score(server, body)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest) -> dict:
        return await serving.feedback(server, body)

    def admin_only(request: Request) -> None:  # a dependency: runs before the body is even validated
        _authorize_admin(request, settings)

    @app.post("/admin/reload", dependencies=[Depends(admin_only)])
    async def admin_reload(body: ReloadRequest) -> dict:
        return await serving.reload(server, body.probe_dir)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {"id": server.model_name, "object": "model", "created": int(started), "owned_by": "probecal"}
            ],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = batcher.running
        body = {
            "status": "ok" if ok else "unavailable",
            "model": server.model_name,
            "queue_depth": batcher.depth,
            "max_batch_size": batcher.max_batch_size,
            "uptime_s": round(time.time() - started, 3),
            "upstream": settings.upstream,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        def read():
            store, window, bins = server.store, settings.calibration_window, settings.calibration_bins
            current, previous = store.artifact_history()
            domains = {
                role: store.domain_calibration(digest, window, bins, settings.metrics_max_domains)
                for role, digest in (("current", current), ("previous", previous))
                if digest
            }
            return store.calibration(window, bins), store.counts(), domains

        calib, counts, domains = await asyncio.to_thread(read)
        text = metrics.render(calib, counts, batcher.depth, settings.calibration_window, domains)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    known = {route.path for route in app.routes}
    app.add_middleware(
        _MetricsMiddleware, metrics=metrics, known_paths=known, max_request_bytes=settings.max_request_bytes
    )
    return app


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _authorize_admin(request: Request, settings: ServeSettings) -> None:
    """serve.admin_token set: `Authorization: Bearer <token>` (constant-time compare), else 401. Unset: the
    client must be on a loopback address and the request must not come through a forwarding proxy, else 403."""
    if settings.admin_token:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.admin_token.encode()
        ):
            raise APIError(
                401,
                "Admin endpoints need 'Authorization: Bearer <serve.admin_token>'.",
                type_="authentication_error",
                code="invalid_admin_token",
            )
        return
    forwarded = any(h in request.headers for h in ("forwarded", "x-forwarded-for", "x-real-ip"))
    if forwarded or not _is_loopback(request.client.host if request.client else None):
        raise APIError(
            403,
            "Admin endpoints answer loopback clients only when serve.admin_token is not set "
            "(set serve.admin_token, or PROBECAL_ADMIN_TOKEN, to call them from elsewhere).",
            type_="permission_error",
            code="admin_loopback_only",
        )


def _error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's {"error": {...}} body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        path = serving.echo(request.url.path)
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
        abstention_message=settings.abstention_message or DEFAULT_ABSTENTION_MESSAGE,
    )


def serve(settings: ServeSettings, probed_model: ProbedModelLike) -> None:
    """Run uvicorn on `create_app(probed_model, settings)` until stopped."""
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the server has no authentication, put it behind one", settings.host)
    uvicorn.run(create_app(probed_model, settings), host=settings.host, port=settings.port, log_level="info")
