"""Abstention thresholds: the finite-sample guarantee holds over many seeds; unreachable targets are refused."""

import numpy as np
import pytest

from probes.evaluation.metrics import risk_coverage_curve
from probes.selection.thresholds import (
    METHODS,
    ThresholdResult,
    choose_threshold,
    clopper_pearson_upper,
    realised,
)

# Synthetic calibrated scores: p ~ Beta(4, 1.5) and y ~ Bernoulli(p). The true accuracy of the answered set
# {p >= t} is E[p | p >= t], computed on a large fixed reference sample (no label noise in it).
REFERENCE = np.sort(np.random.default_rng(12345).beta(4, 1.5, size=400_000))
REFERENCE_TAIL_MEANS = np.cumsum(REFERENCE[::-1])[::-1] / np.arange(len(REFERENCE), 0, -1)


def true_accuracy(threshold: float) -> float:
    i = np.searchsorted(REFERENCE, threshold)
    return float(REFERENCE_TAIL_MEANS[min(i, len(REFERENCE) - 1)])


def calibrated_sample(seed: int, n: int):
    rng = np.random.default_rng(seed)
    p = rng.beta(4, 1.5, size=n)
    return p, (rng.uniform(size=n) < p).astype(int)


@pytest.mark.parametrize("method", METHODS)
def test_guarantee_holds_in_at_least_one_minus_delta_of_trials(method):
    target, delta, trials = 0.9, 0.1, 200
    held, coverages = 0, []
    for seed in range(trials):
        result = choose_threshold(*calibrated_sample(seed, 1000), target, delta, method)
        # an unreachable target makes no promise, so it cannot break one
        held += (not result.reachable) or true_accuracy(result.threshold) >= target
        if result.reachable:
            coverages.append(result.coverage)
    # the guarantee is >= 90%; 0.85 leaves ~3 binomial standard deviations for a fixed-seed test
    assert held / trials >= 0.85
    assert len(coverages) >= 50 and np.mean(coverages) > 0.1  # and it is not vacuous


def test_the_check_above_can_fail_choosing_by_empirical_accuracy_breaks_it():
    target, held = 0.9, 0
    for seed in range(200):
        curve = risk_coverage_curve(*calibrated_sample(seed, 1000))
        lowest_ok = curve.thresholds[np.flatnonzero(1 - curve.risk >= target).max()]
        held += true_accuracy(lowest_ok) >= target
    assert held / 200 < 0.75


@pytest.mark.parametrize("method", METHODS)
def test_result_fields_are_consistent(method):
    p, y = calibrated_sample(7, 3000)
    result = choose_threshold(p, y, 0.9, 0.1, method)
    assert result.reachable and result.message == ""
    accuracy, coverage = realised(p, y, result.threshold)
    assert result.empirical_accuracy == pytest.approx(accuracy)
    assert result.coverage == pytest.approx(coverage)
    assert result.risk_upper_bound <= 0.1 + 1e-12
    assert result.empirical_accuracy >= 0.9
    assert (result.n_calibration, result.method, result.delta, result.target_accuracy) == (
        3000,
        method,
        0.1,
        0.9,
    )
    assert ThresholdResult.from_dict(result.to_dict()) == result


@pytest.mark.parametrize("method", METHODS)
def test_unreachable_target_returns_no_threshold(method):
    rng = np.random.default_rng(0)
    p = rng.uniform(size=500)
    y = (rng.uniform(size=500) < 0.5).astype(int)  # scores carry no information; accuracy 50% everywhere
    result = choose_threshold(p, y, target_accuracy=0.95, delta=0.05, method=method)
    assert not result.reachable and result.threshold is None and result.coverage == 0.0
    assert "cannot be guaranteed" in result.message
    assert realised(p, y, result.threshold) == (pytest.approx(np.nan, nan_ok=True), 0.0)


def test_clopper_pearson_bound_by_hand():
    # zero errors in 10: the bound solves (1 - u)^10 = delta
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0


def test_realised_accuracy_and_coverage():
    p = np.array([0.9, 0.8, 0.3, 0.95])
    y = np.array([1, 0, 0, 1])
    assert realised(p, y, 0.8) == (pytest.approx(2 / 3), 0.75)
    accuracy, coverage = realised(p, y, 0.99)
    assert np.isnan(accuracy) and coverage == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"method": "bonferroni"},
            r"method='bonferroni' is not allowed; allowed values: clopper_pearson, ltt",
        ),
        ({"target_accuracy": 1.0}, r"target_accuracy=1.0 must be in \(0, 1\)"),
        ({"delta": 0.0}, r"delta=0.0 must be in \(0, 1\)"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        choose_threshold(np.array([0.5, 0.6]), np.array([0, 1]), **kwargs)
