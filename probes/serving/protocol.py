"""OpenAI request bodies, their validation, the error shape, and what the server needs from a model.

Supported beyond the basics: `stream` (Server-Sent Events, `stream_options.include_usage`), `n` up to
`serve.max_n` (each choice its own confidence). Not supported (clear 400): logprobs (passed on to the
engine in proxy mode), echo, best_of, penalties, logit_bias, seed, tools / functions, non-text response
formats, token-id prompts on the generation endpoints (use /v1/score), several prompts in one request.
Sampling defaults to greedy (temperature 0), the setting probes are trained on.

Domain tag: `metadata: {"domain": "<name>"}` (OpenAI's `metadata`, a dict of strings; the SDK sends it as
`metadata=` or inside `extra_body=`) or a top-level `"domain"` (`extra_body={"domain": ...}`) picks the
per-domain calibrator of the artifact (unknown domain: its global fallback); it is stored with the response
and `metadata` is echoed in the response.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol

try:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("probecal serve needs the `serve` extra: pip install 'probecal[serve]'") from err

from probes.runtime.wrapper import ProbedGeneration
from probes.serving.settings import ServeSettings

Prompt = str | list[dict[str, str]]  # completion text, or chat messages [{"role", "content"}]


class ProbedModelLike(Protocol):
    """What the server needs from `probes.runtime.wrapper.ProbedModel` (tests pass a small double)."""

    model_name: str
    max_context_tokens: int
    max_batch_size: int
    vocab_size: int  # token ids valid for the tokenizer and the model lie in [0, vocab_size)

    def generate(
        self,
        prompts: list[Prompt],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str] | None,
    ) -> list[ProbedGeneration]: ...

    def count_tokens(self, prompt: Prompt) -> int: ...

    def score(self, prompts: list, completions: list, stop: list[str] | None = None) -> list: ...

    # Optional (a model without them serves one domain-less artifact and answers 501 to /admin/reload):
    # generate / score also take `domains=[str | None, ...]` (passed only when a request has a domain);
    # `artifact_digest: str`, `load_artifact(probe_dir) -> artifact` (verified, any thread) and
    # `swap_artifact(artifact)` (installs it between two model calls).


class APIError(Exception):
    """An error returned to the client as OpenAI's {"error": {message, type, param, code}} body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def validation_error(exc: RequestValidationError) -> APIError:
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
        return APIError(
            400,
            f"Unrecognized request argument supplied: '{param}'.",
            param=param,
            code="unrecognized_parameter",
        )
    got = err.get("input")
    return APIError(
        400,
        f"Invalid value for '{param}': {err['msg']} (got {json.dumps(got)[:80]}).",
        param=param,
        code="invalid_type",
    )


class _Body(BaseModel):
    # strict: "5" is not an integer and true is not a number; forbid: a misspelt option is an error
    model_config = ConfigDict(strict=True, extra="forbid")


class _DomainFields(_Body):
    metadata: Any = None  # OpenAI's metadata: up to 16 string keys -> string values; "domain" is read
    domain: Any = None  # the domain tag at the top level (extra_body={"domain": ...})


class _SamplingFields(_DomainFields):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None  # str | list[str], checked in parse_sampling for a clear message
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
    # engine-specific sampling options (vLLM, llama.cpp's server, SGLang): passed on as they are in proxy mode
    # (the engine validates them), refused by probecal's own server (reject_engine_params)
    top_k: Any = None
    min_p: Any = None
    repetition_penalty: Any = None
    repeat_penalty: Any = None
    length_penalty: Any = None
    min_tokens: Any = None
    ignore_eos: Any = None
    skip_special_tokens: Any = None
    return_token_ids: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    grammar: Any = None
    json_schema: Any = None
    cache_prompt: Any = None


class CompletionRequest(_SamplingFields):
    prompt: Any  # str or [str]; checked in completion_prompt
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Any  # str or [{"type": "text", "text": ...}]; checked in chat_prompt
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
    index: int = 0  # which choice of an n > 1 response


class ScoreRequest(_DomainFields):
    """POST /v1/score: the confidence of a completion another engine generated for a prompt."""

    model: str | None = None
    prompt: Any = None  # text, or token ids (exactly one of prompt / messages)
    messages: list[ChatMessage] | None = None
    completion: Any  # text, or token ids (ids avoid tokenizer drift)
    stop: Any = None  # where the answer is cut (default: the probe's training stop strings)


DOMAIN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")  # bounded: it becomes a metrics label


