"""label_queue / `probecal label-queue`: on a synthetic feedback database the queue balances labels across
domains (the least labelled first, an assigned cluster domain included), takes the answers nearest the
threshold inside a domain, skips labelled, abstained and other-site rows."""

import json

import numpy as np
import pytest

from probes.recalibration import label_queue
from probes.serving.feedback import FeedbackStore, ResponseRecord
from tests.unit.probes.test_recalibration import parent_artifact  # threshold 0.7 at layer 2 / answer_last


def served(store, rid, p, domain, layer=2, abstained=False):
    store.record_responses(
        [
            ResponseRecord(
                rid, "completions", "tiny", f"q {rid}", f"a {rid}", p, 0.0, layer, "answer_last", abstained, 0.7,
                "stop", 1000.0, domain=domain,
            )
        ]
    )  # fmt: skip


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "feedback.db"
    store = FeedbackStore(path)
    for i, p in enumerate(np.linspace(0.05, 0.95, 10)):  # "law": 10 served, 6 labelled
        served(store, f"law-{i}", float(p), "law")
        if i < 6:
            store.record_feedback(f"law-{i}", True)
    for i, p in enumerate([0.2, 0.69, 0.95, 0.55]):  # "cluster-1": assigned by the server, never labelled
        served(store, f"c1-{i}", p, "cluster-1")
    served(store, "med-0", 0.71, "med")
    store.record_feedback("med-0", False)
    served(store, "med-1", 0.72, "med", abstained=True)  # its text is the abstention message: not labellable
    served(store, "med-2", 0.1, "med")
    served(store, "far-0", 0.7, "med", layer=5)  # another capture site
    store.close()
    return path


def test_queue_balances_domains_then_takes_the_answers_nearest_the_threshold(db):
    queue = label_queue(db, parent_artifact(), limit=7)
    ids = [q.id for q in queue]
    # cluster-1 (0 labels) first, nearest 0.7 first (0.69); then cluster-1 and med tie at 1 label (by name:
    # cluster-1, 0.55); then med (1 < 2); med has nothing left, so cluster-1 until it has law's count
    assert ids[:5] == ["c1-1", "c1-3", "med-2", "c1-2", "c1-0"]
    assert "med-1" not in ids and "far-0" not in ids and not {"law-0", "law-5"} & set(ids)
    domains = [q.domain for q in queue]
    # law (6 labels) waits for the others; then its answers nearest 0.7 (0.65 and 0.75)
    assert domains.count("cluster-1") == 4 and domains.count("med") == 1
    assert domains[-2:] == ["law", "law"] and set(ids[-2:]) == {"law-6", "law-7"}
    assert (
        queue[0].prompt == "q c1-1" and "0 labels" in queue[0].reason and "the threshold" in queue[0].reason
    )
    assert (
        len(label_queue(db, parent_artifact(), limit=100)) == 9
    )  # every unlabelled answered row (4 + 4 + 1), once


def test_cli_label_queue_writes_the_queue(db, tmp_path, monkeypatch, capsys):
    from probes.cli import main as cli

    monkeypatch.setattr("sys.argv", ["probecal"])
    parent_dir = parent_artifact().save(tmp_path / "parent")
    run = tmp_path / "run"
    cli.main(
        [
            "label-queue",
            f"evaluate.probe_dir={parent_dir}",
            f"label_queue.from_feedback={db}",
            "label_queue.limit=3",
            f"hydra.run.dir={run}",
        ]
    )
    lines = [json.loads(line) for line in (run / "label_queue.jsonl").read_text().splitlines()]
    assert [row["id"] for row in lines] == ["c1-1", "c1-3", "med-2"]
    assert "| 1 | c1-1 | cluster-1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["label-queue", f"evaluate.probe_dir={parent_dir}", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert "label_queue.from_feedback" in capsys.readouterr().err
