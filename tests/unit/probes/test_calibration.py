"""Calibrators: recover known parameters, agree with scikit-learn, per-category fallback, round trip."""

import numpy as np
import pytest
from hydra.utils import instantiate
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression

from probes.calibration import (
    CALIBRATORS,
    IsotonicCalibrator,
    PerCategoryCalibrator,
    PlattCalibrator,
    TemperatureCalibrator,
    calibrator_kind,
    rebuild_calibrator,
)
from probes.evaluation.metrics import ece, within_category_ece
from tests.conf_groups import group_node
from tests.paths import CONF


def sigmoid_data(a, b, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(scale=2.0, size=n)
    y = (rng.uniform(size=n) < expit(a * s + b)).astype(int)
    return s, y


def test_platt_recovers_slope_and_offset():
    s, y = sigmoid_data(a=0.7, b=-0.4)
    cal = PlattCalibrator().fit(s, y)
    assert cal.a_ == pytest.approx(0.7, abs=0.05)
    assert cal.b_ == pytest.approx(-0.4, abs=0.05)
    p = cal.predict(s)
    assert np.all((p > 0) & (p < 1)) and np.all(np.diff(p[np.argsort(s)]) >= 0)


def test_platt_works_on_any_score_scale_and_one_class():
    s, y = sigmoid_data(a=1.0, b=0.0, n=3000)
    big = PlattCalibrator().fit(1000 * s + 5e4, y)  # ill-scaled scores still fit (standardized internally)
    np.testing.assert_allclose(big.predict(1000 * s + 5e4), PlattCalibrator().fit(s, y).predict(s), atol=1e-4)
    only_correct = PlattCalibrator().fit(s[:50], np.ones(50))
    p = only_correct.predict(s[:50])
    assert np.all(np.isfinite(p)) and np.all(p > 0.5)  # smoothed targets keep it finite


def test_temperature_recovers_the_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=4.0, size=20000)
    y = (rng.uniform(size=logits.size) < expit(logits / 2.5)).astype(int)
    cal = TemperatureCalibrator().fit(logits, y)
    assert cal.temperature_ == pytest.approx(2.5, rel=0.05)
    np.testing.assert_allclose(cal.predict(np.array([0.0])), [0.5])  # no offset: the 0.5 point is kept


def test_isotonic_matches_sklearn_including_out_of_range_scores():
    s, y = sigmoid_data(a=1.0, b=0.3, n=500, seed=3)
    ours = IsotonicCalibrator().fit(s, y)
    ref = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s, y)
    probe_points = np.concatenate([s, [-100.0, 100.0], np.linspace(-5, 5, 37)])
    np.testing.assert_allclose(ours.predict(probe_points), ref.predict(probe_points), atol=1e-12)


@pytest.mark.parametrize("kind", list(CALIBRATORS))
def test_calibrators_lower_ece_of_a_miscalibrated_score(kind):
    s, y = sigmoid_data(a=0.5, b=0.5, n=6000, seed=4)  # true p = sigmoid(0.5 s + 0.5)
    naive = expit(s)  # overconfident and biased
    fit, test = slice(0, 3000), slice(3000, None)
    cal = CALIBRATORS[kind]().fit(s[fit], y[fit])
    assert ece(cal.predict(s[test]), y[test]) < ece(naive[test], y[test]) - 0.03


@pytest.mark.parametrize("kind", list(CALIBRATORS))
def test_round_trip_and_kind(kind):
    s, y = sigmoid_data(a=1.0, b=0.0, n=400)
    cal = CALIBRATORS[kind]().fit(s, y)
    assert calibrator_kind(cal) == kind
    rebuilt = rebuild_calibrator(kind, cal.get_params(), cal.to_tensors())
    np.testing.assert_array_equal(rebuilt.predict(s), cal.predict(s))


def two_category_data(n_each=1500, seed=5):
    """Category a: true p = sigmoid(2 s); category b: true p = sigmoid(0.5 s - 1). One global map fits neither."""
    rng = np.random.default_rng(seed)
    s = rng.normal(scale=2.0, size=2 * n_each)
    cats = np.array(["a"] * n_each + ["b"] * n_each)
    true_p = np.where(cats == "a", expit(2 * s), expit(0.5 * s - 1))
    y = (rng.uniform(size=s.size) < true_p).astype(int)
    return s, y, cats


