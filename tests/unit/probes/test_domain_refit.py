"""Issue #20, part 2's refit: the server stores each response's prompt state (feedback schema 3, float16), and
`recalibrate.refit_domains=K` refits the domain clusters on the untagged served traffic: the child's clusters
follow a shift in that traffic, its per-domain calibration uses the reassigned domains, the refit is seeded,
round-trips through the artifact and changes the digest; client tags are never reassigned."""

import sqlite3

import numpy as np
import pytest
from scipy.special import expit

from probes.artifact import ProbeArtifact
from probes.calibration import ShrinkageCalibrator
from probes.domains import decode_state, encode_state, fit_domain_clusters, purity
from probes.recalibration import (
    NotEnoughRows,
    read_feedback_rows,
    read_served_prompts,
    recalibrate,
    refit_domains,
)
from probes.serving.feedback import SCHEMA_VERSION, FeedbackStore, ResponseRecord
from tests.factories import record_labelled_responses
from tests.unit.probes.test_recalibration import parent_artifact, platt

STATE = 24  # width of the prompt states (another space than the probe's input, as a real model's could be)
TRAINING_SPLIT, SERVED_SPLIT = slice(0, 6), slice(6, 12)  # the axes the training / served questions split on


def blobs(n_per_blob: int, axes: slice, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two groups of prompt states at +-4 along `axes` (unit noise), all moved by `shift` along the training
    split's axes: states [2n, STATE], group [2n]."""
    rng = np.random.default_rng(seed)
    group = np.repeat([0, 1], n_per_blob)
    states = rng.normal(size=(2 * n_per_blob, STATE))
    states[:, axes] += np.where(group == 0, 4.0, -4.0)[:, None]
    states[:, TRAINING_SPLIT] += shift
    return states.astype(np.float32), group


def parent_with_clusters() -> ProbeArtifact:
    """Platt parent whose 2 clusters were fit on training questions that split along axis 0."""
    train_states, _ = blobs(50, TRAINING_SPLIT, seed=0)
    return parent_artifact(platt(0.8, -0.6)).with_domains(fit_domain_clusters(train_states, 2, seed=0))


def serve(db, parent: ProbeArtifact, states, group, tags=None, seed=1) -> None:
    """Untagged (or tagged) served responses with their prompt states; group 0 is right far more often
    than the parent says, group 1 wrong far more often; every response is labelled."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, 1.0, len(states))
    p_true = expit(0.8 * s - 0.6 + np.where(group == 0, 2.5, -2.5))
    y = rng.random(len(s)) < p_true
    assigned = parent.domains.assign(states)
    p_parent = parent.calibrator.predict(s, categories=assigned)
    store = FeedbackStore(db)
    record_labelled_responses(
        store,
        seed,
        p_parent,
        s,
        y,
        domain=list(tags) if tags is not None else [str(d) for d in assigned],
        artifact=parent.digest,
        domain_assigned=tags is None,
        prompt_state=states,
    )
    store.close()


def test_prompt_state_is_stored_as_float16_and_an_old_database_migrates(tmp_path):
    state = np.linspace(-3, 3, 576).astype(np.float32)
    assert len(encode_state(state)) == 2 * 576  # 1,152 bytes per SmolLM2-135M response
    np.testing.assert_allclose(decode_state(encode_state(state)), state, atol=2e-3)
    db = tmp_path / "v2.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE responses (id TEXT PRIMARY KEY, created REAL NOT NULL, endpoint TEXT NOT NULL,
            model TEXT NOT NULL, prompt TEXT, text TEXT, p_correct REAL NOT NULL, score REAL NOT NULL,
            layer INTEGER NOT NULL, position TEXT NOT NULL, abstained INTEGER NOT NULL, threshold REAL,
            finish_reason TEXT NOT NULL, correct INTEGER, label_seq INTEGER, domain TEXT, artifact TEXT);
        INSERT INTO responses VALUES ('old', 1.0, 'completions', 'm', NULL, NULL, 0.7, 0.8, 2, 'answer_last', 0,
            NULL, 'stop', NULL, NULL, 'cluster-1', 'd');
        PRAGMA user_version=2;
    """)
    conn.close()
    store = FeedbackStore(db)
    old, _ = store.get_response("old")
    assert old.prompt_state is None and old.domain_assigned is False and old.domain == "cluster-1"
    store.record_responses(
        [
            ResponseRecord(
                "new", "completions", "m", None, None, 0.5, 0.1, 2, "answer_last", False, None, "stop", 2.0,
                domain="cluster-0", domain_assigned=True, prompt_state=state[:STATE],
            )
        ]
    )  # fmt: skip
    new, _ = store.get_response("new")
    np.testing.assert_allclose(new.prompt_state, state[:STATE], atol=2e-3)
    assert new.domain_assigned is True
    store.close()
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    served = read_served_prompts(db, 2, "answer_last")
    assert served.ids.tolist() == ["old", "new"] and served.stored.tolist() == [False, True]
    assert served.tagged.tolist() == [False, False]  # a pre-3 'cluster-<i>' was the server's, not a tag