def request_domain(body: _DomainFields) -> str | None:
    """The request's domain tag (None: none given); a clear 400 for a malformed metadata / domain."""
    metadata = body.metadata
    if metadata is not None and not (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in metadata.items()
        )
    ):
        raise APIError(
            400,
            "Invalid value for 'metadata': expected an object of at most 16 string keys "
            "(<= 64 characters) to string values (<= 512 characters).",
            param="metadata",
            code="invalid_value",
        )
    tagged = (metadata or {}).get("domain")
    if body.domain is not None and tagged is not None and body.domain != tagged:
        raise APIError(
            400,
            "'domain' and 'metadata.domain' differ: give the domain once.",
            param="domain",
            code="invalid_value",
        )
    domain = body.domain if body.domain is not None else tagged
    param = "domain" if body.domain is not None else "metadata.domain"
    if domain is not None and not (isinstance(domain, str) and DOMAIN_PATTERN.fullmatch(domain)):
        raise APIError(
            400,
            f"Invalid value for '{param}': expected 1 to 64 characters of letters, digits and "
            "_ . : / - (starting with a letter or digit).",
            param=param,
            code="invalid_value",
        )
    return domain


def _is_off(value: Any) -> bool:
    return value in (None, False, 0, "", [], {}, "none") or value == {"type": "text"}


