"""Answers from an OpenAI-compatible engine (`extract.engine=openai`: vLLM, llama.cpp's server, SGLang, ...).

The engine only generates; the hidden states and logit signals come from one teacher-forced forward in
probecal over prompt + answer (`extract.forward.capture_completions`, the forward /v1/score runs). Per
question, one `POST <engine_url>/completions` with:
- the prompt as token ids from the ONE prompt encoder (extract.prompts): the engine sees exactly the ids hf
  generation sees (no second tokenization, no chat template applied by the engine);
- greedy decoding (`temperature: 0`), `max_tokens` = generation.max_new_tokens, `stop_token_ids` = the
  model's EOS ids, and no stop strings: probecal cuts the answer from the returned tokens by its own rules
  (extract.tokens.cut_generation), so the answer is cut exactly as hf's is;
- `return_token_ids: true` (vLLM >= 0.10.2): the answer's ids as the engine generated them. An engine that
  returns no ids gets its text re-encoded, and the row records `answer_reencoded=true`.
`extract.engine_concurrency` requests are in flight at once (the engine batches them).

Any bad answer (an HTTP error, a redirect, not JSON, no usable choice, no complete answer within
`extract.engine_timeout_s`, a body cut short or over MAX_BODY_BYTES) raises `EngineError`: one line naming
the engine URL and the question id (the CLI prints it and exits 2). Shards written before it are kept, so
the same command resumes once the engine is fixed. Plain HTTP from the standard library: extraction needs
no serving extras.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

ENGINES: tuple[str, ...] = ("hf", "openai")
MAX_BODY_BYTES = 8_000_000  # an answer of max_new_tokens tokens with their ids is a few KB
MESSAGE_CHARS = 300  # of an engine's error message, no more than this goes into the error line


class EngineError(RuntimeError):
    """The engine could not be used or sent a bad answer; the message is one line naming URL and question."""


class _BadAnswer(Exception):
    """What was wrong with one HTTP exchange (turned into an EngineError naming the question)."""


@dataclass(frozen=True)
class EngineAnswer:
    """One completion as the engine returned it: `token_ids` None when it sent text only."""

    text: str
    token_ids: list[int] | None
    finish_reason: str  # "stop" (at an EOS id) | "length" (max_tokens reached)


def _limit(conn: http.client.HTTPConnection, deadline: float) -> None:
    """Every socket wait is capped by what is left of the request's deadline: a trickling body cannot
    outlast it, a silent engine neither."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    if conn.sock is not None:
        conn.sock.settimeout(left)


def http_json(method: str, url: str, body: Any, timeout_s: float) -> Any:
    """`method url` with a JSON body (None: none); the decoded JSON answer of a 2xx reply. Raises _BadAnswer
    with what was wrong (status, size, cut body, not JSON, no answer within timeout_s)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    deadline = time.monotonic() + timeout_s
    conn = connection(parts.hostname, parts.port, timeout=timeout_s)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    data = None if body is None else json.dumps(body).encode("utf-8")
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        _limit(conn, deadline)
        reply = conn.getresponse()
        chunks, size = [], 0
        while True:
            _limit(conn, deadline)
            chunk = reply.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _BadAnswer(f"sent an answer over {MAX_BODY_BYTES:,} bytes")
            chunks.append(chunk)
        if reply.length:  # the connection closed before Content-Length bytes arrived
            raise _BadAnswer(f"cut its answer short ({size:,} of {size + reply.length:,} bytes)")
    except TimeoutError:
        raise _BadAnswer(
            f"sent no complete answer within {timeout_s:g} s (extract.engine_timeout_s)"
        ) from None
    except http.client.IncompleteRead as err:
        raise _BadAnswer(f"cut its answer short ({len(err.partial):,} bytes)") from None
    except (OSError, http.client.HTTPException) as err:
        raise _BadAnswer(
            f"cannot be reached or dropped the connection ({type(err).__name__}: {err})"
        ) from None
    finally:
        conn.close()
    content = b"".join(chunks)
    if not 200 <= reply.status < 300:
        raise _BadAnswer(f"answered HTTP {reply.status}{_message(content)}")
    try:
        return json.loads(content)
    except ValueError:
        raise _BadAnswer(f"sent an answer that is not JSON ({content[:60]!r})") from None


def _message(content: bytes) -> str:
    """': <the engine's error message>' (OpenAI's error shape, else the body's text), capped; '' if none."""
    try:
        data = json.loads(content)
        text = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("detail", data)
    except (ValueError, AttributeError, KeyError, TypeError):
        text = content.decode("utf-8", "replace")
    text = " ".join(str(text).split())
    return f": {text[:MESSAGE_CHARS]}{'...' if len(text) > MESSAGE_CHARS else ''}" if text else ""