def test_refit_clusters_follow_the_served_traffic_and_recalibrate_by_them(tmp_path):
    parent = parent_with_clusters()
    # the served questions all lie on one side of the training split and split along another axis
    states, group = blobs(40, SERVED_SPLIT, seed=2, shift=8.0)
    db = tmp_path / "feedback.sqlite"
    serve(db, parent, states, group)
    rows = read_feedback_rows(db, 2, "answer_last", [parent.digest])
    served = read_served_prompts(db, 2, "answer_last", [parent.digest])
    assert set(rows.domain) == {parent.domains.names[parent.domains.nearest([[8.0] * 6 + [0.0] * 18])[0]]}
    assert purity(rows.domain, group) == 0.5  # the parent's clusters put all of it in one cluster

    refit_rows, refit = refit_domains(parent, rows, served, 2, seed=0)
    assert purity(refit_rows.domain, group) == 1.0 and len(refit_rows) == len(rows)
    assert refit.record["n_prompts"] == 80 and refit.record["n_reassigned"] == 80
    again_rows, again = refit_domains(parent, rows, served, 2, seed=0)  # seeded: the same clusters
    np.testing.assert_array_equal(again.clusters.centroids, refit.clusters.centroids)
    assert again_rows.domain.tolist() == refit_rows.domain.tolist()

    child = recalibrate(parent, refit_rows, kind="shrinkage", n_bootstrap=100, refit=refit)
    assert child.accepted, child.reason
    right = refit_rows.domain[group == 0][0]  # the cluster holding the often-right group
    wrong = refit_rows.domain[group == 1][0]
    offsets = child.artifact.calibrator.offsets_
    assert offsets[right] > 1.0 and offsets[wrong] < -1.0
    assert child.record["domain_refit"] == refit.record

    saved = ProbeArtifact.load(child.artifact.save(tmp_path / "child"))
    np.testing.assert_allclose(saved.domains.centroids, refit.clusters.centroids)
    new_states, new_group = blobs(30, SERVED_SPLIT, seed=7, shift=8.0)  # fresh traffic of the shifted kind
    assert purity(saved.domains.assign(new_states), new_group) == 1.0
    assert saved.digest == child.artifact.digest
    kept = recalibrate(parent, rows, kind="shrinkage", n_bootstrap=100)  # same rows, the parent's clusters
    assert kept.artifact.domains is parent.domains and kept.artifact.digest != saved.digest


