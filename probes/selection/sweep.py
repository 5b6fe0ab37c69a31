"""Layer x position sweep: which capture site carries the most signal about correctness?

For every (layer, position), fit a probe on the TRAINING split only and score AUROC on each held-out CV
fold carved from it (never the calibration or test split). The best site has the highest mean fold AUROC.

Speed: by default (`probe_factory=None`) every site uses one fast fixed-C logistic regression
(standardization + L2, class-balanced; `sweep_C`) whose folds are solved together by
`probes.estimators.logistic_fold_fit`. Only the final probe at the chosen site is fit with its regularization
chosen by cross-validation (LogisticProbe(C=None)). Pass `probe_factory` (a no-argument callable returning
any estimator with fit/decision_function) to sweep with another probe, one fit per fold (slower).
Standardization in the fast path uses all training-split rows of the site: it uses no labels, so no
label information leaks into the held-out folds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from threadpoolctl import threadpool_limits

from probecal.files import atomic_write_text
from probes.estimators import logistic_fold_fit, standardize_stats
from probes.evaluation.metrics import auroc

SWEEP_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SweepRow:
    layer: int
    position: str
    auroc_mean: float
    auroc_std: float  # spread across CV folds
    fold_aurocs: tuple[float, ...]


@dataclass
class SweepResult:
    rows: list[SweepRow]
    best_layer: int
    best_position: str
    n_folds: int
    probe: str  # what was fit per site, e.g. "fast_logistic(C=0.01)"
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def best_row(self) -> SweepRow:
        return next(r for r in self.rows if (r.layer, r.position) == (self.best_layer, self.best_position))

    def table(self) -> dict[str, np.ndarray]:
        """{position: auroc_mean per layer [n_layers]} with the layers in `layers()` order, for plots."""
        layers = self.layers()
        out = {}
        for pos in dict.fromkeys(r.position for r in self.rows):
            by_layer = {r.layer: r.auroc_mean for r in self.rows if r.position == pos}
            out[pos] = np.array([by_layer.get(layer, np.nan) for layer in layers])
        return out

    def layers(self) -> list[int]:
        return sorted({r.layer for r in self.rows})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["format_version"] = SWEEP_FORMAT_VERSION
        return data

    def to_json(self, path: str | Path) -> None:
        """Write atomically (readers never see half a file)."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> SweepResult:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
            ) from None
        version = data.pop("format_version", None)
        if version != SWEEP_FORMAT_VERSION:
            raise ValueError(
                f"{path}: sweep format_version {version!r} is not supported (expected {SWEEP_FORMAT_VERSION})"
            )
        try:
            rows = [SweepRow(**{**r, "fold_aurocs": tuple(r["fold_aurocs"])}) for r in data.pop("rows")]
            return cls(rows=rows, **data)
        except (TypeError, KeyError) as err:
            raise ValueError(f"{path}: not a sweep result: {err}") from None


def cv_masks(y01: np.ndarray, n_folds: int, seed: int, categories=None, groups=None) -> np.ndarray:
    """Training-row masks [n_folds, n] for stratified CV. Stratifies on label x category when categories are
    given (every fold sees every category's mix), and keeps each group in one fold when groups are given."""
    strata = y01.astype(str)
    if categories is not None:
        strata = np.char.add(np.char.add(np.asarray(categories).astype(str), "|"), strata)
    counts = np.unique(strata, return_counts=True)[1]
    if counts.min() < n_folds:  # a rare stratum cannot be spread over the folds: stratify on the label only
        strata = y01.astype(str)
    if np.bincount(y01, minlength=2).min() < n_folds:
        raise ValueError(
            f"n_folds={n_folds} but one class has only {np.bincount(y01, minlength=2).min()} examples"
        )
    if groups is not None:
        splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(y01)), strata, groups)
    else:
        splits = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y01)), strata)
    masks = np.zeros((n_folds, len(y01)), dtype=bool)
    for f, (train, _) in enumerate(splits):
        masks[f, train] = True
    return masks


def sweep(
    features: Callable[[int, str], np.ndarray],
    y,
    layers: Sequence[int],
    positions: Sequence[str],
    probe_factory: Callable[[], object] | None = None,
    n_folds: int = 5,
    seed: int = 0,
    categories=None,
    groups=None,
    sweep_C: float = 0.01,
    progress: Callable[[int, str, float], None] | None = None,
    blas_threads: int | None = 1,
) -> SweepResult:
    """AUROC per (layer, position) across CV folds of the training split.

    features(layer, position) -> X [n, hidden]: the training split's activations at that site, rows
    aligned with y [n] (1 = correct). categories [n] / groups [n]: optional stratification / grouping.
    progress(layer, position, auroc_mean) is called after each site.
    blas_threads: BLAS threads while sweeping (None = leave the process setting alone). The per-site
    problems are small, and on a shared machine extra BLAS threads oversubscribe the cores: on this 2-core
    machine with other jobs running, the full sweep took ~23 s with 1 thread and 70-200 s with 2.
    """
    y01 = np.asarray(y)
    if not np.all(np.isin(y01, (0, 1))):
        raise ValueError("y must hold 0 (wrong) / 1 (correct)")
    y01 = y01.astype(np.int64)
    if not layers or not positions:
        raise ValueError("sweep needs at least one layer and one position")
    masks = cv_masks(y01, n_folds, seed, categories, groups)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _sweep_sites(features, y01, layers, positions, probe_factory, masks, sweep_C, progress)


def _sweep_sites(features, y01, layers, positions, probe_factory, masks, sweep_C, progress) -> SweepResult:
    n_folds = len(masks)
    start = time.perf_counter()
    rows = []
    for layer in layers:
        for position in positions:
            X = np.asarray(features(layer, position))
            if X.ndim != 2 or X.shape[0] != len(y01):
                raise ValueError(
                    f"features({layer}, {position!r}) returned shape {X.shape}; expected [{len(y01)}, hidden]"
                )
            scores = _fold_scores(X, y01, masks, probe_factory, sweep_C)
            fold_aurocs = tuple(auroc(scores[f], y01[~masks[f]]) for f in range(n_folds))
            row = SweepRow(
                int(layer),
                str(position),
                float(np.nanmean(fold_aurocs)),
                float(np.nanstd(fold_aurocs)),
                fold_aurocs,
            )
            rows.append(row)
            if progress:
                progress(row.layer, row.position, row.auroc_mean)
    best = max(rows, key=lambda r: (np.nan_to_num(r.auroc_mean, nan=-1.0), -r.auroc_std))
    name = f"fast_logistic(C={sweep_C:g})" if probe_factory is None else type(probe_factory()).__name__
    return SweepResult(rows, best.layer, best.position, n_folds, name, time.perf_counter() - start)


def _fold_scores(X, y01, masks, probe_factory, sweep_C) -> list[np.ndarray]:
    """Held-out decision scores for each fold: list of [n_held_out_f]."""
    if probe_factory is None:
        # float32 activations stay float32 (the solver's products run at float32 speed)
        dtype = np.float32 if X.dtype == np.float32 else np.float64
        mean, scale = standardize_stats(X.astype(np.float64, copy=False))
        Z = ((X - mean) / scale).astype(dtype, copy=False)
        coef, intercept, _ = logistic_fold_fit(Z, y01, masks, sweep_C, "balanced", tol=1e-3, max_iter=200)
        return [Z[~masks[f]] @ coef[f] + intercept[f] for f in range(len(masks))]
    scores = []
    for mask in masks:
        probe = probe_factory().fit(X[mask], y01[mask])
        scores.append(probe.decision_function(X[~mask]))
    return scores
