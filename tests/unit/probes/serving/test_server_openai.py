"""The official `openai` SDK against `probecal serve` and against the proxy (`serve.upstream`), with a real
second process as the upstream engine; /v1/score; the issue #12 server cases (chunked body limit, capped
echoes) and #11 (one ECE binning). The model is the double from test_server.py."""

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from probes.evaluation.metrics import ece, reliability_curve
from probes.serving.app import create_app
from probes.serving.feedback import calibration_stats
from probes.serving.settings import ServeSettings
from tests.paths import ROOT
from tests.unit.probes.serving.test_server import FakeProbedModel, serving

STUB = ROOT / "tests" / "openai_stub.py"


@contextlib.contextmanager
def running(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stub_upstream():
    """The stub engine in its own process (a real second process, as vLLM would be)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(STUB), str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/calls", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None, "stub upstream did not start"
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(10)


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=10)


class PreAbstainingModel(FakeProbedModel):
    """A prompt_last probe with a threshold: the proxy decides abstention before calling the upstream."""

    abstain_before_generating = True
    threshold = 0.5
    abstention_message = "I don't know."


# ------------------------------------------------------------------------------------- probecal serve + SDK
def test_sdk_chat_complete_and_stream_against_probecal_serve(tmp_path):
    settings = ServeSettings(db_path=str(tmp_path / "f.sqlite"), batch_wait_ms=1)
    with running(create_app(FakeProbedModel(), settings)) as base:
        client = sdk(base)
        chat = client.chat.completions.create(
            model="fake-probed", messages=[{"role": "user", "content": "hi p=0.8"}]
        )
        assert chat.choices[0].message.content == "answer to: hi p=0.8"
        assert chat.choices[0].confidence["p_correct"] == 0.8  # extra field, kept by the SDK's models
        text = client.completions.create(model="fake-probed", prompt="q p=0.9", n=2, temperature=0.5)
        assert [c.index for c in text.choices] == [0, 1]
        assert [c.confidence["p_correct"] for c in text.choices] == [0.9, 0.9]

        stream = client.chat.completions.create(
            model="fake-probed",
            stream=True,
            messages=[{"role": "user", "content": "gold symbol p=0.7"}],
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == "answer to: gold symbol p=0.7"
        pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 4  # word by word, not one block
        last = [c for c in chunks if c.choices][-1]
        assert last.choices[0].finish_reason == "stop" and last.choices[0].confidence["p_correct"] == 0.7
        assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []

        completion_stream = list(
            client.completions.create(model="fake-probed", prompt="x p=0.6", stream=True, n=2)
        )
        for i in (0, 1):
            mine = [c.choices[0] for c in completion_stream if c.choices[0].index == i]
            assert "".join(c.text for c in mine) == "answer to: x p=0.6"
            assert mine[-1].confidence["p_correct"] == 0.6
        # a pre-generation abstention streams the abstention message and its confidence
        abstained = list(client.completions.create(model="fake-probed", prompt="who p=0.2", stream=True))
        assert "".join(c.choices[0].text for c in abstained) == "[wrapper abstains]"
        assert abstained[-1].choices[0].confidence["abstained"] is True
        # n choices can be labelled one by one
        http = httpx.Client(base_url=base)
        assert http.post("/v1/feedback", json={"id": text.id, "index": 1, "correct": True}).status_code == 200
        assert http.post("/v1/feedback", json={"id": text.id, "index": 5, "correct": True}).status_code == 404
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.completions.create(model="fake-probed", prompt="q", logprobs=2)


def test_stream_disconnect_frees_the_queued_request(tmp_path):
    gate = threading.Event()
    model = FakeProbedModel(max_batch_size=1, gate=gate)
    settings = ServeSettings(db_path=str(tmp_path / "f.sqlite"), batch_wait_ms=1)
    with running(create_app(model, settings)) as base:
        with httpx.Client(base_url=base, timeout=10) as http, contextlib.ExitStack() as stack:
            first = stack.enter_context(
                http.stream("POST", "/v1/completions", json={"prompt": "a", "stream": True})
            )
            time.sleep(0.3)  # "a" is now generating (blocked on the gate)
            second = http.stream("POST", "/v1/completions", json={"prompt": "b", "stream": True})
            response = second.__enter__()
            time.sleep(0.3)
            response.close()  # client of "b" goes away while queued
            time.sleep(0.3)
            gate.set()
            assert "data: [DONE]" in "".join(first.iter_text())
            time.sleep(0.3)
        assert [prompts for prompts, _ in model.calls] == [["a"]]  # "b" never reached the model


# --------------------------------------------------------------------------------------------- /v1/score
def test_score_endpoint(tmp_path):
    with serving(tmp_path) as client:
        r = client.post(
            "/v1/score", json={"prompt": "capital of france ?", "completion": "paris p=0.9", "stop": "\n"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "score" and body["p_correct"] == 0.9 and body["abstained"] is False
        assert (body["threshold"], body["layer"], body["position"]) == (0.5, 2, "answer_last")
        assert body["answer_tokens"] == [0, 2] and body["usage"] == {
            "prompt_tokens": 4,
            "completion_tokens": 2,
        }
        ids = client.post("/v1/score", json={"prompt": [5, 6, 7], "completion": [8, 9]}).json()
        assert ids["usage"] == {"prompt_tokens": 3, "completion_tokens": 2}
        chat = client.post(
            "/v1/score", json={"messages": [{"role": "user", "content": "q p=0.3"}], "completion": "x"}
        ).json()
        assert chat["p_correct"] == 0.3 and chat["abstained"] is True
        (_, kwargs) = client.model.calls[0]
        assert kwargs == {"completions": ["paris p=0.9"], "stop": ["\n"]}
        # the scored answer can be labelled like any other
        assert client.post("/v1/feedback", json={"id": body["id"], "correct": True}).status_code == 200
        bad = [
            ({"completion": "x"}, "prompt"),
            ({"prompt": "q", "messages": [{"role": "user", "content": "q"}], "completion": "x"}, "prompt"),
            ({"prompt": "q"}, "completion"),
            ({"prompt": "q", "completion": 5}, "completion"),
            ({"prompt": "q", "completion": [1, "a"]}, "completion"),
            ({"prompt": [], "completion": "x"}, "prompt"),
            ({"prompt": [1, 2], "completion": [True]}, "completion"),
            ({"prompt": "q", "completion": "x", "stop": 3}, "stop"),
            ({"prompt": " ".join(["w"] * 99), "completion": [1, 2, 3]}, "prompt"),
            ({"prompt": "q", "completion": "x", "model": "other"}, "model"),
            ({"prompt": "q", "completion": "x", "temperature": 1}, "temperature"),
        ]
        calls = len(client.model.calls)
        for payload, param in bad:
            r = client.post("/v1/score", json=payload)
            assert 400 <= r.status_code < 500, (payload, r.text)
            assert r.json()["error"]["param"] == param, (payload, r.json())
        assert len(client.model.calls) == calls


# --------------------------------------------------------------------------------------------- proxy mode
def test_proxy_through_the_sdk(tmp_path, stub_upstream):
    settings = ServeSettings(
        db_path=str(tmp_path / "f.sqlite"),
        batch_wait_ms=1,
        upstream=f"{stub_upstream}/v1",
        upstream_timeout_s=1.0,
        model_name="fake-probed",
    )
    model = PreAbstainingModel()
    with running(create_app(model, settings)) as base:
        client = sdk(base)
        chat = client.chat.completions.create(
            model="fake-probed", messages=[{"role": "user", "content": "hi p=0.9"}]
        )
        assert chat.choices[0].message.content == "answer to: hi p=0.9"  # the upstream's text
        assert chat.choices[0].confidence["p_correct"] == 0.9
        assert model.calls[-1][1]["completions"] == ["answer to: hi p=0.9"]  # scored what the upstream said
        text = client.completions.create(model="fake-probed", prompt="q p=0.8", n=2)
        assert [c.confidence["p_correct"] for c in text.choices] == [0.8, 0.8]
        chunks = list(
            client.chat.completions.create(
                model="fake-probed", stream=True, messages=[{"role": "user", "content": "s p=0.7"}]
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "answer to: s p=0.7"
        assert chunks[-1].choices[0].confidence["p_correct"] == 0.7
        completion_chunks = list(
            client.completions.create(model="fake-probed", prompt="t p=0.6", stream=True)
        )
        assert "".join(c.choices[0].text for c in completion_chunks) == "answer to: t p=0.6"
        assert completion_chunks[-1].choices[0].confidence["p_correct"] == 0.6

        before = httpx.get(f"{stub_upstream}/calls").json()["n"]
        for stream in (False, True):
            reply = client.completions.create(model="fake-probed", prompt="who p=0.2", stream=stream)
            last = list(reply)[-1] if stream else reply
            assert last.choices[0].confidence["abstained"] is True
        assert httpx.get(f"{stub_upstream}/calls").json()["n"] == before  # no upstream tokens spent

        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="fake-probed", prompt="fail400 p=0.9")
        assert refused.value.status_code == 400 and refused.value.code == "stub_refusal"
        with pytest.raises(openai.InternalServerError) as crashed:
            client.completions.create(model="fake-probed", prompt="crash p=0.9")
        assert (
            crashed.value.status_code == 502 and "engine exploded" in crashed.value.message
        )  # #21: 5xx -> 502
        started = time.monotonic()
        slow = httpx.post(f"{base}/v1/completions", json={"prompt": "slow p=0.9"}, timeout=10)
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - started < 2.5


def test_unreachable_upstream_is_a_502_not_a_hang(tmp_path):
    settings = ServeSettings(
        db_path=str(tmp_path / "f.sqlite"),
        upstream=f"http://127.0.0.1:{free_port()}/v1",
        upstream_connect_timeout_s=1.0,
    )
    with serving(
        tmp_path,
        model=FakeProbedModel(),
        **{k: getattr(settings, k) for k in ("upstream", "upstream_connect_timeout_s")},
    ) as client:
        for stream in (False, True):
            r = client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "q"}], "stream": stream},
            )
            assert r.status_code == 502, r.text
            assert (
                r.json()["error"]["code"] == "upstream_unreachable"
                and "127.0.0.1" in r.json()["error"]["message"]
            )


# ------------------------------------------------------------------------------------- issue #12 / #11
def test_chunked_body_over_the_limit_is_refused_while_reading(tmp_path):
    """#12.6: the limit held only for Content-Length; a chunked 2,000,000-character body was read whole."""
    settings = ServeSettings(db_path=str(tmp_path / "f.sqlite"), max_request_bytes=100_000)
    model = FakeProbedModel()
    with running(create_app(model, settings)) as base:

        def body():
            yield b'{"prompt": "'
            for _ in range(200):
                yield b"w " * 5_000
            yield b'"}'

        r = httpx.post(f"{base}/v1/completions", content=body(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert model.calls == []
        small = httpx.post(
            f"{base}/v1/completions",
            content=iter([b'{"prompt": ', b'"hi"}']),
            headers={"content-type": "application/json"},
        )
        assert small.status_code == 200


def test_echoed_values_are_capped(tmp_path):
    """#12.8: a 404 for an unknown 900 KB feedback id echoed the whole id."""
    with serving(tmp_path, max_request_bytes=2_000_000) as client:
        r = client.post("/v1/feedback", json={"id": "x" * 900_000, "correct": True})
        assert r.status_code == 404 and len(r.text) < 400 and "x" * 64 + "..." in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "q", "model": "m" * 10_000})
        assert r.status_code == 404 and len(r.text) < 400


def test_server_ece_bins_like_the_report_on_bin_edges():
    """#11: p = 0.3, 0.6, 0.7 sit on bin edges; int(p * 10) and searchsorted put them in different bins."""
    p = [0.3, 0.6, 0.7, 0.0, 1.0, 0.1, 0.55, 0.3]
    y = [1, 0, 1, 0, 1, 0, 1, 0]
    stats = calibration_stats(p, [bool(v) for v in y], 10)
    curve = reliability_curve(p, y, 10)
    assert [b.count for b in stats.bins] == curve.counts.tolist()
    assert [b.count for b in stats.bins][
        2
    ] == 2  # 0.3 lands in [0.2, 0.3) as in the report (edge 0.30000000000000004)
    assert stats.ece == pytest.approx(ece(p, y, 10), abs=1e-12)


def test_metrics_are_prometheus_client_exposition_per_app(tmp_path):
    with serving(tmp_path / "a") as a, serving(tmp_path / "b") as b:
        a.post("/v1/completions", json={"prompt": "q"})
        text_a, text_b = a.get("/metrics").text, b.get("/metrics").text
        assert "# TYPE probecal_requests_total counter" in text_a
        assert 'probecal_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text_a
        assert 'endpoint="/v1/completions"' not in text_b  # one registry per app
        json.dumps(text_a)
