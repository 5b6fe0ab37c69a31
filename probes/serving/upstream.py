"""Proxy mode (`serve.upstream`): forward completions to an OpenAI-compatible engine (vLLM, llama.cpp's
server, SGLang, TGI's OpenAI API, ...), then score every returned choice through the /v1/score path and add
`confidence`.

- Requests: `serve.upstream_defaults` (e.g. `{temperature: 0, max_tokens: 64}`) fills in what a request does
  not say, so the engine decodes as the probe was trained (greedy) rather than at its own default sampling.
  Engine-specific sampling options (`top_k`, `min_p`, `repetition_penalty`, guided decoding, ...) pass
  through; probecal validates only what it interprets itself. `confidence.decoding` says how the scored
  answer was decoded (`greedy`, `temperature`; `null` temperature: the engine's own default).
- Pre-generation abstention (a `prompt_last` probe with a threshold) is decided before the upstream is
  called: an abstained request spends no upstream tokens.
- Abstention, the same in both modes: a non-streamed abstained answer's text is replaced by the abstention
  message; a streamed one has been sent already, and its final chunk's `confidence.abstained` says so.
- Streaming passes the upstream's chunks through (our id in place of its own, `finish_reason` held back),
  then one chunk per choice with its `finish_reason` and `confidence`, then the usage chunk if the engine
  sent one (`stream_options.include_usage`), then `[DONE]`.
- Failures are OpenAI's error shape, never a 500 or a hang: an upstream 4xx keeps its status (its
  `error.code` as a string, its message capped); a 5xx, a redirect, or a malformed answer (not JSON, no
  usable `choices`, a bad chunk, a stream without `[DONE]`, more than `serve.upstream_max_bytes`, a
  completion longer than the model's context) is a 502 naming what was wrong; an unreachable engine a 502;
  silence past `serve.upstream_timeout_s` or an answer unfinished after `serve.upstream_deadline_s` a 504.
  In a stream the status line has gone: the error comes as an SSE error event.
- A client that leaves (while the engine is still answering, streamed or not) closes the upstream call at
  once, rather than at the engine's next chunk or at the deadline: the engine stops spending tokens on it.
- Token ids: where the engine returns the ids it generated, those are scored, not a re-encoding of its
  text (a tokenizer may split the same text differently): vLLM's `choices[].token_ids`
  (`return_token_ids: true`), llama.cpp's `choices[].logprobs.content[].id` (`logprobs: true`,
  `top_logprobs: 1`; completions: `logprobs: 1`), in streams too. Otherwise the text is re-encoded.
  `confidence.scored_from` says which (`token_ids` or `text`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from probes.runtime.wrapper import ProbedGeneration
from probes.serving.batcher import ModelError, QueueFullError
from probes.serving.protocol import APIError, Prompt, parse_stop, request_domain, unicode_problem
from probes.serving.serving import (
    OBJECTS,
    Server,
    batcher_failure,
    confidence,
    metadata_echo,
    sse,
    sse_error,
)

ERROR_MESSAGE_CHARS = 1000  # an engine's error message is echoed up to this long
ERROR_BODY_BYTES = 64_000  # of an error answer, no more than this is read


ClientLeft = Callable[
    [], Awaitable[None]
]  # returns once the client has disconnected (api_router.client_left)
T = TypeVar("T")


class _ClientLeft(Exception):
    """The client disconnected while the engine was answering; nobody is left to answer."""


async def _unless_client_leaves(work: Awaitable[T], client_left: ClientLeft | None) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled (which closes its upstream
    connection: httpx drops a response cancelled mid-read) and _ClientLeft is raised."""
    if client_left is None:
        return await work
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise _ClientLeft
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its connection is closed before we go on


def _client_closed() -> APIError:
    # nginx's 499: counted in /metrics as such; the client is gone and never reads it
    return APIError(499, "The client closed the request.", code="client_closed_request")


class _Malformed(Exception):
    """What was wrong with the engine's answer (-> 502)."""


def _bad_answer(base_url: str, what: str) -> APIError:
    return APIError(
        502,
        f"The upstream engine at {base_url} sent a malformed answer: {what}.",
        type_="server_error",
        code="upstream_bad_response",
    )


def _deadline_error(base_url: str, deadline_s: float) -> APIError:
    return APIError(
        504,
        f"The upstream engine at {base_url} did not finish its answer within {deadline_s:g} s "
        "(serve.upstream_deadline_s).",
        type_="server_error",
        code="upstream_timeout",
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
        f"The upstream engine at {base_url} is unreachable ({type(err).__name__}: {str(err)[:200]}).",
        type_="server_error",
        code="upstream_unreachable",
    )


