"""probes.inference: ProbeScorer (numpy + safetensors only) scores exactly as the rebuilt scikit-learn objects,
for every registered probe kind x calibrator kind; a kind without numpy inference is refused at load, by name."""

import numpy as np
import pytest

from probecal.fingerprint import ModelFingerprint
from probes.artifact import ArtifactError, ProbeArtifact
from probes.calibration import CALIBRATOR_KINDS, PerCategoryCalibrator
from probes.estimators import PROBES, LogisticProbe
from probes.inference import probe_input, sigmoid
from probes.scorer import ProbeScorer

HIDDEN = 32
FINGERPRINT = ModelFingerprint("tiny-llama", "f" * 64, "LlamaForCausalLM", HIDDEN, 3)
FAST_PARAMS = {"logistic": {"C": 1.0}, "hybrid": {"C": 1.0}, "mlp": {"hidden_size": 8, "max_iter": 30}}
CATEGORIES = np.array(["capitals", "elements", "rivers"])


def data(width, n=240, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, width))
    y = (X[:, 0] + 0.5 * X[:, -1] + rng.normal(size=n) > 0).astype(int)
    return X, y, CATEGORIES[np.arange(n) % 2]  # "rivers" never seen in fitting: the global fallback


def save_artifact(directory, kind, calibrator):
    probe = PROBES[kind](**FAST_PARAMS.get(kind, {}))
    width = HIDDEN + len(probe.get_params().get("logit_features") or ())  # a hybrid reads logit signals too
    X, y, cats = data(width)
    probe.fit(X[:160], y[:160])
    calibrator_obj = None
    if calibrator == "per_category":
        calibrator_obj = PerCategoryCalibrator(min_count=20)
    elif calibrator is not None:
        calibrator_obj = CALIBRATOR_KINDS[calibrator]()
    if calibrator_obj is not None:
        calibrator_obj.fit(probe.decision_function(X[160:]), y[160:], categories=cats[160:])
    ProbeArtifact.create(probe, calibrator_obj, 2, "answer_last", FINGERPRINT).save(directory)
    return width


@pytest.mark.parametrize("calibrator", [*CALIBRATOR_KINDS, None])
@pytest.mark.parametrize("kind", list(PROBES))
def test_scorer_equals_the_rebuilt_estimators_for_every_kind(tmp_path, kind, calibrator):
    width = save_artifact(tmp_path, kind, calibrator)
    scorer, artifact = (
        ProbeScorer(tmp_path),
        ProbeArtifact.load(tmp_path),
    )  # a kind without numpy inference fails here
    X, _, _ = data(width, n=60, seed=1)
    X[:5] *= 40.0  # far-out scores: saturated sigmoids, isotonic clipping
    cats = CATEGORIES[np.arange(60) % 3]
    # a hybrid reads the hidden state + raw logit signals (its last columns here), turned into its features
    hidden, signals = X[:, :HIDDEN], (X[:, HIDDEN:] if width > HIDDEN else None)
    full = probe_input(hidden, scorer.logit_features, signals)
    for categories in (None, cats):
        expected = artifact.predict(full, categories=categories)[0]
        got = scorer.p_correct(hidden, categories=categories, logit_signals=signals)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    one = scorer.p_correct(hidden[0], logit_signals=None if signals is None else signals[0])
    assert one == pytest.approx(artifact.predict(full[:1])[0][0], abs=1e-12)
    assert scorer.digest == artifact.digest and scorer.n_features == width


def test_a_kind_without_numpy_inference_is_refused_at_load_by_name(tmp_path, monkeypatch):
    class CustomProbe(LogisticProbe):
        kind = "custom_kind"

    monkeypatch.setitem(PROBES, "custom_kind", CustomProbe)
    X, y, _ = data(HIDDEN)
    ProbeArtifact.create(CustomProbe(C=1.0).fit(X, y), None, 2, "answer_last", FINGERPRINT).save(tmp_path)
    ProbeArtifact.load(tmp_path)  # the scikit-learn path still loads it
    with pytest.raises(ArtifactError, match="probe kind 'custom_kind' has no numpy inference function"):
        ProbeScorer(tmp_path)


def test_scorer_refuses_wrong_width_and_non_finite_vectors(tmp_path):
    save_artifact(tmp_path, "logistic", "platt")
    scorer = ProbeScorer(tmp_path)
    with pytest.raises(ValueError, match=f"expected vectors of size {HIDDEN}"):
        scorer.p_correct(np.zeros(HIDDEN + 1))
    with pytest.raises(ValueError, match="nan or inf"):
        scorer.p_correct(np.full(HIDDEN, np.nan))


def test_sigmoid_is_stable_and_exact_at_the_ends():
    z = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = sigmoid(z)
    assert p[0] == 0.0 and p[2] == 0.5 and p[-1] == 1.0
    from scipy.special import expit

    np.testing.assert_allclose(p, expit(z), rtol=1e-14, atol=0)
