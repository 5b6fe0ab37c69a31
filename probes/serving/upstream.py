"""Proxy mode (`serve.upstream`): forward completions to an OpenAI-compatible engine (vLLM, SGLang, TGI's
OpenAI API, ...), then score every returned choice through the /v1/score path and add `confidence`.

- Pre-generation abstention (a `prompt_last` probe with a threshold) is decided before the upstream is
  called: an abstained request spends no upstream tokens.
- Streaming passes the upstream's chunks through unchanged and appends, per choice, one chunk with the
  `finish_reason` and `confidence` before `[DONE]`.
- Upstream HTTP errors keep the upstream's status and become OpenAI's error shape; an unreachable upstream
  is a 502 and an upstream that stays silent past `serve.upstream_timeout_s` a 504, never a hang.
- The returned text is re-encoded to score it (the OpenAI API returns no token ids): with the same model
  and tokenizer on both sides this matches the engine's tokens for ordinary text; see /v1/score for ids.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from probes.runtime.wrapper import ProbedGeneration
from probes.serving.batcher import ModelError, QueueFullError
from probes.serving.protocol import APIError, Prompt, parse_stop, request_domain
from probes.serving.serving import (
    OBJECTS,
    Server,
    batcher_failure,
    confidence,
    metadata_echo,
    sse,
    sse_error,
)


def _transport_error(err: httpx.HTTPError, base_url: str) -> APIError:
    if isinstance(err, (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)):
        return APIError(
            504,
            f"The upstream engine at {base_url} did not answer in time ({type(err).__name__}; "
            "serve.upstream_timeout_s).",
            type_="server_error",
            code="upstream_timeout",
        )
    return APIError(
        502,
        f"The upstream engine at {base_url} is unreachable ({type(err).__name__}: {err}).",
        type_="server_error",
        code="upstream_unreachable",
    )


def _upstream_error(status: int, content: bytes) -> APIError:
    """The upstream's error, its status kept, in OpenAI's shape."""
    try:
        error = json.loads(content)["error"]
        if isinstance(error, str):
            error = {"message": error}
        return APIError(
            status,
            str(error.get("message", "upstream error")),
            type_=error.get("type") or "upstream_error",
            param=error.get("param"),
            code=error.get("code"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = content.decode("utf-8", "replace")[:200]
        return APIError(status, f"The upstream engine answered {status}: {text}", type_="upstream_error")


def _as_generation(result: Any, text: str, finish: str, completion_tokens: int) -> ProbedGeneration:
    return ProbedGeneration(
        text=text,
        p_correct=result.p_correct,
        score=result.score,
        layer=result.layer,
        position=result.position,
        abstained=result.abstained,
        threshold=result.threshold,
        finish_reason=finish,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=completion_tokens,
        artifact=getattr(result, "artifact", None),
        novelty=getattr(result, "novelty", None),
        in_domain=getattr(result, "in_domain", None),
        model_refused=getattr(result, "model_refused", False),
    )


class UpstreamProxy:
    """Proxy mode's work: one pooled async HTTP client to the engine (opened on app start, closed on
    shutdown), and the `Server` whose model scores, and whose store records, what the engine returns."""

    def __init__(self, server: Server, base_url: str, connect_timeout_s: float, timeout_s: float):
        self.server = server
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def complete(self, endpoint: str, body: Any, raw: dict, prompt: Prompt, param: str) -> Any:
        """Forward one completion / chat completion (`raw`: the request's JSON) and add confidences."""
        server = self.server
        domain = request_domain(body)
        echoed = metadata_echo(body, domain)
        await server.check_length(prompt, 0, param)
        n, stop = body.n or 1, parse_stop(body.stop)
        abstained = await self._abstains_before_generating(prompt, n, domain)
        if abstained is not None:  # no upstream tokens spent
            if not body.stream:
                return await server.respond(endpoint, prompt, abstained, domain, echoed)
            events: asyncio.Queue = asyncio.Queue()
            futures = []
            for gen in abstained:
                future = asyncio.get_running_loop().create_future()
                future.set_result(gen)
                futures.append(future)
            return server.stream(endpoint, prompt, futures, events, body, domain)
        path = "/completions" if endpoint == "completions" else "/chat/completions"
        # the top-level "domain" is probecal's own field; metadata (OpenAI's) goes on to the engine
        forwarded = {
            **{k: v for k, v in raw.items() if k != "domain"},
            "model": raw.get("model") or server.model_name,
        }
        if not body.stream:
            try:
                reply = await self.client.post(path, json=forwarded)
            except httpx.HTTPError as err:
                raise _transport_error(err, self.base_url) from None
            if reply.status_code != 200:
                raise _upstream_error(reply.status_code, reply.content)
            data = reply.json()
            choices = data.get("choices") or []
            texts = [
                (c.get("text") if endpoint == "completions" else (c.get("message") or {}).get("content"))
                or ""
                for c in choices
            ]
            results = await self._scores(prompt, texts, stop, domain)
            for choice, result in zip(choices, results, strict=True):
                choice["confidence"] = confidence(result) | {"answer_chars": None}
            # our own id (the one /v1/feedback knows): upstream ids need not be unique across engines
            response_id = data["id"] = f"{OBJECTS[endpoint][0]}-{uuid.uuid4().hex}"
            await server.record(
                endpoint,
                response_id,
                prompt,
                [
                    (t, r, c.get("finish_reason") or "stop")
                    for t, r, c in zip(texts, results, choices, strict=True)
                ],
                domain,
            )
            return JSONResponse(data | echoed)
        try:
            request = self.client.build_request("POST", path, json=forwarded)
            reply = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            raise _transport_error(err, self.base_url) from None
        if reply.status_code != 200:
            content = await reply.aread()
            await reply.aclose()
            raise _upstream_error(reply.status_code, content)
        return StreamingResponse(
            self._pass_through(endpoint, reply, prompt, stop, domain, echoed),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _scores(
        self, prompt: Prompt, texts: list[str], stop: tuple[str, ...] | None, domain: str | None = None
    ) -> list[Any]:
        batcher = self.server.batcher
        try:
            return list(await asyncio.gather(*(batcher.score(prompt, t, stop, domain) for t in texts)))
        except (QueueFullError, ModelError) as err:
            raise batcher_failure(err) from None

    async def _abstains_before_generating(
        self, prompt: Prompt, n: int, domain: str | None
    ) -> list[ProbedGeneration] | None:
        model = self.server.model
        if (
            not getattr(model, "abstain_before_generating", False)
            or getattr(model, "threshold", None) is None
        ):
            return None
        (result,) = await self._scores(
            prompt, [""], None, domain
        )  # a prompt_last probe reads the prompt only
        if not result.abstained:
            return None
        message = self.server.settings.abstention_message or getattr(
            model, "abstention_message", "I don't know."
        )
        return [_as_generation(result, message, "abstained", 0)] * n

    async def _pass_through(
        self,
        endpoint: str,
        reply: httpx.Response,
        prompt: Prompt,
        stop: tuple[str, ...] | None,
        domain: str | None = None,
        echoed: dict | None = None,
    ) -> AsyncIterator[str]:
        """The upstream's chunks unchanged (our id in place of its own), then one chunk per choice with its
        `finish_reason` and `confidence`, then [DONE]."""
        texts: dict[int, str] = {}
        finishes: dict[int, str] = {}
        last: dict[str, Any] = {}
        response_id = f"{OBJECTS[endpoint][0]}-{uuid.uuid4().hex}"  # replaces the upstream's (see complete)
        try:
            try:
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        yield sse(payload)
                        continue
                    if isinstance(chunk, dict) and "id" in chunk:
                        chunk["id"] = response_id
                    yield sse(chunk)
                    if not isinstance(chunk, dict):
                        continue
                    last = chunk
                    for choice in chunk.get("choices") or []:
                        i = choice.get("index", 0)
                        piece = (
                            choice.get("text")
                            if endpoint == "completions"
                            else (choice.get("delta") or {}).get("content")
                        )
                        texts[i] = texts.get(i, "") + (piece or "")
                        if choice.get("finish_reason"):
                            finishes[i] = choice["finish_reason"]
            except httpx.HTTPError as err:
                yield sse_error(_transport_error(err, self.base_url))
                return
            indices = sorted(texts)
            try:
                results = await self._scores(prompt, [texts[i] for i in indices], stop, domain)
            except APIError as failure:
                yield sse_error(failure)
                return
            kind = OBJECTS[endpoint][1] + ("" if endpoint == "completions" else ".chunk")
            for i, result in zip(indices, results, strict=True):
                choice = {
                    "index": i,
                    "logprobs": None,
                    "finish_reason": finishes.get(i, "stop"),
                    "confidence": confidence(result) | {"answer_chars": None},
                }
                choice |= {"text": ""} if endpoint == "completions" else {"delta": {}}
                yield sse(
                    {
                        "id": response_id,
                        "object": kind,
                        "created": last.get("created", int(time.time())),
                        "model": last.get("model", self.server.model_name),
                        "choices": [choice],
                        **(echoed or {}),
                    }
                )
            await self.server.record(
                endpoint,
                response_id,
                prompt,
                [(texts[i], r, finishes.get(i, "stop")) for i, r in zip(indices, results, strict=True)],
                domain,
            )
            yield sse("[DONE]")
        finally:
            await reply.aclose()