def _capped(text: Any) -> str:
    text = str(text)
    return text if len(text) <= ERROR_MESSAGE_CHARS else text[:ERROR_MESSAGE_CHARS] + " ... (cut)"


def _upstream_error(status: int, content: bytes, headers: httpx.Headers | None = None) -> APIError:
    """The upstream's error in OpenAI's shape: a 4xx keeps its status, a 5xx or a redirect is a 502."""
    if 300 <= status < 400:
        where = (headers or {}).get("location", "?")
        return APIError(
            502,
            f"The upstream engine answered {status} (a redirect to {_capped(where)}); redirects are not "
            "followed: set serve.upstream to the engine's own base URL.",
            type_="server_error",
            code="upstream_redirect",
        )
    try:
        error = json.loads(content)["error"]
        if isinstance(error, str):
            error = {"message": error}
        message, kind = _capped(error.get("message", "upstream error")), error.get("type")
        param, code = error.get("param"), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = _capped(content.decode("utf-8", "replace")) or "(no body)"
        kind = param = code = None
    if status >= 500 or status < 400:
        return APIError(
            502,
            f"The upstream engine failed ({status}): {message}",
            type_="server_error",
            code="upstream_error",
        )
    return APIError(
        status,
        message if kind else f"The upstream engine answered {status}: {message}",
        type_=str(kind) if kind else "upstream_error",
        param=str(param) if param is not None else None,
        code=str(code) if code is not None else None,  # llama.cpp sends an integer
    )


def _choice_text(choice: Any, endpoint: str, streamed: bool) -> str:
    """The text of one choice (a delta's piece when streamed); _Malformed when it has none of the right type."""
    if not isinstance(choice, dict):
        raise _Malformed(f"a choice is {type(choice).__name__}, not an object")
    if endpoint == "completions":
        text = choice.get("text")
    else:
        holder = choice.get("delta" if streamed else "message")
        if holder is not None and not isinstance(holder, dict):
            raise _Malformed(f"a choice's {'delta' if streamed else 'message'} is not an object")
        text = (holder or {}).get("content")
    if text is not None and not isinstance(text, str):
        raise _Malformed(f"a choice's text is {type(text).__name__}, not a string")
    if text and (problem := unicode_problem(text)):
        raise _Malformed(f"a choice's text holds {problem}")
    return text or ""


def _choice_index(choice: dict, n: int) -> int:
    index = choice.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
        raise _Malformed(f"a choice's index is {json.dumps(index)[:40]}, not an integer in [0, {n})")
    return index


def engine_token_ids(choice: dict, vocab_size: int | None) -> list[int] | None:
    """The token ids the engine generated for a choice (a chunk's piece when streamed), where it returns
    them: vLLM's `token_ids`, llama.cpp's `logprobs.content[].id`. None when it sends none, or any that is
    not a token of the model's vocabulary (another model's ids say nothing: the text is scored then)."""
    ids = choice.get("token_ids")
    if ids is None:
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(content, list) and all(isinstance(entry, dict) for entry in content):
            ids = [entry.get("id") for entry in content]
    if not isinstance(ids, list) or not ids:
        return None
    limit = vocab_size or float("inf")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limit for t in ids):
        return None
    return ids


