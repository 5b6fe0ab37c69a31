"""Recalibration on a new domain: fixes a miscalibrated parent, records lineage, refuses a worse artifact,
falls back per domain, stays safe on small data (threshold and minimum rows), reads rows files and the
feedback database."""

import json
import re
import sqlite3

import numpy as np
import pytest
from scipy.special import expit

from extract.models import ModelFingerprint
from probes.artifact import ProbeArtifact
from probes.calibration import PerCategoryCalibrator, PlattCalibrator
from probes.estimators import PROBES
from probes.evaluation.metrics import auroc, ece
from probes.recalibration import (
    ABSTAIN_ALL,
    MIN_FIT_ROWS,
    NotEnoughRows,
    compare,
    compare_by_domain,
    make_rows,
    min_total_rows,
    read_feedback_rows,
    read_rows_file,
    recalibrate,
    split_rows,
)
from probes.selection.thresholds import realised
from probes.serving.feedback import FeedbackStore
from tests.factories import record_labelled_responses

HIDDEN = 16
FINGERPRINT = ModelFingerprint("tiny-llama", "f" * 64, "LlamaForCausalLM", HIDDEN, 3)


def platt(a: float, b: float) -> PlattCalibrator:
    calibrator = PlattCalibrator()
    calibrator.a_, calibrator.b_ = np.float64(a), np.float64(b)
    return calibrator


