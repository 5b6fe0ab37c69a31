"""ShrinkageCalibrator: a per-domain MAP offset on the global logit. Few labels -> the global calibrator,
many labels -> the per-domain fit, the prior width estimated across domains, artifact and ProbeScorer round trip."""

import numpy as np
import pytest
from scipy.special import expit
from sklearn.base import clone

from probecal.fingerprint import ModelFingerprint
from probes.artifact import ProbeArtifact
from probes.calibration import (
    DEFAULT_TAU,
    PlattCalibrator,
    ShrinkageCalibrator,
    estimate_tau,
    map_offset,
    rebuild_calibrator,
)
from probes.estimators import LogisticProbe
from probes.scorer import ProbeScorer

SHIFTS = {"easy": 1.5, "hard": -2.0, "same": 0.0}


def shifted_domains(n_per_domain, seed=0, shifts=SHIFTS):
    """Scores whose P(correct) is sigmoid(0.8 s + shift[domain])."""
    rng = np.random.default_rng(seed)
    domains = np.repeat(list(shifts), n_per_domain)
    s = rng.normal(scale=2.0, size=len(domains))
    shift = np.array([shifts[d] for d in domains])
    y = (rng.uniform(size=len(s)) < expit(0.8 * s + shift)).astype(int)
    return s, y, domains


def test_map_offset_limits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=200)
    y = (rng.uniform(size=200) < expit(logits + 1.0)).astype(float)
    assert map_offset(logits, y, 0.0) == 0.0
    mle = map_offset(logits, y, np.inf)
    # the maximum-likelihood offset zeroes the score equation sum(sigmoid(logit + d) - y)
    assert abs(np.sum(expit(logits + mle) - y)) < 1e-5
    shrunk = map_offset(logits, y, 0.3)
    assert 0 < shrunk < mle  # pulled toward the prior's centre
    assert map_offset(logits, np.ones(200), np.inf) == pytest.approx(10.0, abs=1e-3)  # one class: the bound


def test_few_labels_stay_at_the_global_calibrator():
    s, y, d = shifted_domains(2000)
    global_cal = PlattCalibrator().fit(s, y)
    rng = np.random.default_rng(1)
    few = rng.choice(np.flatnonzero(d == "easy"), 3, replace=False)
    s_few = np.concatenate([s[d != "easy"], s[few]])
    y_few, d_few = np.concatenate([y[d != "easy"], y[few]]), np.concatenate([d[d != "easy"], d[few]])
    cal = ShrinkageCalibrator(tau=0.3).fit(s_few, y_few, categories=d_few, prior=global_cal)
    grid = np.linspace(-4, 4, 50)
    p_easy = cal.predict(grid, categories=np.full(50, "easy"))
    np.testing.assert_allclose(p_easy, global_cal.predict(grid), atol=0.08)
    assert abs(cal.offsets_["easy"]) < 0.35
    # the domains with many labels moved to their own shift
    assert cal.offsets_["hard"] < -1.0
    # an unknown domain and categories=None are the global calibrator exactly
    np.testing.assert_array_equal(
        cal.predict(grid, categories=np.full(50, "unseen")), global_cal.predict(grid)
    )
    np.testing.assert_array_equal(cal.predict(grid), global_cal.predict(grid))


def test_many_labels_equal_a_per_domain_fit():
    s, y, d = shifted_domains(5000)
    # a global calibrator with the domains' common slope (a Platt fit on the mixed domains is flatter, and one
    # offset per domain cannot change a slope)
    prior = PlattCalibrator().fit(s[d == "same"], y[d == "same"])
    cal = ShrinkageCalibrator().fit(s, y, categories=d, prior=prior)
    grid = np.linspace(-4, 4, 50)
    for domain, shift in SHIFTS.items():
        rows = d == domain
        per_domain = PlattCalibrator().fit(s[rows], y[rows])
        p = cal.predict(grid, categories=np.full(50, domain))
        np.testing.assert_allclose(p, per_domain.predict(grid), atol=0.03)
        np.testing.assert_allclose(p, expit(0.8 * grid + shift), atol=0.03)
        # the offset is (to the prior's pull) the domain's maximum-likelihood offset on the global logit
        logits = prior.a_ * s[rows] + prior.b_
        assert cal.offsets_[domain] == pytest.approx(map_offset(logits, y[rows], np.inf), abs=0.02)
        assert cal.offsets_[domain] == pytest.approx(shift, abs=0.15)


