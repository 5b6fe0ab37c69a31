"""The proxy against engines that behave like the real ones (#22) and against bad ones (#21 items 6-8 and the
minor upstream items): the stub engine (tests/openai_stub.py) runs as a real second process on loopback and
picks its misbehaviour from `mode=NAME` in the prompt."""

import json
import time

import httpx
import pytest

from probes.serving.app import create_app
from probes.serving.settings import ServeSettings
from tests.unit.probes.serving.test_server import FakeProbedModel
from tests.unit.probes.serving.test_server_openai import free_port, running, stub_upstream  # noqa: F401


@pytest.fixture(scope="module")
def model():
    return FakeProbedModel()


@pytest.fixture(scope="module")
def proxy(model, stub_upstream, tmp_path_factory):  # noqa: F811
    settings = ServeSettings(
        db_path=str(tmp_path_factory.mktemp("proxy") / "f.sqlite"),
        upstream=f"{stub_upstream}/v1",
        upstream_timeout_s=5.0,
        upstream_deadline_s=2.0,
        upstream_max_bytes=100_000,
        abstention_message="I can't say.",
    )
    with running(create_app(model, settings)) as base:
        yield base


def chat(base, content, **kw):
    return httpx.post(
        f"{base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], **kw},
        timeout=20,
    )


def events(reply: httpx.Response) -> list:
    out = []
    for line in reply.text.splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_defaults_fill_what_the_request_does_not_say_and_engine_options_pass_through(proxy, stub_upstream):  # noqa: F811
    r = chat(proxy, "capital p=0.9", top_k=5, min_p=0.1, repetition_penalty=1.1, return_token_ids=True)
    assert r.status_code == 200, r.text
    sent = httpx.get(f"{stub_upstream}/last").json()
    assert (sent["temperature"], sent["max_tokens"]) == (0.0, 64)  # serve.upstream_defaults
    assert (sent["top_k"], sent["min_p"], sent["repetition_penalty"], sent["return_token_ids"]) == (
        5,
        0.1,
        1.1,
        True,
    )
    conf = r.json()["choices"][0]["confidence"]
    assert conf["decoding"] == {"greedy": True, "temperature": 0.0}
    r = chat(proxy, "capital p=0.9", temperature=0.7, max_completion_tokens=9)
    sent = httpx.get(f"{stub_upstream}/last").json()
    assert sent["temperature"] == 0.7 and sent["max_completion_tokens"] == 9 and "max_tokens" not in sent
    conf = r.json()["choices"][0]["confidence"]
    assert conf["decoding"] == {"greedy": False, "temperature": 0.7}
    text = r.json()["choices"][0]["message"]["content"]
    assert conf["answer_chars"] == [0, len(text)]  # an answer-reading probe says what it read