# option -> why it is refused; each is accepted only absent or at its no-op value (n=1, stream=false, ...)
_UNSUPPORTED = {
    "best_of": "best_of is not supported",
    "logprobs": "logprobs are not supported (the engine's pass through in proxy mode)",
    "top_logprobs": "top_logprobs are not supported (the engine's pass through in proxy mode)",
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


ENGINE_PARAMS = (
    "top_k", "min_p", "repetition_penalty", "repeat_penalty", "length_penalty", "min_tokens", "ignore_eos",
    "skip_special_tokens", "return_token_ids", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "structured_outputs", "grammar", "json_schema", "cache_prompt",
)  # fmt: skip


def reject_engine_params(body: BaseModel) -> None:
    """probecal's own server decodes with transformers' greedy/temperature/top_p only: an engine's option
    is an error here (it is passed on in proxy mode)."""
    for name in ENGINE_PARAMS:
        if getattr(body, name, None) is not None:
            raise APIError(
                400,
                f"'{name}' is an engine's sampling option: it is passed on only in proxy mode (serve.upstream).",
                param=name,
                code="unsupported_parameter",
            )


# computed by the engine in proxy mode (llama.cpp returns its token ids there), by nothing in probecal's own
ENGINE_COMPUTED = ("logprobs", "top_logprobs")


def reject_unsupported(body: BaseModel, max_n: int = 1, proxied: bool = False) -> None:
    n = getattr(body, "n", None)
    if n is not None and not 1 <= n <= max_n:
        raise APIError(
            400,
            f"Invalid value for 'n': {n} is outside [1, {max_n}] (serve.max_n).",
            param="n",
            code="invalid_value",
        )
    options = getattr(body, "stream_options", None)
    if options is not None and not (
        isinstance(options, dict)
        and set(options) <= {"include_usage"}
        and isinstance(options.get("include_usage", False), bool)
    ):
        raise APIError(
            400,
            "Invalid value for 'stream_options': expected {'include_usage': true|false}.",
            param="stream_options",
            code="invalid_value",
        )
    if options is not None and not body.stream:
        raise APIError(
            400,
            "stream_options is only allowed with stream=true.",
            param="stream_options",
            code="invalid_value",
        )
    for name, why in _UNSUPPORTED.items():
        if proxied and name in ENGINE_COMPUTED:
            continue
        value = getattr(body, name, None)
        refused = value not in (None, 1) if name == "best_of" else not _is_off(value)
        if refused:
            raise APIError(
                400, f"Unsupported value for '{name}': {why}.", param=name, code="unsupported_parameter"
            )


@dataclass(frozen=True)
class Sampling:
    """Generation settings; requests are batched together only when these are equal."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] | None


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode, or None. JSON's \\ud83d escapes can carry a lone surrogate, which
    neither the tokenizer nor the feedback database can encode (the tokenizer fails with a TypeError)."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        return f"a lone surrogate {text[err.start]!r} at character {err.start} is not valid Unicode"


def check_text(text: str, param: str) -> str:
    """`text`, or a clear 400 naming `param` when it is not valid Unicode."""
    problem = unicode_problem(text)
    if problem:
        raise APIError(400, f"Invalid value for '{param}': {problem}.", param=param, code="invalid_value")
    return text


def parse_stop(value: Any, param: str = "stop") -> tuple[str, ...] | None:
    stop = [value] if isinstance(value, str) else value
    if stop is not None and (
        not isinstance(stop, list)
        or not 1 <= len(stop) <= 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(
            400,
            f"Invalid value for '{param}': expected a non-empty string or a list of 1 to 4 "
            "non-empty strings.",
            param=param,
            code="invalid_value",
        )
    return tuple(check_text(s, param) for s in stop) if stop else None


def parse_sampling(body: _SamplingFields, max_tokens: int | None, settings: ServeSettings) -> Sampling:
    max_new = settings.default_max_tokens if max_tokens is None else max_tokens
    param = (
        "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    )
    if not 1 <= max_new <= settings.max_tokens_limit:
        raise APIError(
            400,
            f"Invalid value for '{param}': {max_new} is outside [1, {settings.max_tokens_limit}] "
            "(serve.max_tokens_limit).",
            param=param,
            code="invalid_value",
        )
    temperature = 0.0 if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
        raise APIError(
            400,
            f"Invalid value for 'temperature': {temperature} is outside [0, 2].",
            param="temperature",
            code="invalid_value",
        )
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 < top_p <= 1.0:
        raise APIError(
            400, f"Invalid value for 'top_p': {top_p} is outside (0, 1].", param="top_p", code="invalid_value"
        )
    return Sampling(max_new, temperature, top_p, parse_stop(body.stop))


def completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(
            400,
            "Invalid value for 'prompt': expected a string (one prompt per request; token "
            "ids are not supported).",
            param="prompt",
            code="invalid_value",
        )
    if not prompt:
        raise APIError(
            400, "Invalid value for 'prompt': the prompt is empty.", param="prompt", code="invalid_value"
        )
    return check_text(prompt, "prompt")


def chat_prompt(messages: list[ChatMessage]) -> list[dict[str, str]]:
    if not messages:
        raise APIError(
            400,
            "Invalid value for 'messages': at least one message is required.",
            param="messages",
            code="invalid_value",
        )
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list) and all(
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
            and set(part) <= {"type", "text"}
            for part in content
        ):
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise APIError(
                400,
                f"Invalid value for 'messages.{i}.content': expected a string or a list of "
                "{'type': 'text', 'text': ...} parts (images and audio are not supported).",
                param=f"messages.{i}.content",
                code="invalid_value",
            )
        out.append({"role": message.role, "content": check_text(content, f"messages.{i}.content")})
    return out


def _token_ids(value: Any, param: str, vocab_size: int | None, allow_empty: bool) -> list[int] | None:
    """`value` as token ids, None when it is not a list (text); a clear 400 for bad ids."""
    if not isinstance(value, list) or (value and isinstance(value[0], dict)):
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise APIError(
            400,
            f"Invalid value for '{param}': expected a string or a list of token ids (integers).",
            param=param,
            code="invalid_value",
        )
    if not value and not allow_empty:
        raise APIError(
            400, f"Invalid value for '{param}': the token list is empty.", param=param, code="invalid_value"
        )
    if vocab_size and any(not 0 <= t < vocab_size for t in value):
        raise APIError(
            400,
            f"Invalid value for '{param}': token ids must lie in [0, {vocab_size - 1}].",
            param=param,
            code="invalid_value",
        )
    return value


def score_inputs(body: ScoreRequest, vocab_size: int | None) -> tuple[Any, Any, str]:
    """(prompt: text | chat messages | ids, completion: text | ids, the prompt's param name)."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(
            400,
            "Exactly one of 'prompt' (text or token ids) and 'messages' is required.",
            param="prompt",
            code="invalid_value",
        )
    if body.messages is not None:
        prompt, param = chat_prompt(body.messages), "messages"
    else:
        ids = _token_ids(body.prompt, "prompt", vocab_size, allow_empty=False)
        prompt, param = (ids, "prompt") if ids is not None else (completion_prompt(body.prompt), "prompt")
    ids = _token_ids(body.completion, "completion", vocab_size, allow_empty=True)
    if ids is None and not isinstance(body.completion, str):
        raise APIError(
            400,
            "Invalid value for 'completion': expected a string or a list of token ids.",
            param="completion",
            code="invalid_value",
        )
    return prompt, ids if ids is not None else check_text(body.completion, "completion"), param


class ReloadRequest(_Body):
    """POST /admin/reload: the folder of the artifact to serve from now on."""

    probe_dir: str
