"""The refusal-gap table: hand-counted numbers on arrays, then on a synthetic store with never-fit domains."""

from __future__ import annotations

import numpy as np
import pytest

from probes.calibration import PlattCalibrator
from probes.estimators import LogisticProbe
from probes.evaluation.metrics import auroc
from probes.evaluation.refusal_gap import gap_rows, measure_refusal_gap, refusal_gap_table
from probes.training import TrainSpec, train_probe
from probes.training.splits import SplitData
from tests.pipeline_fixtures import write_synthetic_store


def test_table_numbers_by_hand():
    #          geo x4 (2 right, 1 refused)   unanswerable x4            benign x2
    domains = ["geo"] * 4 + ["unanswerable"] * 4 + ["benign_refusal"] * 2
    labels = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    refused = [0, 0, 1, 0, 1, 0, 0, 0, 1, 0]
    p = np.array([0.9, 0.4, 0.1, 0.8, 0.2, 0.7, 0.3, 0.1, 0.2, 0.9])
    twin = np.array([0.6, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.5, 0.5])
    table = refusal_gap_table(domains, labels, np.array(refused, bool), p, 0.5, {"prompt_last probe": twin})
    geo, un, benign = table.rows["geo"], table.rows["unanswerable"], table.rows["benign_refusal"]
    assert list(table.rows) == ["geo", "unanswerable", "benign_refusal", "all answerable"]
    assert geo["accuracy"] == 0.5 and geo["model refused"] == 0.25 and geo["abstains"] == 0.5
    assert geo["abstained while right"] == 0.5  # p 0.4 on a right answer
    assert geo["answered while unanswerable"] is None and geo["over-refusal"] is None
    assert un["accuracy"] is None and un["model refused"] == 0.25 and un["abstains"] == 0.75
    assert un["answered while unanswerable"] == 0.25  # only the p=0.7 row: not refused, not abstained
    assert benign["over-refusal"] == 0.5 and benign["abstains"] == 0.5
    # AUROC: positives = geo right (0.9, 0.4), negatives = unanswerable (0.2, 0.7, 0.3, 0.1): 7 of 8 pairs
    assert table.auroc["probe"] == pytest.approx(7 / 8)
    assert table.auroc["prompt_last probe"] == pytest.approx(
        auroc([0.6, 0.6, 0.1, 0.1, 0.1, 0.9], [1, 1, 0, 0, 0, 0])
    )
    assert table.abstains["prompt_last probe"]["unanswerable"] == 0.75
    md = table.markdown()
    assert "| unanswerable | 4 | 0.250 | - | 0.750 | 0.250 | - | - | 0.750 |" in md
    assert "misses the target <= 2%" in md


def test_without_a_threshold_probecal_never_abstains_and_the_table_says_so():
    domains = ["geo"] * 2 + ["unanswerable"] * 2
    table = refusal_gap_table(
        domains, [1, 0, 0, 0], np.array([0, 0, 1, 0], bool), np.array([0.9, 0.1, 0.2, 0.3]), None
    )
    assert table.rows["unanswerable"]["abstains"] == 0.0
    assert table.rows["unanswerable"]["answered while unanswerable"] == 0.5  # the one that did not refuse
    assert table.to_dict()["threshold"] is None
    assert "No reachable abstention threshold (probecal never abstains)" in table.markdown()


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="same shape"):
        refusal_gap_table(["a", "b"], [1, 0], [False], np.array([0.1, 0.2]), 0.5)


N_UNANSWERABLE = 30


def _heldout_record(i: int, record: dict) -> dict:
    """The last N_UNANSWERABLE rows are unanswerable (no answers, label 0); every 10th other row is refused."""
    if i >= 200 - N_UNANSWERABLE:
        return {**record, "domain": "unanswerable", "category": "fictional_entity", "answers": [], "label": 0}
    if i % 10 == 3:
        return {**record, "refused": True, "label": 0}
    return record


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(
        tmp_path_factory.mktemp("gap") / "s", n_rows=200, edit_record=_heldout_record
    )


def test_never_fit_and_refused_rows_are_masked_out_of_fit_and_calibration(store):
    data = SplitData.from_store(store)
    never_fit = np.arange(len(store)) >= 200 - N_UNANSWERABLE
    refused = store.column("refused").astype(bool)
    assert refused.sum() > 10 and not refused[never_fit].any()
    for split in ("train", "calibration", "test"):
        assert not (data.masks[split] & never_fit).any(), split
    assert not ((data.masks["train"] | data.masks["calibration"]) & refused).any()
    assert (data.masks["test"] & refused).any()  # kept in test, as wrong answers
    assert (gap_rows(store) & never_fit).sum() == N_UNANSWERABLE


def test_table_on_a_synthetic_store(store):
    result = train_probe(store, LogisticProbe(), PlattCalibrator(), TrainSpec(n_folds=3, select="cv"), seed=0)
    artifact = result.artifact
    assert artifact.metadata.split_sizes["train"] == int(SplitData.from_store(store).masks["train"].sum())
    threshold = 0.5
    table = measure_refusal_gap(artifact, store, threshold)
    rows = gap_rows(store)
    never_fit = np.arange(len(store))[rows] >= 200 - N_UNANSWERABLE
    from probes.training.splits import probe_features

    X = probe_features(artifact.probe, store, artifact.metadata.layer, artifact.metadata.position)[rows]
    p, _ = artifact.predict(X, categories=store.column("category")[rows])
    labels = store.column("label").astype(int)[rows]
    un = table.rows["unanswerable"]
    assert un["n"] == N_UNANSWERABLE and un["accuracy"] is None
    assert un["answered while unanswerable"] == pytest.approx(np.mean(p[never_fit] >= threshold))
    right = ~never_fit & (labels == 1)
    assert table.rows["all answerable"]["abstained while right"] == pytest.approx(
        np.mean(p[right] < threshold)
    )
    expected = auroc(p[right | never_fit], right[right | never_fit].astype(int))
    assert table.auroc["probe"] == pytest.approx(expected)
    if artifact.metadata.position != "prompt_last":
        assert "prompt_last probe" in table.auroc


def test_run_outputs_show_the_table_in_report_headline_and_metrics(store, tmp_path):
    import json

    from probes.evaluation.outputs import write_run_outputs
    from probes.training import evaluate_probe

    spec = TrainSpec(n_folds=3, n_bootstrap=20, select="cv")
    result = train_probe(store, LogisticProbe(), PlattCalibrator(), spec, seed=0)
    table, methods, data, mask = evaluate_probe(result.artifact, store, PlattCalibrator(), spec, "test")
    gap = measure_refusal_gap(result.artifact, store, 0.5)
    extra = {**result.outputs(), "refusal_gap": gap}
    report, headline = write_run_outputs(tmp_path, "gap run", table, methods, data, mask, spec, None, extra)
    assert gap.markdown() in headline and gap.markdown() in report.read_text(encoding="utf-8")
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["refusal_gap"]
    assert saved["rows"]["unanswerable"]["n"] == N_UNANSWERABLE and saved["threshold"] == 0.5
