"""`probecal serve`: an OpenAI-compatible HTTP server whose answers carry a calibrated confidence.

Endpoints
- `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI request/response bodies; every choice has an
  extra `confidence` object {p_correct, abstained, threshold, score, layer, position} (higher `p_correct`
  = more likely correct). An abstained answer keeps `finish_reason` "stop" (clients only know OpenAI's
  values) and says so in `confidence.abstained`.
- `POST /v1/feedback` {id, correct}: labels a served response (unknown id: 404; a repeated label
  replaces the previous one, the response says which label it replaced).
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).

Concurrency: handlers put requests on a queue; one asyncio task collects up to `max_batch_size` of them
(waiting at most `batch_wait_ms` after the first), groups them by sampling settings and calls
`ProbedModel.generate` once per group on a single dedicated thread, so the event loop never runs the model
and the model is never called from two threads at once.

Not supported (clear 400): n > 1, streaming, logprobs, echo, best_of, penalties, logit_bias, seed, tools /
functions, non-text response formats, token-id prompts, several prompts in one request. Sampling defaults
to greedy (temperature 0), the setting probes are trained on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("probecal serve needs the `serve` extra: pip install 'probecal[serve]'") from err

from probes.feedback import CalibrationStats, FeedbackStore, ResponseRecord, UnknownResponseError
from probes.wrapper import ProbedGeneration

log = logging.getLogger("probecal.serve")

Prompt = str | list[dict[str, str]]  # completion text, or chat messages [{"role", "content"}]


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class ServeSettings:
    """The `serve` config group (conf/serve/default.yaml). Building it only assigns; `validate` checks."""

    host: str = "127.0.0.1"  # loopback by default: the server has no authentication
    port: int = 8000
    probe_dir: str | None = None  # saved probe artifact the wrapper loads (required by `probecal serve`)
    db_path: str = "outputs/serve/feedback.sqlite"  # responses + feedback; kept across restarts
    max_batch_size: int = 16  # most requests per generate call (also capped by the model's own limit)
    batch_wait_ms: float = 5.0  # after the first queued request, wait this long for more to batch
    max_queue_size: int = 256  # queued requests beyond this get 503 instead of waiting without bound
    default_max_tokens: int = 64  # max_tokens when a request does not set it
    max_tokens_limit: int = 256  # largest max_tokens a request may ask for
    max_request_bytes: int = 1_000_000  # larger bodies get 413 before they are parsed
    abstention_message: str | None = None  # text returned for an abstained answer (None: the wrapper's)
    calibration_window: int = 1000  # rolling window: the last N labelled responses
    calibration_bins: int = 10  # equal-width confidence bins for ECE and per-bin accuracy
    store_text: bool = True  # store prompts and answers in the database (False: only confidences)
    model_name: str | None = None  # name reported in responses (None: the wrapper's model_name)

    def validate(self) -> None:
        positive = ("port", "max_batch_size", "max_queue_size", "default_max_tokens", "max_tokens_limit",
                    "max_request_bytes", "calibration_window", "calibration_bins")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"serve.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"serve.batch_wait_ms must be in [0, 10000] ms, got {self.batch_wait_ms!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"serve.default_max_tokens={self.default_max_tokens} exceeds "
                f"serve.max_tokens_limit={self.max_tokens_limit}"
            )
        if not self.db_path:
            raise ValueError("serve.db_path must name a SQLite file")


class ProbedModelLike(Protocol):
    """What the server needs from `probes.wrapper.ProbedModel` (tests pass a small double)."""

    model_name: str
    max_context_tokens: int
    max_batch_size: int

    def generate(
        self, prompts: list[Prompt], *, max_new_tokens: int, temperature: float, top_p: float,
        stop: list[str] | None,
    ) -> list[ProbedGeneration]: ...

    def count_tokens(self, prompt: Prompt) -> int: ...


# ------------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error returned to the client as OpenAI's {"error": {message, type, param, code}} body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class QueueFullError(Exception):
    pass


class ModelError(Exception):
    """The model raised while generating a batch; every request of that batch fails with a 500."""


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"][1:]) or None  # loc[0] is "body"
    kind = err["type"]
    if kind == "json_invalid":
        detail = err.get("ctx", {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON ({detail}).", code="invalid_json")
    if param is None:
        return APIError(400, "The request body must be a JSON object (Content-Type: application/json).")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_parameter")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: '{param}'.", param=param,
                        code="unrecognized_parameter")
    got = err.get("input")
    return APIError(400, f"Invalid value for '{param}': {err['msg']} (got {json.dumps(got)[:80]}).",
                    param=param, code="invalid_type")


# ----------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # strict: "5" is not an integer and true is not a number; forbid: a misspelt option is an error
    model_config = ConfigDict(strict=True, extra="forbid")


class _SamplingFields(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None  # str | list[str], checked in _sampling for a clear message
    user: str | None = None  # accepted and ignored, as OpenAI does for tracking ids
    # options accepted only at their no-op value (see _UNSUPPORTED)
    n: int | None = None
    stream: bool | None = None
    stream_options: Any = None
    logprobs: Any = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Any = None
    seed: int | None = None


class CompletionRequest(_SamplingFields):
    prompt: Any  # str or [str]; checked in _completion_prompt
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Any  # str or [{"type": "text", "text": ...}]; checked in _chat_prompt
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None


class FeedbackRequest(_Body):
    id: str
    correct: bool


def _is_off(value: Any) -> bool:
    return value in (None, False, 0, "", [], {}, "none") or value == {"type": "text"}


# option -> why it is refused; each is accepted only absent or at its no-op value (n=1, stream=false, ...)
_UNSUPPORTED = {
    "n": "only n=1 is supported (one choice per request)",
    "best_of": "best_of is not supported",
    "stream": "streaming is not supported; send stream=false",
    "stream_options": "stream_options is not supported (no streaming)",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "top_logprobs are not supported",
    "echo": "echo is not supported",
    "presence_penalty": "presence_penalty is not supported",
    "frequency_penalty": "frequency_penalty is not supported",
    "logit_bias": "logit_bias is not supported",
    "seed": "seed is not supported (use temperature=0 for reproducible answers)",
    "suffix": "suffix (insertion) is not supported",
    "tools": "tools are not supported",
    "tool_choice": "tool_choice is not supported",
    "functions": "functions are not supported",
    "function_call": "function_call is not supported",
    "response_format": "only response_format {'type': 'text'} is supported",
}


def _reject_unsupported(body: BaseModel) -> None:
    for name, why in _UNSUPPORTED.items():
        value = getattr(body, name, None)
        refused = value not in (None, 1) if name in ("n", "best_of") else not _is_off(value)
        if refused:
            raise APIError(400, f"Unsupported value for '{name}': {why}.", param=name, code="unsupported_parameter")


@dataclass(frozen=True)
class Sampling:
    """Generation settings; requests are batched together only when these are equal."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] | None