def test_own_server_refuses_engine_options(tmp_path):
    settings = ServeSettings(db_path=str(tmp_path / "f.sqlite"))
    with running(create_app(FakeProbedModel(), settings)) as base:
        r = chat(base, "q", top_k=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


def test_an_answer_opening_with_a_line_break_is_read_after_it(proxy):
    r = chat(proxy, "where p=0.9 mode=newline")
    choice = r.json()["choices"][0]
    start, end = choice["confidence"]["answer_chars"]
    assert choice["message"]["content"][start:end] == choice["message"]["content"].strip() and start == 2


def test_a_non_streamed_abstention_shows_the_abstention_message_as_probecals_own_server_does(proxy):
    r = chat(proxy, "who p=0.2")
    choice = r.json()["choices"][0]
    assert choice["confidence"]["abstained"] is True and choice["message"]["content"] == "I can't say."


@pytest.mark.parametrize("n", [1, 2])
def test_stream_with_usage_confidence_before_usage_and_one_finish_reason_per_choice(proxy, n):
    r = chat(proxy, "stream p=0.8", stream=True, n=n, stream_options={"include_usage": True})
    got = events(r)
    assert got[-1] == "[DONE]" and "usage" in got[-2] and got[-2]["choices"] == []
    finishes = [c for e in got[:-1] for c in e["choices"] if c.get("finish_reason")]
    assert sorted(c["index"] for c in finishes) == list(range(n))
    assert all(c["finish_reason"] == "stop" and c["confidence"]["p_correct"] == 0.8 for c in finishes)
    assert all(e["id"] == got[0]["id"] for e in got[:-1])  # our id on every chunk, the usage chunk too
    text = "".join(c["delta"].get("content") or "" for e in got[:-1] for c in e["choices"] if c["index"] == 0)
    assert text == "answer to: stream p=0.8"


@pytest.mark.parametrize(
    ("mode", "status", "code", "says"),
    [
        ("int_code", 400, "400", "n > 1 is not supported"),  # llama.cpp: integer code -> string
        ("e503", 502, "upstream_error", "overloaded"),
        ("redirect", 502, "upstream_redirect", "elsewhere.invalid"),
        ("badjson", 502, "upstream_bad_response", "not JSON"),
        ("choices_str", 502, "upstream_bad_response", "choices"),
        ("choices_null", 502, "upstream_bad_response", "NoneType"),
        ("choices_missing", 502, "upstream_bad_response", "choices"),
        ("body_list", 502, "upstream_bad_response", "list"),
        ("huge", 502, "upstream_bad_response", "serve.upstream_max_bytes"),
        ("slowbody", 504, "upstream_timeout", "serve.upstream_deadline_s"),
    ],
)
def test_bad_engine_answers_are_clear_errors_not_500s(proxy, mode, status, code, says):
    started = time.monotonic()
    r = chat(proxy, f"q p=0.9 mode={mode}")
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and says in error["message"], error
    assert time.monotonic() - started < 5  # serve.upstream_deadline_s=2


@pytest.mark.parametrize(
    ("mode", "code", "says"),
    [
        ("plainjson", "upstream_bad_response", "not an event stream"),
        ("badindex", "upstream_bad_response", "index"),
        ("nodone", "upstream_bad_response", "without [DONE]"),
        ("endless", "upstream_timeout", "serve.upstream_deadline_s"),
        ("e503", "upstream_error", "overloaded"),
    ],
)
def test_bad_engine_streams_end_in_an_error_not_a_hang(proxy, mode, code, says):
    started = time.monotonic()
    r = chat(proxy, f"q p=0.9 mode={mode}", stream=True)
    if r.status_code != 200:  # failed before the first chunk: a plain error answer
        assert r.status_code in (502, 504)
        error = r.json()["error"]
    else:
        got = events(r)
        assert "[DONE]" not in got and "error" in got[-1]
        error = got[-1]["error"]
    assert error["code"] == code and says in error["message"], error
    assert time.monotonic() - started < 5


def test_a_completion_longer_than_the_models_context_is_a_502(stub_upstream, tmp_path):  # noqa: F811
    settings = ServeSettings(db_path=str(tmp_path / "f.sqlite"), upstream=f"{stub_upstream}/v1")
    with running(create_app(FakeProbedModel(), settings)) as base:
        r = chat(base, "q p=0.9 mode=huge")  # 150,000 words, the fake model's context is 100 tokens
    assert r.status_code == 502 and "context of 100 tokens" in r.json()["error"]["message"]


def test_health_reports_the_upstream(proxy, tmp_path):
    body = httpx.get(f"{proxy}/health").json()
    assert body["status"] == "ok" and body["upstream"]["status"] == "ok"
    settings = ServeSettings(
        db_path=str(tmp_path / "f.sqlite"), upstream=f"http://127.0.0.1:{free_port()}/v1"
    )
    with running(create_app(FakeProbedModel(), settings)) as base:
        body = httpx.get(f"{base}/health").json()
    assert body["status"] == "degraded" and body["upstream"]["status"].startswith("unreachable")


ENGINE_IDS = {"vllm": {"return_token_ids": True}, "llamacpp": {"logprobs": True, "top_logprobs": 1}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("engine", sorted(ENGINE_IDS))
def test_the_engines_own_token_ids_are_scored_not_its_re_encoded_text(proxy, model, engine, stream):
    """vLLM's `token_ids` and llama.cpp's `logprobs.content[].id` are what the model generated: those are
    scored (a tokenizer can split the engine's text otherwise); ids outside the vocabulary, or none, fall
    back to the text."""
    cases = [
        ("what is the capital", ENGINE_IDS[engine], [200, 201, 202, 203], "token_ids"),
        ("what is the capital", {}, "answer to: the capital", "text"),
        ("the capital mode=bigids", ENGINE_IDS[engine], "answer to: capital mode=bigids", "text"),
    ]
    for content, ask, scored, source in cases:
        r = chat(proxy, content, stream=stream, **ask)
        assert r.status_code == 200, r.text
        if stream:
            conf = [e for e in events(r) if e != "[DONE]" and e["choices"]][-1]["choices"][0]["confidence"]
        else:
            conf = r.json()["choices"][0]["confidence"]
        assert model.calls[-1][1]["completions"] == [scored], (content, ask)
        assert conf["scored_from"] == source


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_closes_the_upstream_call(stub_upstream, tmp_path, stream):  # noqa: F811
    """#21 item 7: waiting for a slow engine (1 byte/s, deadline 60 s), the client gives up after 1 s; the
    engine must see its connection closed within a few seconds, not when the deadline passes."""
    settings = ServeSettings(
        db_path=str(tmp_path / "f.sqlite"), upstream=f"{stub_upstream}/v1", upstream_deadline_s=60.0
    )
    with running(create_app(FakeProbedModel(), settings)) as base:
        body = {"messages": [{"role": "user", "content": "q p=0.9 mode=slowbody"}], "stream": stream}
        calls = httpx.get(f"{stub_upstream}/calls").json()["n"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.5))
        left = time.monotonic()
        assert httpx.get(f"{stub_upstream}/calls").json()["n"] == calls + 1  # the engine was answering
        while httpx.get(f"{stub_upstream}/open").json()["n"] and time.monotonic() - left < 10:
            time.sleep(0.2)
        assert httpx.get(f"{stub_upstream}/open").json()["n"] == 0  # its answer was cut once the client left
        assert time.monotonic() - left < 5


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_answer_holding_a_lone_surrogate_is_a_502(proxy, stream):
    r = chat(proxy, "q p=0.9 mode=surrogate", stream=stream)
    error = (r.json() if r.status_code != 200 else events(r)[-1])["error"]
    assert r.status_code == (200 if stream else 502), r.text
    assert error["code"] == "upstream_bad_response" and "lone surrogate" in error["message"], error
