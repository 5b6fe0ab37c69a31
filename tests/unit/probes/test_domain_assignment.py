"""Domain assignment at serving time on the tiny Llama: an untagged request gets the artifact's cluster of its
prompt_last state at the probe's layer (as a plain forward computes it), deterministically; a client tag wins;
the assigned domain picks the per-domain calibration, is echoed in `confidence` and stored with the feedback."""

import sqlite3

import numpy as np
import pytest
import torch

from extract.models import from_transformers
from probes.artifact import ProbeArtifact
from probes.calibration import ShrinkageCalibrator
from probes.domains import fit_domain_clusters
from probes.estimators import LogisticProbe
from probes.runtime.wrapper import ProbedModel
from probes.serving.feedback import FeedbackStore

LAYER = 2
QUESTIONS = [
    "what is the capital of france ?",
    "what is 12 + 30 ?",
    "which city is in asia ?",
    "what is 7 + 1 ?",
]


@pytest.fixture()
def loaded(tiny_llama, word_tokenizer):
    return from_transformers(tiny_llama, word_tokenizer, name="tiny-llama")


def prompt_last_state(loaded, prompt_ids):
    with torch.no_grad():
        hidden = loaded.model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states[LAYER][0]
    return hidden[len(prompt_ids) - 1].numpy()


def build(loaded, directory, with_clusters=True):
    """An answer_last probe whose shrinkage calibrator shifts cluster-0 up and cluster-1 down; clusters fit on
    the prompt_last states of QUESTIONS (as the server will see them)."""
    rng = np.random.default_rng(0)
    hidden = loaded.fingerprint.hidden_size
    X = rng.normal(size=(80, hidden))
    y = (X[:, 0] + 0.5 * rng.normal(size=80) > 0).astype(int)
    probe = LogisticProbe(C=1.0).fit(X, y)
    calibrator = ShrinkageCalibrator(tau=1.0).fit(probe.decision_function(X), y)
    calibrator.offsets_, calibrator.counts_ = (
        {"cluster-0": 2.0, "cluster-1": -2.0},
        {"cluster-0": 9, "cluster-1": 9},
    )
    settings = {"generation": {"stop_strings": ["?"]}, "prompt": {"instruction": "answer briefly"}}
    artifact = ProbeArtifact.create(
        probe, calibrator, LAYER, "answer_last", loaded.fingerprint, extract_settings=settings
    )
    wrapped = ProbedModel.from_transformers(
        loaded.model, loaded.tokenizer, artifact.save(directory), threshold=None
    )
    states = np.array(
        [prompt_last_state(loaded, wrapped._encode(wrapped.question_prompt(q))) for q in QUESTIONS]
    )
    if with_clusters:
        artifact = artifact.with_domains(fit_domain_clusters(states, n_clusters=2, seed=0))
        artifact.save(directory)
    return ProbedModel.from_transformers(loaded.model, loaded.tokenizer, directory, threshold=None), states


def test_untagged_generations_get_the_cluster_of_their_prompt_and_a_tag_wins(loaded, tmp_path):
    wrapped, states = build(loaded, tmp_path)
    clusters = wrapped.artifact.domains
    expected = clusters.assign(states)
    assert len(set(expected)) == 2
    prompts = [wrapped.question_prompt(q) for q in QUESTIONS]
    results = wrapped.generate(prompts, max_new_tokens=3)
    assert [r.domain for r in results] == expected.tolist() and all(r.domain_assigned for r in results)
    # the assigned domain chose the calibration: same probe score, the cluster's offset
    for r in results:
        p_global = wrapped.artifact.calibrator.predict(np.array([r.score]))[0]
        shifted = 1 / (
            1 + np.exp(-(np.log(p_global / (1 - p_global)) + (2.0 if r.domain == "cluster-0" else -2.0)))
        )
        assert r.p_correct == pytest.approx(shifted, rel=1e-6)
    again = wrapped.generate(prompts, max_new_tokens=3)
    assert [r.domain for r in again] == [r.domain for r in results]  # deterministic
    tagged = wrapped.generate(prompts[:2], max_new_tokens=3, domains=["med", None])
    assert (tagged[0].domain, tagged[0].domain_assigned) == ("med", False)
    assert (tagged[1].domain, tagged[1].domain_assigned) == (expected[1], True)
    scored = wrapped.score(prompts, [" paris", " 42", " tokyo", " 8"])
    assert [s.domain for s in scored] == expected.tolist() and all(s.domain_assigned for s in scored)
    # the prompt state the clusters read travels with each result (the server stores it to refit them)
    for out in (results, scored):
        np.testing.assert_allclose(np.stack([r.prompt_state for r in out]), states, rtol=1e-4, atol=1e-4)
    assert "prompt_state" not in results[0].to_dict()
    assert wrapped.score(prompts[:1], [" paris"], domains=["law"])[0].domain == "law"


def test_without_clusters_nothing_is_assigned(loaded, tmp_path):
    wrapped, states = build(loaded, tmp_path, with_clusters=False)
    result = wrapped.generate(wrapped.question_prompt(QUESTIONS[0]), max_new_tokens=3)[0]
    assert result.domain is None and result.domain_assigned is False
    # the prompt state is read anyway (one more vector of the same forward): clusters can be fit on it later
    np.testing.assert_allclose(result.prompt_state, states[0], rtol=1e-4, atol=1e-4)


def test_server_echoes_and_stores_the_assigned_domain(loaded, tmp_path):
    from fastapi.testclient import TestClient

    from probes.serving.app import create_app
    from probes.serving.settings import ServeSettings

    wrapped, states = build(loaded, tmp_path / "probe")
    expected = wrapped.artifact.domains.assign(states)
    prompt = wrapped.question_prompt(QUESTIONS[1])
    settings = ServeSettings(db_path=str(tmp_path / "db.sqlite"), batch_wait_ms=0)
    with TestClient(create_app(wrapped, settings)) as client:
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 3}
        untagged = client.post("/v1/completions", json=body).json()
        confidence = untagged["choices"][0]["confidence"]
        assert confidence["domain"] == expected[1] and confidence["domain_assigned"] is True
        tagged = client.post("/v1/completions", json={**body, "metadata": {"domain": "med"}}).json()
        assert "domain_assigned" not in tagged["choices"][0]["confidence"]
        assert client.post("/v1/feedback", json={"id": untagged["id"], "correct": True}).status_code == 200
        assert f'domain="{expected[1]}"' in client.get("/metrics").text
    rows = dict(
        sqlite3.connect(tmp_path / "db.sqlite").execute("SELECT id, domain FROM responses").fetchall()
    )
    assert rows[untagged["id"]] == expected[1] and rows[tagged["id"]] == "med"
    stored, _ = FeedbackStore(tmp_path / "db.sqlite").get_response(untagged["id"])
    assert stored.domain_assigned is True and stored.prompt_state.dtype == np.float32
    np.testing.assert_allclose(stored.prompt_state, states[1], rtol=2e-3, atol=2e-3)  # float16 in the DB
    assert FeedbackStore(tmp_path / "db.sqlite").get_response(tagged["id"])[0].domain_assigned is False