def _sampling(body: _SamplingFields, max_tokens: int | None, settings: ServeSettings) -> Sampling:
    max_new = settings.default_max_tokens if max_tokens is None else max_tokens
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    if not 1 <= max_new <= settings.max_tokens_limit:
        raise APIError(400, f"Invalid value for '{param}': {max_new} is outside [1, {settings.max_tokens_limit}] "
                       "(serve.max_tokens_limit).", param=param, code="invalid_value")
    temperature = 0.0 if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, f"Invalid value for 'temperature': {temperature} is outside [0, 2].",
                       param="temperature", code="invalid_value")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"Invalid value for 'top_p': {top_p} is outside (0, 1].", param="top_p",
                       code="invalid_value")
    stop = body.stop
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or not 1 <= len(stop) <= 4 or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(400, "Invalid value for 'stop': expected a non-empty string or a list of 1 to 4 "
                       "non-empty strings.", param="stop", code="invalid_value")
    return Sampling(max_new, temperature, top_p, tuple(stop) if stop else None)


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "Invalid value for 'prompt': expected a string (one prompt per request; token "
                       "ids are not supported).", param="prompt", code="invalid_value")
    if not prompt:
        raise APIError(400, "Invalid value for 'prompt': the prompt is empty.", param="prompt", code="invalid_value")
    return prompt


def _chat_prompt(messages: list[ChatMessage]) -> list[dict[str, str]]:
    if not messages:
        raise APIError(400, "Invalid value for 'messages': at least one message is required.", param="messages",
                       code="invalid_value")
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            and set(part) <= {"type", "text"}
            for part in content
        ):
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise APIError(400, f"Invalid value for 'messages.{i}.content': expected a string or a list of "
                           "{'type': 'text', 'text': ...} parts (images and audio are not supported).",
                           param=f"messages.{i}.content", code="invalid_value")
        out.append({"role": message.role, "content": content})
    return out


