"""Probe estimators: scikit-learn contract, agreement with sklearn, options, tensors round trip."""

import numpy as np
import pytest
from hydra.utils import instantiate
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from probes.estimators import (
    PROBES,
    LogisticProbe,
    MassMeanProbe,
    MLPProbe,
    logistic_fold_fit,
    probe_kind,
    rebuild_probe,
    standardize_stats,
)
from tests.conf_groups import group_node
from tests.paths import CONF


def linear_data(n=400, d=12, seed=0, positive_rate=0.5):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)
    w = rng.normal(size=d)
    logit = (X - X.mean(0)) / X.std(0) @ w
    threshold = np.quantile(logit, 1 - positive_rate)
    y = (logit + rng.normal(scale=1.0, size=n) > threshold).astype(int)
    return X, y


@parametrize_with_checks(
    [LogisticProbe(), MassMeanProbe(), MassMeanProbe(covariance=True), MLPProbe(max_iter=30)]
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("C", [0.01, 1.0])
@pytest.mark.parametrize("class_weight", ["balanced", None])
def test_logistic_matches_sklearn_on_standardized_features(C, class_weight):
    X, y = linear_data(positive_rate=0.3)
    probe = LogisticProbe(C=C, class_weight=class_weight, tol=1e-9, max_iter=20000).fit(X, y)
    Z = (X - X.mean(0)) / X.std(0)
    reference = LogisticRegression(C=C, class_weight=class_weight, tol=1e-10, max_iter=10000).fit(Z, y)
    np.testing.assert_allclose(probe.coef_, reference.coef_[0], atol=1e-5)
    np.testing.assert_allclose(probe.intercept_, reference.intercept_[0], atol=1e-5)
    np.testing.assert_allclose(probe.predict_proba(X), reference.predict_proba(Z), atol=1e-6)


def test_fold_fit_equals_one_fit_per_fold():
    X, y = linear_data(n=300)
    Z = (X - X.mean(0)) / X.std(0)
    rng = np.random.default_rng(1)
    fold = rng.integers(0, 3, size=len(y))
    masks = np.stack([fold != f for f in range(3)])
    coef, intercept, _ = logistic_fold_fit(Z, y, masks, C=0.1, tol=1e-10, max_iter=20000)
    for f in range(3):
        ref = LogisticRegression(C=0.1, class_weight="balanced", tol=1e-10, max_iter=10000).fit(
            Z[masks[f]], y[masks[f]]
        )
        np.testing.assert_allclose(coef[f], ref.coef_[0], atol=1e-5)
        np.testing.assert_allclose(intercept[f], ref.intercept_[0], atol=1e-5)


def test_logistic_chooses_C_by_cross_validation():
    X, y = linear_data(n=300, d=40)
    probe = LogisticProbe(Cs=(1e-3, 1e-1, 10.0)).fit(X, y)
    assert probe.C_ in (1e-3, 1e-1, 10.0)
    assert roc_auc_score(y, probe.decision_function(X)) > 0.8
    # fixed C bypasses the search
    assert LogisticProbe(C=0.5).fit(X, y).C_ == 0.5


def test_higher_score_means_correct_and_probabilities_are_consistent():
    X, y = linear_data()
    for probe in (LogisticProbe(C=1.0), MassMeanProbe(), MLPProbe(max_iter=100)):
        probe.fit(X, y)
        proba = probe.predict_proba(X)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        score = probe.decision_function(X)
        assert np.all(np.diff(proba[np.argsort(score), 1]) >= -1e-12)  # column 1 rises with the score
        assert roc_auc_score(y, score) > 0.75, type(probe).__name__


def test_mass_mean_direction_is_difference_of_means():
    X, y = linear_data()
    probe = MassMeanProbe().fit(X, y)
    expected = X[y == 1].mean(0) - X[y == 0].mean(0)
    np.testing.assert_allclose(probe.direction_, expected)
    assert probe.scale_ > 0  # the projection points towards "correct"


def test_mass_mean_with_covariance_uses_inverse_pooled_covariance():
    X, y = linear_data(n=600, d=6)
    probe = MassMeanProbe(covariance=True, shrinkage=0.0).fit(X, y)
    mu1, mu0 = X[y == 1].mean(0), X[y == 0].mean(0)
    centered = np.where(y[:, None] == 1, X - mu1, X - mu0)
    expected = np.linalg.solve(centered.T @ centered / len(y), mu1 - mu0)
    np.testing.assert_allclose(probe.direction_, expected, rtol=1e-6)


def test_mlp_learns_a_nonlinear_boundary_the_linear_probe_cannot():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(600, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR
    mlp = MLPProbe(hidden_size=16, max_iter=800, learning_rate_init=0.01).fit(X, y)
    assert roc_auc_score(y, mlp.decision_function(X)) > 0.95
    assert roc_auc_score(y, LogisticProbe(C=1.0).fit(X, y).decision_function(X)) < 0.65


def test_balanced_class_weight_counters_imbalance():
    X, y = linear_data(n=600, positive_rate=0.9)
    balanced = LogisticProbe(C=0.1).fit(X, y)
    plain = LogisticProbe(C=0.1, class_weight=None).fit(X, y)
    # balanced weights shift the decision boundary towards the majority class
    assert (balanced.predict(X) == 0).mean() > (plain.predict(X) == 0).mean() + 0.05


@pytest.mark.parametrize("cls", list(PROBES.values()))
def test_one_class_is_a_clear_error(cls):
    X, _ = linear_data(n=50)
    with pytest.raises(ValueError, match="both classes"):
        cls().fit(X, np.ones(50, dtype=int))


@pytest.mark.parametrize(
    "probe, message",
    [
        (
            LogisticProbe(class_weight="weighted"),
            r"class_weight='weighted'.*allowed values: 'balanced', None",
        ),
        (LogisticProbe(C=-1.0), r"C=-1.0 must be > 0"),
        (LogisticProbe(Cs=()), r"Cs=\(\) must be a non-empty"),
        (MassMeanProbe(shrinkage=2.0), r"shrinkage=2.0.*'auto' or a number in \[0, 1\]"),
        (MLPProbe(hidden_size=0), r"hidden_size=0 must be >= 1"),
    ],
)
def test_bad_options_name_the_option_and_allowed_values(probe, message):
    X, y = linear_data(n=60)
    with pytest.raises(ValueError, match=message):
        probe.fit(X, y)


@pytest.mark.parametrize("kind", list(PROBES))
def test_tensors_round_trip_gives_identical_predictions(kind):
    X, y = linear_data(n=200)
    params = {"mlp": {"max_iter": 50}, "logistic": {"C": 0.3}}.get(kind, {})
    probe = PROBES[kind](**params).fit(X, y)
    assert probe_kind(probe) == kind
    tensors = probe.to_tensors()
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    rebuilt = rebuild_probe(kind, probe.get_params(), {k: v.copy() for k, v in tensors.items()})
    np.testing.assert_array_equal(rebuilt.predict_proba(X), probe.predict_proba(X))
    np.testing.assert_array_equal(rebuilt.decision_function(X), probe.decision_function(X))
    assert rebuilt.n_features_in_ == X.shape[1]
    with pytest.raises(ValueError, match="tensors lack"):
        rebuild_probe(kind, probe.get_params(), {})
    with pytest.raises(ValueError, match="unknown probe kind 'svm'"):
        rebuild_probe("svm", {}, tensors)


def test_standardize_keeps_constant_columns_finite():
    X = np.column_stack([np.ones(10), np.arange(10.0)])
    mean, scale = standardize_stats(X)
    assert scale[0] == 1.0 and np.all(np.isfinite((X - mean) / scale))


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "probe").glob("*.yaml")))
def test_every_probe_config_builds_a_probe(option):
    probe = instantiate(group_node("probe", option), _convert_="all")
    assert probe_kind(probe) == option
    X, y = linear_data(n=80)
    assert probe.set_params(**({"max_iter": 20} if option == "mlp" else {})).fit(X, y).predict_proba(
        X
    ).shape == (80, 2)