def test_tau_is_estimated_across_domains():
    shifts = {f"d{k}": shift for k, shift in enumerate(np.random.default_rng(3).normal(scale=1.2, size=12))}
    s, y, d = shifted_domains(400, seed=4, shifts=shifts)
    logits = 0.8 * s  # the true global logit: offsets are exactly the shifts
    tau = estimate_tau(logits, y, d)
    assert tau == pytest.approx(np.std(list(shifts.values())), rel=0.35)
    s0, y0, d0 = shifted_domains(400, seed=4, shifts=dict.fromkeys(shifts, 0.0))
    assert estimate_tau(0.8 * s0, y0, d0) < 0.2  # no spread between domains: a narrow prior
    assert estimate_tau(logits[d == "d0"], y[d == "d0"], d[d == "d0"]) is None  # one domain: cannot estimate
    cal = ShrinkageCalibrator().fit(s[d == "d0"], y[d == "d0"], categories=d[d == "d0"])
    assert cal.tau_ == DEFAULT_TAU
    assert ShrinkageCalibrator().fit(s, y, categories=d).tau_ > 0.5


def test_bad_options_are_named():
    s, y, d = shifted_domains(50)
    with pytest.raises(ValueError, match="base='nope' is not allowed"):
        ShrinkageCalibrator(base="nope").fit(s, y, categories=d)
    with pytest.raises(ValueError, match="tau=-1"):
        ShrinkageCalibrator(tau=-1).fit(s, y, categories=d)
    with pytest.raises(ValueError, match="base='platt' needs a PlattCalibrator"):
        ShrinkageCalibrator().fit(s, y, categories=d, prior=ShrinkageCalibrator().fit(s, y))
    assert clone(ShrinkageCalibrator(tau=0.5)).get_params() == {"base": "platt", "tau": 0.5}


def test_artifact_round_trip_and_probe_scorer(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(900, 16))
    d = np.array(["a", "b", "c"])[np.arange(900) % 3]
    y = (rng.uniform(size=900) < expit(X[:, 0] + np.where(d == "b", -1.5, 0.5))).astype(int)
    probe = LogisticProbe(C=1.0).fit(X[:300], y[:300])
    cal = ShrinkageCalibrator().fit(probe.decision_function(X[300:]), y[300:], categories=d[300:])
    fingerprint = ModelFingerprint("tiny", "f" * 64, "LlamaForCausalLM", 16, 3)
    ProbeArtifact.create(probe, cal, 2, "answer_last", fingerprint).save(tmp_path)
    loaded = ProbeArtifact.load(tmp_path)
    assert loaded.calibrator.offsets_ == cal.offsets_ and loaded.calibrator.counts_ == cal.counts_
    assert loaded.calibrator.tau_ == cal.tau_
    cats = np.array(["a", "b", "c", "unknown"])[np.arange(60) % 4]
    for categories in (None, cats):
        expected = cal.predict(probe.decision_function(X[:60]), categories=categories)
        np.testing.assert_array_equal(loaded.predict(X[:60], categories=categories)[0], expected)
        np.testing.assert_allclose(ProbeScorer(tmp_path).p_correct(X[:60], categories), expected, atol=1e-12)
    rebuilt = rebuild_calibrator("shrinkage", cal.get_params(), cal.to_tensors())
    np.testing.assert_array_equal(rebuilt.predict(X[:60, 0], cats), cal.predict(X[:60, 0], cats))
    tensors = cal.to_tensors()
    del tensors["b/offset"]
    with pytest.raises(ValueError, match="lacks its offset"):
        rebuild_calibrator("shrinkage", cal.get_params(), tensors)
