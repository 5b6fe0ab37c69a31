"""Issue #14, online half: the domain tag of a request (stored, echoed, applied with a global fallback), the
feedback DB migration, POST /admin/reload (token / loopback protection, bad artifacts refused, no failed
request while reloading in a loop), and the per-domain ECE of the current vs previous artifact in /metrics.

`ArtifactModel` is a model double around a REAL ProbeArtifact: a prompt's hidden state is a fixed vector
derived from its text, scored with `artifact.predict(vectors, categories=domains)` as the wrapper does.
"""

import hashlib
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from extract.models import ModelFingerprint
from probes.artifact import ProbeArtifact
from probes.calibration import PerCategoryCalibrator, PlattCalibrator
from probes.estimators import PROBES
from probes.recalibration import read_feedback_rows
from probes.runtime.wrapper import ProbedGeneration, ProbedScore
from probes.serving.app import create_app
from probes.serving.feedback import SCHEMA_VERSION, FeedbackStore
from probes.serving.settings import ServeSettings

HIDDEN = 12
FINGERPRINT = ModelFingerprint("tiny-double", "e" * 64, "LlamaForCausalLM", HIDDEN, 3)
TOKEN = "s3cret-admin-token-0123"


def platt(a: float, b: float) -> PlattCalibrator:
    calibrator = PlattCalibrator()
    calibrator.a_, calibrator.b_ = np.float64(a), np.float64(b)
    return calibrator


def _probe():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, HIDDEN)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=80) > 0).astype(int)
    return PROBES["logistic"](Cs=(1.0,), cv=3).fit(X, y)


PROBE = _probe()


def artifact(calibrator, layer: int = 2) -> ProbeArtifact:
    return ProbeArtifact.create(
        PROBE,
        calibrator,
        layer,
        "answer_last",
        FINGERPRINT,
        training_data_hash="abc",
        split_sizes={"train": 80},
    )


def per_domain(global_ab=(1.0, 0.0), own=None) -> PerCategoryCalibrator:
    calibrator = PerCategoryCalibrator(base="platt")
    calibrator.global_ = platt(*global_ab)
    calibrator.per_category_ = {d: platt(*ab) for d, ab in (own or {}).items()}
    return calibrator


def vector(prompt) -> np.ndarray:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).normal(size=HIDDEN).astype(np.float32)


class ArtifactModel:
    """The ProbedModel contract, domains and hot reload included, around a real artifact (no torch)."""

    model_name = "tiny-double"
    max_context_tokens = 1000
    vocab_size = 1000

    def __init__(self, art: ProbeArtifact, step_s: float = 0.0, max_batch_size: int = 8):
        self.artifact, self.artifact_digest = art, art.digest
        self.step_s, self.max_batch_size = step_s, max_batch_size
        self.domains_seen: list = []

    def count_tokens(self, prompt) -> int:
        return len(str(prompt).split())

    def _predict(self, prompts, domains):
        X = np.stack([vector(p) for p in prompts])
        self.domains_seen.append(domains)
        return self.artifact.predict(
            X, categories=None if domains is None else np.asarray([d or "" for d in domains])
        )

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
        domains=None,
    ):
        art = self.artifact  # one artifact for the whole batch (the swap runs on this same thread)
        time.sleep(self.step_s)
        p, s = self._predict(prompts, domains)
        assert art is self.artifact
        return [
            ProbedGeneration(
                text="ok",
                p_correct=float(p[i]),
                score=float(s[i]),
                layer=art.metadata.layer,
                position=art.metadata.position,
                abstained=False,
                threshold=None,
                finish_reason="stop",
                prompt_tokens=1,
                completion_tokens=1,
                artifact=art.digest,
            )
            for i in range(len(prompts))
        ]

    def score(self, prompts, completions, stop=None, domains=None):
        p, s = self._predict(prompts, domains)
        return [
            ProbedScore(
                p_correct=float(p[i]),
                score=float(s[i]),
                layer=2,
                position="answer_last",
                abstained=False,
                threshold=None,
                prompt_tokens=1,
                completion_tokens=1,
                answer_tokens=(0, 1),
                answer_text="x",
                artifact=self.artifact.digest,
            )
            for i in range(len(prompts))
        ]

    def load_artifact(self, probe_dir):
        return ProbeArtifact.load(probe_dir, expected_fingerprint=FINGERPRINT)

    def swap_artifact(self, art):
        old, self.artifact, self.artifact_digest = self.artifact, art, art.digest
        return old