# ------------------------------------------------------------------------------------------------ metrics
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}" if pairs else ""


def _num(value: float) -> str:
    return "NaN" if math.isnan(value) else repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    """Cumulative Prometheus histogram with fixed upper bounds (+Inf added)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def render(self, name: str, labels: dict[str, str]) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if math.isinf(bound) else repr(float(bound))
            lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
        lines.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        lines.append(f"{name}_count{_labels(labels)} {self.count}")
        return lines


class ServerMetrics:
    """In-process counters (reset on restart, as Prometheus expects); calibration comes from the store.

    Updated only on the event-loop thread, so no lock is needed.
    """

    LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    CONFIDENCE_BOUNDS = tuple(i / 10 for i in range(1, 11))
    BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.confidence = Histogram(self.CONFIDENCE_BOUNDS)
        self.batch_size = Histogram(self.BATCH_BOUNDS)
        self.responses = 0
        self.abstentions = 0
        self.model_errors = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(endpoint, Histogram(self.LATENCY_BOUNDS)).observe(seconds)

    def observe_generation(self, gen: ProbedGeneration) -> None:
        self.responses += 1
        self.abstentions += int(gen.abstained)
        self.confidence.observe(gen.p_correct)

    def render(self, calib: CalibrationStats, counts: dict[str, int], queue_depth: int, window: int) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        metric("probecal_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [f"probecal_requests_total{_labels({'endpoint': e, 'status': s})} {n}"
                for (e, s), n in sorted(self.requests.items())])
        metric("probecal_request_latency_seconds", "histogram", "Request latency by endpoint.",
               [line for e, h in sorted(self.latency.items())
                for line in h.render("probecal_request_latency_seconds", {"endpoint": e})])
        metric("probecal_confidence", "histogram", "p_correct of served answers (higher = more likely correct).",
               self.confidence.render("probecal_confidence", {}))
        metric("probecal_responses_total", "counter", "Answers served since start.",
               [f"probecal_responses_total {self.responses}"])
        metric("probecal_abstentions_total", "counter", "Answers abstained since start.",
               [f"probecal_abstentions_total {self.abstentions}"])
        rate = self.abstentions / self.responses if self.responses else math.nan
        metric("probecal_abstention_rate", "gauge", "Abstained / served answers since start.",
               [f"probecal_abstention_rate {_num(rate)}"])
        metric("probecal_batch_size", "histogram", "Requests per ProbedModel.generate call.",
               self.batch_size.render("probecal_batch_size", {}))
        metric("probecal_model_errors_total", "counter", "generate calls that raised.",
               [f"probecal_model_errors_total {self.model_errors}"])
        metric("probecal_queue_depth", "gauge", "Requests waiting for the model.",
               [f"probecal_queue_depth {queue_depth}"])
        metric("probecal_stored_responses", "gauge", "Responses in the feedback database (all time).",
               [f"probecal_stored_responses {counts['responses']}"])
        metric("probecal_labelled_responses", "gauge", "Responses with feedback in the database (all time).",
               [f"probecal_labelled_responses {counts['labelled']}"])
        metric("probecal_feedback_total", "gauge", "Feedback posts in the database, repeats included.",
               [f"probecal_feedback_total {counts['feedback']}"])
        about = f"over the last {window} labelled responses"
        metric("probecal_calibration_window_labelled", "gauge", f"Labelled responses in the window ({window}).",
               [f"probecal_calibration_window_labelled {calib.labelled}"])
        metric("probecal_calibration_accuracy", "gauge", f"Fraction correct {about}.",
               [f"probecal_calibration_accuracy {_num(calib.accuracy)}"])
        metric("probecal_calibration_mean_confidence", "gauge", f"Mean p_correct {about}.",
               [f"probecal_calibration_mean_confidence {_num(calib.mean_confidence)}"])
        metric("probecal_calibration_ece", "gauge", f"Expected calibration error (equal-width bins) {about}.",
               [f"probecal_calibration_ece {_num(calib.ece)}"])
        bin_labels = [{"lower": f"{b.lower:g}", "upper": f"{b.upper:g}"} for b in calib.bins]
        metric("probecal_calibration_bin_accuracy", "gauge", f"Fraction correct per p_correct bin {about}.",
               [f"probecal_calibration_bin_accuracy{_labels(lab)} {_num(b.accuracy)}"
                for lab, b in zip(bin_labels, calib.bins, strict=True)])
        metric("probecal_calibration_bin_confidence", "gauge", f"Mean p_correct per bin {about}.",
               [f"probecal_calibration_bin_confidence{_labels(lab)} {_num(b.mean_confidence)}"
                for lab, b in zip(bin_labels, calib.bins, strict=True)])
        metric("probecal_calibration_bin_count", "gauge", f"Labelled responses per p_correct bin {about}.",
               [f"probecal_calibration_bin_count{_labels(lab)} {b.count}"
                for lab, b in zip(bin_labels, calib.bins, strict=True)])
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ batcher
@dataclass
class _Pending:
    prompt: Prompt
    sampling: Sampling
    future: asyncio.Future


class Batcher:
    """Queue -> batches -> `generate` on one dedicated thread; results go back to each request's future."""

    def __init__(self, model: ProbedModelLike, max_batch_size: int, batch_wait_s: float, max_queue_size: int,
                 on_batch: Callable[[int], None] = lambda size: None,
                 on_error: Callable[[], None] = lambda: None):
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue_size = max_queue_size
        self._on_batch, self._on_error = on_batch, on_error
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probecal-model")
        self._task = asyncio.create_task(self._run(), name="probecal-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(QueueFullError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, prompt: Prompt, sampling: Sampling) -> ProbedGeneration:
        if not self.running:
            raise QueueFullError("the model worker is not running")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(prompt, sampling, future))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.max_queue_size} requests are already queued") from None
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Pending] = []
        try:
            while True:
                batch = [await self._queue.get()]
                deadline = loop.time() + self.batch_wait_s
                while len(batch) < self.max_batch_size:
                    if not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                        continue
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                        break
                groups: dict[Sampling, list[_Pending]] = {}
                for pending in batch:
                    groups.setdefault(pending.sampling, []).append(pending)
                for sampling, group in groups.items():
                    await self._generate(sampling, group)
        except asyncio.CancelledError:  # shutting down mid-batch: answer the requests taken off the queue
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(QueueFullError("the server is shutting down"))
            raise

    async def _generate(self, sampling: Sampling, group: list[_Pending]) -> None:
        self._on_batch(len(group))
        call = lambda: self.model.generate(  # noqa: E731 - runs on the model thread
            [p.prompt for p in group], max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, stop=list(sampling.stop) if sampling.stop else None,
        )
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, call)
            if len(results) != len(group):
                raise RuntimeError(f"generate returned {len(results)} results for {len(group)} prompts")
        except Exception as err:  # a model failure fails this batch only; the worker keeps serving
            log.exception("generate failed on a batch of %d", len(group))
            self._on_error()
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(ModelError(f"{type(err).__name__}: {err}"))
            return
        for pending, result in zip(group, results, strict=True):
            if not pending.future.done():  # done = the client went away and the handler was cancelled
                pending.future.set_result(result)


