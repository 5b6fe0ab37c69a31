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
