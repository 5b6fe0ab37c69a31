"""recalibrate(kind="shrinkage"): 20 labels per domain are enough, the check is cross-fitted (no rows held
out), a worse artifact is still refused, the CLI selects it and the child serves through ProbeScorer."""

import json

import numpy as np
import pytest
from scipy.special import expit

from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator, ShrinkageCalibrator
from probes.evaluation.metrics import ece
from probes.recalibration import NotEnoughRows, cross_fit_folds, make_rows, recalibrate
from probes.scorer import ProbeScorer
from tests.unit.probes.test_recalibration import parent_artifact, platt

SHIFTS = {"arith": -1.8, "chem": 1.2, "geo": 0.0, "bio": -0.9}


def domains_rows(n_per_domain: int, seed: int, shifts=SHIFTS):
    """Rows whose P(correct) = sigmoid(0.8 s - 0.6 + shift[domain]): the parent platt(0.8, -0.6) shifted."""
    rng = np.random.default_rng(seed)
    d = np.repeat(list(shifts), n_per_domain)
    s = rng.normal(0.0, 1.5, len(d))
    y = (rng.random(len(d)) < expit(0.8 * s - 0.6 + np.array([shifts[k] for k in d]))).astype(int)
    return s, y, d


def test_twenty_labels_per_domain_recalibrate_and_beat_the_parent():
    parent = parent_artifact(platt(0.8, -0.6))
    s, y, d = domains_rows(20, seed=1)
    result = recalibrate(parent, make_rows(s, y, d), kind="shrinkage", n_bootstrap=200)
    assert result.accepted, result.reason
    calibrator = result.artifact.calibrator
    assert isinstance(calibrator, ShrinkageCalibrator) and calibrator.global_ is parent.calibrator
    assert result.record["check"] == "10-fold cross-fit" and result.record["n_heldout"] == 80
    test_s, test_y, test_d = domains_rows(5000, seed=99)
    for domain in SHIFTS:
        rows = test_d == domain
        before = ece(parent.calibrator.predict(test_s[rows]), test_y[rows])
        after = ece(calibrator.predict(test_s[rows], categories=test_d[rows]), test_y[rows])
        if abs(SHIFTS[domain]) >= 1.0:
            assert after < before - 0.05, (domain, before, after)
        assert after < 0.12, (domain, after)
    assert "per-domain logit offsets" in "\n".join(result.notes)


def test_cross_fit_folds_are_seeded_and_stratified():
    y = np.array([0, 1] * 30)
    d = np.repeat(["a", "b", "c"], 20)
    folds = cross_fit_folds(y, d, 10, seed=3)
    np.testing.assert_array_equal(folds, cross_fit_folds(y, d, 10, seed=3))
    assert set(folds) == set(range(10)) and np.bincount(folds).max() - np.bincount(folds).min() <= 1
    assert set(cross_fit_folds(y[:4], d[:4], 10, seed=0)) == {0, 1, 2, 3}  # no more folds than rows


def test_a_worse_shrinkage_recalibration_is_refused():
    """A parent exactly calibrated on one domain; a fixed wide prior on 6 rows per domain chases noise."""
    parent = parent_artifact(platt(0.8, -0.6))
    shifts = {f"d{k}": 0.0 for k in range(40)}
    s, y, d = domains_rows(6, seed=7, shifts=shifts)
    result = recalibrate(parent, make_rows(s, y, d), kind="shrinkage", n_bootstrap=300, tau=50.0)
    assert not result.accepted and result.artifact is None
    assert "worse than its parent" in result.reason
    # the prior estimated across those domains is narrow: the same rows are then not refused
    assert recalibrate(parent, make_rows(s, y, d), kind="shrinkage", n_bootstrap=300).accepted


def test_too_few_rows_and_no_parent_calibrator_are_named():
    s, y, d = domains_rows(1, seed=2)
    with pytest.raises(NotEnoughRows, match="needs at least 5"):
        recalibrate(parent_artifact(), make_rows(s, y, d), kind="shrinkage")
    s, y, d = domains_rows(10, seed=2)
    bare = parent_artifact()
    bare.calibrator = None
    with pytest.raises(ValueError, match="parent artifact has no calibrator"):
        recalibrate(bare, make_rows(s, y, d), kind="shrinkage")


