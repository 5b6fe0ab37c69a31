"""Metrics against scikit-learn and hand-computed values, edge cases, and the evaluation table."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from probes.calibration import PlattCalibrator
from probes.evaluation import metrics as m
from probes.evaluation.tables import calibrate_baselines, evaluate
from probes.inference import oriented, raw_probability


@pytest.fixture
def random_pair():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=400)
    y = (rng.uniform(size=400) < p).astype(int)
    return p, y


def test_ranking_and_scoring_metrics_match_sklearn(random_pair):
    p, y = random_pair
    assert m.auroc(p, y) == pytest.approx(roc_auc_score(y, p))
    assert m.auprc(p, y) == pytest.approx(average_precision_score(y, p))
    assert m.brier(p, y) == pytest.approx(brier_score_loss(y, p))
    assert m.nll(p, y) == pytest.approx(log_loss(y, p))


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_makes_ranking_metrics_nan_but_not_calibration_metrics(label):
    p = np.array([0.2, 0.5, 0.9])
    y = np.full(3, label)
    assert np.isnan(m.auroc(p, y)) and np.isnan(m.auprc(p, y))
    assert m.brier(p, y) == pytest.approx(np.mean((p - label) ** 2))
    assert m.ece(p, y, n_bins=1) == pytest.approx(abs(p.mean() - label))
    assert m.aurc(p, y) == pytest.approx(1.0 - label)
    assert m.eaurc(p, y) == pytest.approx(0.0)


def test_nll_of_a_confident_miss_is_finite():
    assert np.isfinite(m.nll(np.array([1.0, 0.0]), np.array([0, 1])))


def test_ece_and_mce_by_hand():
    p = np.array([0.05, 0.15, 0.15, 0.85, 0.95, 1.0])
    y = np.array([0, 0, 1, 1, 1, 0])
    # uniform, 2 bins: [0, .5) holds .05 .15 .15 (conf .1167, acc .3333); [.5, 1] holds .85 .95 1 (conf .9333, acc .6667)  # noqa: E501
    expected = 0.5 * abs(0.35 / 3 - 1 / 3) + 0.5 * abs(2.8 / 3 - 2 / 3)
    assert m.ece(p, y, n_bins=2) == pytest.approx(expected)
    assert m.mce(p, y, n_bins=2) == pytest.approx(max(abs(0.35 / 3 - 1 / 3), abs(2.8 / 3 - 2 / 3)))
    # quantile, 3 bins: edges at the 1/3 and 2/3 quantiles (.15 and .8833); the tied .15s share bin 1:
    # {.05} (acc 0), {.15, .15, .85} (conf .3833, acc .6667), {.95, 1.0} (conf .975, acc .5)
    expected_q = (1 * 0.05 + 3 * abs(1.15 / 3 - 2 / 3) + 2 * abs(0.975 - 0.5)) / 6
    assert m.ece(p, y, n_bins=3, strategy="quantile") == pytest.approx(expected_q)


def test_perfectly_calibrated_constant_has_zero_ece():
    y = np.array([1, 1, 1, 0])
    assert m.ece(np.full(4, 0.75), y) == pytest.approx(0.0)
    assert m.ece(np.full(4, 0.75), y, strategy="quantile") == pytest.approx(0.0)


def test_reliability_curve_bins_cover_zero_and_one():
    p = np.array([0.0, 0.0, 0.5, 1.0, 1.0])
    curve = m.reliability_curve(p, np.array([0, 1, 1, 1, 0]), n_bins=4)
    np.testing.assert_array_equal(curve.counts, [2, 0, 1, 2])
    np.testing.assert_allclose(curve.edges, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve.accuracy[[0, 2, 3]], [0.5, 1.0, 0.5])
    assert np.isnan(curve.confidence[1])  # empty bin
    tied = m.reliability_curve(np.full(6, 0.3), np.array([0, 1, 0, 1, 0, 1]), n_bins=3, strategy="quantile")
    assert tied.counts.max() == 6  # tied values never straddle two bins


def test_calibration_metrics_reject_bad_options():
    with pytest.raises(ValueError, match=r"strategy='kmeans'.*uniform, quantile"):
        m.ece(np.array([0.5]), np.array([1]), strategy="kmeans")
    with pytest.raises(ValueError, match="same length"):
        m.brier(np.array([0.5, 0.2]), np.array([1]))
    with pytest.raises(ValueError, match=r"0 \(wrong\) / 1 \(correct\)"):
        m.auroc(np.array([0.5, 0.2]), np.array([1, 2]))


TIED_P = np.array([0.9, 0.9, 0.5, 0.5, 0.1])
TIED_Y = np.array([1, 0, 1, 1, 0])


def test_risk_coverage_curve_treats_ties_as_one_step():
    curve = m.risk_coverage_curve(TIED_P, TIED_Y)
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.5, 0.1])
    np.testing.assert_allclose(curve.coverage, [0.4, 0.8, 1.0])
    np.testing.assert_allclose(curve.risk, [0.5, 0.25, 0.4])


def test_aurc_by_hand_with_ties_and_order_invariance():
    # expected errors among the top k (ties averaged): .5, 1, 1, 1, 2 -> risks .5, .5, 1/3, .25, .4
    assert m.aurc(TIED_P, TIED_Y) == pytest.approx((0.5 + 0.5 + 1 / 3 + 0.25 + 0.4) / 5)
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(5)
        assert m.aurc(TIED_P[order], TIED_Y[order]) == pytest.approx(m.aurc(TIED_P, TIED_Y))


def test_aurc_without_ties_is_the_plain_definition(random_pair):
    p, y = random_pair
    order = np.argsort(-p)
    errors = np.cumsum(1 - y[order])
    assert m.aurc(p, y) == pytest.approx(np.mean(errors / np.arange(1, len(p) + 1)))
    assert m.eaurc(p, y) == pytest.approx(m.aurc(p, y) - m.optimal_aurc(y))
    assert m.eaurc(y + 0.0, y) == pytest.approx(0.0)  # a perfect ranking has no excess
    assert m.eaurc(p, y) > 0


def test_selective_accuracy_and_coverage_at_accuracy_by_hand():
    assert m.selective_accuracy(TIED_P, TIED_Y, 0.2) == pytest.approx(0.5)  # one of the tied .9: expected .5
    assert m.selective_accuracy(TIED_P, TIED_Y, 0.8) == pytest.approx(0.75)
    assert m.selective_accuracy(TIED_P, TIED_Y, 1.0) == pytest.approx(0.6)
    assert m.coverage_at_accuracy(TIED_P, TIED_Y, 0.75) == pytest.approx(0.8)
    assert m.coverage_at_accuracy(TIED_P, TIED_Y, 0.9) == 0.0
    with pytest.raises(ValueError, match="coverage"):
        m.selective_accuracy(TIED_P, TIED_Y, 0.0)


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate(random_pair):
    p, y = random_pair
    low, high = m.bootstrap_ci(m.brier, p, y, n=300, seed=1)
    assert low < m.brier(p, y) < high
    assert (low, high) == m.bootstrap_ci(m.brier, p, y, n=300, seed=1)
    assert np.isnan(m.bootstrap_ci(m.auroc, p, np.ones_like(y), n=20)[0])


def test_within_category_auroc_removes_the_category_effect():
    rng = np.random.default_rng(2)
    cats = np.repeat(["easy", "hard", "single"], 300)
    base_rate = np.select([cats == "easy", cats == "hard"], [0.9, 0.2], 1.0)
    y = (rng.uniform(size=cats.size) < base_rate).astype(int)
    y[cats == "single"] = 1
    p = base_rate + rng.normal(scale=0.01, size=cats.size)  # knows the category, nothing else
    within = m.within_category_auroc(p, y, cats)
    assert m.auroc(p, y) > 0.8
    assert within.mean == pytest.approx(0.5, abs=0.08)
    assert (within.n_used, within.n_categories) == (2, 3)
    assert np.isnan(within.per_category["single"])


def test_metric_row_is_flat_and_consistent(random_pair):
    p, y = random_pair
    cats = np.where(np.arange(len(p)) % 2 == 0, "a", "b")
    row = m.metric_row(p, y, cats, n_bootstrap=50)
    assert row["auroc"] == pytest.approx(m.auroc(p, y))
    assert row["ece"] == pytest.approx(m.ece(p, y))
    assert row["ece_quantile"] == pytest.approx(m.ece(p, y, strategy="quantile"))
    assert row["ece_low"] <= row["ece_high"]
    assert row["sel_acc@0.5"] == pytest.approx(m.selective_accuracy(p, y, 0.5))
    assert row["within_cat_n"] == 2
    assert all(np.isscalar(v) for v in row.values())


def test_evaluation_table_rows_and_formats(random_pair):
    p, y = random_pair
    cats = np.where(np.arange(len(p)) % 2 == 0, "a", "b")
    table = evaluate({"probe": p, "constant": np.full(len(p), y.mean())}, y, cats, n_bootstrap=20)
    assert list(table.rows) == ["probe", "constant"]
    assert table.rows["constant"]["auroc"] == pytest.approx(0.5)
    assert set(table.per_category["probe"]) == {"a", "b"}
    markdown = table.to_markdown()
    assert markdown.splitlines()[0].startswith("| method | auroc | within_cat_auroc")
    assert "| constant | 0.500 |" in markdown
    assert table.to_csv().splitlines()[0].startswith("method,n,accuracy,auroc")
    assert table.to_dict()["rows"]["probe"]["n"] == len(p)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        evaluate({"logits": p * 10}, y)


def test_baselines_are_oriented_and_calibrated_like_the_probe():
    rng = np.random.default_rng(3)
    n = 2000
    y = (rng.uniform(size=n) < 0.6).astype(int)
    entropy = rng.gamma(2.0, 0.5, size=n) + (1 - y) * 0.8  # lower entropy when correct
    logprob = -entropy / 2 - np.abs(rng.normal(scale=0.2, size=n))  # log-probabilities are <= 0
    cal, test = slice(0, 1000), slice(1000, None)
    assert m.auroc(oriented("mean_entropy", entropy[test]), y[test]) > 0.7
    methods = calibrate_baselines(
        {"mean_entropy": entropy[cal], "mean_logprob": logprob[cal]},
        y[cal],
        {"mean_entropy": entropy[test], "mean_logprob": logprob[test]},
        PlattCalibrator,
        "platt",
    )
    assert set(methods) == {"mean_entropy (platt)", "mean_logprob (raw)", "mean_logprob (platt)"}
    np.testing.assert_allclose(methods["mean_logprob (raw)"], np.exp(logprob[test]))
    assert m.auroc(methods["mean_entropy (platt)"], y[test]) > 0.7  # flipped: higher p = more confident
    table = evaluate(methods, y[test], n_bootstrap=10)
    assert table.rows["mean_logprob (platt)"]["ece"] < table.rows["mean_logprob (raw)"]["ece"]
    assert raw_probability("mean_entropy", entropy) is None