def test_per_category_calibration_lowers_per_category_ece():
    s, y, cats = two_category_data()
    fit = np.arange(len(s)) % 2 == 0
    test = ~fit
    global_p = PlattCalibrator().fit(s[fit], y[fit]).predict(s[test])
    per_cat = PerCategoryCalibrator(base="platt", min_count=30).fit(s[fit], y[fit], cats[fit])
    assert set(per_cat.per_category_) == {"a", "b"}
    per_cat_p = per_cat.predict(s[test], cats[test])
    assert (
        within_category_ece(per_cat_p, y[test], cats[test])
        < within_category_ece(global_p, y[test], cats[test]) - 0.03
    )


def test_per_category_falls_back_to_global():
    s, y, cats = two_category_data(n_each=200)
    cats = cats.copy()
    cats[:10] = "rare"  # 10 < min_count
    cal = PerCategoryCalibrator(base="isotonic", min_count=30).fit(s, y, cats)
    assert "rare" not in cal.per_category_
    global_p = cal.global_.predict(s)
    np.testing.assert_array_equal(cal.predict(s[:10], cats[:10]), global_p[:10])
    np.testing.assert_array_equal(cal.predict(s[:5], np.array(["never seen"] * 5)), global_p[:5])
    np.testing.assert_array_equal(cal.predict(s), global_p)  # category unknown at run time
    one_class = PerCategoryCalibrator(min_count=5).fit(
        s[:40], np.r_[np.ones(20), y[20:40]], ["x"] * 20 + ["y"] * 20
    )
    assert "x" not in one_class.per_category_  # a category with one class only gets no calibrator


def test_per_category_round_trip():
    s, y, cats = two_category_data(n_each=300)
    cats = np.where(np.arange(len(s)) % 3 == 0, "with/slash", cats)
    cal = PerCategoryCalibrator(base="temperature", min_count=30).fit(s, y, cats)
    rebuilt = rebuild_calibrator("per_category", cal.get_params(), cal.to_tensors())
    assert set(rebuilt.per_category_) == set(cal.per_category_) == {"a", "b", "with/slash"}
    np.testing.assert_array_equal(rebuilt.predict(s, cats), cal.predict(s, cats))


@pytest.mark.parametrize(
    "scores, y, message",
    [
        (np.zeros((3, 2)), np.zeros(3), r"scores must be 1-D"),
        (np.array([0.0, np.nan]), np.array([0, 1]), r"nan or inf"),
        (np.zeros(3), np.zeros(2), r"y has shape \(2,\)"),
        (np.zeros(3), np.array([0, 1, 2]), r"0 \(wrong\) / 1 \(correct\)"),
        (np.zeros(0), np.zeros(0), r"zero examples"),
    ],
)
def test_bad_inputs_are_clear_errors(scores, y, message):
    for cls in CALIBRATORS.values():
        with pytest.raises(ValueError, match=message):
            cls().fit(scores, y)


def test_bad_options_are_clear_errors():
    with pytest.raises(
        ValueError, match=r"base='beta' is not allowed; allowed values: platt, temperature, isotonic"
    ):
        PerCategoryCalibrator(base="beta").fit(np.zeros(4), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="min_temperature"):
        TemperatureCalibrator(min_temperature=5.0, max_temperature=1.0).fit(
            np.zeros(4), np.array([0, 1, 0, 1])
        )
    with pytest.raises(ValueError, match="unknown calibrator kind 'beta'"):
        rebuild_calibrator("beta", {}, {})


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "calibration").glob("*.yaml")))
def test_every_calibration_config_builds_a_calibrator(option):
    cal = instantiate(group_node("calibration", option), _convert_="all")
    # per_domain (and its deprecated alias per_category) keep the kind saved artifacts carry: per_category
    assert calibrator_kind(cal) == ("per_category" if option == "per_domain" else option)
    s, y = sigmoid_data(a=1.0, b=0.0, n=200)
    assert cal.fit(s, y, categories=None).predict(s, categories=None).shape == (200,)