def expected_p(art: ProbeArtifact, prompt, domain) -> float:
    cats = None if domain is None else np.asarray([domain])
    return float(art.predict(vector(prompt)[None], categories=cats)[0][0])


def client_for(tmp_path, model, **overrides) -> TestClient:
    settings = ServeSettings(db_path=str(tmp_path / "feedback.sqlite"), **overrides)
    return TestClient(create_app(model, settings), raise_server_exceptions=False)


def admin(client, probe_dir, token=TOKEN):
    return client.post(
        "/admin/reload",
        json={"probe_dir": str(probe_dir)},
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )


# ------------------------------------------------------------------------------------------------ domain tag
def test_domain_tag_is_applied_with_global_fallback_stored_and_echoed(tmp_path):
    art = artifact(per_domain((1.0, 0.0), {"med": (0.3, -1.0)}))
    with client_for(tmp_path, ArtifactModel(art)) as client:
        cases = [
            ("q1", {"metadata": {"domain": "med", "user": "u1"}}, "med"),
            ("q2", {"domain": "med"}, "med"),  # extra_body={"domain": ...}
            ("q3", {"metadata": {"domain": "law"}}, "law"),  # unknown -> global fallback
            ("q4", {}, None),
        ]  # no tag -> global fallback
        for prompt, extra, domain in cases:
            r = client.post("/v1/completions", json={"prompt": prompt, **extra})
            assert r.status_code == 200, r.text
            body = r.json()
            p = body["choices"][0]["confidence"]["p_correct"]
            assert p == pytest.approx(expected_p(art, prompt, domain), abs=1e-12)
            own = domain == "med"
            assert (p == pytest.approx(expected_p(artifact(platt(1.0, 0.0)), prompt, None), abs=1e-12)) != own
            if domain is None:
                assert "metadata" not in body
            else:
                assert body["metadata"]["domain"] == domain
            record, _ = FeedbackStore(tmp_path / "feedback.sqlite").get_response(body["id"])
            assert record.domain == domain and record.artifact == art.digest
        assert client.post("/v1/completions", json={"prompt": "q1", "metadata": {"domain": "med"}}).json()[
            "metadata"
        ] == {"domain": "med"}
        chat = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "metadata": {"domain": "med"},
                "stream": True,
            },
        )
        chunks = [
            json.loads(line[5:])
            for line in chat.text.splitlines()
            if line.startswith("data:") and "[DONE]" not in line
        ]
        assert all(c["metadata"] == {"domain": "med"} for c in chunks)
        scored = client.post(
            "/v1/score", json={"prompt": "q1", "completion": "x", "metadata": {"domain": "med"}}
        )
        assert scored.json()["p_correct"] == pytest.approx(expected_p(art, "q1", "med"))


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"metadata": {"domain": "a b"}}, "metadata.domain"),
        ({"metadata": {"domain": "x" * 65}}, "metadata.domain"),
        ({"metadata": {"domain": 3}}, "metadata"),
        ({"metadata": "med"}, "metadata"),
        ({"domain": "med", "metadata": {"domain": "law"}}, "domain"),
    ],
)
def test_bad_domain_tags_are_400(tmp_path, extra, param):
    with client_for(tmp_path, ArtifactModel(artifact(platt(1.0, 0.0)))) as client:
        r = client.post("/v1/completions", json={"prompt": "q", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_schema_1_database_is_migrated_in_place(tmp_path):
    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE responses (id TEXT PRIMARY KEY, created REAL NOT NULL, endpoint TEXT NOT NULL,
            model TEXT NOT NULL, prompt TEXT, text TEXT, p_correct REAL NOT NULL, score REAL NOT NULL,
            layer INTEGER NOT NULL, position TEXT NOT NULL, abstained INTEGER NOT NULL, threshold REAL,
            finish_reason TEXT NOT NULL, correct INTEGER, label_seq INTEGER);
        CREATE TABLE feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT NOT NULL REFERENCES
            responses(id), correct INTEGER NOT NULL, created REAL NOT NULL);
        INSERT INTO responses VALUES ('r1', 1.0, 'completions', 'm', NULL, NULL, 0.7, 0.8, 2, 'answer_last', 0,
            NULL, 'stop', 1, 1);
        INSERT INTO feedback VALUES (1, 'r1', 1, 1.0);
        PRAGMA user_version=1;
    """)
    conn.close()
    store = FeedbackStore(db)
    record, label = store.get_response("r1")
    assert record.domain is None and record.artifact is None and label is True
    assert store.counts() == {"responses": 1, "labelled": 1, "feedback": 1}
    store.close()
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    rows = read_feedback_rows(db, 2, "answer_last")
    assert list(rows.domain) == [""] and list(rows.y) == [1]


# ------------------------------------------------------------------------------------------------ protection
def test_reload_needs_the_token_when_one_is_configured(tmp_path):
    new = artifact(platt(0.5, 0.2)).save(tmp_path / "new")
    with client_for(tmp_path, ArtifactModel(artifact(platt(1.0, 0.0))), admin_token=TOKEN) as client:
        assert admin(client, new, token=None).status_code == 401
        assert admin(client, new, token="wrong-token-wrong-token").status_code == 401
        r = client.post("/admin/reload", json={"nonsense": 1})  # refused before the body is looked at
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
        assert admin(client, new).status_code == 200


def test_without_a_token_reload_answers_loopback_clients_only(tmp_path):
    new = artifact(platt(0.5, 0.2)).save(tmp_path / "new")
    app = create_app(
        ArtifactModel(artifact(platt(1.0, 0.0))), ServeSettings(db_path=str(tmp_path / "f.sqlite"))
    )
    with TestClient(app, raise_server_exceptions=False) as remote:  # TestClient's peer is "testclient"
        r = admin(remote, new, token=None)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_loopback_only"

        async def from_loopback(headers):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
            async with httpx.AsyncClient(transport=transport, base_url="http://probecal") as local:
                return await local.post("/admin/reload", json={"probe_dir": str(new)}, headers=headers)

        assert remote.portal.call(from_loopback, {"X-Forwarded-For": "203.0.113.9"}).status_code == 403
        assert remote.portal.call(from_loopback, {}).status_code == 200


# ------------------------------------------------------------------------------------------------ reload
def test_bad_artifacts_are_refused_and_the_old_one_keeps_serving(tmp_path):
    old = artifact(platt(1.0, 0.0))
    good = artifact(platt(0.5, 0.2)).save(tmp_path / "good")
    tampered = artifact(platt(0.4, 0.1)).save(tmp_path / "tampered")
    meta = json.loads((tampered / "probe.json").read_text())
    meta["layer"] = 1  # an edited layer: the digest no longer matches
    (tampered / "probe.json").write_text(json.dumps(meta))
    other_model = ProbeArtifact.create(
        PROBE, platt(1, 0), 2, "answer_last", ModelFingerprint("another", "a" * 64, "X", HIDDEN, 3)
    ).save(tmp_path / "other")
    model = ArtifactModel(old)
    with client_for(tmp_path, model, admin_token=TOKEN) as client:
        for bad in (tmp_path / "missing", tampered, other_model):
            r = admin(client, bad)
            assert r.status_code == 400 and r.json()["error"]["code"] == "artifact_refused", r.text
            assert model.artifact is old
            served = client.post("/v1/completions", json={"prompt": "q"}).json()
            assert served["choices"][0]["confidence"]["p_correct"] == pytest.approx(
                expected_p(old, "q", None)
            )
        r = admin(client, good)
        assert r.status_code == 200 and r.json()["changed"] is True
        assert r.json()["previous"]["digest"] == old.digest
        assert r.json()["current"]["digest"] == ProbeArtifact.load(good).digest
        assert admin(client, good).json()["changed"] is False
        metrics = client.get("/metrics").text
        assert 'probecal_reloads_total{outcome="refused"} 3.0' in metrics
        assert 'probecal_reloads_total{outcome="swapped"} 2.0' in metrics


def test_hot_reload_under_concurrent_requests_never_fails_a_request(tmp_path):
    arts = [artifact(per_domain((1.0, 0.0), {"med": (0.3, -1.0)})), artifact(platt(0.5, 0.2), layer=3)]
    dirs = [a.save(tmp_path / f"a{i}") for i, a in enumerate(arts)]
    by_digest = {ProbeArtifact.load(d).digest: a for d, a in zip(dirs, arts, strict=True)}
    model = ArtifactModel(ProbeArtifact.load(dirs[0]), step_s=0.003)
    stop, results, reloads = threading.Event(), [], []
    with client_for(tmp_path, model, admin_token=TOKEN, batch_wait_ms=1.0) as client:

        def load(worker: int) -> None:
            k = 0
            while not stop.is_set() or k < 5:
                prompt, domain = f"w{worker} q{k}", ("med", "law", None)[k % 3]
                r = client.post(
                    "/v1/completions", json={"prompt": prompt, **({"domain": domain} if domain else {})}
                )
                results.append((r.status_code, r.json(), prompt, domain))
                k += 1

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(load, w) for w in range(6)]
            for i in range(12):
                r = admin(client, dirs[(i + 1) % 2])
                reloads.append(r.status_code)
                time.sleep(0.01)
            stop.set()
            for f in futures:
                f.result()
        store = FeedbackStore(tmp_path / "feedback.sqlite")
        assert reloads == [200] * 12
        assert len(results) > 60 and all(status == 200 for status, *_ in results)
        seen = set()
        for _, body, prompt, domain in results:  # every answer was scored by one whole artifact
            record, _ = store.get_response(body["id"])
            seen.add(record.artifact)
            assert body["choices"][0]["confidence"]["p_correct"] == pytest.approx(
                expected_p(by_digest[record.artifact], prompt, domain), abs=1e-12
            )
            assert body["choices"][0]["confidence"]["layer"] == by_digest[record.artifact].metadata.layer
        assert seen == set(by_digest)


def test_metrics_show_domain_ece_of_the_current_and_previous_artifact(tmp_path):
    old = artifact(platt(1.0, 0.0))
    new = artifact(per_domain((1.0, 0.0), {"med": (0.3, -1.0)})).save(tmp_path / "new")
    with client_for(tmp_path, ArtifactModel(old), admin_token=TOKEN) as client:

        def serve_and_label(prompts, domain, correct):
            out = []
            for prompt in prompts:
                body = client.post(
                    "/v1/completions", json={"prompt": prompt, "metadata": {"domain": domain}}
                ).json()
                client.post("/v1/feedback", json={"id": body["id"], "correct": correct})
                out.append(body["choices"][0]["confidence"]["p_correct"])
            return out

        before = serve_and_label(["a", "b", "c"], "med", False)
        untagged = client.post("/v1/completions", json={"prompt": "z"}).json()
        client.post("/v1/feedback", json={"id": untagged["id"], "correct": True})
        text = client.get("/metrics").text
        assert 'probecal_calibration_ece{artifact="previous"' not in text
        values = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("probecal_calibration_")
        }
        assert values['probecal_calibration_ece{artifact="current",domain="med"}'] == pytest.approx(
            np.mean(before)
        )
        assert values['probecal_calibration_domain_labelled{artifact="current",domain="med"}'] == 3
        assert 'probecal_calibration_ece{artifact="current",domain="default"}' in values
        assert "probecal_calibration_ece" in values  # the unlabelled rolling-window sample stays

        assert admin(client, new).status_code == 200
        after = serve_and_label(["d", "e"], "med", False)
        values = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("probecal_calibration_")
        }
        assert values['probecal_calibration_ece{artifact="previous",domain="med"}'] == pytest.approx(
            np.mean(before)
        )
        assert values['probecal_calibration_ece{artifact="current",domain="med"}'] == pytest.approx(
            np.mean(after)
        )
        assert values['probecal_calibration_domain_labelled{artifact="current",domain="med"}'] == 2


def test_reload_refused_for_a_model_that_cannot_swap(tmp_path):
    from tests.unit.probes.serving.test_server import FakeProbedModel

    with client_for(tmp_path, FakeProbedModel(), admin_token=TOKEN) as client:
        r = admin(client, tmp_path)
        assert r.status_code == 501 and r.json()["error"]["code"] == "reload_unsupported"