def test_a_shrinkage_parent_passes_its_tau_and_global_calibrator():
    s, y, d = domains_rows(200, seed=4)
    trained = ShrinkageCalibrator(tau=0.7).fit(s, y, categories=d, prior=platt(0.8, -0.6))
    parent = parent_artifact(trained)
    s2, y2, d2 = domains_rows(20, seed=5)
    result = recalibrate(parent, make_rows(s2, y2, d2), kind="shrinkage", n_bootstrap=100)
    assert result.record["tau"] == pytest.approx(0.7) and result.record["tau_source"] == "the parent's"
    assert isinstance(result.calibrator.global_, PlattCalibrator)
    assert result.calibrator.global_.a_ == pytest.approx(0.8)


def test_cli_recalibrate_kind_shrinkage_writes_a_child_that_probe_scorer_serves(
    tmp_path, monkeypatch, capsys
):
    from probes.cli import main as cli

    monkeypatch.setattr("sys.argv", ["probecal"])
    parent_dir = parent_artifact(platt(0.8, -0.6)).save(tmp_path / "parent")
    s, y, d = domains_rows(20, seed=8)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"id": i, "score": s[i], "correct": int(y[i]), "domain": str(d[i])}) + "\n"
            for i in range(len(s))
        )
    )
    run = tmp_path / "run"
    cli.main(
        [
            "recalibrate",
            f"evaluate.probe_dir={parent_dir}",
            f"recalibrate.rows={rows}",
            "recalibrate.kind=shrinkage",
            f"hydra.run.dir={run}",
            "train.n_bootstrap=50",
        ]
    )
    report = json.loads((run / "recalibration.json").read_text())
    assert report["accepted"] and report["record"]["kind"] == "shrinkage"
    child = ProbeArtifact.load(run / "probe")
    X = np.random.default_rng(0).normal(size=(8, child.probe.n_features_in_)).astype(np.float32)
    cats = np.array(list(SHIFTS) * 2)
    expected = child.predict(X, categories=cats)[0]
    np.testing.assert_allclose(ProbeScorer(run / "probe").p_correct(X, cats), expected, atol=1e-12)
    assert "shrinkage toward the parent's platt calibrator" in capsys.readouterr().out


def test_prior_cross_domain_shrinks_toward_the_stored_out_of_domain_map_with_its_tau():
    """The parent's own calibrator is far too confident on new domains; the out-of-domain Platt map its
    training stored is the right level (0.8 s - 0.6), so 20 labels per domain only need the domain offsets."""
    record = {"a": 0.8, "b": -0.6, "tau": 1.25, "n_domains": 19}
    parent = parent_artifact().with_metadata(cross_domain_calibration=record)
    s, y, d = domains_rows(20, seed=1)
    rows = make_rows(s, y, d)
    result = recalibrate(parent, rows, kind="shrinkage", n_bootstrap=200, prior="cross_domain")
    assert result.accepted, result.reason
    child = result.artifact.calibrator
    assert (float(child.global_.a_), float(child.global_.b_)) == (0.8, -0.6)
    assert child.tau_ == pytest.approx(1.25)
    assert result.record["prior"] == "cross_domain" and "19 training domains" in result.record["tau_source"]
    assert "cross-domain platt" in "\n".join(result.notes)
    around_parent = recalibrate(parent, rows, kind="shrinkage", n_bootstrap=200).artifact.calibrator
    test_s, test_y, test_d = domains_rows(5000, seed=99)
    eces = [
        np.mean([ece(c.predict(test_s[test_d == k], categories=test_d[test_d == k]), test_y[test_d == k])
                 for k in SHIFTS])
        for c in (child, around_parent)
    ]  # fmt: skip
    assert eces[0] < eces[1] - 0.01, eces
    # given tau still wins; the child keeps the parent's stored record (it is metadata, inherited)
    assert recalibrate(parent, rows, kind="shrinkage", prior="cross_domain", tau=0.5).calibrator.tau_ == 0.5


def test_prior_cross_domain_is_refused_clearly_where_it_cannot_apply():
    s, y, d = domains_rows(20, seed=1)
    rows = make_rows(s, y, d)
    with pytest.raises(ValueError, match="has none .*recalibrate.prior=parent"):
        recalibrate(parent_artifact(), rows, kind="shrinkage", prior="cross_domain")
    parent = parent_artifact().with_metadata(
        cross_domain_calibration={"a": 1, "b": 0, "tau": 1, "n_domains": 3}
    )
    with pytest.raises(ValueError, match="kind=platt fits its own map"):
        recalibrate(parent, rows, kind="platt", prior="cross_domain")
    with pytest.raises(ValueError, match="allowed values: parent, cross_domain"):
        recalibrate(parent, rows, kind="shrinkage", prior="xd")
