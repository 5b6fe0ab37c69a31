"""A small OpenAI-compatible engine for proxy tests, run as its own process:
`python tests/openai_stub.py PORT`. Deterministic: the answer to a prompt is "answer to: <last words>";
a prompt containing `fail400` gets a 400 in OpenAI's shape, `crash` a plain-text 500, `slow` waits 3 s.
`GET /calls` counts the completion requests it has served (the proxy's pre-generation abstention must
not spend any)."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

app = FastAPI()
calls = {"n": 0}


def _prompt(body: dict) -> str:
    if "messages" in body:
        return " ".join(m["content"] for m in body["messages"])
    return body["prompt"]


@app.get("/calls")
async def count() -> dict:
    return calls


@app.post("/v1/completions")
@app.post("/v1/chat/completions")
async def complete(request: Request):
    calls["n"] += 1
    body = await request.json()
    chat = request.url.path.endswith("/chat/completions")
    prompt = _prompt(body)
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
    n = body.get("n") or 1
    kind = "chat.completion" if chat else "text_completion"
    if not body.get("stream"):
        choices = [
            {
                "index": i,
                "finish_reason": "stop",
                "logprobs": None,
                **({"message": {"role": "assistant", "content": text}} if chat else {"text": text}),
            }
            for i in range(n)
        ]
        return {
            "id": "stub-1",
            "object": kind,
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": choices,
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }

    async def events():
        words = text.split(" ")
        for k, word in enumerate(words):
            piece = word if k == 0 else " " + word
            for i in range(n):
                choice = {"index": i, "delta": {"content": piece}} if chat else {"index": i, "text": piece}
                yield (
                    "data: "
                    + json.dumps(
                        {
                            "id": "stub-2",
                            "object": kind + (".chunk" if chat else ""),
                            "created": 1,
                            "model": body.get("model"),
                            "choices": [{**choice, "finish_reason": None}],
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
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