def _answer(data: Any) -> EngineAnswer:
    """The first choice of a /completions answer; _BadAnswer if it has none that can be used."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _BadAnswer("sent an answer without a usable 'choices' list")
    choice = choices[0]
    text, ids, finish = choice.get("text"), choice.get("token_ids"), choice.get("finish_reason")
    if ids is not None and not (
        isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    ):
        raise _BadAnswer("sent 'token_ids' that are not a list of token ids")
    if ids is None and not isinstance(text, str):
        raise _BadAnswer("sent a choice with neither 'text' nor 'token_ids'")
    if finish not in ("stop", "length"):
        raise _BadAnswer(f"sent finish_reason {finish!r} (expected 'stop' or 'length')")
    return EngineAnswer(text if isinstance(text, str) else "", ids, finish)


def completion_ids(
    answer: EngineAnswer, encode: Callable[[str], list[int]], eos: Sequence[int]
) -> tuple[list[int], bool]:
    """(the answer's token ids as hf generation would hold them, whether they were re-encoded from text).

    An answer that stopped at an EOS the engine did not return (text only, or an engine that drops it) gets
    the model's first EOS id appended: hf's generation holds it, and the cut, the `truncated` flag and an
    empty answer's logit signals read it."""
    reencoded = answer.token_ids is None
    ids = list(encode(answer.text)) if reencoded else list(answer.token_ids)
    if answer.finish_reason == "stop" and eos and not set(eos).intersection(ids):
        ids.append(eos[0])
    return ids, reencoded


class OpenAIEngine:
    """A connection to an OpenAI-compatible engine's base URL (`http://host:port/v1`), checked by `connect`."""

    def __init__(self, url: str, model: str, owned_by: str, timeout_s: float, concurrency: int):
        self.url = url
        self.model = model
        self.owned_by = owned_by
        self.timeout_s = timeout_s
        self.concurrency = concurrency

    @classmethod
    def connect(
        cls, url: str, model: str = "", timeout_s: float = 120.0, concurrency: int = 16
    ) -> OpenAIEngine:
        """GET <url>/models: the engine is up and serves `model` ("" = the one model it lists)."""
        url = url.rstrip("/")
        try:
            data = http_json("GET", f"{url}/models", None, timeout_s)
        except _BadAnswer as err:
            raise EngineError(f"extract.engine_url={url}: GET /models: the engine {err}") from None
        listed = data.get("data") if isinstance(data, dict) else None
        if not isinstance(listed, list) or not all(isinstance(m, dict) and "id" in m for m in listed):
            raise EngineError(f"extract.engine_url={url}: GET /models: no model list in the answer")
        owners = {str(m["id"]): str(m.get("owned_by", "")) for m in listed}
        if model and model not in owners:
            raise EngineError(
                f"extract.engine_model={model!r}: the engine at {url} serves {sorted(owners) or 'no model'}"
            )
        if not model:
            if len(owners) != 1:
                raise EngineError(
                    f"the engine at {url} serves {sorted(owners) or 'no model'}: "
                    "name the one to use with extract.engine_model"
                )
            model = next(iter(owners))
        return cls(url, model, owners[model], timeout_s, concurrency)

    def identity(self) -> dict[str, str]:
        """What the store's key records of the engine: which model, served by what (vLLM's owned_by is
        "vllm", llama.cpp's "llamacpp"). Not the URL: the same engine at another address resumes the store."""
        return {"kind": "openai", "model": self.model, "owned_by": self.owned_by}

    def error(self, question_id: str, what: str) -> EngineError:
        """The one line a bad answer to `question_id` ends the run with ("the engine <what>")."""
        return EngineError(
            f"extract.engine_url={self.url}: question {question_id}: the engine {what}. "
            "Rows already stored are kept: rerun to resume once the engine answers"
        )

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        question_ids: Sequence[str],
        max_tokens: int,
        stop_token_ids: Sequence[int],
    ) -> list[EngineAnswer]:
        """Greedy answers to `prompts` (token ids), in order, `concurrency` requests at a time; the first
        failure cancels what has not started and raises EngineError naming its question."""

        def one(i: int) -> EngineAnswer:
            body = {
                "model": self.model,
                "prompt": list(prompts[i]),
                "max_tokens": max_tokens,
                "temperature": 0,
                "stop_token_ids": list(stop_token_ids),
                "return_token_ids": True,
            }
            try:
                return _answer(http_json("POST", f"{self.url}/completions", body, self.timeout_s))
            except _BadAnswer as err:
                raise self.error(question_ids[i], str(err)) from None

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            futures = [pool.submit(one, i) for i in range(len(prompts))]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                raise failed.exception()
            return [f.result() for f in futures]
