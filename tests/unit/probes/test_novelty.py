"""Novelty (probes.novelty): in-domain rows score low and shifted rows high; the model travels in the artifact
under its digest; ProbeScorer, the runtime wrapper's generate and score all report the same novelty."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from extract.models import from_transformers
from probes.artifact import ArtifactError, ProbeArtifact
from probes.novelty import NoveltyModel
from probes.runtime.wrapper import ProbedModel
from probes.scorer import ProbeScorer
from probes.training import TrainSpec, train_probe
from tests.factories import fitted_artifact
from tests.pipeline_fixtures import write_synthetic_store

HIDDEN = 24


def _domain(rng, n, shift=0.0, rank=4):
    """Rows that live near a `rank`-dimensional subspace (as hidden states of one question form do)."""
    basis = np.linalg.qr(np.random.default_rng(7).normal(size=(HIDDEN, HIDDEN)))[0]
    inside = rng.normal(size=(n, rank)) * 3.0 @ basis[:rank]
    outside = 0.3 * rng.normal(size=(n, HIDDEN))
    return inside + outside + shift * basis[rank + 1]


def test_in_domain_rows_score_low_and_shifted_rows_high():
    rng = np.random.default_rng(0)
    model = NoveltyModel(n_components=4, quantile=0.95).fit(_domain(rng, 400), _domain(rng, 200))
    known, shifted = model.score(_domain(rng, 300)), model.score(_domain(rng, 300, shift=4.0))
    assert 0.88 <= np.mean(known <= 1.0) <= 0.99  # ~95% of held-out in-domain rows under the cut-off
    assert np.mean(shifted <= 1.0) < 0.05 and np.median(shifted) > 2 * np.median(known)
    assert list(NoveltyModel.in_domain([0.5, 1.0, 1.5])) == [True, True, False]


def test_novelty_options_and_inputs_are_checked():
    X = np.random.default_rng(0).normal(size=(50, HIDDEN))
    with pytest.raises(ValueError, match="quantile=1.5"):
        NoveltyModel(quantile=1.5).fit(X)
    with pytest.raises(ValueError, match="n_components=0"):
        NoveltyModel(n_components=0).fit(X)
    with pytest.raises(RuntimeError, match="not fitted"):
        NoveltyModel().score(X)
    model = NoveltyModel(n_components=3).fit(X)
    with pytest.raises(ValueError, match="size 24"):
        model.score(X[:, :10])
    with pytest.raises(ValueError, match="nan or inf"):
        model.score(np.full((1, HIDDEN), np.nan))


def _artifact(fingerprint, novelty, layer=2, position="answer_last"):
    settings = {"generation": {"stop_strings": ["?"]}, "prompt": {"instruction": "answer briefly"}}
    return fitted_artifact(fingerprint, layer, position, seed=1, novelty=novelty, extract_settings=settings)


def test_round_trip_keeps_novelty_and_the_digest_covers_it(tiny_loaded, tmp_path):
    rng = np.random.default_rng(2)
    prompts = rng.normal(size=(60, tiny_loaded.fingerprint.hidden_size))
    novelty = NoveltyModel(n_components=5).fit(prompts)
    _artifact(tiny_loaded.fingerprint, novelty).save(tmp_path / "a")
    loaded = ProbeArtifact.load(tmp_path / "a")
    probe_rows = rng.normal(size=(7, tiny_loaded.fingerprint.hidden_size))
    np.testing.assert_allclose(loaded.score_novelty(probe_rows), novelty.score(probe_rows), rtol=1e-5)
    scorer = ProbeScorer(tmp_path / "a")
    assert scorer.has_novelty
    np.testing.assert_allclose(scorer.novelty(probe_rows), novelty.score(probe_rows), rtol=1e-5)
    assert loaded.metadata.novelty["layer"] == 2 and loaded.metadata.novelty["position"] == "prompt_last"

    meta_path = tmp_path / "a" / "probe.json"
    document = json.loads(meta_path.read_text())
    document["novelty"]["cutoff"] *= 10  # would call every question familiar
    meta_path.write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match="changed after it was saved"):
        ProbeArtifact.load(tmp_path / "a")


def test_an_artifact_without_novelty_still_loads_and_says_so(tiny_loaded, tmp_path):
    _artifact(tiny_loaded.fingerprint, None).save(tmp_path)
    assert (
        ProbeArtifact.load(tmp_path).score_novelty(np.zeros((1, tiny_loaded.fingerprint.hidden_size))) is None
    )
    scorer = ProbeScorer(tmp_path)
    assert not scorer.has_novelty
    with pytest.raises(ValueError, match="no novelty model"):
        scorer.novelty(np.zeros(tiny_loaded.fingerprint.hidden_size))


def test_training_fits_novelty_and_measures_it_leave_one_domain_out(tmp_path, monkeypatch):
    import probes.training.splits as splits_module

    store = write_synthetic_store(tmp_path / "store")
    monkeypatch.setattr(
        splits_module, "row_domains", lambda s: np.array(["a", "b", "c"])[np.arange(len(s)) % 3]
    )
    result = train_probe(store, spec=TrainSpec(n_folds=3, n_bootstrap=20, select="cv"))
    assert result.artifact.novelty is not None
    assert result.artifact.metadata.novelty["layer"] == result.artifact.metadata.layer
    summary = result.novelty
    assert set(summary["per_domain"]) == {"a", "b", "c"}
    # the synthetic domains are random rows of one distribution: novelty cannot tell them apart
    assert 0.3 < summary["auroc"] < 0.7 and summary["reference_in_domain_share"] > 0.8


def test_generate_and_score_report_the_same_novelty(tiny_loaded, tmp_path):
    loaded = from_transformers(tiny_loaded.model, tiny_loaded.tokenizer, name="tiny-llama")
    wrapped_plain = ProbedModel(loaded, _artifact(loaded.fingerprint, None), threshold=None)
    questions = ["what is the capital of france ?", "what is 12 + 30 ?", "which city is in asia ?"]
    ids = [wrapped_plain.prompt_ids(wrapped_plain.question_prompt(q)) for q in questions]
    states = wrapped_plain.prompt_states(ids * 10)
    noise = np.random.default_rng(0).normal(scale=0.01, size=states.shape)
    novelty = NoveltyModel(n_components=2).fit(states + noise)
    wrapped = ProbedModel(loaded, _artifact(loaded.fingerprint, novelty), threshold=None)
    generated = wrapped.generate([wrapped.question_prompt(q) for q in questions], max_new_tokens=3)
    assert all(g.novelty is not None and isinstance(g.in_domain, bool) for g in generated)
    scored = wrapped.score(ids, [list(g.completion_ids) for g in generated])
    np.testing.assert_allclose([s.novelty for s in scored], [g.novelty for g in generated], rtol=1e-4)
    with torch.no_grad():
        direct = novelty.score(wrapped.prompt_states(ids))
    np.testing.assert_allclose([g.novelty for g in generated], direct, rtol=1e-4)
