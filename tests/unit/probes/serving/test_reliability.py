"""Reliability of the serving surfaces: a bad request fails alone (never its batch), tokenizing never waits
for the model, an unwritable feedback database loses no answer, the admin guard refuses forwarded requests."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from extract.models import from_transformers
from probes.runtime.wrapper import ProbedModel
from probes.serving.app import create_app
from probes.serving.settings import ServeSettings
from tests.unit.probes.serving.test_hybrid_serving import hybrid_artifact
from tests.unit.probes.serving.test_server import FakeProbedModel, serving


@pytest.fixture
def tiny_probed(tiny_llama, word_tokenizer, tmp_path):
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    hybrid_artifact(loaded.fingerprint, 1, "answer_last", tmp_path / "hybrid")
    return ProbedModel.from_transformers(tiny_llama, word_tokenizer, tmp_path / "hybrid", threshold=None)


def concurrent_posts(client, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post("/v1/score", json=b), bodies))


def test_bad_token_ids_are_400_before_batching_and_never_fail_their_neighbours(tiny_probed, tmp_path):
    vocab = tiny_probed.vocab_size
    assert vocab == 99  # the tiny model's embedding rows and the word tokenizer's size
    settings = ServeSettings(db_path=str(tmp_path / "f.sqlite"), batch_wait_ms=200, max_batch_size=8)
    with TestClient(create_app(tiny_probed, settings), raise_server_exceptions=False) as client:
        for bad in (vocab, 10**6, -1, 2**70):
            r = client.post("/v1/score", json={"prompt": [5, 6, 7], "completion": [8, bad]})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "completion" and "[0, 98]" in r.json()["error"]["message"]
            r = client.post("/v1/score", json={"prompt": [5, bad], "completion": "paris"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        good = [{"prompt": "what is the capital of france ?", "completion": f"paris {i}"} for i in range(6)]
        answers = concurrent_posts(client, [*good, {"prompt": [5, 6, 7], "completion": [99999]}])
        assert [a.status_code for a in answers] == [200] * 6 + [400]
        assert all(0 <= a.json()["p_correct"] <= 1 for a in answers[:6])


class OneBadScore(FakeProbedModel):
    """A model whose score fails on one request (a failure the checks cannot foresee)."""

    vocab_size = 1000

    def score(self, prompts, completions, stop=None):
        self.batch_sizes = [*getattr(self, "batch_sizes", []), len(prompts)]
        if any("boom" in str(c) for c in completions):
            raise RuntimeError("simulated failure on one request")
        return super().score(prompts, completions, stop)


def test_a_batch_that_fails_is_retried_one_request_at_a_time(tmp_path):
    with serving(tmp_path, OneBadScore(), batch_wait_ms=200) as client:
        bodies = [{"prompt": "q", "completion": f"a {i}"} for i in range(6)] + [
            {"prompt": "q", "completion": "boom"}
        ]
        answers = concurrent_posts(client, bodies)
        assert [a.status_code for a in answers] == [200] * 6 + [500]
        assert max(client.model.batch_sizes) > 1  # they did share a batch first


def test_counting_tokens_never_waits_for_the_model(tiny_probed):
    counted = []
    with tiny_probed._lock:  # a long generation holds the model
        worker = threading.Thread(
            target=lambda: counted.append(tiny_probed.count_tokens("what is 12 + 30 ?"))
        )
        worker.start()
        worker.join(5)
        assert counted and counted[0] > 0
        assert tiny_probed.prompt_ids("what is 12 + 30 ?")


FORWARDED = [
    {"Via": "1.1 nginx"},
    {"X-Forwarded-Host": "probecal.example"},
    {"X-Forwarded-Proto": "https"},
    {"X-Client-IP": "203.0.113.9"},
    {"True-Client-IP": "203.0.113.9"},
    {"CF-Connecting-IP": "203.0.113.9"},
    {"X-Original-Forwarded-For": "203.0.113.9"},
    {"Forwarded": "for=203.0.113.9"},
    {"X-Real-IP": "203.0.113.9"},
    {"X-Forwarded-For": "203.0.113.9"},
]


def test_admin_without_a_token_refuses_every_sign_of_forwarding_and_a_non_loopback_bind(tmp_path):
    import httpx

    from tests.unit.probes.serving.test_online_recalibration import ArtifactModel, artifact, platt

    new = artifact(platt(0.5, 0.2)).save(tmp_path / "new")

    def app_for(**overrides):
        settings = ServeSettings(db_path=str(tmp_path / f"f{len(overrides)}.sqlite"), **overrides)
        return create_app(ArtifactModel(artifact(platt(1.0, 0.0))), settings)

    async def from_loopback(app, headers):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://probecal") as local:
            return await local.post("/admin/reload", json={"probe_dir": str(new)}, headers=headers)

    app = app_for()
    with TestClient(app, raise_server_exceptions=False) as client:
        for headers in FORWARDED:
            r = client.portal.call(from_loopback, app, headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_loopback_only", headers
        assert client.portal.call(from_loopback, app, {}).status_code == 200
    app = app_for(host="0.0.0.0")
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.portal.call(from_loopback, app, {})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_token_required"
        assert "serve.host=0.0.0.0" in r.json()["error"]["message"]


def read_only(store) -> None:
    """Reopen the server's feedback database read-only: every later write fails as on an immutable file."""
    import sqlite3

    with store._lock:
        store._conn.close()
        store._conn = sqlite3.connect(
            f"file:{store.db_path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )


def test_an_unwritable_feedback_db_loses_no_answer_and_health_says_degraded(tmp_path):
    with serving(tmp_path) as client:
        assert client.get("/health").json()["status"] == "ok"
        read_only(client.app.state.store)
        r = client.post("/v1/completions", json={"prompt": "what is 2 + 2 ?"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "answer to: what is 2 + 2 ?"
        assert "confidence" in r.json()["choices"][0]
        r = client.post("/v1/score", json={"prompt": "q", "completion": "a"})
        assert r.status_code == 200 and 0 <= r.json()["p_correct"] <= 1
        with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stream": True
        }) as stream:  # fmt: skip
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"confidence"' in events[-2]
        r = client.post("/v1/feedback", json={"id": "cmpl-x", "correct": True})
        assert r.status_code in (404, 503)
        health = client.get("/health").json()
        assert health["status"] == "degraded" and "readonly" in health["feedback_db"]["error"]
        metrics = client.get("/metrics").text
        assert "probecal_feedback_write_errors_total 3.0" in metrics


def test_start_up_on_an_unusable_feedback_db_is_one_clear_error(tmp_path):
    from probes.serving.feedback import FeedbackStore

    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file" / "feedback.db", tmp_path):  # parent is a file; a directory
        with pytest.raises(
            ValueError,
            match=r"not a usable SQLite database|serve.db_path=.*the feedback database is not usable",
        ):
            FeedbackStore(path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hybrid_score_runs_the_lm_head_on_the_answer_only_and_gives_the_same_result(
    arch, tiny_llama, tiny_gpt2, word_tokenizer, tmp_path, monkeypatch
):
    import probes.runtime.wrapper as wrapper
    from extract.forward import states_and_logits

    model = tiny_llama if arch == "llama" else tiny_gpt2
    loaded = from_transformers(model, word_tokenizer, name="tiny")
    hybrid_artifact(loaded.fingerprint, 1, "answer_last", tmp_path / "hybrid")
    pm = ProbedModel.from_transformers(model, word_tokenizer, tmp_path / "hybrid", threshold=None)
    prompts = ["what is the capital of france ?", "what is 12 + 30 ?", "which city is in asia ?", "hi"]
    completions = ["paris is the capital of france", "42", "", [8, 9, 10, 11, 12, 13, 14]]
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    try:
        sliced = pm.score(prompts, completions, stop=["w98"])
    finally:
        handle.remove()
    assert seen and seen[0] == 8  # the longest answer + 1 positions, not the padded width
    monkeypatch.setattr(wrapper, "states_and_logits", lambda *a, keep_last=None: states_and_logits(*a))
    full = pm.score(prompts, completions, stop=["w98"])
    for a, b in zip(sliced, full, strict=True):
        assert a.p_correct == pytest.approx(b.p_correct, abs=1e-6) and a.score == pytest.approx(
            b.score, abs=1e-6
        )


def test_score_bounds_a_batchs_tokens_and_gives_the_same_result(tiny_llama, word_tokenizer, tmp_path):
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    hybrid_artifact(loaded.fingerprint, 1, "answer_last", tmp_path / "hybrid")
    pm = ProbedModel.from_transformers(tiny_llama, word_tokenizer, tmp_path / "hybrid", threshold=None)
    prompts = ["what is the capital of france ?", "what is 12 + 30 ?", "which city is in asia ?"] * 2
    completions = ["paris", "42", "tokyo", [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], "rome", ""]
    widths = []
    handle = tiny_llama.get_input_embeddings().register_forward_hook(
        lambda m, a, out: widths.append(out.shape)
    )
    try:
        unbounded = pm.score(prompts, completions, stop=["w98"])
        pm.max_batch_tokens = 40
        bounded = pm.score(prompts, completions, stop=["w98"])
    finally:
        handle.remove()
    assert len(widths) > 2 and all(rows * width <= 40 or rows == 1 for rows, width, _ in widths[1:])
    for a, b in zip(bounded, unbounded, strict=True):
        assert a.p_correct == pytest.approx(b.p_correct, abs=1e-5)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ServeSettings(max_batch_tokens=0).validate()


def test_a_numeric_looking_admin_token_on_the_command_line_stays_a_string():
    from probes.cli.config import instantiate_group
    from tests.conf_groups import group_node

    for token in ("1234567890123456", "0012345678901234"):
        settings = instantiate_group(group_node("serve", "default", f"serve.admin_token={token}"))
        assert settings.admin_token == token
        settings.validate()


JSON = {"content-type": "application/json"}


def test_a_lone_surrogate_is_a_clear_400_naming_the_field_and_never_fails_the_batch(tiny_probed, tmp_path):
    """JSON's "\\ud83d" escape decodes to a lone surrogate that the tokenizer cannot encode: a completion holding
    one was an own 500 (TypeError) and a prompt a 400 quoting the tokenizer's internals (found by
    scripts/reliability_matrix.py)."""
    settings = ServeSettings(db_path=str(tmp_path / "f.sqlite"), batch_wait_ms=200, max_batch_size=8)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "a\ud83d"}]}
    with TestClient(create_app(tiny_probed, settings), raise_server_exceptions=False) as client:
        for path, body, param in [
            ("/v1/score", {"prompt": "q", "completion": "paris\udc00"}, "completion"),
            ("/v1/score", {"prompt": "\ud83d", "completion": "paris"}, "prompt"),
            ("/v1/completions", {"prompt": "\ud83d", "stream": True}, "prompt"),
            ("/v1/completions", {"prompt": "q", "stop": ["\ud83d"]}, "stop"),
            ("/v1/chat/completions", chat, "messages.1.content"),
        ]:
            r = client.post(path, content=json.dumps(body), headers=JSON)  # json= cannot encode a surrogate
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and "lone surrogate" in error["message"], error
        good = [{"prompt": "what is the capital of france ?", "completion": f"paris {i}"} for i in range(5)]
        bodies = [json.dumps(b) for b in [*good, {"prompt": "q", "completion": "a\ud83d"}]]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: client.post("/v1/score", content=b, headers=JSON), bodies))
        assert [a.status_code for a in answers] == [200] * 5 + [400]


