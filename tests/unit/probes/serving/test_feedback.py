"""FeedbackStore (SQLite responses + labels) and the rolling calibration numbers behind /metrics."""

import math
import sqlite3

import numpy as np
import pytest

from probes.serving.feedback import FeedbackStore, ResponseRecord, UnknownResponseError, calibration_stats

# 5 equal-width bins: bin 0 gets 0.05, 0.15, 0.15 (1 of 3 correct), bin 4 gets 0.85, 0.95, 1.0 (2 of 3).
P = [0.05, 0.15, 0.15, 0.85, 0.95, 1.0]
Y = [False, False, True, True, True, False]
# ECE = 3/6 * |1/3 - 0.35/3| + 3/6 * |2/3 - 2.8/3| = (0.65 + 0.8) / 6
ECE = 1.45 / 6


def record(rid: str, p: float, **kw) -> ResponseRecord:
    fields = dict(
        id=rid,
        endpoint="completions",
        model="m",
        prompt='"q"',
        text="a",
        p_correct=p,
        score=0.0,
        layer=2,
        position="prompt_last",
        abstained=False,
        threshold=None,
        finish_reason="stop",
        created=1.0,
    )
    fields.update(kw)
    return ResponseRecord(**fields)


def test_calibration_stats_hand_computed():
    stats = calibration_stats(P, Y, n_bins=5)
    assert stats.labelled == 6
    assert stats.accuracy == pytest.approx(0.5)
    assert stats.mean_confidence == pytest.approx(3.15 / 6)
    assert stats.ece == pytest.approx(ECE)
    assert [b.count for b in stats.bins] == [3, 0, 0, 0, 3]
    assert stats.bins[0].accuracy == pytest.approx(1 / 3) and stats.bins[4].accuracy == pytest.approx(2 / 3)
    assert stats.bins[0].mean_confidence == pytest.approx(0.35 / 3)
    assert math.isnan(stats.bins[2].accuracy)  # empty bin: no accuracy, not 0
    assert (stats.bins[4].lower, stats.bins[4].upper) == (0.8, 1.0)


def test_calibration_stats_edges():
    # bin edges: 0.2 opens bin 1, 1.0 closes the last bin
    assert [b.count for b in calibration_stats([0.0, 0.2, 0.3999, 1.0], [True] * 4, n_bins=5).bins] == [
        1,
        2,
        0,
        0,
        1,
    ]
    assert calibration_stats([1.0, 1.0], [True, True], 10).ece == 0.0  # all correct, fully confident
    assert calibration_stats([0.0, 0.0], [False, False], 10).ece == 0.0  # all wrong, zero confidence
    assert calibration_stats([0.9, 0.9], [False, False], 10).ece == pytest.approx(0.9)
    empty = calibration_stats([], [], 10)
    assert empty.labelled == 0 and math.isnan(empty.ece) and math.isnan(empty.accuracy)
    with pytest.raises(ValueError, match="n_bins"):
        calibration_stats([0.5], [True], 0)


def test_calibration_stats_matches_numpy_reference():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=500)
    y = rng.uniform(size=500) < p**2  # miscalibrated on purpose
    bins = np.minimum((p * 15).astype(int), 14)
    expected = sum(
        (bins == b).mean() * abs(y[bins == b].mean() - p[bins == b].mean())
        for b in range(15)
        if (bins == b).any()
    )
    assert calibration_stats(p.tolist(), y.tolist(), 15).ece == pytest.approx(expected, abs=1e-12)


def test_store_feedback_last_wins_and_unknown_id(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    store.record_responses([record("a", 0.9), record("b", 0.2)])
    assert store.record_feedback("a", True) is None
    assert store.record_feedback("a", False) is True  # returns the label it replaced
    with pytest.raises(UnknownResponseError):
        store.record_feedback("nope", True)
    rec, label = store.get_response("a")
    assert rec == record("a", 0.9) and label is False
    assert store.counts() == {"responses": 2, "labelled": 1, "feedback": 2}
    stats = store.calibration(window=10, n_bins=10)
    assert (stats.labelled, stats.accuracy) == (1, 0.0)
    with pytest.raises(sqlite3.IntegrityError):  # ids are unique
        store.record_responses([record("a", 0.5)])
    store.close()


def test_window_is_the_most_recently_labelled(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    store.record_responses([record(f"r{i}", p) for i, p in enumerate(P)])
    for i, y in enumerate(Y):
        store.record_feedback(f"r{i}", y)
    assert store.calibration(window=100, n_bins=5).ece == pytest.approx(ECE)
    last3 = store.calibration(window=3, n_bins=5)  # r3, r4, r5: 0.85/T, 0.95/T, 1.0/F
    assert last3.labelled == 3 and last3.accuracy == pytest.approx(2 / 3)
    assert last3.ece == pytest.approx(abs(2 - 2.8) / 3)
    store.record_feedback("r0", True)  # relabelled now: r0 enters the window, r3 leaves it
    relabelled = store.calibration(window=3, n_bins=5)
    assert [b.count for b in relabelled.bins] == [1, 0, 0, 0, 2]
    assert relabelled.accuracy == pytest.approx(2 / 3)
    store.close()


def test_store_survives_reopen_and_rejects_foreign_files(tmp_path):
    path = tmp_path / "sub" / "f.sqlite"  # parent folders are created
    store = FeedbackStore(path)
    store.record_responses([record("a", 0.7, abstained=True, threshold=0.8, text=None, prompt=None)])
    store.record_feedback("a", True)
    store.close()
    reopened = FeedbackStore(path)
    rec, label = reopened.get_response("a")
    assert rec.abstained is True and rec.threshold == 0.8 and rec.text is None and label is True
    assert reopened.counts() == {"responses": 1, "labelled": 1, "feedback": 1}
    assert reopened._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()

    newer = tmp_path / "newer.sqlite"
    conn = sqlite3.connect(newer)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("PRAGMA user_version=7")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="schema version 7"):
        FeedbackStore(newer)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        FeedbackStore(junk)


def test_calibration_stats_give_the_floor_and_smooth_ece_beside_the_ece():
    # p = 1 everywhere: labels drawn from p are all correct (floor 0); one of 40 wrong: ECE = smooth ECE = 0.025
    stats = calibration_stats([1.0] * 40, [True] * 39 + [False], 15)
    assert stats.ece_floor == 0.0 and stats.ece == pytest.approx(0.025)
    assert stats.smooth_ece == pytest.approx(0.025)
    assert 0.05 < calibration_stats([0.5] * 50, [True] * 25 + [False] * 25, 15).ece_floor < 0.1  # ~0.056
    empty = calibration_stats([], [], 10)
    assert math.isnan(empty.ece_floor) and math.isnan(empty.smooth_ece)


def test_metrics_expose_floor_and_smooth_ece_per_domain_and_artifact():
    from probes.serving.exposition import ServerMetrics

    window = calibration_stats([0.9, 0.2], [True, False], 10)
    domain = calibration_stats([1.0] * 40, [True] * 39 + [False], 15)
    text = ServerMetrics().render(
        window, {"responses": 2, "labelled": 2, "feedback": 2}, 0, 100, {"current": {"med": domain}}
    )
    assert 'probecal_calibration_domain_ece_floor{artifact="current",domain="med"} 0.0' in text
    assert 'probecal_calibration_domain_smooth_ece{artifact="current",domain="med"} 0.025' in text
