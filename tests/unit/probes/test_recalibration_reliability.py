"""Recalibration refuses what would write a wrong probe silently: rows scored by another artifact, a
calibrator that reverses the probe's direction, an output directory holding an artifact, a held-out share
outside (0, 1)."""

import json

import pytest
from scipy.special import expit

from probes.artifact import ProbeArtifact
from probes.recalibration import lineage_digests, make_rows, read_feedback_rows, recalibrate
from probes.serving.feedback import FeedbackStore
from tests.factories import record_labelled_responses
from tests.unit.probes.test_recalibration import new_domain, parent_artifact


def serve_rows(store: FeedbackStore, n: int, seed: int, digest: str | None, sign: float = 1.0) -> None:
    """n labelled responses scored by artifact `digest`; sign -1 = a negated copy of the probe (its score
    is minus the parent's, the labels are the same answers')."""
    s, y, _ = new_domain(n, seed, a=1.5, b=0.0)
    record_labelled_responses(store, seed, expit(sign * s), sign * s, y, threshold=0.7, artifact=digest)


def test_feedback_rows_keep_only_the_parents_lineage_and_count_the_dropped(tmp_path):
    parent = parent_artifact()
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    serve_rows(store, 200, seed=1, digest="e" * 64, sign=-1.0)  # a negated copy of the probe
    serve_rows(store, 120, seed=2, digest=parent.digest)
    serve_rows(store, 30, seed=3, digest=None)  # no digest recorded: cannot be trusted either
    store.close()
    rows = read_feedback_rows(db, 2, "answer_last", lineage_digests(parent))
    assert len(rows) == 120 and all(i.startswith("r2-") for i in rows.ids)
    assert "230 labelled rows scored by other artifacts dropped" in rows.source
    assert rows.parent_p is not None  # all scored by the parent itself: its recorded p is the parent's
    child = recalibrate(parent, rows, n_bootstrap=50).artifact
    # rows of the child's parent carry the same raw score: kept, but the parent's p is recomputed
    lineage = read_feedback_rows(db, 2, "answer_last", lineage_digests(child))
    assert len(lineage) == 120 and lineage.parent_p is None
    with pytest.raises(
        ValueError, match=r"no labelled responses at layer 2 / answer_last scored by artifact"
    ):
        read_feedback_rows(db, 2, "answer_last", ["0" * 64])


def test_a_calibrator_that_reverses_the_probe_is_refused():
    parent = parent_artifact()
    s, y, d = new_domain(300, seed=4, a=1.5, b=0.0)
    result = recalibrate(parent, make_rows(-s, y, d), n_bootstrap=50)  # scores of a negated probe
    assert not result.accepted and result.artifact is None
    assert "reverses the probe's direction (a_ = -" in result.reason
    per_domain = recalibrate(parent, make_rows(-s, y, d), kind="per_domain", n_bootstrap=50)
    assert not per_domain.accepted and "reverses the probe's direction" in per_domain.reason
    assert recalibrate(parent, make_rows(s, y, d), n_bootstrap=50).accepted


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2])
def test_heldout_fraction_outside_0_1_is_a_clear_error(fraction):
    s, y, d = new_domain(300, seed=5)
    with pytest.raises(ValueError, match=rf"heldout_fraction={fraction!r} must be strictly between 0 and 1"):
        recalibrate(parent_artifact(), make_rows(s, y, d), heldout_fraction=fraction)


def _cli(args, monkeypatch):
    from probes.cli import main as cli

    monkeypatch.setattr("sys.argv", ["probecal"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["recalibrate", *args])
    return exit_info.value.code


def test_cli_refuses_an_output_dir_holding_an_artifact_and_a_bad_heldout_fraction(
    tmp_path, monkeypatch, capsys
):
    parent_dir = parent_artifact().save(tmp_path / "parent")
    before = (parent_dir / "probe.json").read_bytes()
    s, y, _ = new_domain(120, seed=6)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"id": i, "score": s[i], "correct": int(y[i])}) + "\n" for i in range(120))
    )
    other = parent_artifact().save(tmp_path / "other")
    for output, says in (
        (parent_dir, "is the parent artifact's directory"),
        (other, "already holds an artifact"),
    ):
        code = _cli(
            [f"recalibrate.probe_dir={parent_dir}", f"recalibrate.rows={rows}", f"recalibrate.output_dir={output}",
             f"hydra.run.dir={tmp_path / 'run'}", "train.n_bootstrap=20"],
            monkeypatch,
        )  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err
    assert (parent_dir / "probe.json").read_bytes() == before
    assert ProbeArtifact.load(parent_dir).metadata.parent is None
    for fraction in ("1", "0", "1.5"):
        code = _cli(
            [f"recalibrate.probe_dir={parent_dir}", f"recalibrate.rows={rows}",
             f"recalibrate.heldout_fraction={fraction}", f"hydra.run.dir={tmp_path / 'run3'}"],
            monkeypatch,
        )  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "must be strictly between 0 and 1" in err and "Traceback" not in err


def test_a_null_domain_is_no_domain(tmp_path):
    from probes.recalibration import read_rows_file

    s, y, _ = new_domain(4, seed=7)
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"id": i, "score": s[i], "correct": int(y[i]), "domain": [None, "law", None, "med"][i]}
            )
            + "\n"
            for i in range(4)
        )
    )
    rows = read_rows_file(path, parent_artifact())
    assert rows.domain.tolist() == ["", "law", "", "med"]
    assert make_rows([0.1, 0.2], [0, 1], [None, "x"]).domain.tolist() == ["", "x"]
