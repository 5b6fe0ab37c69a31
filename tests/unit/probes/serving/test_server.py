"""probecal serve: endpoints, validation, batching, feedback/metrics and persistence, with a model double.

`FakeProbedModel` implements the ProbedModel contract deterministically: a prompt containing `p=0.83` gets
p_correct 0.83 (abstaining below 0.5), a prompt containing `boom` makes generate raise, and every
generate call is recorded so the tests can see the batches.
"""

import asyncio
import contextlib
import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from probes.runtime.wrapper import ProbedGeneration, ProbedScore
from probes.serving.app import create_app
from probes.serving.settings import ServeSettings


class FakeProbedModel:
    model_name = "fake-probed"
    max_context_tokens = 100
    vocab_size = 1000

    def __init__(self, max_batch_size: int = 8, gate: threading.Event | None = None):
        self.max_batch_size = max_batch_size
        self.gate = gate  # when set, generate blocks on it (lets requests pile up in the queue)
        self.calls: list[tuple[list, dict]] = []
        self.overlapped = False  # set if generate is ever entered while another call runs
        self._busy = threading.Lock()

    @staticmethod
    def _text(prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return " ".join(str(m) if isinstance(m, int) else m["content"] for m in prompt)  # ids or messages

    def count_tokens(self, prompt) -> int:
        return len(self._text(prompt).split()) + (0 if isinstance(prompt, str) else 2 * len(prompt))

    def generate(
        self,
        prompts,
        *,
        max_new_tokens=64,
        temperature=0.0,
        top_p=1.0,
        stop=None,
        on_text=None,
        cancelled=None,
    ):
        if not self._busy.acquire(blocking=False):
            self.overlapped = True
            self._busy.acquire()
        try:
            self.calls.append(
                (
                    list(prompts),
                    dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop),
                )
            )
            if self.gate is not None:
                self.gate.wait(10)
            if any("boom" in self._text(p) for p in prompts):
                raise RuntimeError("simulated CUDA out of memory")
            results = [self._one(p) for p in prompts]
            if on_text is not None:  # stream each answer word by word
                for i, r in enumerate(results):
                    if not r.abstained:
                        for word in re.findall(r"\S+\s*", r.text):
                            on_text(i, word)
            return results
        finally:
            self._busy.release()

    def score(self, prompts, completions, stop=None):
        self.calls.append((list(prompts), {"completions": list(completions), "stop": stop}))
        return [self._scored(p, c) for p, c in zip(prompts, completions, strict=True)]

    def _scored(self, prompt, completion) -> ProbedScore:
        text = completion if isinstance(completion, str) else " ".join(map(str, completion))
        found = re.search(r"p=([0-9.]+)", text) or re.search(r"p=([0-9.]+)", self._text(prompt))
        p = float(found.group(1)) if found else 0.75
        n_prompt = len(prompt) if prompt and isinstance(prompt[0], int) else self.count_tokens(prompt)
        n = len(completion) if isinstance(completion, list) else len(completion.split())
        return ProbedScore(
            p_correct=p,
            score=math.log(max(p, 1e-9) / max(1 - p, 1e-9)),
            layer=2,
            position="answer_last",
            abstained=p < 0.5,
            threshold=0.5,
            prompt_tokens=n_prompt,
            completion_tokens=n,
            answer_tokens=(0, n),
            answer_text=text.strip(),
        )

    def _one(self, prompt) -> ProbedGeneration:
        text = self._text(prompt)
        found = re.search(r"p=([0-9.]+)", text)
        p = float(found.group(1)) if found else 0.75
        abstained = p < 0.5
        return ProbedGeneration(
            text="[wrapper abstains]" if abstained else f"answer to: {text}",
            p_correct=p,
            score=math.log(max(p, 1e-9) / max(1 - p, 1e-9)),
            layer=2,
            position="prompt_last",
            abstained=abstained,
            threshold=0.5,
            finish_reason="abstained" if abstained else "stop",
            prompt_tokens=self.count_tokens(prompt),
            completion_tokens=0 if abstained else 3,
        )