# ---------------------------------------------------------------------------------------------------- app
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


# -------------------------------------------------------------------------------------------- entry point
def build_probed_model(cfg: Any, settings: ServeSettings) -> ProbedModelLike:
    """Load the configured model (`cfg.model`) and wrap it with the probe saved in `serve.probe_dir`."""
    if not settings.probe_dir:
        raise ValueError("serve.probe_dir is required: the folder of a saved probe artifact "
                         "(e.g. probecal serve serve.probe_dir=outputs/.../probe)")
    from probes.config import instantiate_group
    from probes.wrapper import DEFAULT_ABSTENTION_MESSAGE, ProbedModel

    return ProbedModel.from_config(
        instantiate_group(cfg.model), settings.probe_dir, max_batch_size=settings.max_batch_size,
        abstention_message=settings.abstention_message or DEFAULT_ABSTENTION_MESSAGE,
    )


def serve(cfg: Any, build: Callable[[Any, ServeSettings], ProbedModelLike] = build_probed_model) -> None:
    """`probecal serve`: build the settings from `cfg.serve`, the model, and run uvicorn until stopped."""
    import uvicorn

    from probes.config import instantiate_group

    settings: ServeSettings = instantiate_group(cfg.serve)
    settings.validate()
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the server has no authentication, put it behind one", settings.host)
    app = create_app(build(cfg, settings), settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


__all__ = ["APIError", "Batcher", "ServeSettings", "create_app", "serve", "build_probed_model"]
