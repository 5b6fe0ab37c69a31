"""Layer x position sweep: finds the informative site, agrees with sklearn, saves and loads its result."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from probes.estimators import MassMeanProbe
from probes.selection.sweep import SweepResult, cv_masks, sweep

POSITIONS = ("prompt_last", "answer_last")


def site_features(n=240, hidden=20, informative=(2, "answer_last"), seed=0):
    """Only the informative site carries the label; the others are noise."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.6).astype(int)
    cache = {}

    def features(layer, position):
        key = (layer, position)
        if key not in cache:
            site_rng = np.random.default_rng([seed, layer, POSITIONS.index(position)])
            X = site_rng.normal(size=(n, hidden))
            if key == informative:
                X[:, 0] += 1.5 * (2 * y - 1)
            cache[key] = X
        return cache[key]

    return features, y


def test_sweep_finds_the_informative_site_and_reports_fold_spread():
    features, y = site_features()
    result = sweep(features, y, layers=[0, 1, 2, 3], positions=POSITIONS, n_folds=4)
    assert (result.best_layer, result.best_position) == (2, "answer_last")
    assert len(result.rows) == 8 and result.n_folds == 4
    best = result.best_row()
    assert best.auroc_mean > 0.85 and len(best.fold_aurocs) == 4
    assert best.auroc_std == pytest.approx(np.std(best.fold_aurocs))
    noise = [r.auroc_mean for r in result.rows if (r.layer, r.position) != (2, "answer_last")]
    assert max(noise) < 0.7
    assert result.table()["answer_last"].shape == (4,)


def test_fast_path_matches_sklearn_fold_by_fold():
    features, y = site_features()
    X = features(2, "answer_last")
    result = sweep(features, y, layers=[2], positions=["answer_last"], n_folds=3, seed=1, sweep_C=0.05)
    Z = (X - X.mean(0)) / X.std(0)
    expected = []
    for mask in cv_masks(y, 3, seed=1):
        clf = LogisticRegression(C=0.05, class_weight="balanced").fit(Z[mask], y[mask])
        expected.append(roc_auc_score(y[~mask], clf.decision_function(Z[~mask])))
    np.testing.assert_allclose(result.rows[0].fold_aurocs, expected, atol=5e-3)


def test_sweep_accepts_any_probe_factory():
    features, y = site_features()
    result = sweep(features, y, [1, 2], POSITIONS, probe_factory=MassMeanProbe, n_folds=3)
    assert (result.best_layer, result.best_position) == (2, "answer_last")
    assert result.probe == "MassMeanProbe"


def test_cv_masks_partition_and_stratify_by_category():
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=300) < 0.5).astype(int)
    cats = np.repeat(["a", "b", "c"], 100)
    masks = cv_masks(y, 5, seed=0, categories=cats)
    np.testing.assert_array_equal((~masks).sum(axis=0), np.ones(300))  # each row held out exactly once
    for f in range(5):
        held = ~masks[f]
        assert {c: np.sum(cats[held] == c) for c in "abc"} == {"a": 20, "b": 20, "c": 20}
    groups = np.arange(300) // 3
    grouped = cv_masks(y, 5, seed=0, groups=groups)
    for f in range(5):
        assert not set(groups[grouped[f]]) & set(groups[~grouped[f]])  # a group never straddles folds


def test_result_json_round_trip_and_errors(tmp_path):
    features, y = site_features(n=120)
    result = sweep(features, y, [0, 2], POSITIONS, n_folds=3)
    path = tmp_path / "sweep.json"
    result.to_json(path)
    assert SweepResult.from_json(path) == result
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]  # no temp file left behind
    path.write_text('{"rows": [\n  oops')
    with pytest.raises(ValueError, match=r"sweep.json: not valid JSON \(line 2"):
        SweepResult.from_json(path)
    path.write_text(json.dumps({**result.to_dict(), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        SweepResult.from_json(path)


def test_bad_inputs_are_clear_errors():
    features, y = site_features(n=60)
    with pytest.raises(ValueError, match=r"features\(0, 'prompt_last'\) returned shape \(59, 20\)"):
        sweep(lambda layer, pos: features(layer, pos)[:59], y, [0], ["prompt_last"], n_folds=3)
    with pytest.raises(ValueError, match="at least one layer"):
        sweep(features, y, [], POSITIONS)
    with pytest.raises(ValueError, match="one class has only 2 examples"):
        sweep(features, np.r_[np.ones(58), [0, 0]].astype(int), [0], ["prompt_last"], n_folds=3)
