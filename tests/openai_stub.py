"""A small OpenAI-compatible engine for proxy tests, run as its own process:
`python tests/openai_stub.py PORT`. Deterministic: the answer to a prompt is "answer to: <last words>";
a prompt containing `fail400` gets a 400 in OpenAI's shape, `crash` a plain-text 500, `slow` waits 3 s.
`GET /calls` counts the completion requests it has served (the proxy's pre-generation abstention must
not spend any); `GET /last` is the last request body (what the proxy forwarded).

Bad engines, picked by `mode=NAME` in the prompt (each as a real engine could misbehave, #21/#22):
int_code (llama.cpp's 400 with an integer error.code), e503, redirect (302), badjson, choices_str,
choices_null (`[null]`), choices_missing, body_list, plainjson (a JSON answer to a streamed request),
badindex (a chunk with index "a"), nodone (a stream cut without [DONE]), endless (a stream that never
ends), slowbody (1 byte/s), huge (a 300 KB answer), newline (an answer opening with a line break), number (an
answer that is only a number, "42"), text_int (the answer's text a JSON number, not a string), surrogate
(an answer holding a lone surrogate, JSON's "\\ud83d").
A stream asked with stream_options.include_usage ends with a usage chunk, as vLLM's does.
Token ids of the answer (word k: id 200 + k; `mode=bigids`: ids outside the model's vocabulary) as the engines
return them: `return_token_ids: true` -> vLLM's `choices[].token_ids`, `logprobs` -> llama.cpp's
`choices[].logprobs.content[].id`, per chunk when streamed."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

app = FastAPI()
calls = {"n": 0}
last: dict = {}
open_bodies = {"n": 0}  # slow bodies being sent now (the proxy must close them when its client leaves)


def _prompt(body: dict) -> str:
    if "messages" in body:
        return " ".join(m["content"] for m in body["messages"])
    return body["prompt"]


@app.get("/calls")
async def count() -> dict:
    return calls


@app.get("/open")
async def still_open() -> dict:
    return open_bodies


@app.get("/last")
async def last_body() -> dict:
    return last


@app.get("/v1/models")
async def models() -> dict:
    return {"object": "list", "data": [{"id": "stub", "object": "model"}]}


def _mode(prompt: str) -> str | None:
    found = re.search(r"mode=(\w+)", prompt)
    return found.group(1) if found else None


async def _bad(mode: str, chat: bool, stream: bool):
    """The answer of a misbehaving engine, or None for an ordinary one."""
    if mode == "int_code":
        body = {"error": {"code": 400, "message": "n > 1 is not supported", "type": "invalid_request_error"}}
        return JSONResponse(body, status_code=400)
    if mode == "e503":
        return JSONResponse({"error": {"message": "overloaded", "type": "server_error", "code": 503}}, 503)
    if mode == "redirect":
        return Response(status_code=302, headers={"location": "http://elsewhere.invalid/v1"})
    bodies = {
        "badjson": b"{not json",
        "choices_str": b'{"id": "x", "choices": "Paris"}',
        "choices_null": b'{"id": "x", "choices": [null]}',
        "choices_missing": b'{"id": "x"}',
        "body_list": b"[1, 2]",
    }
    if mode in bodies:
        return Response(bodies[mode], media_type="application/json")
    if mode == "text_int" and not stream:
        content = {"message": {"role": "assistant", "content": 42}} if chat else {"text": 42}
        return {"id": "x", "object": "x", "choices": [{"index": 0, "finish_reason": "stop", **content}]}
    if mode == "plainjson" and stream:
        return {"id": "x", "object": "chat.completion", "choices": []}
    if mode == "slowbody":

        async def trickle():
            open_bodies["n"] += 1
            try:
                for byte in b'{"choices": []}' * 10:
                    await asyncio.sleep(1)
                    yield bytes([byte])
            finally:  # also when the proxy closes the connection
                open_bodies["n"] -= 1

        return StreamingResponse(trickle(), media_type="text/event-stream" if stream else "application/json")
    if mode in ("badindex", "nodone", "endless") and stream:

        async def events():
            choice = {"index": 0, "delta": {"content": "Par"}} if chat else {"index": 0, "text": "Par"}
            yield "data: " + json.dumps({"id": "s", "choices": [{**choice, "finish_reason": None}]}) + "\n\n"
            if mode == "badindex":
                yield "data: " + json.dumps({"id": "s", "choices": [{**choice, "index": "a"}]}) + "\n\n"
            while mode == "endless":
                await asyncio.sleep(0.05)
                yield (
                    "data: "
                    + json.dumps({"id": "s", "choices": [{**choice, "finish_reason": None}]})
                    + "\n\n"
                )

        return StreamingResponse(events(), media_type="text/event-stream")
    return None


def _with_ids(choice: dict, body: dict, ids: list[int]) -> dict:
    """`choice` with the ids of its text where the request asked for them, in vLLM's or llama.cpp's field."""
    if body.get("return_token_ids"):
        return {**choice, "token_ids": ids}
    if body.get("logprobs"):
        content = [{"id": t, "token": f"<{t}>", "logprob": -0.1, "top_logprobs": []} for t in ids]
        return {**choice, "logprobs": {"content": content}}
    return choice


@app.post("/v1/completions")
@app.post("/v1/chat/completions")
async def complete(request: Request):
    calls["n"] += 1
    body = await request.json()
    last.clear()
    last.update(body)
    chat = request.url.path.endswith("/chat/completions")
    prompt = _prompt(body)
    mode = _mode(prompt)
    if mode is not None:
        bad = await _bad(mode, chat, bool(body.get("stream")))
        if bad is not None:
            return bad
    if "fail400" in prompt:
        return JSONResponse(
            {
                "error": {
                    "message": "stub refuses this prompt",
                    "type": "invalid_request_error",
                    "param": "prompt",
                    "code": "stub_refusal",
                }
            },
            status_code=400,
        )
    if "crash" in prompt:
        return PlainTextResponse("engine exploded", status_code=500)
    if "slow" in prompt:
        await asyncio.sleep(3)
    text = "answer to: " + " ".join(prompt.split()[-2:])
    if mode == "huge":
        text = "w " * 150_000
    if mode == "number":
        text = "42"
    if mode == "surrogate":
        text = "Par\ud83d"
    if mode == "newline":
        text = "\n\nanswer to: " + " ".join(prompt.split()[-2:])
    n = body.get("n") or 1
    kind = "chat.completion" if chat else "text_completion"
    first_id = 2000 if mode == "bigids" else 200
    if not body.get("stream"):
        ids = [first_id + k for k in range(len(text.split(" ")))]
        choices = [
            _with_ids(
                {
                    "index": i,
                    "finish_reason": "stop",
                    "logprobs": None,
                    **({"message": {"role": "assistant", "content": text}} if chat else {"text": text}),
                },
                body,
                ids,
            )
            for i in range(n)
        ]
        answer = {
            "id": "stub-1",
            "object": kind,
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": choices,
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }
        # json.dumps escapes a lone surrogate as \\ud83d (FastAPI's own encoder would fail on it)
        return Response(json.dumps(answer), media_type="application/json")

    async def events():
        words = text.split(" ")
        for k, word in enumerate(words):
            piece = word if k == 0 else " " + word
            for i in range(n):
                choice = {"index": i, "delta": {"content": piece}} if chat else {"index": i, "text": piece}
                choice = _with_ids({**choice, "finish_reason": None}, body, [first_id + k])
                yield (
                    "data: "
                    + json.dumps(
                        {
                            "id": "stub-2",
                            "object": kind + (".chunk" if chat else ""),
                            "created": 1,
                            "model": body.get("model"),
                            "choices": [choice],
                        }
                    )
                    + "\n\n"
                )
        for i in range(n):
            choice = {"index": i, "delta": {}} if chat else {"index": i, "text": ""}
            yield (
                "data: "
                + json.dumps(
                    {
                        "id": "stub-2",
                        "object": kind + (".chunk" if chat else ""),
                        "created": 1,
                        "model": body.get("model"),
                        "choices": [{**choice, "finish_reason": "stop"}],
                    }
                )
                + "\n\n"
            )
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}
            yield (
                "data: "
                + json.dumps({"id": "stub-2", "object": kind, "choices": [], "usage": usage})
                + "\n\n"
            )
        if mode != "nodone":
            yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