def _choices(data: Any, endpoint: str, n: int) -> tuple[list[dict], list[str]]:
    if not isinstance(data, dict):
        raise _Malformed(f"the body is a JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _Malformed("`choices` is missing, null, empty or not a list")
    texts = [_choice_text(c, endpoint, streamed=False) for c in choices]
    for c in choices:
        _choice_index(c, n)
    return choices, texts


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


def _decoding(forwarded: dict) -> dict[str, Any]:
    """How the engine decoded: greedy at temperature 0 (or top_k 1); None temperature: the engine's default."""
    temperature = forwarded.get("temperature")
    greedy = temperature == 0 or forwarded.get("top_k") == 1
    return {"greedy": bool(greedy), "temperature": temperature}


def _scored_from(completion: str | list[int]) -> str:
    return "text" if isinstance(completion, str) else "token_ids"


def _answer_chars(result: Any, text: str) -> list[int] | None:
    """[start, end) of `text` the probe read (the graded answer), None for a prompt_last probe."""
    answer = getattr(result, "answer_text", "")
    if result.position == "prompt_last" or not answer:
        return None
    at = text.find(answer)
    return None if at < 0 else [at, at + len(answer)]


async def _until_client_leaves(
    chunks: AsyncIterator[str], client_left: ClientLeft | None
) -> AsyncIterator[str]:
    """`chunks` until the client disconnects. Needed because a server on ASGI 2.4 (uvicorn) tells a
    streaming response of a disconnect only when it next writes: a silent engine would keep its call open."""
    try:
        while True:
            try:
                yield await _unless_client_leaves(anext(chunks), client_left)
            except (StopAsyncIteration, _ClientLeft):
                return
    finally:
        await chunks.aclose()


class UpstreamProxy:
    """Proxy mode's work: one pooled async HTTP client to the engine (opened on app start, closed on
    shutdown), and the `Server` whose model scores, and whose store records, what the engine returns."""

    def __init__(self, server: Server, base_url: str, connect_timeout_s: float, timeout_s: float):
        self.server = server
        self.base_url = base_url.rstrip("/")
        settings = server.settings
        self.deadline_s = float(getattr(settings, "upstream_deadline_s", 300.0))
        self.max_bytes = int(getattr(settings, "upstream_max_bytes", 4_000_000))
        self.defaults = dict(getattr(settings, "upstream_defaults", None) or {})
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            follow_redirects=False,
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def health(self) -> dict[str, Any]:
        """The engine's state for /health: "ok" when GET {upstream}/models answers 200 within 2 s."""
        try:
            reply = await self.client.get("/models", timeout=2.0)
            state = "ok" if reply.status_code == 200 else f"error {reply.status_code}"
        except httpx.HTTPError as err:
            state = f"unreachable ({type(err).__name__})"
        return {"url": self.base_url, "status": state}

    def forwarded(self, raw: dict) -> dict:
        """The request as sent to the engine: `serve.upstream_defaults` for what the client did not say,
        probecal's own top-level `domain` removed (OpenAI's `metadata` goes on to the engine)."""
        out = {k: v for k, v in self.defaults.items() if raw.get(k) is None}
        if raw.get("max_completion_tokens") is not None:
            out.pop("max_tokens", None)
        out |= {k: v for k, v in raw.items() if k != "domain"}
        out["model"] = raw.get("model") or self.server.model_name
        return out

    async def complete(
        self,
        endpoint: str,
        body: Any,
        raw: dict,
        prompt: Prompt,
        param: str,
        client_left: ClientLeft | None = None,
    ) -> Any:
        """Forward one completion / chat completion (`raw`: the request's JSON) and add confidences;
        `client_left` returns when the client disconnects, which cancels the upstream call."""
        server = self.server
        domain = request_domain(body)
        echoed = metadata_echo(body, domain)
        prompt_tokens = await server.check_length(prompt, 0, param)
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
        forwarded = self.forwarded(raw)
        decoding = _decoding(forwarded)
        if body.stream:
            return await self._open_stream(
                endpoint,
                path,
                forwarded,
                prompt,
                prompt_tokens,
                n,
                stop,
                domain,
                echoed,
                decoding,
                client_left,
            )
        try:
            status, content, headers = await _unless_client_leaves(self._post(path, forwarded), client_left)
        except _ClientLeft:
            raise _client_closed() from None
        if status != 200:
            raise _upstream_error(status, content, headers)
        try:
            data = json.loads(content)
        except ValueError as err:
            raise _bad_answer(self.base_url, f"the body is not JSON ({str(err)[:120]})") from None
        try:
            choices, texts = _choices(data, endpoint, n)
        except _Malformed as err:
            raise _bad_answer(self.base_url, str(err)) from None
        vocab_size = getattr(server.model, "vocab_size", None)
        scored = [  # the engine's own ids where it returned them, else its text
            (engine_token_ids(c, vocab_size) if t else None) or t for c, t in zip(choices, texts, strict=True)
        ]
        await self._check_completions(prompt_tokens, scored)
        results = await self._scores(prompt, scored, stop, domain)
        message = server.settings.abstention_message or getattr(server.model, "abstention_message", None)
        for choice, text, what, result in zip(choices, texts, scored, results, strict=True):
            choice["confidence"] = confidence(result) | {
                "answer_chars": _answer_chars(result, text),
                "decoding": decoding,
                "scored_from": _scored_from(what),
            }
            if result.abstained and message is not None:  # as probecal's own server does
                choice["confidence"]["answer_chars"] = None
                if endpoint == "completions":
                    choice["text"] = message
                else:
                    choice["message"] = {**(choice.get("message") or {}), "content": message}
        # our own id (the one /v1/feedback knows): upstream ids need not be unique across engines
        response_id = data["id"] = f"{OBJECTS[endpoint][0]}-{uuid.uuid4().hex}"
        data["choices"] = choices
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

    async def _post(self, path: str, forwarded: dict) -> tuple[int, bytes, httpx.Headers]:
        """(status, body, headers) of one non-streamed call, within the deadline and the byte cap."""
        try:
            async with asyncio.timeout(self.deadline_s):
                async with self.client.stream("POST", path, json=forwarded) as reply:
                    limit = self.max_bytes if reply.status_code == 200 else ERROR_BODY_BYTES
                    content = bytearray()
                    async for piece in reply.aiter_bytes():
                        content += piece
                        if len(content) > limit:
                            if reply.status_code != 200:
                                break  # enough of an error body to say what it was
                            raise _bad_answer(
                                self.base_url,
                                f"the answer is larger than {self.max_bytes} bytes (serve.upstream_max_bytes)",
                            )
                    return reply.status_code, bytes(content[:limit]), reply.headers
        except TimeoutError:
            raise _deadline_error(self.base_url, self.deadline_s) from None
        except httpx.HTTPError as err:
            raise _transport_error(err, self.base_url) from None

    async def _check_completions(self, prompt_tokens: int, completions: list[str | list[int]]) -> None:
        """502 when a completion (text or ids) is longer than the model's context allows (it could not be
        scored whole)."""
        model = self.server.model
        limit = model.max_context_tokens
        for completion in completions:
            if len(completion) <= limit:  # a token is at least one character: nothing to count
                continue
            if isinstance(completion, list):
                tokens = len(completion)
            else:
                tokens = await asyncio.to_thread(model.count_tokens, completion)
            if prompt_tokens + tokens > limit:
                raise _bad_answer(
                    self.base_url,
                    f"a completion of {tokens} tokens after a prompt of {prompt_tokens} exceeds the model's "
                    f"context of {limit} tokens (set max_tokens, or serve.upstream_defaults.max_tokens)",
                )

    async def _scores(
        self,
        prompt: Prompt,
        completions: list[str | list[int]],
        stop: tuple[str, ...] | None,
        domain: str | None = None,
    ) -> list[Any]:
        batcher = self.server.batcher
        try:
            return list(await asyncio.gather(*(batcher.score(prompt, c, stop, domain) for c in completions)))
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

    async def _open_stream(
        self, endpoint, path, forwarded, prompt, prompt_tokens, n, stop, domain, echoed, decoding, client_left
    ) -> StreamingResponse:
        started = time.monotonic()
        try:
            request = self.client.build_request("POST", path, json=forwarded)
            reply = await _unless_client_leaves(
                asyncio.wait_for(self.client.send(request, stream=True), self.deadline_s), client_left
            )
        except _ClientLeft:
            raise _client_closed() from None
        except TimeoutError:
            raise _deadline_error(self.base_url, self.deadline_s) from None
        except httpx.HTTPError as err:
            raise _transport_error(err, self.base_url) from None
        if reply.status_code != 200 or "text/event-stream" not in reply.headers.get("content-type", ""):
            try:
                status, content = reply.status_code, await self._head(reply)
            finally:
                await reply.aclose()
            if status != 200:
                raise _upstream_error(status, content, reply.headers)
            raise _bad_answer(
                self.base_url,
                f"a streamed request was answered with {reply.headers.get('content-type', 'no content type')}, "
                "not an event stream",
            )
        chunks = self._pass_through(
            endpoint, reply, prompt, prompt_tokens, n, stop, domain, echoed, decoding, started
        )
        return StreamingResponse(
            _until_client_leaves(chunks, client_left),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _head(self, reply: httpx.Response) -> bytes:
        content = bytearray()
        try:
            async with asyncio.timeout(min(self.deadline_s, 10.0)):
                async for piece in reply.aiter_bytes():
                    content += piece
                    if len(content) > ERROR_BODY_BYTES:
                        break
        except (TimeoutError, httpx.HTTPError):
            pass
        return bytes(content[:ERROR_BODY_BYTES])

    async def _lines(self, reply: httpx.Response, started: float) -> AsyncIterator[str]:
        """The stream's lines, each within what is left of the deadline, all within the byte cap."""
        lines = reply.aiter_lines()
        read = 0
        while True:
            left = self.deadline_s - (time.monotonic() - started)
            if left <= 0:
                raise _deadline_error(self.base_url, self.deadline_s)
            try:
                line = await asyncio.wait_for(anext(lines), left)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _deadline_error(self.base_url, self.deadline_s) from None
            read += len(line) + 1
            if read > self.max_bytes:
                raise _bad_answer(
                    self.base_url,
                    f"the stream is larger than {self.max_bytes} bytes (serve.upstream_max_bytes)",
                )
            yield line

    async def _pass_through(
        self, endpoint, reply, prompt, prompt_tokens, n, stop, domain, echoed, decoding, started
    ) -> AsyncIterator[str]:
        """The upstream's chunks (our id in place of its own, finish_reason held back), then one chunk per
        choice with its `finish_reason` and `confidence`, then the usage chunk if any, then [DONE]."""
        texts: dict[int, str] = {}
        ids: dict[int, list[int] | None] = {}  # None once a piece of text came without its ids
        vocab_size = getattr(self.server.model, "vocab_size", None)
        finishes: dict[int, str] = {}
        last: dict[str, Any] = {}
        usage: dict | None = None
        response_id = f"{OBJECTS[endpoint][0]}-{uuid.uuid4().hex}"  # replaces the upstream's (see complete)
        try:
            done = False
            async for line in self._lines(reply, started):
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event:/id: fields
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    raise _Malformed(f"a chunk is not JSON ({_capped(payload)[:80]!r})") from None
                if not isinstance(chunk, dict):
                    raise _Malformed(f"a chunk is a JSON {type(chunk).__name__}, not an object")
                if "error" in chunk:  # the engine's own error event
                    error = (
                        chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                    )
                    raise _Malformed(f"the engine sent an error event: {_capped(error.get('message'))}")
                choices = chunk.get("choices")
                if choices is None and chunk.get("usage") is not None:
                    choices = []
                if not isinstance(choices, list):
                    raise _Malformed("a chunk's `choices` is missing or not a list")
                relayed = []
                for choice in choices:
                    piece = _choice_text(choice, endpoint, streamed=True)
                    i = _choice_index(choice, n)
                    texts[i] = texts.get(i, "") + piece
                    piece_ids = engine_token_ids(choice, vocab_size)
                    if (piece and piece_ids is None) or ids.get(i, []) is None:
                        ids[i] = None
                    elif piece_ids:
                        ids[i] = ids.get(i, []) + piece_ids
                    if choice.get("finish_reason"):
                        finishes[i] = str(choice["finish_reason"])
                        if not piece:
                            continue  # the finish_reason comes once, with the confidence
                        choice = {**choice, "finish_reason": None}
                    relayed.append(choice)
                last = chunk
                if chunk.get("usage") is not None and not relayed:
                    usage = chunk  # sent last, after the confidences
                    continue
                if choices and not relayed:
                    continue
                yield sse({**chunk, "id": response_id, "choices": relayed})
            if not done:
                raise _Malformed("the stream ended without [DONE] (cut off)")
            if not texts:
                raise _Malformed("the stream carried no choices")
            indices = sorted(texts)
            scored = [ids.get(i) or texts[i] if texts[i] else "" for i in indices]
            await self._check_completions(prompt_tokens, scored)
            results = await self._scores(prompt, scored, stop, domain)
            kind = OBJECTS[endpoint][1] + ("" if endpoint == "completions" else ".chunk")
            for i, what, result in zip(indices, scored, results, strict=True):
                choice = {
                    "index": i,
                    "logprobs": None,
                    "finish_reason": finishes.get(i, "stop"),
                    "confidence": confidence(result)
                    | {
                        "answer_chars": _answer_chars(result, texts[i]),
                        "decoding": decoding,
                        "scored_from": _scored_from(what),
                    },
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
            if usage is not None:
                yield sse({**usage, "id": response_id})
            await self.server.record(
                endpoint,
                response_id,
                prompt,
                [(texts[i], r, finishes.get(i, "stop")) for i, r in zip(indices, results, strict=True)],
                domain,
            )
            yield sse("[DONE]")
        except _Malformed as err:
            yield sse_error(_bad_answer(self.base_url, str(err)))
        except APIError as failure:
            yield sse_error(failure)
        except httpx.HTTPError as err:
            yield sse_error(_transport_error(err, self.base_url))
        finally:
            await reply.aclose()