FREEZE = """
import os, subprocess, sys
from probes.serving.feedback import FeedbackStore
store = FeedbackStore(sys.argv[1])
store.record_artifact("a" * 64, None)
os.sync()
paths = [sys.argv[1] + s for s in ("", "-wal", "-shm")]
subprocess.run(["chattr", "+i", *paths, os.path.dirname(sys.argv[1])], check=True)
for step in (lambda: store.record_artifact("b" * 64, None), store.counts):
    try:
        step()
        print("no error")
    except Exception as err:
        print(type(err).__name__, err, flush=True)
os._exit(0)  # closing the connection still checkpoints into the frozen -shm (a fault at shutdown only)
"""


def test_feedback_db_files_turned_immutable_are_an_error_not_a_crash(tmp_path):
    """WAL mode maps the -shm file: once it is immutable (chattr +i) the next access was a SIGBUS that killed the
    server with no traceback (found by scripts/reliability_matrix.py)."""
    import subprocess
    import sys

    from tests.paths import ROOT

    probe = tmp_path / "probe"
    probe.touch()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root (CAP_LINUX_IMMUTABLE)")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    db = tmp_path / "db" / "f.sqlite"
    try:
        done = subprocess.run(
            [sys.executable, "-c", FREEZE, str(db)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    finally:
        subprocess.run(["chattr", "-i", str(db.parent), *map(str, db.parent.glob("f.sqlite*"))], check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("OperationalError") for line in lines), lines
    assert all("is not writable (read-only or immutable)" in line for line in lines), lines


def test_metrics_keep_answering_when_the_feedback_db_fails(tmp_path, monkeypatch):
    import sqlite3

    def fail(*args):
        raise sqlite3.OperationalError("f.sqlite-shm is not writable (read-only or immutable)")

    with serving(tmp_path) as client:
        store = client.app.state.store
        with monkeypatch.context() as patch:
            patch.setattr(store, "counts", fail)
            r = client.get("/metrics")  # nothing read yet: the database's gauges are NaN
            assert r.status_code == 200 and "probecal_stored_responses NaN" in r.text, r.text
        client.post("/v1/completions", json={"prompt": "what is 2 + 2 ?"})
        assert "probecal_stored_responses 1.0" in client.get("/metrics").text
        monkeypatch.setattr(store, "counts", fail)
        monkeypatch.setattr(store, "record_responses", fail)
        assert client.post("/v1/completions", json={"prompt": "what is 2 + 2 ?"}).status_code == 200
        r = client.get("/metrics")
        assert r.status_code == 200, r.text
        assert "probecal_feedback_write_errors_total 1.0" in r.text  # visible when it matters
        assert "probecal_stored_responses 1.0" in r.text  # the last value read
        assert client.get("/health").json()["status"] == "degraded"
