"""The work behind the routes: generation (plain and streamed), scoring completions (/v1/score), feedback.

`Server` does the work, one method per endpoint (as vLLM's `OpenAIServingCompletion`); `api_router.py`
only routes to it; `upstream.py` (proxy mode) reuses its response builders.

Streaming (`stream: true`): Server-Sent Events in OpenAI's chunk format. The first chunk of a chat choice
carries the role; text chunks follow as the batch generates; the LAST chunk of each choice carries its
`finish_reason` and `confidence` (the probe reads the finished answer, so there is no running estimate);
`stream_options.include_usage` adds a usage chunk; then `data: [DONE]`. A pre-generation abstention
streams the abstention message and its confidence. A client that disconnects frees its place: queued, it
is dropped before its batch starts; running, the batch stops once all of its clients have gone.

Domains: the request's domain tag (`protocol.request_domain`) goes to the model with the prompt
(per-domain calibration), into the database with the response and the artifact digest that scored it, and
its `metadata` is echoed in the response (every stream chunk).

Hot reload (`Server.reload`, POST /admin/reload): the new artifact is read and verified in a worker thread
(serving goes on), then swapped in on the model thread, i.e. between two batches: every answer is scored by
exactly one artifact, whole. A bad artifact is refused (4xx) and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi.responses import StreamingResponse

from probes.runtime.wrapper import ProbedGeneration
from probes.serving.batcher import Batcher, ModelError, QueueFullError
from probes.serving.exposition import ServerMetrics
from probes.serving.feedback import FeedbackStore, ResponseRecord, UnknownResponseError, calibration_stats
from probes.serving.protocol import (
    APIError,
    FeedbackRequest,
    ProbedModelLike,
    Prompt,
    Sampling,
    ScoreRequest,
    parse_stop,
    request_domain,
    score_inputs,
)
from probes.serving.settings import ServeSettings

log = logging.getLogger("probecal.serve")

OBJECTS = {"completions": ("cmpl", "text_completion"), "chat.completions": ("chatcmpl", "chat.completion")}


def echo(value: str, limit: int = 64) -> str:
    """A client-supplied value quoted back in an error message, capped (a 900 KB id is not echoed whole)."""
    return value if len(value) <= limit else value[:limit] + "..."


def confidence(gen: Any) -> dict[str, Any]:
    out = {
        "p_correct": gen.p_correct,
        "abstained": gen.abstained,
        "threshold": gen.threshold,
        "score": gen.score,
        "layer": gen.layer,
        "position": gen.position,
        "model_refused": getattr(gen, "model_refused", False),
    }
    chars = getattr(gen, "answer_chars", None)
    out["answer_chars"] = list(chars) if chars is not None else None
    # how far the question lies from the probe's training (probes.novelty): 1.0 = the cut-off
    out["novelty"] = getattr(gen, "novelty", None)
    out["in_domain"] = getattr(gen, "in_domain", None)
    if getattr(gen, "domain_assigned", False):  # no client tag: the artifact's cluster of the prompt
        out["domain"], out["domain_assigned"] = gen.domain, True
    return out


def metadata_echo(body: Any, domain: str | None) -> dict[str, Any]:
    """{"metadata": ...} to add to a response: the request's metadata (with its domain), or {}."""
    metadata = dict(body.metadata or {})
    if domain is not None:
        metadata["domain"] = domain
    return {"metadata": metadata} if metadata else {}


def client_finish(gen: ProbedGeneration) -> str:
    # an abstained answer keeps finish_reason "stop" (clients only know OpenAI's values)
    return "stop" if gen.finish_reason == "abstained" else gen.finish_reason


def _choice_body(endpoint: str, text: str) -> dict:
    if endpoint == "completions":
        return {"text": text, "logprobs": None}
    return {"message": {"role": "assistant", "content": text}, "logprobs": None}


def batcher_failure(err: Exception) -> APIError:
    """The client's error for a batcher failure: a full queue is 503 (retry later), a model error 500."""
    if isinstance(err, QueueFullError):
        return APIError(
            503, f"The server is overloaded: {err}. Retry later.", type_="server_error", code="overloaded"
        )
    return APIError(
        500, f"The model failed while generating: {err}", type_="server_error", code="model_error"
    )


def sse(payload: dict | str) -> str:
    """One Server-Sent Event carrying `payload` (a JSON object, or a literal such as "[DONE]")."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def sse_error(err: APIError) -> str:
    """An error in the middle of a stream (the status line has gone already): OpenAI's error body as an event."""
    return sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})