@contextlib.contextmanager
def serving(tmp_path, model=None, **overrides):
    settings = ServeSettings(db_path=str(tmp_path / "feedback.sqlite"), **overrides)
    model = model or FakeProbedModel()
    with TestClient(create_app(model, settings), raise_server_exceptions=False) as client:
        client.model = model
        yield client


def complete(client, prompt, **kw):
    return client.post("/v1/completions", json={"prompt": prompt, **kw})


def parse_metrics(text: str) -> dict[str, float]:
    """{'name{labels}': value} from Prometheus text (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


# ------------------------------------------------------------------------------------------------ endpoints
def test_completion_response(tmp_path):
    with serving(tmp_path) as client:
        r = complete(client, "capital of france ? p=0.8", model="fake-probed", max_tokens=5, stop="\n")
        assert r.status_code == 200
        body = r.json()
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        assert body["model"] == "fake-probed" and isinstance(body["created"], int)
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["text"] == "answer to: capital of france ? p=0.8"
        assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
        assert choice["confidence"] == {
            "p_correct": 0.8,
            "abstained": False,
            "threshold": 0.5,
            "score": pytest.approx(math.log(4)),
            "layer": 2,
            "position": "prompt_last",
            "model_refused": False,
            "answer_chars": None,
            "novelty": None,  # the fake's artifact has no novelty model
            "in_domain": None,
        }
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        ((prompts, kwargs),) = client.model.calls
        assert prompts == ["capital of france ? p=0.8"]
        assert kwargs == {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0, "stop": ["\n"]}


def test_chat_completion_response(tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "gold "}, {"type": "text", "text": "symbol?"}]},
    ]
    with serving(tmp_path) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "messages": messages,
                "max_completion_tokens": 7,
                "temperature": 0.7,
                "top_p": 0.9,
                "user": "u1",
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "answer to: be brief gold symbol?"}
        assert choice["confidence"]["p_correct"] == 0.75
        ((prompts, kwargs),) = client.model.calls
        assert prompts == [
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "gold symbol?"}]
        ]
        assert kwargs == {"max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9, "stop": None}
        usage = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5}).json()[
            "usage"
        ]
        assert usage == {
            "prompt_tokens": 8,
            "completion_tokens": 3,
            "total_tokens": 11,
        }  # 4 words + 2 per message


def test_abstention(tmp_path):
    with serving(tmp_path) as client:
        choice = complete(client, "who won p=0.2").json()["choices"][0]
        assert choice["text"] == "[wrapper abstains]" and choice["finish_reason"] == "stop"
        assert choice["confidence"]["abstained"] is True and choice["confidence"]["threshold"] == 0.5
    with serving(tmp_path, abstention_message="I don't know.") as client:
        body = complete(client, "who won p=0.2").json()
        assert body["choices"][0]["text"] == "I don't know."
        rec, _ = client.app.state.store.get_response(body["id"])
        assert rec.text == "I don't know." and rec.abstained and rec.finish_reason == "abstained"
        assert complete(client, "who won p=0.9").json()["choices"][0]["text"] == "answer to: who won p=0.9"


def test_health_models_and_unknown_routes(tmp_path):
    with serving(tmp_path) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["model"] == "fake-probed"
        assert client.get("/v1/models").json()["data"][0]["id"] == "fake-probed"
        for method, path, status in [("GET", "/v1/nope", 404), ("GET", "/v1/completions", 405)]:
            r = client.request(method, path)
            assert r.status_code == status
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------------------------- validation
LONG = " ".join(["word"] * 60)
BAD_REQUESTS = [
    # (endpoint, body: dict or raw bytes, status, param, code)
    ("completions", b'{"prompt": "hi"', 400, None, "invalid_json"),
    ("completions", b"not json at all", 400, None, "invalid_json"),
    ("completions", b'["prompt"]', 400, None, None),
    ("completions", {}, 400, "prompt", "missing_parameter"),
    ("chat", {"max_tokens": 3}, 400, "messages", "missing_parameter"),
    ("completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ("completions", {"prompt": "hi", "temperature": True}, 400, "temperature", "invalid_type"),
    ("completions", {"prompt": "hi", "promt": "typo"}, 400, "promt", "unrecognized_parameter"),
    ("completions", {"prompt": 5}, 400, "prompt", "invalid_value"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
    ("completions", {"prompt": [1, 2, 3]}, 400, "prompt", "invalid_value"),
    ("completions", {"prompt": ""}, 400, "prompt", "invalid_value"),
    ("chat", {"messages": []}, 400, "messages", "invalid_value"),
    ("chat", {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", "invalid_type"),
    ("chat", {"messages": [{"content": "x"}]}, 400, "messages.0.role", "missing_parameter"),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
        400,
        "messages.0.content",
        "invalid_value",
    ),
    ("chat", {"messages": [{"role": "user", "content": None}]}, 400, "messages.0.content", "invalid_value"),
    ("completions", {"prompt": "hi", "n": 9}, 400, "n", "invalid_value"),
    ("completions", {"prompt": "hi", "n": 0}, 400, "n", "invalid_value"),
    (
        "completions",
        {"prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "invalid_value",
    ),
    (
        "completions",
        {"prompt": "hi", "stream": True, "stream_options": {"x": 1}},
        400,
        "stream_options",
        "invalid_value",
    ),
    ("completions", {"prompt": "hi", "logprobs": 3}, 400, "logprobs", "unsupported_parameter"),
    ("completions", {"prompt": "hi", "echo": True}, 400, "echo", "unsupported_parameter"),
    ("completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("completions", {"prompt": "hi", "seed": 1}, 400, "seed", "unsupported_parameter"),
    (
        "chat",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True},
        400,
        "logprobs",
        "unsupported_parameter",
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tools",
        "unsupported_parameter",
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
        400,
        "response_format",
        "unsupported_parameter",
    ),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("completions", {"prompt": "hi", "max_tokens": 257}, 400, "max_tokens", "invalid_value"),
    (
        "chat",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 999},
        400,
        "max_completion_tokens",
        "invalid_value",
    ),
    ("completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, "stop", "invalid_value"),
    ("completions", {"prompt": "hi", "stop": 3}, 400, "stop", "invalid_value"),
    # 60 prompt tokens + 50 new tokens > the double's 100-token context
    ("completions", {"prompt": LONG, "max_tokens": 50}, 400, "prompt", "context_length_exceeded"),
    (
        "chat",
        {"messages": [{"role": "user", "content": LONG}], "max_tokens": 50},
        400,
        "messages",
        "context_length_exceeded",
    ),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("feedback", {"id": "x", "correct": "yes"}, 400, "correct", "invalid_type"),
    ("feedback", {"correct": True}, 400, "id", "missing_parameter"),
    ("feedback", {"id": "cmpl-unknown", "correct": True}, 404, "id", "response_not_found"),
]
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "feedback": "/v1/feedback"}


def test_bad_requests_get_openai_errors_and_never_reach_the_model(tmp_path):
    with serving(tmp_path) as client:
        for endpoint, body, status, param, code in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = client.post(PATHS[endpoint], content=body, headers={"content-type": "application/json"})
            else:
                r = client.post(PATHS[endpoint], json=body)
            case = f"{endpoint} {body!r}"
            assert r.status_code == status, f"{case}: {r.status_code} {r.text}"
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, case
            assert (error["param"], error["code"]) == (param, code), f"{case}: {error}"
            assert error["type"] == "invalid_request_error" and len(error["message"]) > 10, case
        assert client.model.calls == []
        # a body sent as text/plain is refused, not guessed at
        r = client.post(
            "/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"}
        )
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
        assert complete(client, "still serving").status_code == 200  # nothing above hurt the server
        counts = parse_metrics(client.get("/metrics").text)
        assert counts['probecal_requests_total{endpoint="/v1/completions",status="400"}'] >= 25


def test_oversized_body_is_refused(tmp_path):
    with serving(tmp_path, max_request_bytes=2000) as client:
        r = complete(client, "x" * 3000)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert client.model.calls == []


def test_model_exception_is_a_clean_500_and_the_server_keeps_serving(tmp_path):
    with serving(tmp_path) as client:
        r = complete(client, "boom")
        assert r.status_code == 500
        assert r.json()["error"] == {
            "message": "The model failed while generating: RuntimeError: simulated CUDA out of memory",
            "type": "server_error",
            "param": None,
            "code": "model_error",
        }
        assert complete(client, "fine").status_code == 200
        assert client.get("/health").json()["status"] == "ok"
        metrics = parse_metrics(client.get("/metrics").text)
        assert metrics["probecal_model_errors_total"] == 1
        assert metrics['probecal_requests_total{endpoint="/v1/completions",status="500"}'] == 1


def test_settings_are_validated():
    for field, value in [
        ("max_batch_size", 0),
        ("port", -1),
        ("calibration_bins", 1.5),
        ("batch_wait_ms", -1),
    ]:
        with pytest.raises(ValueError, match=f"serve.{field}"):
            ServeSettings(**{field: value}).validate()
    with pytest.raises(ValueError, match="default_max_tokens=300 exceeds serve.max_tokens_limit=256"):
        ServeSettings(default_max_tokens=300).validate()


# ------------------------------------------------------------------------------------------------- batching
def wait_for_queue(client, depth: int) -> None:
    deadline = time.monotonic() + 5
    while client.app.state.batcher.depth < depth:
        assert time.monotonic() < deadline, "requests did not reach the queue"
        time.sleep(0.005)


def test_concurrent_requests_are_batched_and_routed_back(tmp_path):
    gate = threading.Event()
    with (
        serving(tmp_path, FakeProbedModel(gate=gate), batch_wait_ms=0) as client,
        ThreadPoolExecutor(6) as pool,
    ):
        first = pool.submit(complete, client, "q0")
        while not client.model.calls:  # q0 is inside generate, blocked on the gate
            time.sleep(0.005)
        rest = [pool.submit(complete, client, f"q{i}") for i in range(1, 6)]
        wait_for_queue(client, 5)
        gate.set()
        bodies = [f.result().json() for f in [first, *rest]]
        assert [len(prompts) for prompts, _ in client.model.calls] == [1, 5]
        assert sorted(client.model.calls[1][0]) == ["q1", "q2", "q3", "q4", "q5"]
        assert not client.model.overlapped  # generate never ran on two threads at once
        assert [b["choices"][0]["text"] for b in bodies] == [f"answer to: q{i}" for i in range(6)]
        assert len({b["id"] for b in bodies}) == 6
        metrics = parse_metrics(client.get("/metrics").text)
        assert (metrics["probecal_batch_size_count"], metrics["probecal_batch_size_sum"]) == (2, 6)
        assert metrics['probecal_batch_size_bucket{le="4.0"}'] == 1  # the batch of 1
        assert metrics['probecal_batch_size_bucket{le="8.0"}'] == 2


def test_batches_group_by_sampling_settings_and_respect_the_model_limit(tmp_path):
    gate = threading.Event()
    model = FakeProbedModel(max_batch_size=2, gate=gate)
    with (
        serving(tmp_path, model, batch_wait_ms=0, max_batch_size=16) as client,
        ThreadPoolExecutor(6) as pool,
    ):
        first = pool.submit(complete, client, "q0")
        while not model.calls:
            time.sleep(0.005)
        futures = [pool.submit(complete, client, f"a{i}", max_tokens=5) for i in range(3)]
        wait_for_queue(client, 3)
        futures.append(pool.submit(complete, client, "b0", max_tokens=7))
        wait_for_queue(client, 4)
        gate.set()
        assert all(f.result().status_code == 200 for f in [first, *futures])
    batches = [(len(p), kw["max_new_tokens"]) for p, kw in model.calls]
    assert all(size <= 2 for size, _ in batches)  # the model's max_batch_size caps the server's 16
    assert sum(size for size, _ in batches) == 5 and sorted(batches)[-1] == (2, 5)
    for prompts, kw in model.calls:  # never mixes settings in one call
        assert all(p.startswith("b") == (kw["max_new_tokens"] == 7) for p in prompts if p != "q0")


# ------------------------------------------------------------------------------------ feedback and metrics
P = [0.05, 0.15, 0.15, 0.85, 0.95, 1.0]
Y = [False, False, True, True, True, False]


def test_feedback_and_calibration_metrics(tmp_path):
    with serving(tmp_path, calibration_bins=5, calibration_window=100) as client:
        ids = [complete(client, f"q{i} p={p}").json()["id"] for i, p in enumerate(P)]
        for rid, y in zip(ids, Y, strict=True):
            r = client.post("/v1/feedback", json={"id": rid, "correct": y})
            assert r.json() == {"object": "feedback", "id": rid, "index": 0, "correct": y, "replaced": None}
        m = parse_metrics(client.get("/metrics").text)
        assert m["probecal_calibration_ece"] == pytest.approx(1.45 / 6)  # see test_feedback.py
        assert m["probecal_calibration_accuracy"] == pytest.approx(0.5)
        assert m["probecal_calibration_window_labelled"] == 6
        assert m['probecal_calibration_bin_accuracy{lower="0",upper="0.2"}'] == pytest.approx(1 / 3)
        assert m['probecal_calibration_bin_accuracy{lower="0.8",upper="1"}'] == pytest.approx(2 / 3)
        assert m['probecal_calibration_bin_count{lower="0.8",upper="1"}'] == 3
        assert math.isnan(m['probecal_calibration_bin_accuracy{lower="0.4",upper="0.6"}'])
        assert m["probecal_abstention_rate"] == pytest.approx(0.5)  # 0.05, 0.15, 0.15 are below 0.5
        assert m["probecal_confidence_count"] == 6 and m["probecal_confidence_sum"] == pytest.approx(3.15)
        assert m['probecal_confidence_bucket{le="0.2"}'] == 3
        assert m['probecal_requests_total{endpoint="/v1/feedback",status="200"}'] == 6
        assert m['probecal_request_latency_seconds_count{endpoint="/v1/completions"}'] == 6

        # a second label for the same answer replaces the first (and is counted as a post)
        r = client.post("/v1/feedback", json={"id": ids[5], "correct": True})
        assert r.json()["replaced"] is False
        m = parse_metrics(client.get("/metrics").text)
        assert m["probecal_calibration_accuracy"] == pytest.approx(4 / 6)
        assert m["probecal_calibration_ece"] == pytest.approx((0.65 + 0.2) / 6)
        assert (m["probecal_feedback_total"], m["probecal_labelled_responses"]) == (7, 6)


def test_metrics_before_any_feedback_and_rolling_window(tmp_path):
    with serving(tmp_path, calibration_bins=5, calibration_window=2) as client:
        m = parse_metrics(client.get("/metrics").text)
        assert m["probecal_calibration_window_labelled"] == 0 and math.isnan(m["probecal_calibration_ece"])
        assert math.isnan(m["probecal_abstention_rate"])
        ids = [complete(client, f"p={p}").json()["id"] for p in (0.9, 0.9, 0.3)]
        for rid, y in zip(ids, [False, True, False], strict=True):
            client.post("/v1/feedback", json={"id": rid, "correct": y})
        m = parse_metrics(client.get("/metrics").text)  # window = the last two labels: 0.9/T and 0.3/F
        assert m["probecal_calibration_window_labelled"] == 2
        assert m["probecal_calibration_ece"] == pytest.approx((0.1 + 0.3) / 2)


def test_responses_and_feedback_survive_a_restart(tmp_path):
    with serving(tmp_path) as client:
        rid = complete(client, "capital of peru p=0.9").json()["id"]
        client.post("/v1/feedback", json={"id": rid, "correct": True})
    with serving(tmp_path) as client:  # a new app (new process, in effect) on the same database
        m = parse_metrics(client.get("/metrics").text)
        assert (m["probecal_stored_responses"], m["probecal_labelled_responses"]) == (1, 1)
        assert m["probecal_calibration_accuracy"] == 1.0
        assert client.post("/v1/feedback", json={"id": rid, "correct": False}).json()["replaced"] is True
        rec, label = client.app.state.store.get_response(rid)
        assert json.loads(rec.prompt) == "capital of peru p=0.9" and rec.p_correct == 0.9 and label is False


def test_store_text_off_keeps_only_confidences(tmp_path):
    with serving(tmp_path, store_text=False) as client:
        rid = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "secret"}]}
        ).json()["id"]
        rec, _ = client.app.state.store.get_response(rid)
        assert rec.prompt is None and rec.text is None and rec.p_correct == 0.75


# ------------------------------------------------------------------------------------------- real uvicorn
def test_real_uvicorn_on_loopback(tmp_path):
    settings = ServeSettings(db_path=str(tmp_path / "f.sqlite"), batch_wait_ms=1)
    config = uvicorn.Config(
        create_app(FakeProbedModel(), settings), host="127.0.0.1", port=0, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.get("/health").json()["status"] == "ok"
            with ThreadPoolExecutor(4) as pool:
                replies = list(
                    pool.map(lambda i: http.post("/v1/completions", json={"prompt": f"q{i} p=0.6"}), range(8))
                )
            assert [r.status_code for r in replies] == [200] * 8
            assert [r.json()["choices"][0]["text"] for r in replies] == [
                f"answer to: q{i} p=0.6" for i in range(8)
            ]
            bad = http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
            fb = http.post("/v1/feedback", json={"id": replies[0].json()["id"], "correct": True})
            assert fb.status_code == 200
            metrics = http.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
            assert parse_metrics(metrics.text)["probecal_calibration_accuracy"] == 1.0
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()


def test_batcher_shutdown_answers_every_waiting_request():
    from probes.serving.batcher import Batcher, QueueFullError
    from probes.serving.protocol import Sampling

    gate = threading.Event()
    model = FakeProbedModel(gate=gate)

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, batch_wait_s=0.0, max_queue_size=8)
        await batcher.start()
        greedy, longer = Sampling(5, 0.0, 1.0, None), Sampling(9, 0.0, 1.0, None)
        first = asyncio.create_task(batcher.submit("q0", greedy))
        while not model.calls:  # q0 is inside generate, blocked on the gate
            await asyncio.sleep(0.005)
        waiting = [asyncio.create_task(batcher.submit(f"q{i}", s)) for i, s in [(1, greedy), (2, longer)]]
        await asyncio.sleep(0.05)
        threading.Timer(0.2, gate.set).start()  # lets the executor finish so stop() can join it
        await batcher.stop()
        return await asyncio.gather(first, *waiting, return_exceptions=True)

    results = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert all(isinstance(r, QueueFullError) for r in results), results


def test_serve_group_composes_with_overrides(tmp_path):
    from hydra import compose, initialize_config_module

    from probes.cli.config import instantiate_group, register_configs
    from probes.serving.app import build_probed_model

    register_configs()
    with initialize_config_module(config_module="probecal_conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["serve.port=9001", "serve.max_batch_size=4"])
    settings = instantiate_group(cfg.serve)
    assert isinstance(settings, ServeSettings)
    assert (settings.host, settings.port, settings.max_batch_size, settings.probe_dir) == (
        "127.0.0.1",
        9001,
        4,
        None,
    )
    settings.validate()
    with pytest.raises(ValueError, match="serve.probe_dir is required"):
        build_probed_model(cfg.model, settings)
