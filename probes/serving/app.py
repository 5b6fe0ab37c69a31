"""`create_app`: the OpenAI-compatible HTTP server whose answers carry a calibrated confidence.

Endpoints
- `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI request/response bodies; every choice has an
  extra `confidence` object {p_correct, abstained, threshold, score, layer, position} (higher `p_correct`
  = more likely correct). An abstained answer keeps `finish_reason` "stop" (clients only know OpenAI's
  values) and says so in `confidence.abstained`.
- `POST /v1/feedback` {id, correct}: labels a served response (unknown id: 404; a repeated label
  replaces the previous one, the response says which label it replaced).
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from probes.serving.batcher import Batcher, ModelError, QueueFullError
from probes.serving.exposition import ServerMetrics
from probes.serving.feedback import CalibrationStats, FeedbackStore, ResponseRecord, UnknownResponseError
from probes.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    ProbedModelLike,
    Prompt,
    Sampling,
    _chat_prompt,
    _completion_prompt,
    _reject_unsupported,
    _sampling,
    _validation_error,
)
from probes.serving.settings import ServeSettings
from probes.serving.wrapper import ProbedGeneration

log = logging.getLogger("probecal.serve")


class _MetricsMiddleware:
    """Pure ASGI middleware: counts requests by endpoint/status, times them, refuses oversized bodies."""

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
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                err = APIError(413, f"The request body is larger than {self.max_bytes} bytes "
                               "(serve.max_request_bytes).", code="request_too_large")
                await err.response()(scope, receive, send_and_record)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.observe_request(endpoint, status[0], time.perf_counter() - start)


def create_app(probed_model: ProbedModelLike, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving `probed_model`. One lifespan per app: shutdown closes its database."""
    settings.validate()
    store = FeedbackStore(settings.db_path)
    metrics = ServerMetrics()
    model_name = settings.model_name or probed_model.model_name
    batcher = Batcher(
        probed_model,
        max_batch_size=max(1, min(settings.max_batch_size, probed_model.max_batch_size)),
        batch_wait_s=settings.batch_wait_ms / 1000,
        max_queue_size=settings.max_queue_size,
        on_batch=metrics.batch_size.observe,
        on_error=lambda: setattr(metrics, "model_errors", metrics.model_errors + 1),
    )
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            store.close()

    app = FastAPI(title="probecal", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.store, app.state.batcher, app.state.metrics = settings, store, batcher, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, f"Internal server error ({type(exc).__name__}).", type_="server_error").response()

    async def answer(endpoint: str, prompt: Prompt, sampling: Sampling, param: str) -> tuple[str, str, Any]:
        """Validate the length, generate (batched), store; returns (response id, text, generation)."""
        try:
            prompt_tokens = await asyncio.to_thread(probed_model.count_tokens, prompt)
        except (ValueError, TypeError) as err:  # e.g. a chat template refusing the message order
            raise APIError(400, f"Invalid value for '{param}': {err}", param=param, code="invalid_value") from None
        limit = probed_model.max_context_tokens
        if prompt_tokens + sampling.max_new_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + sampling.max_new_tokens} tokens ({prompt_tokens} in the {param}, "
                f"{sampling.max_new_tokens} in the completion). Please reduce the {param} or max_tokens.",
                param=param, code="context_length_exceeded",
            )
        try:
            gen = await batcher.submit(prompt, sampling)
        except QueueFullError as err:
            raise APIError(503, f"The server is overloaded: {err}. Retry later.", type_="server_error",
                           code="overloaded") from None
        except ModelError as err:
            raise APIError(500, f"The model failed while generating: {err}", type_="server_error",
                           code="model_error") from None
        text = settings.abstention_message if gen.abstained and settings.abstention_message is not None else gen.text
        prefix = "cmpl" if endpoint == "completions" else "chatcmpl"
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        record = ResponseRecord(
            id=response_id, endpoint=endpoint, model=model_name,
            prompt=json.dumps(prompt) if settings.store_text else None, text=text if settings.store_text else None,
            p_correct=gen.p_correct, score=gen.score, layer=gen.layer, position=gen.position,
            abstained=gen.abstained, threshold=gen.threshold, finish_reason=gen.finish_reason, created=time.time(),
        )
        await asyncio.to_thread(store.record_responses, [record])
        metrics.observe_generation(gen)
        return response_id, text, gen

    def envelope(response_id: str, kind: str, choice: dict, gen: ProbedGeneration) -> dict:
        choice["finish_reason"] = "stop" if gen.finish_reason == "abstained" else gen.finish_reason
        choice["confidence"] = {
            "p_correct": gen.p_correct, "abstained": gen.abstained, "threshold": gen.threshold,
            "score": gen.score, "layer": gen.layer, "position": gen.position,
        }
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                 "total_tokens": gen.prompt_tokens + gen.completion_tokens}
        return {"id": response_id, "object": kind, "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, **choice}], "usage": usage}

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != model_name:
            raise APIError(404, f"The model '{requested}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        check_model(body.model)
        _reject_unsupported(body)
        sampling = _sampling(body, body.max_tokens, settings)
        response_id, text, gen = await answer("completions", _completion_prompt(body.prompt), sampling, "prompt")
        return envelope(response_id, "text_completion", {"text": text, "logprobs": None}, gen)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> dict:
        check_model(body.model)
        _reject_unsupported(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling = _sampling(body, max_tokens, settings)
        response_id, text, gen = await answer("chat.completions", _chat_prompt(body.messages), sampling, "messages")
        message = {"role": "assistant", "content": text}
        return envelope(response_id, "chat.completion", {"message": message, "logprobs": None}, gen)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest) -> dict:
        try:
            previous = await asyncio.to_thread(store.record_feedback, body.id, body.correct)
        except UnknownResponseError:
            raise APIError(404, f"No response with id '{body.id}' was served by this server.", param="id",
                           code="response_not_found") from None
        return {"object": "feedback", "id": body.id, "correct": body.correct, "replaced": previous}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "probecal"}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = batcher.running
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "queue_depth": batcher.depth,
                "max_batch_size": batcher.max_batch_size, "uptime_s": round(time.time() - started, 3)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        def read() -> tuple[CalibrationStats, dict[str, int]]:
            return store.calibration(settings.calibration_window, settings.calibration_bins), store.counts()

        calib, counts = await asyncio.to_thread(read)
        text = metrics.render(calib, counts, batcher.depth, settings.calibration_window)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    known = {route.path for route in app.routes}
    app.add_middleware(_MetricsMiddleware, metrics=metrics, known_paths=known,
                       max_request_bytes=settings.max_request_bytes)
    return app


def build_probed_model(model_spec: Any, settings: ServeSettings) -> ProbedModelLike:
    """Load the model `model_spec` names and wrap it with the probe saved in `serve.probe_dir`."""
    if not settings.probe_dir:
        raise ValueError("serve.probe_dir is required: the folder of a saved probe artifact "
                         "(e.g. probecal serve serve.probe_dir=outputs/.../probe)")
    from probes.serving.wrapper import DEFAULT_ABSTENTION_MESSAGE, ProbedModel

    return ProbedModel.from_config(
        model_spec, settings.probe_dir, max_batch_size=settings.max_batch_size,
        abstention_message=settings.abstention_message or DEFAULT_ABSTENTION_MESSAGE,
    )


def serve(settings: ServeSettings, probed_model: ProbedModelLike) -> None:
    """Run uvicorn on `create_app(probed_model, settings)` until stopped."""
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the server has no authentication, put it behind one", settings.host)
    uvicorn.run(create_app(probed_model, settings), host=settings.host, port=settings.port, log_level="info")
