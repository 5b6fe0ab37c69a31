"""A stub OpenAI-compatible engine on loopback, in a thread, that generates greedily with a given model: what
`extract.engine=openai` sees from vLLM (`/v1/models`, `/v1/completions` with token-id prompts,
`stop_token_ids`, `return_token_ids`), so its answers equal transformers' own generation.

`engine.mode` makes it misbehave as a real engine can: e500 (a 500 in OpenAI's error shape), badjson,
nochoices, hang (a 500 after 3 s), cut (a body shorter than its Content-Length), huge (a 2 MB body),
text_only (no token ids: the client re-encodes the text), foreign (token ids outside the vocabulary).
`engine.fail_after = n`: a 500 from the (n+1)-th completion on. `engine.completions` counts the
completions served.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class GreedyEngine:
    def __init__(self, model, tokenizer, owned_by: str = "stub"):
        self.model, self.tokenizer, self.owned_by = model, tokenizer, owned_by
        self.mode: str | None = None
        self.fail_after: int | None = None
        self.completions = 0
        self.bodies: list[dict] = []
        self._lock = threading.Lock()  # one generate at a time: the model is not shared across threads
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, content: bytes, length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content) if length is None else length))
                self.end_headers()
                try:
                    self.wfile.write(content)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a huge body: fine
                    pass

            def do_GET(self):
                if self.path != "/v1/models":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                data = [{"id": "tiny", "object": "model", "owned_by": engine.owned_by}]
                self._send(200, json.dumps({"object": "list", "data": data}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, content, length = engine.answer(body)
                self._send(status, content, length)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GreedyEngine:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, body: dict) -> tuple[int, bytes, int | None]:
        """(status, body, Content-Length to announce or None) for one /v1/completions request."""
        if self.mode == "hang":  # outside the lock: the next test's requests are not held up
            time.sleep(3)
            return 500, b'{"error": {"message": "too late"}}', None
        with self._lock:
            self.bodies.append(body)
            failing = self.fail_after is not None and self.completions >= self.fail_after
            if failing or self.mode == "e500":
                return 500, b'{"error": {"message": "engine core died", "type": "server_error"}}', None
            if self.mode == "badjson":
                return 200, b"<html>gateway</html>", None
            if self.mode == "nochoices":
                return 200, b'{"id": "cmpl-1", "object": "text_completion"}', None
            if self.mode == "cut":
                return 200, b'{"choices": [{"te', 5000
            if self.mode == "foreign":  # ids of another model's vocabulary
                choice = {"index": 0, "text": "x", "token_ids": [500, 501], "finish_reason": "length"}
                return 200, json.dumps({"choices": [choice]}).encode(), None
            if self.mode == "huge":
                return 200, b'{"choices": [], "pad": "' + b"x" * 2_000_000 + b'"}', None
            ids = torch.tensor([body["prompt"]], device=next(self.model.parameters()).device)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=body["max_tokens"],
                    do_sample=False,
                    eos_token_id=body["stop_token_ids"],
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            generated = out[0, ids.shape[1] :].tolist()
            stopped = bool(generated) and generated[-1] in body["stop_token_ids"]
            choice = {
                "index": 0,
                "text": self.tokenizer.decode(generated, skip_special_tokens=True),
                "finish_reason": "stop" if stopped else "length",
            }
            if body.get("return_token_ids") and self.mode != "text_only":
                choice["token_ids"] = generated
            self.completions += 1
            return 200, json.dumps({"object": "text_completion", "choices": [choice]}).encode(), None
