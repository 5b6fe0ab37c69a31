"""Novelty: how far a question lies from what the probe was trained on, with every answer.

A probe's P(correct) is calibrated on the question forms it was trained and calibrated on; on a new form its
ranking mostly transfers but its calibration does not (a per-domain offset). Novelty says when that has
happened, per answer, so a serving team knows which probabilities are unverified.

The statistic: the prompt's last-token hidden state at the probe's layer (`prompt_last`, known before the
answer is written; the forward that scores an answer computes it anyway), standardized with the training
rows' per-feature mean and scale, and its distance OUTSIDE the training rows' top `n_components` principal
directions (the PCA reconstruction residual). Measured leave-one-domain-out on the default SmolLM2 store
(benchmarks/bench_novelty.py), it separates held-out-domain questions from in-domain test questions far
better than a Mahalanobis distance inside the subspace or the answer's own state (docs/results.md).

Scale: `novelty = residual / cutoff_`, where `cutoff_` is the `quantile` (0.95) of the residuals of held-out
in-domain rows (the calibration split at training time). So 1.0 is the cut-off, `in_domain = novelty <= 1`;
about 5% of in-domain questions read above 1, and a value of 2 is twice as far as that.
Higher = more novel. What to do with a novel answer: its p_correct is unverified for this kind of question:
label a few such answers (20 per domain suffice for `probecal recalibrate` with the shrinkage calibrator)
and recalibrate.

Numpy only (fit and score): ProbeScorer uses it next to an engine with no scikit-learn installed.
"""

from __future__ import annotations

import numpy as np

NOVELTY_POSITION = "prompt_last"
TENSOR_NAMES = ("mean", "scale", "components")


class NoveltyModel:
    """PCA-residual novelty of hidden states (see the module docstring). Higher = farther from training.

    n_components: principal directions of the training rows kept as "known" (k; at most half the hidden size
    and n - 1); quantile: the share of
    held-out in-domain rows that read novelty <= 1. Learned: mean_, scale_ [hidden], components_ [k, hidden],
    cutoff_ (the residual at `quantile`).
    """

    def __init__(self, n_components: int = 32, quantile: float = 0.95):
        self.n_components = n_components
        self.quantile = quantile

    def get_params(self) -> dict[str, float | int]:
        return {"n_components": self.n_components, "quantile": self.quantile}

    def fit(self, X, X_cutoff=None) -> NoveltyModel:
        """X [n, hidden]: training rows. X_cutoff [m, hidden]: held-out rows of the same domains that set the
        cut-off (default: X itself, whose residuals are optimistic: they were fit)."""
        if not (isinstance(self.n_components, int) and self.n_components >= 1):
            raise ValueError(f"n_components={self.n_components!r}; allowed: an integer >= 1")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile={self.quantile!r}; allowed: a number in (0, 1)")
        X = _rows(X, "X")
        if len(X) < 2:
            raise ValueError(f"a novelty model needs at least 2 rows; got {len(X)}")
        self.mean_ = X.mean(0)
        self.scale_ = X.std(0) + 1e-6
        Z = (X - self.mean_) / self.scale_
        _, _, vt = np.linalg.svd(Z, full_matrices=False)
        # at most half the width (and n - 1): the residual needs directions left outside the subspace
        k = max(1, min(self.n_components, X.shape[1] // 2, len(X) - 1))
        self.components_ = vt[:k].astype(np.float64)
        reference = X if X_cutoff is None else _rows(X_cutoff, "X_cutoff")
        self.cutoff_ = float(np.quantile(self._residual(reference), self.quantile))
        if not self.cutoff_ > 0:
            raise ValueError("every reference row lies inside the principal subspace: novelty is undefined")
        return self

    def _residual(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean_) / self.scale_
        return np.linalg.norm(Z - (Z @ self.components_.T) @ self.components_, axis=1)

    def score(self, X) -> np.ndarray:
        """[n, hidden] -> novelty [n] (1.0 = the cut-off)."""
        if not hasattr(self, "cutoff_"):
            raise RuntimeError("this NoveltyModel is not fitted yet: call fit first")
        X = _rows(X, "X")
        if X.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"expected vectors of size {self.mean_.shape[0]}; got {X.shape[1]}")
        return self._residual(X) / self.cutoff_

    @staticmethod
    def in_domain(novelty) -> np.ndarray:
        """The documented cut-off: novelty <= 1."""
        return np.asarray(novelty) <= 1.0

    # -- artifact ----------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(getattr(self, f"{name}_"), dtype=np.float32) for name in TENSOR_NAMES}

    def settings(self) -> dict[str, float | int]:
        return {**self.get_params(), "cutoff": self.cutoff_}

    @classmethod
    def from_tensors(cls, settings: dict, tensors: dict[str, np.ndarray]) -> NoveltyModel:
        missing = [name for name in TENSOR_NAMES if name not in tensors]
        if missing:
            raise ValueError(f"novelty tensors missing: {missing}")
        model = cls(int(settings["n_components"]), float(settings["quantile"]))
        for name in TENSOR_NAMES:
            setattr(model, f"{name}_", np.asarray(tensors[name], dtype=np.float64))
        model.cutoff_ = float(settings["cutoff"])
        return model


def _rows(X, name: str) -> np.ndarray:
    if hasattr(X, "detach"):  # torch tensor
        X = X.detach().float().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be [n, hidden]; got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} contains nan or inf")
    return X
