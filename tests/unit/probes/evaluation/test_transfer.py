"""Leave-one-domain-out: split logic, the transfer table (probes/evaluation/transfer.py) and candidate
scoring (probes/selection/candidates.py)."""

from __future__ import annotations

import numpy as np
import pytest

from probes.calibration import PlattCalibrator
from probes.evaluation.metrics import WITHIN_FLOOR_MARGIN, within_category_auroc
from probes.evaluation.transfer import (
    design_matrix,
    domain_folds,
    fold_logistic_scores,
    generic_fold_scores,
    transfer_table,
)
from probes.inference import logit_feature_matrix
from probes.selection.candidates import Candidate, center_by_group, score_candidates


def _synthetic(n_per_category: int = 60, seed: int = 0):
    """Three domains x two categories; the label moves the hidden state along one direction, and each domain
    adds its own offset (so "which domain" is visible in the activations, as in real stores)."""
    rng = np.random.default_rng(seed)
    domains = {"geo": ("capitals", "continents"), "chem": ("symbols", "masses"), "math": ("add", "times")}
    rows = [(d, c) for d, cats in domains.items() for c in cats for _ in range(n_per_category)]
    dom = np.array([d for d, _ in rows])
    cat = np.array([c for _, c in rows])
    y = (rng.random(len(rows)) < 0.5).astype(int)
    hidden = 8
    direction = np.eye(hidden)[0]
    offsets = {d: rng.normal(0, 3, hidden) for d in domains}
    X = (
        rng.normal(size=(len(rows), hidden))
        + 1.5 * y[:, None] * direction
        + np.array([offsets[d] for d in dom])
    )
    split = np.array(["train", "train", "calibration", "test"] * (len(rows) // 4))
    return X, y, cat, dom, split


def test_domain_folds_never_train_or_calibrate_on_the_held_out_domain():
    X, y, cat, dom, split = _synthetic()
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    assert folds.domains == ("chem", "geo", "math")
    for f, name in enumerate(folds.domains):
        held = dom == name
        np.testing.assert_array_equal(folds.held_out[f], held)  # every row of the domain, whatever its split
        assert not (folds.fit[f] & held).any() and not (folds.calibrate[f] & held).any()
        np.testing.assert_array_equal(
            folds.fit[f], (split == "train") & ~held
        )  # all other domains' train rows
        np.testing.assert_array_equal(folds.calibrate[f], (split == "calibration") & ~held)
        assert set(dom[folds.fit[f]]) == set(folds.domains) - {name}


def test_domain_folds_skip_a_domain_with_one_label_and_refuse_a_single_domain():
    X, y, cat, dom, split = _synthetic()
    y = y.copy()
    y[dom == "math"] = 1  # no wrong answer in math: no AUROC there
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    assert folds.domains == ("chem", "geo")
    with pytest.raises(ValueError, match="at least two domains"):
        domain_folds(np.array(["one"] * len(y)), split == "train", split == "calibration", y)


def test_fold_scores_match_a_fit_on_the_fold_rows_only():
    X, y, cat, dom, split = _synthetic()
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    Z = design_matrix(X, None, "hidden").astype(np.float64)
    scores, _ = fold_logistic_scores(Z, y, folds.fit, C=0.1, tol=1e-10, max_iter=5000)
    # Changing the held-out domain's labels must not change that fold's scores (no leak of its labels).
    y_flipped = y.copy()
    y_flipped[dom == folds.domains[0]] ^= 1
    flipped, _ = fold_logistic_scores(Z, y_flipped, folds.fit, C=0.1, tol=1e-10, max_iter=5000)
    np.testing.assert_allclose(flipped[0], scores[0], atol=1e-6)
    assert not np.allclose(flipped[1], scores[1], atol=1e-3)  # the other folds did train on those rows


def test_score_candidates_finds_the_signal_and_logit_features_help_when_they_carry_it():
    X, y, cat, dom, split = _synthetic()
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    rng = np.random.default_rng(1)
    noise = {0: rng.normal(size=X.shape), 1: X}  # layer 1 holds the signal, layer 0 is noise
    logits = {"mean_logprob": -1.0 + 2.0 * y + rng.normal(0, 0.3, len(y)), "mean_entropy": rng.random(len(y))}
    L = logit_feature_matrix(logits)
    search = score_candidates(
        lambda layer, pos: noise[layer], L, y, cat, folds, [0, 1], ["answer_last"], Cs=[0.01, 0.1]
    )
    assert len(search.scores) == 2 * 2 * 2
    by = {(s.candidate.layer, s.candidate.features, s.candidate.C): s.heldout_auroc for s in search.scores}
    assert by[(1, "hidden", 0.1)] > 0.75 > by[(0, "hidden", 0.1)]
    assert by[(0, "hidden+logits", 0.1)] > 0.9  # the logit signal alone nearly separates the labels
    best = search.best()
    assert best.candidate.features == "hidden+logits" and set(best.per_domain) == set(folds.domains)
    assert best.heldout_auroc == pytest.approx(np.mean(list(best.per_domain.values())))
    assert search.to_dict()["scores"][0]["layer"] == 0


def test_logit_feature_matrix_orients_every_signal_higher_is_more_confident():
    values = {
        "mean_logprob": np.array([-2.0, -0.1]),
        "sequence_prob": np.array([0.0, 0.9]),
        "mean_entropy": np.array([3.0, 0.5]),
        "perplexity": np.array([7.0, 1.1]),
    }
    L = logit_feature_matrix(values, ["mean_logprob", "sequence_prob", "mean_entropy", "perplexity"])
    assert L.shape == (2, 4) and np.all(L[1] > L[0])  # row 1 is the confident one on every signal
    np.testing.assert_allclose(L[:, 1], np.log([1e-6, 0.9]))
    np.testing.assert_allclose(L[:, 3], -np.log([7.0, 1.1]))
    with pytest.raises(ValueError, match="not among the baselines"):
        logit_feature_matrix(values, ["p_true"])


def test_design_matrix_weights_logit_columns_and_validates_the_feature_set():
    X = np.random.default_rng(0).normal(size=(50, 3))
    L = np.random.default_rng(1).normal(size=(50, 2))
    Z = design_matrix(X, L, "hidden+logits", logit_weight=4.0)
    np.testing.assert_allclose(Z.std(axis=0), [1, 1, 1, 4, 4], rtol=1e-4)
    with pytest.raises(ValueError, match="features='hidden\\+all'.*allowed values"):
        design_matrix(X, L, "hidden+all")
    with pytest.raises(ValueError, match="needs the store's logit signals"):
        design_matrix(X, None, "hidden+logits")


def test_center_by_group_removes_each_group_mean():
    X, y, cat, dom, split = _synthetic()
    centred = center_by_group(X, dom)
    for d in np.unique(dom):
        np.testing.assert_allclose(centred[dom == d].mean(axis=0), 0.0, atol=1e-9)


def test_transfer_table_means_over_domains_and_calibrates_on_other_domains():
    X, y, cat, dom, split = _synthetic()
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    Z = design_matrix(X, None, "hidden").astype(np.float64)
    scores, _ = fold_logistic_scores(Z, y, folds.fit, C=0.1)
    rng = np.random.default_rng(2)
    baselines = {"sequence_prob": np.clip(0.3 + 0.2 * y + rng.normal(0, 0.2, len(y)), 0, 1)}
    table = transfer_table({"probe": scores}, baselines, y, cat, folds, PlattCalibrator, "platt")
    assert set(table.rows) == {"probe", "sequence_prob (platt)", "sequence_prob (raw)"}
    for f, d in enumerate(folds.domains):
        held = folds.held_out[f]
        calibrator = PlattCalibrator().fit(scores[f][folds.calibrate[f]], y[folds.calibrate[f]])
        p = calibrator.predict(scores[f][held])
        assert table.per_domain["probe"][d]["within_cat_auroc"] == pytest.approx(
            within_category_auroc(p, y[held], cat[held]).mean
        )
        assert table.per_domain["probe"][d]["n"] == held.sum()
    mean = np.mean([table.per_domain["probe"][d]["ece"] for d in folds.domains])
    assert table.rows["probe"]["ece"] == pytest.approx(mean)
    assert 0 <= table.rows["probe"]["pooled_ece"] <= table.rows["probe"]["ece"] + 0.05
    assert 0 < table.rows["probe"]["ece_floor"] < 0.2  # 60-row domains: binning noise alone reads ~0.1
    for d in folds.domains:  # each held-out domain carries its floor and smooth ECE beside its ECE
        row = table.per_domain["probe"][d]
        assert 0 < row["ece_floor"] < 0.25 and 0 <= row["smooth_ece"] <= 1
        assert row["within_floor"] == (row["ece"] <= row["ece_floor"] + WITHIN_FLOOR_MARGIN)
    floors = [table.per_domain["probe"][d]["ece_floor"] for d in folds.domains]
    assert table.rows["probe"]["ece_floor"] == pytest.approx(np.mean(floors))
    calibration = table.calibration("probe")
    assert calibration.summary["n_domains"] == len(folds.domains)
    assert calibration.summary["n_within"] == table.rows["probe"]["n_within"]
    assert calibration.summary["mean_ece"] == pytest.approx(table.rows["probe"]["ece"])
    assert calibration.summary["mean_smooth_ece"] == pytest.approx(table.rows["probe"]["smooth_ece"])
    assert calibration.summary["pooled_ece"] == table.rows["probe"]["pooled_ece"]
    assert table.rows["probe"]["within_cat_auroc"] > table.rows["sequence_prob (platt)"]["within_cat_auroc"]
    assert table.best("probe") in {"sequence_prob (platt)", "sequence_prob (raw)"}


def test_generic_fold_scores_fit_any_probe_per_fold():
    from probes.estimators import LogisticProbe

    X, y, cat, dom, split = _synthetic()
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    scores = generic_fold_scores(X, y, folds.fit, lambda: LogisticProbe(C=0.1))
    expected = LogisticProbe(C=0.1).fit(X[folds.fit[1]], y[folds.fit[1]]).decision_function(X)
    np.testing.assert_allclose(scores[1], expected)
    assert Candidate(3, "answer_last", "hidden", 0.01).describe() == "layer 3 / answer_last, hidden, C=0.01"


def test_hybrid_probe_weights_its_logit_columns_and_validates_them():
    from probes.estimators import HybridProbe, LogisticProbe

    X, y, cat, dom, split = _synthetic()
    logit = (2.0 * y + np.random.default_rng(3).normal(0, 1.0, len(y)))[:, None]
    XL = np.hstack([X, logit])
    light = HybridProbe(logit_features=("mean_logprob",), logit_weight=1.0, C=1e-3).fit(XL, y)
    heavy = HybridProbe(logit_features=("mean_logprob",), logit_weight=10.0, C=1e-3).fit(XL, y)
    assert heavy.n_hidden_features == X.shape[1] and heavy.n_features_in_ == X.shape[1] + 1
    # weight 1 equals a plain logistic probe on the same columns; a larger weight leans more on the logit column
    plain = LogisticProbe(C=1e-3).fit(XL, y)
    np.testing.assert_allclose(light.decision_function(XL), plain.decision_function(XL), atol=1e-6)
    share = [abs(p.coef_[-1]) / np.abs(p.coef_).sum() for p in (light, heavy)]
    assert share[1] > share[0] + 0.15  # 0.54 -> 0.74 of the coefficient mass here
    with pytest.raises(ValueError, match="must name at least one logit signal"):
        HybridProbe(logit_features=(), C=1.0).fit(XL, y)
    with pytest.raises(ValueError, match="logit_weight=0 must be > 0"):
        HybridProbe(logit_weight=0, C=1.0).fit(XL, y)


def test_nested_cross_domain_calibration_never_sees_the_held_out_domain():
    """A planted domain whose labels are flipped (wrong where the signal says right): its held-out ECE estimate
    must come from a calibrator that saw only the other domains, scored by probes that never saw it either."""
    from probes.evaluation.transfer import cross_domain_set, nested_cross_domain_sets, nested_fit_masks

    X, y, cat, dom, split = _synthetic(n_per_category=80)
    y = np.where(dom == "math", 1 - y, y)  # the planted domain: the signal direction means the opposite
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    # centred per domain: a probe fit on one domain alone then scores the others on one scale
    Z = design_matrix(center_by_group(X, dom), None, "hidden").astype(np.float64)
    outer, _ = fold_logistic_scores(Z, y, folds.fit, C=0.1)
    masks, pairs = nested_fit_masks(folds)
    assert len(pairs) == 3 * 2
    for m, (f, g) in enumerate(pairs):  # inner fits: neither the outer held-out domain nor the inner one
        assert not (masks[m] & (folds.held_out[f] | folds.held_out[g])).any()
    inner, _ = fold_logistic_scores(Z, y, masks, C=0.1, tol=1e-10, max_iter=20000)
    calibration = split == "calibration"
    sets = nested_cross_domain_sets(inner, pairs, folds, calibration)
    f = folds.domains.index("math")
    rows = sets[f][0].astype(int)
    assert set(dom[rows]) == {"chem", "geo"} and calibration[rows].all()
    # the math fold's calibration set does not change when math's labels change (they never enter it)
    y2 = np.where(dom == "math", 1 - y, y)
    inner2, _ = fold_logistic_scores(
        Z, y2, masks, C=0.1, tol=1e-10, max_iter=20000
    )  # (one shared solve: tight
    # tolerance, as the other folds' class weights move the common bound)
    again = nested_cross_domain_sets(inner2, pairs, folds, calibration)[f]
    np.testing.assert_allclose(again[1], sets[f][1], atol=1e-6)
    np.testing.assert_array_equal(y2[rows], y[rows])

    table = transfer_table(
        {"probe": outer}, {}, y, cat, folds, PlattCalibrator, "platt", calibration_sets={"probe": sets}
    )
    # calibrated on the other (unflipped) domains, math's flipped labels show: its ECE is large, AUROC low
    assert table.per_domain["probe"]["math"]["ece"] > 0.15  # (0.21 here)
    assert table.per_domain["probe"]["math"]["within_cat_auroc"] < 0.3
    # leaking math's own rows into its calibrator would hide that; transfer_table refuses such a set
    leaky = list(sets)
    leaky[f] = cross_domain_set(outer, folds, calibration)
    with pytest.raises(ValueError, match="holds rows of that domain"):
        transfer_table(
            {"probe": outer}, {}, y, cat, folds, PlattCalibrator, "platt", calibration_sets={"probe": leaky}
        )


def test_cross_domain_set_scores_each_domain_with_the_fold_that_left_it_out():
    from probes.evaluation.transfer import cross_domain_set

    X, y, cat, dom, split = _synthetic()
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    scores = np.arange(3)[:, None] + np.zeros((3, len(y)))  # fold g scores every row with the value g
    idx, values = cross_domain_set(scores, folds, split == "calibration")
    idx = idx.astype(int)
    assert sorted(idx) == sorted(np.flatnonzero(split == "calibration"))
    np.testing.assert_array_equal(values, [folds.domains.index(d) for d in dom[idx]])


def test_select_rule_heldout_then_cv_prefers_in_domain_among_near_ties():
    from probes.selection.candidates import CandidateScore, CandidateSearch

    def score(C, held, cv):
        return CandidateScore(Candidate(1, "answer_last", "hidden", C), held, {}, cv)

    search = CandidateSearch(
        [score(1e-3, 0.824, 0.76), score(1e-2, 0.818, 0.78), score(1e-1, 0.80, 0.85)], ("a",), 0.0
    )
    assert search.best("heldout").candidate.C == 1e-3
    assert search.best("heldout_then_cv", 0.01).candidate.C == 1e-2  # within 0.01 of the best held-out
    assert search.best("heldout_then_cv", 0.0).candidate.C == 1e-3
    with pytest.raises(ValueError, match="rule='cv' is not allowed"):
        search.best("cv")


def test_score_candidates_adds_in_domain_cv_auroc_from_the_same_solve():
    from probes.selection.sweep import cv_masks

    X, y, cat, dom, split = _synthetic()
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    train = split == "train"
    cv = np.zeros((3, len(y)), bool)
    cv[:, train] = cv_masks(y[train], 3, 0, cat[train])
    search = score_candidates(
        lambda layer, pos: X, None, y, cat, folds, [0], ["answer_last"], ["hidden"], [0.1], cv_fit_masks=cv
    )
    plain = score_candidates(
        lambda layer, pos: X, None, y, cat, folds, [0], ["answer_last"], ["hidden"], [0.1]
    )
    assert search.scores[0].heldout_auroc == pytest.approx(plain.scores[0].heldout_auroc, abs=1e-6)
    assert 0.75 < search.scores[0].cv_auroc <= 1.0 and np.isnan(plain.scores[0].cv_auroc)


def test_add_cv_scores_only_for_the_near_best_and_matches_the_joint_solve():
    from probes.selection.candidates import add_cv_scores
    from probes.selection.sweep import cv_masks

    X, y, cat, dom, split = _synthetic()
    folds = domain_folds(dom, split == "train", split == "calibration", y)
    train = split == "train"
    cv = np.zeros((3, len(y)), bool)
    cv[:, train] = cv_masks(y[train], 3, 0, cat[train])
    args = (lambda layer, pos: X, None, y, cat, folds, [0], ["answer_last"], ["hidden"], [1e-4, 0.1])
    joint = score_candidates(*args, cv_fit_masks=cv)
    later = add_cv_scores(
        score_candidates(*args), lambda layer, pos: X, None, y, cat, cv, 1.0, folds.fit.any(axis=0)
    )
    for a, b in zip(joint.scores, later.scores, strict=True):
        assert b.cv_auroc == pytest.approx(a.cv_auroc, abs=0.01)
    none = add_cv_scores(
        score_candidates(*args), lambda layer, pos: X, None, y, cat, cv, 0.0, folds.fit.any(axis=0)
    )
    assert sum(not np.isnan(s.cv_auroc) for s in none.scores) == 1  # only the best held-out candidate
