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


# -- calibration per domain: floor, smooth ECE, per-domain table ------------------------------------------


def test_ece_floor_is_the_ece_of_labels_drawn_from_p():
    # p = 0.5 on 2 rows, one bin: mean(y) is 0, 0.5, 1 with prob 1/4, 1/2, 1/4 -> E|0.5 - mean(y)| = 0.25
    assert m.ece_floor([0.5, 0.5], n_bins=1, draws=4000) == pytest.approx(0.25, abs=0.015)
    assert m.ece_floor([1.0] * 10) == 0.0 and m.ece_floor([0.0] * 10) == 0.0  # labels are certain
    p = np.random.default_rng(0).uniform(size=200)
    assert m.ece_floor(p, seed=3) == m.ece_floor(p, seed=3) != m.ece_floor(p, seed=4)  # seeded
    small, large = m.ece_floor(p[:50]), m.ece_floor(p)
    assert (
        1.5 < small / large < 2.5
    )  # binning noise shrinks like 1 / sqrt(rows): 4x the rows, ~half the floor


def test_smooth_ece_at_fixed_bandwidth_hand_computed():
    # residuals of +0.5 and -0.5 at the same p cancel; far apart under a narrow kernel they do not
    assert m.smooth_ece_at([0.5, 0.5], [1, 0], 0.1) == pytest.approx(0.0, abs=1e-12)
    assert m.smooth_ece_at([0.25, 0.75], [1, 0], 0.01) == pytest.approx(0.75, abs=1e-6)
    assert m.smooth_ece_at([0.25, 0.75], [1, 0], 0.5) < 0.4  # a wide kernel averages them towards 0
    with pytest.raises(ValueError, match="sigma=0"):
        m.smooth_ece_at([0.5], [1], 0)


def test_smooth_ece_edge_cases_and_offsets():
    assert m.smooth_ece([0.7], [1]) == pytest.approx(0.3)  # one row: |y - p|
    assert m.smooth_ece([1.0, 1.0], [1, 1]) == 0.0  # all correct, fully confident
    assert m.smooth_ece([0.0, 0.0], [0, 0]) == 0.0  # all wrong, zero confidence
    assert m.smooth_ece([0.9, 0.9], [0, 0]) == pytest.approx(0.9)  # all wrong, confident
    # a constant residual: p = 0.5 everywhere, 30% correct -> exactly 0.2 at any bandwidth
    assert m.smooth_ece([0.5] * 10, [1] * 3 + [0] * 7) == pytest.approx(0.2)
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.1, 0.8, size=5000)
    y = (rng.uniform(size=5000) < truth).astype(int)
    assert m.smooth_ece(truth, y) < 0.03  # perfectly calibrated: small
    assert m.smooth_ece(truth + 0.1, y) == pytest.approx(0.1, abs=0.015)  # constant over-confidence
    assert m.smooth_ece(truth - 0.1, y) == pytest.approx(0.1, abs=0.015)  # and under-confidence


def test_smooth_ece_matches_the_relplot_package():
    # relplot 1.0.3 (Błasiok & Nakkiran's reference code, grid-discretised) on the same seeded rows:
    # smECE = 0.126836, smECE_sigma(0.05) = 0.146456
    rng = np.random.default_rng(0)
    p = rng.random(50)
    y = (rng.random(50) < p).astype(int)
    assert m.smooth_ece(p, y) == pytest.approx(0.126836, abs=2e-4)
    assert m.smooth_ece_at(p, y, 0.05) == pytest.approx(0.146456, abs=2e-4)


def test_domain_calibration_hand_computed():
    p = [0.8, 0.8, 0.8, 0.8, 0.2, 0.2]
    y = [1, 1, 1, 0, 1, 1]
    cal = m.domain_calibration(p, y, ["a", "a", "a", "a", "b", "b"])
    a, b = cal.per_domain["a"], cal.per_domain["b"]
    assert (a["n"], a["accuracy"], a["mean_p"]) == (4, 0.75, pytest.approx(0.8))
    assert a["ece"] == pytest.approx(0.05) and a["smooth_ece"] == pytest.approx(0.05)
    # floor of a: E|0.8 - Binomial(4, 0.8) / 4| = 0.16384; of b: E|0.2 - Binomial(2, 0.2) / 2| = 0.256
    assert a["ece_floor"] == pytest.approx(0.16384, abs=0.04) and a["within_floor"] is True
    assert (b["n"], b["accuracy"], b["ece"], b["smooth_ece"]) == (
        2,
        1.0,
        pytest.approx(0.8),
        pytest.approx(0.8),
    )
    assert b["ece_floor"] == pytest.approx(0.256, abs=0.06) and b["within_floor"] is False
    s = cal.summary
    assert (s["n_domains"], s["n_within"]) == (2, 1)
    assert s["mean_ece"] == pytest.approx(0.425) and s["mean_smooth_ece"] == pytest.approx(0.425)
    assert s["mean_floor"] == pytest.approx((a["ece_floor"] + b["ece_floor"]) / 2)
    assert s["pooled_ece"] == pytest.approx((4 * 0.05 + 2 * 0.8) / 6)  # two bins over all six rows
    assert cal.to_dict()["summary"] == s
    with pytest.raises(ValueError, match="domains has shape"):
        m.domain_calibration(p, y, ["a"])


def test_domain_calibration_within_floor_uses_the_margin():
    # p = 1 everywhere: the floor is 0 (labels drawn from p are all correct), so ECE = the fraction wrong
    # and within_floor reads ece <= 0.03: 1 wrong in 40 (0.025) is within, 2 in 40 (0.05) is not
    y_one, y_two = [1] * 39 + [0], [1] * 38 + [0, 0]
    cal = m.domain_calibration([1.0] * 80, y_one + y_two, ["one"] * 40 + ["two"] * 40)
    assert cal.per_domain["one"]["ece_floor"] == 0.0 and cal.per_domain["one"]["ece"] == pytest.approx(0.025)
    assert cal.per_domain["one"]["within_floor"] and not cal.per_domain["two"]["within_floor"]
    assert cal.summary["n_within"] == 1
