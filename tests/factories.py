"""Shared test objects: a small fitted probe artifact for a given model fingerprint and capture site."""

from __future__ import annotations

import numpy as np

from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator
from probes.estimators import LogisticProbe


def fitted_artifact(fingerprint, layer: int, position: str, *, n: int = 80, seed: int = 0, **metadata):
    """A logistic probe + Platt calibrator fit on random rows of the model's hidden size (label: the first
    feature plus noise), created at (layer, position) for `fingerprint`; `metadata` as ProbeArtifact.create
    takes it (thresholds, extract_settings, novelty, ...)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, fingerprint.hidden_size))
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    probe = LogisticProbe(C=1.0).fit(X, y)
    calibrator = PlattCalibrator().fit(probe.decision_function(X), y)
    return ProbeArtifact.create(probe, calibrator, layer, position, fingerprint, **metadata)


def record_labelled_responses(
    store, prefix, p_correct, score, labels, *, layer=2, threshold=None, n_labelled=None, **fields
) -> None:
    """Served responses `r{prefix}-{i}` (completions at `layer` / answer_last, scored `score[i]` with
    P(correct) `p_correct[i]`) in a FeedbackStore, and the first `n_labelled` (default: all) labelled
    `labels[i]`. fields: ResponseRecord's keyword fields, each one value for every row or one per row."""
    from probes.serving.feedback import ResponseRecord

    def row_value(value, i):
        return value[i] if isinstance(value, list | tuple | np.ndarray) else value

    store.record_responses(
        [
            ResponseRecord(
                f"r{prefix}-{i}",
                "completions",
                "tiny",
                None,
                None,
                float(p_correct[i]),
                float(score[i]),
                layer,
                "answer_last",
                False,
                threshold,
                "stop",
                1000.0 + i,
                **{name: row_value(value, i) for name, value in fields.items()},
            )  # fmt: skip
            for i in range(len(score))
        ]
    )
    for i in range(len(score) if n_labelled is None else n_labelled):
        store.record_feedback(f"r{prefix}-{i}", bool(labels[i]))