def parent_artifact(calibrator=None) -> ProbeArtifact:
    """A probe trained elsewhere; its calibrator says P(correct) = sigmoid(2 s + 1): far too confident on
    the new domain below, where P(correct | s) = sigmoid(0.8 s - 0.6)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, HIDDEN)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=120) > 0).astype(int)
    probe = PROBES["logistic"](Cs=(1.0,), cv=3).fit(X, y)
    calibrator = platt(2.0, 1.0) if calibrator is None else calibrator
    thresholds = [
        {"threshold": 0.7, "target_accuracy": 0.9, "delta": 0.1, "method": "ltt", "reachable": True}
    ]
    return ProbeArtifact.create(
        probe,
        calibrator,
        2,
        "answer_last",
        FINGERPRINT,
        thresholds=thresholds,
        training_data_hash="abc",
        split_sizes={"train": 120},
    )


def new_domain(n: int, seed: int, a: float = 0.8, b: float = -0.6, domain: str = "new"):
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < expit(a * s + b)).astype(int)
    return s, y, np.full(n, domain)


def test_recalibration_fixes_a_miscalibrated_parent_and_keeps_the_ranking():
    parent = parent_artifact()
    s, y, d = new_domain(400, seed=1)
    result = recalibrate(parent, make_rows(s, y, d), kind="platt", n_bootstrap=200)
    assert result.accepted and result.reason == ""
    test_s, test_y, _ = new_domain(20_000, seed=99)
    before = parent.calibrator.predict(test_s)
    after = result.artifact.calibrator.predict(test_s)
    assert ece(before, test_y) > 0.15
    assert ece(after, test_y) < 0.04
    assert auroc(after, test_y) == pytest.approx(auroc(before, test_y), abs=1e-12)  # direction kept
    held = result.comparison
    assert held["n"] == result.record["n_heldout"] == 200
    assert held["ece_after"]["value"] < held["ece_before"]["value"]
    assert held["ece_change"]["high"] < 0  # better beyond noise
    assert held["ece_before"]["low"] <= held["ece_before"]["high"]
    # per domain, beside the floor: the one domain "new" of the held-out part
    new = held["per_domain"]["new"]
    assert new["n"] == 200 and new["ece_before"] == pytest.approx(held["ece_before"]["value"])
    assert new["ece_after"] == pytest.approx(held["ece_after"]["value"]) and 0 < new["ece_floor_after"] < 0.15
    assert "| new | 200 |" in result.summary()


def test_compare_by_domain_hand_computed():
    # domain a: parent 0.8 on 4 rows, 3 right (ECE 0.05) -> new 0.75 (ECE 0); domain b: parent 0.2, 2 of 2 right
    # (ECE 0.8) -> new 1.0 (ECE 0, floor 0: labels drawn from p = 1 are all correct)
    y = np.array([1, 1, 1, 0, 1, 1])
    out = compare_by_domain([0.8] * 4 + [0.2] * 2, [0.75] * 4 + [1.0] * 2, y, np.array(["a"] * 4 + ["b"] * 2))
    assert out["a"]["n"] == 4 and out["a"]["accuracy"] == 0.75
    assert out["a"]["ece_before"] == pytest.approx(0.05) and out["a"]["ece_after"] == pytest.approx(0.0)
    assert out["b"]["ece_before"] == pytest.approx(0.8) and out["b"]["smooth_ece_before"] == pytest.approx(
        0.8
    )
    assert (
        out["b"]["ece_floor_after"] == 0.0
        and out["b"]["within_floor_after"]
        and not out["b"]["within_floor_before"]
    )


def test_new_artifact_records_its_parent_and_data_and_round_trips(tmp_path):
    parent = parent_artifact()
    s, y, d = new_domain(200, seed=2)
    rows = make_rows(s, y, d, source="my_domain.jsonl")
    child = recalibrate(parent, rows, kind="platt", n_bootstrap=100).artifact
    lineage = child.metadata.parent
    assert lineage["digest"] == parent.digest
    record = lineage["recalibration"]
    assert record["data_hash"] == rows.data_hash() and record["n_rows"] == 200
    assert record["kind"] == "platt" and record["source"] == "my_domain.jsonl"
    assert record["domains"] == {"new": 200}
    assert child.probe is parent.probe and child.metadata.layer == 2
    assert child.metadata.training_data_hash == "abc"
    assert child.digest != parent.digest
    loaded = ProbeArtifact.load(child.save(tmp_path / "child"))
    assert loaded.metadata.parent == json.loads(json.dumps(lineage))
    X = np.random.default_rng(3).normal(size=(10, HIDDEN)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(X)[0], child.predict(X)[0])
    # one changed row -> another data hash
    y2 = y.copy()
    y2[0] = 1 - y2[0]
    assert make_rows(s, y2, d).data_hash() != rows.data_hash()


def test_a_recalibration_worse_than_its_parent_is_refused():
    """The parent is calibrated exactly; temperature scaling has no offset and cannot be as good."""
    parent = parent_artifact(platt(0.8, -0.6))
    s, y, d = new_domain(2000, seed=4)
    result = recalibrate(parent, make_rows(s, y, d), kind="temperature", n_bootstrap=200)
    assert not result.accepted and result.artifact is None
    assert result.comparison["ece_change"]["low"] > 0
    assert "worse than its parent" in result.reason and "ECE" in result.reason
    assert "REFUSED" in result.summary()


def test_an_equally_good_recalibration_is_not_refused():
    parent = parent_artifact(platt(0.8, -0.6))
    s, y, d = new_domain(400, seed=5)
    result = recalibrate(parent, make_rows(s, y, d), kind="platt", n_bootstrap=200)
    assert result.accepted  # noise around a perfect parent is not "worse beyond noise"


def test_too_few_rows_says_how_many_more_and_isotonic_needs_more_than_platt():
    parent = parent_artifact()
    assert min_total_rows("platt", 0.5) == 2 * MIN_FIT_ROWS["platt"] == 60
    assert min_total_rows("isotonic", 0.5) == 100 > min_total_rows("platt", 0.5)
    s, y, d = new_domain(50, seed=6)
    with pytest.raises(
        NotEnoughRows, match="50 labelled rows; recalibrating with platt needs at least 60.*label 10 more"
    ):
        recalibrate(parent, make_rows(s, y, d), kind="platt")
    s, y, d = new_domain(80, seed=6)
    recalibrate(parent, make_rows(s, y, d), kind="platt", n_bootstrap=50)  # enough for Platt
    with pytest.raises(NotEnoughRows, match="needs at least 100 .*label 20 more"):
        recalibrate(parent, make_rows(s, y, d), kind="isotonic")
    with pytest.raises(NotEnoughRows, match="0 wrong answers"):
        recalibrate(parent, make_rows(s, np.ones(80, int), d), kind="platt")
    with pytest.raises(ValueError, match="recalibrate.kind='beta' is not allowed; allowed values: platt"):
        recalibrate(parent, make_rows(s, y, d), kind="beta")


def test_threshold_on_small_data_abstains_on_everything_instead_of_dropping():
    parent = parent_artifact()
    s, y, d = new_domain(70, seed=7, b=-1.0)  # ~40% correct: 90% accuracy cannot be certified from 70 rows
    result = recalibrate(parent, make_rows(s, y, d), kind="platt", n_bootstrap=50)
    t = result.threshold
    assert not t.reachable and t.threshold == ABSTAIN_ALL > 1.0
    assert "cannot support accuracy 0.9" in t.message and "abstaining on every answer" in t.message
    assert result.artifact.abstention_threshold() == ABSTAIN_ALL
    p = result.artifact.calibrator.predict(np.linspace(-50, 50, 101))
    assert not np.any(p >= result.artifact.abstention_threshold())  # answers nothing


def test_threshold_on_enough_data_keeps_its_guarantee_on_fresh_rows():
    parent = parent_artifact()
    s, y, d = new_domain(3000, seed=8, b=0.5)
    result = recalibrate(parent, make_rows(s, y, d), kind="platt", n_bootstrap=50)
    t = result.threshold
    assert t.reachable and t.method == "ltt" and t.target_accuracy == 0.9  # inherited from the parent
    assert t.risk_upper_bound <= 0.1 and 0 < t.coverage < 1
    test_s, test_y, _ = new_domain(50_000, seed=98, b=0.5)
    accuracy, coverage = realised(result.artifact.calibrator.predict(test_s), test_y, t.threshold)
    assert accuracy >= 0.9 and coverage == pytest.approx(t.coverage, abs=0.05)


def test_per_domain_calibrators_with_a_global_fallback():
    parent = parent_artifact()
    sa, ya, da = new_domain(300, seed=9, a=0.8, b=1.0, domain="easy")
    sb, yb, db = new_domain(300, seed=10, a=0.8, b=-1.5, domain="hard")
    sc, yc, dc = new_domain(20, seed=11, domain="rare")
    rows = make_rows(np.r_[sa, sb, sc], np.r_[ya, yb, yc], np.r_[da, db, dc])
    result = recalibrate(parent, rows, kind="per_domain", n_bootstrap=100)
    calibrator = result.artifact.calibrator
    assert isinstance(calibrator, PerCategoryCalibrator)
    assert sorted(calibrator.per_category_) == ["easy", "hard"]  # "rare" has ~10 fit rows < 30
    grid = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(calibrator.predict(grid, np.full(7, "rare")), calibrator.global_.predict(grid))
    np.testing.assert_allclose(
        calibrator.predict(grid, np.full(7, "unseen")), calibrator.global_.predict(grid)
    )
    # 20 rare rows -> 9 or 10 in the fit part (per stratum rounding): 30 - that more are needed
    assert any(
        re.search(r"global fallback for rare \((2[01]) more fit rows needed\)", note) for note in result.notes
    )
    # each known domain's own calibrator beats one global Platt inside that domain
    ts, ty, _ = new_domain(20_000, seed=97, a=0.8, b=-1.5)
    global_only = recalibrate(parent, rows, kind="platt", n_bootstrap=50).artifact.calibrator
    assert ece(calibrator.predict(ts, np.full(len(ts), "hard")), ty) < 0.04 < ece(global_only.predict(ts), ty)
    assert result.record["domains"] == {"easy": 300, "hard": 300, "rare": 20}


def test_split_is_seeded_and_stratified_by_domain_and_label():
    y = np.array([1] * 40 + [0] * 20 + [1] * 10 + [0] * 30)
    d = np.array(["a"] * 60 + ["b"] * 40)
    held = split_rows(y, d, 0.5, seed=3)
    np.testing.assert_array_equal(held, split_rows(y, d, 0.5, seed=3))
    assert not np.array_equal(held, split_rows(y, d, 0.5, seed=4))
    for dom, label, n in (("a", 1, 40), ("a", 0, 20), ("b", 1, 10), ("b", 0, 30)):
        assert held[(d == dom) & (y == label)].sum() == n // 2
    with pytest.raises(ValueError, match="heldout_fraction=1.0 must be in"):
        split_rows(y, d, 1.0, seed=0)


def test_compare_of_identical_probabilities_changes_nothing():
    s, y, _ = new_domain(300, seed=12)
    p = expit(s)
    out = compare(p, p, y, n_bootstrap=100)
    for name in ("ece", "brier", "auroc"):
        assert out[f"{name}_change"] == {"value": 0.0, "low": 0.0, "high": 0.0}


def test_rows_file_jsonl_csv_and_p_only_rows(tmp_path):
    parent = parent_artifact()
    s, y, _ = new_domain(5, seed=13)
    lines = [
        json.dumps({"id": f"q{i}", "score": s[i], "correct": bool(y[i]), "domain": "law"}) for i in range(4)
    ]
    lines.append(json.dumps({"id": "q4", "p_correct": float(expit(2.0 * s[4] + 1.0)), "correct": int(y[4])}))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = read_rows_file(path, parent)
    np.testing.assert_allclose(rows.score, s, atol=1e-9)  # the p-only row's score is Platt inverted
    assert rows.parent_p is None  # not every row carried p: recomputed from the scores
    assert rows.domain.tolist() == ["law"] * 4 + [""] and rows.y.tolist() == y.tolist()
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("id,score,correct\na,0.5,1\nb,oops,0\n")
    with pytest.raises(ValueError, match=r"rows.csv:3: field `score` must be a number; got 'oops'"):
        read_rows_file(csv_path, parent)
    path.write_text('{"id": "a", "score": 1.0, "correct": 1}\n{"id": "b", "score": 1.0}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: missing field `correct`"):
        read_rows_file(path, parent)
    path.write_text('{"id": "a", "p_correct": 0.4, "correct": 1}\n')
    with pytest.raises(ValueError, match="cannot be inverted"):
        read_rows_file(path, parent_artifact(PerCategoryCalibrator().fit(s, [0, 1, 0, 1, 1])))


def _served(store: FeedbackStore, n: int, seed: int, layer: int = 2) -> tuple[np.ndarray, np.ndarray]:
    s, y, _ = new_domain(n, seed)
    # the last five stay unlabelled
    record_labelled_responses(
        store, seed, expit(2 * s + 1), s, y, layer=layer, threshold=0.7, n_labelled=n - 5
    )
    return s[: n - 5], y[: n - 5]


def test_feedback_database_rows_one_domain_then_with_a_domain_column(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    s, y = _served(store, 40, seed=14)
    _served(store, 10, seed=15, layer=5)  # another capture site: not this probe's score
    store.close()
    rows = read_feedback_rows(db, layer=2, position="answer_last")
    assert len(rows) == 35 and set(rows.domain) == {""}
    np.testing.assert_allclose(rows.score, s)
    np.testing.assert_allclose(rows.parent_p, expit(2 * s + 1))
    assert rows.y.tolist() == y.tolist()
    with sqlite3.connect(db) as conn:  # requests tagged with metadata.domain store it (untagged: NULL -> "")
        conn.execute("UPDATE responses SET domain = 'law' WHERE id LIKE 'r14-1%'")
    rows = read_feedback_rows(db, layer=2, position="answer_last")
    assert sorted(set(rows.domain)) == ["", "law"] and (rows.domain == "law").sum() == 11
    with pytest.raises(NotEnoughRows, match="no labelled responses at layer 7"):
        read_feedback_rows(db, layer=7, position="answer_last")
    (tmp_path / "junk.db").write_text("not sqlite")
    with pytest.raises(ValueError, match="junk.db"):
        read_feedback_rows(tmp_path / "junk.db")


def test_cli_stage_writes_a_child_artifact_or_refuses(tmp_path, monkeypatch, capsys):
    from probes.cli import main as cli

    monkeypatch.setattr("sys.argv", ["probecal"])
    parent_dir = parent_artifact().save(tmp_path / "parent")
    s, y, _ = new_domain(120, seed=16)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"id": i, "score": s[i], "correct": int(y[i])}) + "\n" for i in range(120))
    )
    run = tmp_path / "run"
    cli.main(
        [
            "recalibrate",
            f"evaluate.probe_dir={parent_dir}",
            f"recalibrate.rows={rows}",
            f"hydra.run.dir={run}",
            "train.n_bootstrap=50",
        ]
    )
    child = ProbeArtifact.load(run / "probe")
    assert child.metadata.parent["digest"] == ProbeArtifact.load(parent_dir).digest
    report = json.loads((run / "recalibration.json").read_text())
    assert report["accepted"] and report["record"]["n_rows"] == 120
    assert "| ECE |" in capsys.readouterr().out
    few = tmp_path / "few.jsonl"
    few.write_text(
        "".join(json.dumps({"id": i, "score": s[i], "correct": int(y[i])}) + "\n" for i in range(40))
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "recalibrate",
                f"evaluate.probe_dir={parent_dir}",
                f"recalibrate.rows={few}",
                f"hydra.run.dir={tmp_path / 'run2'}",
            ]
        )
    assert exit_info.value.code == 2
    assert "40 labelled rows; recalibrating with platt needs at least 60" in capsys.readouterr().err


def test_cli_prior_cross_domain_on_a_parent_without_it_fails_before_reading_rows(
    tmp_path, monkeypatch, capsys
):
    from probes.cli import main as cli

    monkeypatch.setattr("sys.argv", ["probecal"])
    parent_dir = parent_artifact().save(tmp_path / "parent")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "recalibrate",
                f"recalibrate.probe_dir={parent_dir}",
                "recalibrate.kind=shrinkage",
                "recalibrate.prior=cross_domain",
                f"recalibrate.rows={tmp_path / 'missing.jsonl'}",  # never read: the prior is checked first
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "recalibrate.prior=cross_domain needs the cross-domain calibration" in err and "missing" not in err