def test_client_tags_are_kept_and_rows_without_a_state_are_dropped(tmp_path):
    parent = parent_with_clusters()
    db = tmp_path / "feedback.sqlite"
    states, group = blobs(10, SERVED_SPLIT, seed=3)
    serve(db, parent, states, group)
    serve(db, parent, *blobs(5, SERVED_SPLIT, seed=4), tags=["med"] * 10, seed=5)
    store = FeedbackStore(db)  # an untagged labelled response of before schema 3: no state
    store.record_responses(
        [ResponseRecord("x", "completions", "m", None, None, 0.5, 0.0, 2, "answer_last", False, None, "stop",
                        3.0, domain="cluster-0", artifact=parent.digest, domain_assigned=True)]
    )  # fmt: skip
    store.record_feedback("x", True)
    store.close()
    rows = read_feedback_rows(db, 2, "answer_last", [parent.digest])
    served = read_served_prompts(db, 2, "answer_last", [parent.digest])
    refit_rows, refit = refit_domains(parent, rows, served, 2, seed=0)
    assert refit.record["n_prompts"] == 20 and refit.record["n_dropped"] == 1  # tagged prompts not fit on
    assert "x" not in refit_rows.ids and (refit_rows.domain == "med").sum() == 10
    assert "1 untagged rows without a stored state dropped" in refit_rows.source
    with pytest.raises(NotEnoughRows, match="only 20 untagged served responses"):
        refit_domains(parent, rows, served, 21, seed=0)


def test_cli_refit_domains(tmp_path, monkeypatch, capsys):
    from probes.cli import main as cli

    monkeypatch.setattr("sys.argv", ["probecal"])
    parent = parent_with_clusters()
    parent_dir = parent.save(tmp_path / "parent")
    db = tmp_path / "feedback.sqlite"
    serve(db, ProbeArtifact.load(parent_dir), *blobs(30, SERVED_SPLIT, seed=2))
    args = [
        "recalibrate",
        f"recalibrate.probe_dir={parent_dir}",
        f"recalibrate.from_feedback={db}",
        "recalibrate.kind=shrinkage",
        "recalibrate.refit_domains=2",
        "train.n_bootstrap=50",
    ]
    cli.main([*args, f"hydra.run.dir={tmp_path / 'run'}"])
    child = ProbeArtifact.load(tmp_path / "run" / "probe")
    assert child.metadata.parent["recalibration"]["domain_refit"]["n_clusters"] == 2
    assert not np.allclose(child.domains.centroids, parent.domains.centroids)
    with pytest.raises(SystemExit):
        cli.main(["recalibrate", f"recalibrate.probe_dir={parent_dir}", "recalibrate.rows=x.jsonl",
                  "recalibrate.refit_domains=2", f"hydra.run.dir={tmp_path / 'run2'}"])  # fmt: skip
    assert "it needs recalibrate.from_feedback" in capsys.readouterr().err


def test_refit_needs_a_schema_3_database(tmp_path):
    db = tmp_path / "v2.sqlite"
    sqlite3.connect(db).executescript(
        "CREATE TABLE responses (id TEXT, layer INTEGER, position TEXT); PRAGMA user_version=2;"
    )
    with pytest.raises(ValueError, match="stores no prompt states"):
        read_served_prompts(db, 2, "answer_last")


def test_refit_rows_keep_the_parents_p_under_the_old_cluster_names(tmp_path):
    """A parent whose calibrator has offsets for ITS cluster-0 / cluster-1: rows scored by its lineage (p not
    carried) get the parent's p computed with the old names, not with the refit's new ones."""
    calibrator = ShrinkageCalibrator(tau=1.0).fit(np.zeros(4), [0, 1, 0, 1], prior=platt(0.8, -0.6))
    calibrator.offsets_, calibrator.counts_ = (
        {"cluster-0": 2.0, "cluster-1": -2.0},
        {"cluster-0": 9, "cluster-1": 9},
    )
    parent = parent_artifact(calibrator).with_domains(parent_with_clusters().domains)
    db = tmp_path / "feedback.sqlite"
    serve(db, parent, *blobs(20, SERVED_SPLIT, seed=2, shift=8.0))
    recorded = read_feedback_rows(db, 2, "answer_last", [parent.digest]).parent_p
    rows = read_feedback_rows(db, 2, "answer_last", ["f" * 64, parent.digest])  # a child's view: rescored
    assert rows.parent_p is None
    served = read_served_prompts(db, 2, "answer_last")
    refit_rows, _ = refit_domains(parent, rows, served, 2, seed=0)
    assert set(refit_rows.domain) == {"cluster-0", "cluster-1"}  # the new names, on other clusters
    np.testing.assert_allclose(refit_rows.parent_p, recorded, rtol=1e-9)