STORE_COUNTS = ("responses", "labelled", "feedback")  # FeedbackStore.counts()


class Server:
    """The work behind the routes, one method per endpoint; one per app (`app.state.server`)."""

    def __init__(
        self,
        model: ProbedModelLike,
        settings: ServeSettings,
        store: FeedbackStore,
        batcher: Batcher,
        metrics: ServerMetrics,
        model_name: str,
        probe_dir: str | None = None,
    ):
        self.model = model
        self.settings = settings
        self.store = store
        self.batcher = batcher
        self.metrics = metrics
        self.model_name = model_name
        self.probe_dir = probe_dir  # the artifact in service (updated by reload)
        self.reload_lock = asyncio.Lock()
        self.started = time.time()
        self.store_error: str | None = None  # the last failed feedback write (None: the last one worked)
        self.auto = (
            None  # probes.serving.autorecal.AutoRecalibrator under serve.auto_recalibrate (app lifespan)
        )
        self._last_store_read: tuple | None = None  # /metrics' last read of the database

    # -- shared checks and bookkeeping ---------------------------------------------------------------------

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise APIError(
                404,
                f"The model '{echo(requested)}' does not exist; this server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )

    async def check_length(self, prompt: Any, new_tokens: int, param: str) -> int:
        """Prompt tokens; 400 when the prompt cannot be encoded or prompt + new tokens exceed the context."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            prompt_tokens = len(prompt)
        else:
            try:
                prompt_tokens = await asyncio.to_thread(self.model.count_tokens, prompt)
            except (ValueError, TypeError) as err:  # e.g. a chat template refusing the message order
                raise APIError(
                    400, f"Invalid value for '{param}': {err}", param=param, code="invalid_value"
                ) from None
        limit = self.model.max_context_tokens
        if prompt_tokens + new_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + new_tokens} tokens ({prompt_tokens} in the {param}, {new_tokens} in the "
                f"completion). Please reduce the {param} or max_tokens.",
                param=param,
                code="context_length_exceeded",
            )
        return prompt_tokens

    async def record(
        self,
        endpoint: str,
        response_id: str,
        prompt: Any,
        items: list[tuple[str, Any, str]],
        domain: str | None = None,
    ) -> None:
        """Store served choices (text, generation or score, finish reason) with the request's domain and the
        digest of the artifact that scored each; choice i > 0 is `<id>:<i>`."""
        keep = self.settings.store_text
        records = [
            ResponseRecord(
                id=response_id if i == 0 else f"{response_id}:{i}",
                endpoint=endpoint,
                model=self.model_name,
                prompt=json.dumps(prompt) if keep else None,
                text=text if keep else None,
                p_correct=g.p_correct,
                score=g.score,
                layer=g.layer,
                position=g.position,
                abstained=g.abstained,
                threshold=g.threshold,
                finish_reason=finish,
                created=time.time(),
                domain=getattr(g, "domain", None) if getattr(g, "domain_assigned", False) else domain,
                artifact=getattr(g, "artifact", None) or getattr(self.model, "artifact_digest", None),
                domain_assigned=bool(getattr(g, "domain_assigned", False)),
                prompt_state=getattr(g, "prompt_state", None),
            )
            for i, (text, g, finish) in enumerate(items)
        ]
        try:
            await asyncio.to_thread(self.store.record_responses, records)
            self.store_error = None
        except (sqlite3.Error, OSError) as err:  # the answer still goes out: log, count, /health degraded
            self.store_error = f"{type(err).__name__}: {err}"
            self.metrics.observe_feedback_write_error()
            log.error("feedback database: response %s not stored (%s)", response_id, self.store_error)
        for _, g, _ in items:
            assigned = getattr(g, "domain", None) if getattr(g, "domain_assigned", False) else None
            self.metrics.observe_generation(g, assigned or domain)

    def shown_text(self, gen: ProbedGeneration) -> str:
        message = self.settings.abstention_message
        return message if gen.abstained and message is not None else gen.text

    # -- /v1/completions, /v1/chat/completions -------------------------------------------------------------

    async def generate(self, endpoint: str, body: Any, prompt: Prompt, sampling: Sampling, param: str) -> Any:
        """A completion / chat completion: the JSON body, or a StreamingResponse when `body.stream`."""
        domain = request_domain(body)
        await self.check_length(prompt, sampling.max_new_tokens, param)
        n = body.n or 1
        if body.stream:
            events: asyncio.Queue = asyncio.Queue()
            try:
                futures = [
                    self.batcher.enqueue(
                        prompt,
                        sampling,
                        on_text=lambda piece, i=i: events.put_nowait((i, piece)),
                        domain=domain,
                    )
                    for i in range(n)
                ]
            except QueueFullError as err:
                raise batcher_failure(err) from None
            return self.stream(endpoint, prompt, futures, events, body, domain)
        try:
            futures = [self.batcher.enqueue(prompt, sampling, domain=domain) for _ in range(n)]
            gens = await asyncio.gather(*futures)
        except (QueueFullError, ModelError) as err:
            raise batcher_failure(err) from None
        return await self.respond(endpoint, prompt, gens, domain, metadata_echo(body, domain))

    async def respond(
        self,
        endpoint: str,
        prompt: Any,
        gens: list[ProbedGeneration],
        domain: str | None = None,
        echo_metadata: dict | None = None,
    ) -> dict:
        """The JSON body for finished generations (recorded first, so /v1/feedback knows the id)."""
        prefix, kind = OBJECTS[endpoint]
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        texts = [self.shown_text(g) for g in gens]
        await self.record(
            endpoint,
            response_id,
            prompt,
            [(t, g, g.finish_reason) for t, g in zip(texts, gens, strict=True)],
            domain,
        )
        choices = [
            {
                "index": i,
                **_choice_body(endpoint, t),
                "finish_reason": client_finish(g),
                "confidence": confidence(g),
            }
            for i, (t, g) in enumerate(zip(texts, gens, strict=True))
        ]
        completion_tokens = sum(g.completion_tokens for g in gens)
        usage = {
            "prompt_tokens": gens[0].prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": gens[0].prompt_tokens + completion_tokens,
        }
        return {
            "id": response_id,
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": usage,
            **(echo_metadata or {}),
        }

    def stream(
        self,
        endpoint: str,
        prompt: Any,
        futures: list[asyncio.Future],
        events: asyncio.Queue,
        body: Any,
        domain: str | None = None,
    ) -> StreamingResponse:
        """SSE for `futures` (one per choice); text pieces arrive on `events` as (choice, piece)."""
        prefix, kind = OBJECTS[endpoint]
        response_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        echoed = metadata_echo(body, domain)
        for i, future in enumerate(futures):
            future.add_done_callback(lambda f, i=i: events.put_nowait((i, None)))

        def chunk(choices: list[dict], **extra: Any) -> str:
            return sse(
                {
                    "id": response_id,
                    "object": f"{kind}.chunk" if endpoint != "completions" else kind,
                    "created": created,
                    "model": self.model_name,
                    "choices": choices,
                    **extra,
                    **echoed,
                }
            )

        def piece(i: int, text: str, finish: str | None = None, **extra: Any) -> dict:
            if endpoint == "completions":
                return {"index": i, "text": text, "logprobs": None, "finish_reason": finish, **extra}
            return {
                "index": i,
                "delta": {"content": text} if text else {},
                "logprobs": None,
                "finish_reason": finish,
                **extra,
            }

        async def events_stream() -> AsyncIterator[str]:
            sent, done, gens = [""] * len(futures), 0, {}
            try:
                if endpoint != "completions":
                    yield chunk(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                            for i in range(len(futures))
                        ]
                    )
                while done < len(futures):
                    i, text = await events.get()
                    if text is not None:
                        sent[i] += text
                        yield chunk([piece(i, text)])
                        continue
                    done += 1
                    future = futures[i]
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        yield sse_error(batcher_failure(future.exception()))
                        return
                    gen = gens[i] = future.result()
                    final = self.shown_text(gen)
                    rest = final[len(sent[i]) :] if final.startswith(sent[i]) else ""
                    if rest:
                        yield chunk([piece(i, rest)])
                    yield chunk([piece(i, "", client_finish(gen), confidence=confidence(gen))])
                ordered = [gens[i] for i in range(len(futures))]
                await self.record(
                    endpoint,
                    response_id,
                    prompt,
                    [(self.shown_text(g), g, g.finish_reason) for g in ordered],
                    domain,
                )
                if include_usage:
                    tokens = sum(g.completion_tokens for g in ordered)
                    yield chunk(
                        [],
                        usage={
                            "prompt_tokens": ordered[0].prompt_tokens,
                            "completion_tokens": tokens,
                            "total_tokens": ordered[0].prompt_tokens + tokens,
                        },
                    )
                yield sse("[DONE]")
            finally:  # the client went away (or we are done): queued requests are dropped, a batch can stop
                for future in futures:
                    future.cancel()

        return StreamingResponse(
            events_stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- /v1/score, /v1/feedback ---------------------------------------------------------------------------

    async def score(self, body: ScoreRequest) -> dict:
        """POST /v1/score: the confidence of a completion another engine generated."""
        self.check_model(body.model)
        domain = request_domain(body)
        # every request is checked before it is batched: a bad id must not fail the batch it would join
        prompt, completion, param = score_inputs(body, self.model.vocab_size)
        stop = parse_stop(body.stop)
        if isinstance(completion, list):
            completion_len = len(completion)
        else:  # an upper bound: count_tokens may add special tokens
            completion_len = await asyncio.to_thread(self.model.count_tokens, completion) if completion else 0
        await self.check_length(prompt, completion_len, param)
        try:
            result = await self.batcher.score(prompt, completion, stop, domain)
        except (QueueFullError, ModelError) as err:
            raise batcher_failure(err) from None
        response_id = f"score-{uuid.uuid4().hex}"
        text = completion if isinstance(completion, str) else None
        await self.record("score", response_id, prompt, [(text, result, "scored")], domain)
        return {
            "id": response_id,
            "object": "score",
            "created": int(time.time()),
            "model": self.model_name,
            "p_correct": result.p_correct,
            "abstained": result.abstained,
            "threshold": result.threshold,
            "score": result.score,
            "layer": result.layer,
            "position": result.position,
            "answer_tokens": list(result.answer_tokens),
            "answer_text": result.answer_text,
            "novelty": getattr(result, "novelty", None),
            "in_domain": getattr(result, "in_domain", None),
            "model_refused": result.model_refused,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            **metadata_echo(body, domain),
        }

    async def feedback(self, body: FeedbackRequest) -> dict:
        """POST /v1/feedback: label a served choice (404 for an id this server never served)."""
        response_id = body.id if body.index == 0 else f"{body.id}:{body.index}"
        try:
            previous = await asyncio.to_thread(self.store.record_feedback, response_id, body.correct)
        except UnknownResponseError:
            raise APIError(
                404,
                f"No response with id '{echo(body.id)}' (choice {body.index}) was served by this server.",
                param="id",
                code="response_not_found",
            ) from None
        except (sqlite3.Error, OSError) as err:  # the client learns the label was not stored and can retry
            self.store_error = f"{type(err).__name__}: {err}"
            self.metrics.observe_feedback_write_error()
            log.error("feedback database: label of %s not stored (%s)", response_id, self.store_error)
            raise APIError(
                503,
                f"The label was not stored: the feedback database failed ({self.store_error}). Retry later.",
                type_="server_error",
                code="feedback_store_unavailable",
            ) from None
        if self.auto is not None:  # wakes the background worker; never waits for it
            self.auto.notify()
        return {
            "object": "feedback",
            "id": body.id,
            "index": body.index,
            "correct": body.correct,
            "replaced": previous,
        }

    # -- /v1/models, /health, /metrics ---------------------------------------------------------------------

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": int(self.started),
                    "owned_by": "probecal",
                }
            ],
        }

    def health(self) -> tuple[dict, bool]:
        """(the /health body, whether the server is serving: False gives 503)."""
        ok = self.batcher.running
        body = {
            # degraded: answers are served, but the feedback database failed its last write
            "status": ("degraded" if self.store_error else "ok") if ok else "unavailable",
            "feedback_db": {"ok": self.store_error is None, "error": self.store_error},
            "model": self.model_name,
            "queue_depth": self.batcher.depth,
            "max_batch_size": self.batcher.max_batch_size,
            "uptime_s": round(time.time() - self.started, 3),
            "upstream": self.settings.upstream,
        }
        return body, ok

    async def prometheus(self) -> str:
        """GET /metrics: the counters and the rolling calibration (read off the event loop)."""
        settings = self.settings

        def read():
            store, window, bins = self.store, settings.calibration_window, settings.calibration_bins
            current, previous = store.artifact_history()
            domains = {
                role: store.domain_calibration(digest, window, bins, settings.metrics_max_domains)
                for role, digest in (("current", current), ("previous", previous))
                if digest
            }
            return store.calibration(window, bins), store.counts(), domains

        try:
            self._last_store_read = await asyncio.to_thread(read)
        except (sqlite3.Error, OSError) as err:
            # the counters (probecal_feedback_write_errors_total above all) stay visible; the database's
            # gauges keep their last values, NaN before any read has worked
            self.store_error = f"{type(err).__name__}: {err}"
            log.error("feedback database: /metrics shows the last values read (%s)", self.store_error)
        nothing = (
            calibration_stats([], [], settings.calibration_bins),
            dict.fromkeys(STORE_COUNTS, math.nan),
            {},
        )
        calib, counts, domains = self._last_store_read or nothing
        return self.metrics.render(calib, counts, self.batcher.depth, settings.calibration_window, domains)

    # -- /admin/reload -------------------------------------------------------------------------------------

    async def reload(self, probe_dir: Any) -> dict:
        """POST /admin/reload: verify the artifact in `probe_dir` off the event loop, then swap it in between
        two batches. 400 for a bad artifact (the old one keeps serving), 409 while another reload runs, 501 for
        a model that cannot reload."""
        model = self.model
        if not all(hasattr(model, name) for name in ("load_artifact", "swap_artifact")):
            raise APIError(
                501,
                "This model cannot reload its probe artifact.",
                type_="server_error",
                code="reload_unsupported",
            )
        if not isinstance(probe_dir, str) or not probe_dir:
            raise APIError(
                400,
                "Missing required parameter: 'probe_dir' (the folder of a saved probe artifact).",
                param="probe_dir",
                code="missing_parameter",
            )
        if self.reload_lock.locked():
            raise APIError(
                409, "Another reload is in progress; retry when it has finished.", code="reload_in_progress"
            )
        async with self.reload_lock:
            started = time.perf_counter()
            try:  # reads, hashes and rebuilds the artifact in a worker thread: requests keep being served
                artifact = await asyncio.to_thread(model.load_artifact, probe_dir)
                await asyncio.to_thread(smoke_test, artifact)
            except Exception as err:  # ArtifactError, a missing file, a wrong fingerprint, a bad calibrator
                self.metrics.observe_reload(False)
                raise APIError(
                    400,
                    f"The artifact in '{echo(probe_dir, 200)}' was refused; the previous one keeps "
                    f"serving: {type(err).__name__}: {err}",
                    param="probe_dir",
                    code="artifact_refused",
                ) from None
            previous_dir = self.probe_dir
            try:
                old = await self.batcher.run_on_model_thread(lambda: model.swap_artifact(artifact))
            except QueueFullError as err:
                raise batcher_failure(err) from None
            self.probe_dir = probe_dir
            try:  # the new artifact serves already; only its lineage record is missing
                await asyncio.to_thread(self.store.record_artifact, artifact.digest, probe_dir)
            except (sqlite3.Error, OSError) as err:
                self.store_error = f"{type(err).__name__}: {err}"
                self.metrics.observe_feedback_write_error()
                log.error("feedback database: reload of %s not recorded (%s)", probe_dir, self.store_error)
            self.metrics.observe_reload(True)
        return {
            "object": "reload",
            "changed": getattr(old, "digest", None) != artifact.digest,
            "current": _artifact_summary(artifact, probe_dir),
            "previous": _artifact_summary(old, previous_dir),
            "seconds": round(time.perf_counter() - started, 4),
        }


def _artifact_summary(artifact: Any, probe_dir: str | None) -> dict[str, Any]:
    meta = getattr(artifact, "metadata", None)
    calibrator = getattr(artifact, "calibrator", None)
    return {
        "probe_dir": probe_dir,
        "digest": getattr(artifact, "digest", None),
        "layer": getattr(meta, "layer", None),
        "position": getattr(meta, "position", None),
        "calibrator": getattr(meta, "calibrator_kind", None),
        "domains": sorted(
            getattr(calibrator, "per_category_", None) or getattr(calibrator, "offsets_", None) or {}
        ),
    }


def smoke_test(artifact: Any) -> None:
    """The artifact scores a vector of its own width to finite probabilities in [0, 1], with and without a
    domain (a calibrator that cannot predict is refused before it serves)."""
    predict = getattr(artifact, "predict", None)
    width = getattr(getattr(artifact, "probe", None), "n_features_in_", None)
    if predict is None or width is None:
        return
    X = np.zeros((2, int(width)), dtype=np.float32)
    for categories in (None, np.asarray(["", "__probecal_unknown_domain__"])):
        p, _ = predict(X, categories=categories)
        p = np.asarray(p, dtype=float)
        if p.shape != (2,) or not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
            raise ValueError(
                f"the artifact's probabilities on a test vector are not finite values in [0, 1]: {p}"
            )
