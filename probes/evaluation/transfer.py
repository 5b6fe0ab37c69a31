"""Leave-one-domain-out (LODO): how does a probe do on a domain it never saw, with no data from outside?

A *domain* is a group of related categories (facts: geography, chemistry, arithmetic, ...; user data may set
one; default = the category). For each domain D of the store: fit on the training-split rows of every OTHER
domain, calibrate on the calibration-split rows of every other domain, and score ALL rows of D (no row of D,
whatever its split, entered that fold's fit or calibration). Numbers are averaged over the held-out domains:
the within-category AUROC (ranking inside each category of D, mean over D's categories), ECE and Brier.

In-domain CV is not evidence of transfer: on new question forms the default probe fell from 0.87 to 0.69
within-category AUROC, below the model's own sequence probability. This module is what the pipeline uses both
to MEASURE transfer (the probe and every logit baseline) and to SELECT a probe by it (`score_candidates`).

Speed: every held-out domain is one "fold" of `probes.estimators.logistic_fold_fit`, so one call fits the
probe for all domains at once (one Gram matrix and one Cholesky factor per site and C). Standardization uses
the column statistics of all fit rows of the store (no labels; as in the layer sweep): a held-out domain adds
only its share of the per-feature scale, never its labels.

Logit features: `logit_feature_matrix` (defined in probes.inference, which serving shares) turns the store's
logit signals into unbounded, oriented columns (higher = more confident) that a hybrid probe reads next to the
hidden state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from probes.estimators import logistic_fold_fit, standardize_stats
from probes.evaluation.metrics import brier, ece, within_category_auroc
from probes.evaluation.tables import oriented, raw_probability
from probes.inference import PROBABILITY_FLOOR, logit_feature_matrix  # noqa: F401 (re-exported; defined once)

FEATURE_SETS = ("hidden", "hidden+logits")  # what a transfer candidate reads
CENTERINGS = ("none", "domain")  # subtract each domain's mean activation (label-free) before the probe
TRANSFER_METRICS = ("within_cat_auroc", "ece", "brier")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


# ----------------------------------------------------------------------------------------------
# The split: one fold per domain
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainFolds:
    """One fold per held-out domain. fit / calibrate / held_out: [k, n] bool row masks."""

    domains: tuple[str, ...]
    fit: np.ndarray  # rows of fit_rows outside the domain
    calibrate: np.ndarray  # rows of calibration_rows outside the domain
    held_out: np.ndarray  # every row of the domain


def domain_folds(domains, fit_rows, calibration_rows, y=None) -> DomainFolds:
    """Leave-one-domain-out masks over n rows.

    domains [n] str; fit_rows / calibration_rows [n] bool (the train / calibration split).
    y [n] (1 = correct), optional: a domain is held out only if its fold has both labels in its fit and
    calibration rows (else the fold could not be fit) and both labels among its own rows (else it has no AUROC).
    Raises ValueError when fewer than two domains can be held out.
    """
    domains = np.asarray(domains).astype(str)
    fit_rows, calibration_rows = np.asarray(fit_rows, bool), np.asarray(calibration_rows, bool)
    if not (domains.shape == fit_rows.shape == calibration_rows.shape):
        raise ValueError(f"domains {domains.shape}, fit_rows {fit_rows.shape} and calibration_rows "
                         f"{calibration_rows.shape} must have the same shape [n]")
    names, fits, calibrates, helds = [], [], [], []
    for name in np.unique(domains):
        held = domains == name
        fit, calibrate = fit_rows & ~held, calibration_rows & ~held
        if y is not None:
            y = np.asarray(y)
            if any(len(np.unique(y[m])) < 2 for m in (fit, calibrate, held)):
                continue
        names.append(str(name))
        fits.append(fit)
        calibrates.append(calibrate)
        helds.append(held)
    if len(names) < 2:
        raise ValueError(
            f"leave-one-domain-out needs at least two domains with both correct and wrong answers; the data has "
            f"{len(np.unique(domains))} domain(s) ({', '.join(map(str, np.unique(domains)[:8]))}), {len(names)} usable. "
            "Give rows a `domain` (a group of related categories) or set train.transfer=false"
        )
    return DomainFolds(tuple(names), np.array(fits), np.array(calibrates), np.array(helds))


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


def center_by_group(X: np.ndarray, groups) -> np.ndarray:
    """X [n, d] minus the mean of each row's group (no labels used): removes "which domain is this"."""
    X = np.array(X, dtype=np.float64, copy=True)
    groups = np.asarray(groups).astype(str)
    for g in np.unique(groups):
        rows = groups == g
        X[rows] -= X[rows].mean(axis=0)
    return X


def design_matrix(X: np.ndarray, logits: np.ndarray | None, features: str, logit_weight: float = 1.0,
                  stats_rows=None) -> np.ndarray:
    """Standardized [n, d (+ m)] float32 design: hidden columns, then (for "hidden+logits") the logit columns
    times `logit_weight` (a weight w divides their L2 penalty by w^2: a few strong signals among hundreds of
    hidden columns). stats_rows [n] bool: rows whose column statistics standardize (None = all)."""
    _check_choice("features", features, FEATURE_SETS)
    parts = [X]
    if features == "hidden+logits":
        if logits is None or logits.shape[1] == 0:
            raise ValueError("features='hidden+logits' needs the store's logit signals (baselines); none given")
        parts.append(logits)
    full = np.hstack(parts).astype(np.float64) if len(parts) > 1 else np.asarray(X, dtype=np.float64)
    rows = slice(None) if stats_rows is None else np.asarray(stats_rows, bool)
    mean, scale = standardize_stats(full[rows])
    Z = (full - mean) / scale
    if features == "hidden+logits":
        Z[:, X.shape[1]:] *= logit_weight
    return Z.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Selection: score candidates by the held-out-domain within-category AUROC
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A logistic-family probe: hidden state at (layer, position), optionally with logit features, fixed C."""

    layer: int
    position: str
    features: str  # one of FEATURE_SETS
    C: float

    def describe(self) -> str:
        return f"layer {self.layer} / {self.position}, {self.features}, C={self.C:g}"


@dataclass(frozen=True)
class CandidateScore:
    candidate: Candidate
    heldout_auroc: float  # mean over held-out domains of the within-category AUROC
    per_domain: dict[str, float]


@dataclass
class CandidateSearch:
    scores: list[CandidateScore]
    domains: tuple[str, ...]
    seconds: float
    settings: dict = field(default_factory=dict)

    def best(self) -> CandidateScore:
        return max(self.scores, key=lambda s: np.nan_to_num(s.heldout_auroc, nan=-1.0))

    def to_dict(self) -> dict:
        return {"domains": list(self.domains), "seconds": self.seconds, "settings": self.settings,
                "scores": [{**asdict(s.candidate), "heldout_auroc": s.heldout_auroc, "per_domain": s.per_domain}
                           for s in self.scores]}


def heldout_within_auroc(scores: np.ndarray, y, categories, folds: DomainFolds) -> dict[str, float]:
    """{domain: within-category AUROC of that fold's scores on the domain's rows}; scores [k, n]."""
    y, categories = np.asarray(y), np.asarray(categories).astype(str)
    return {d: within_category_auroc(scores[f][folds.held_out[f]], y[folds.held_out[f]],
                                     categories[folds.held_out[f]]).mean
            for f, d in enumerate(folds.domains)}


def _mean(values) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def fold_logistic_scores(Z: np.ndarray, y01: np.ndarray, fit_masks: np.ndarray, C: float, class_weight="balanced",
                         init=None, tol: float = 1e-3, max_iter: int = 200,
                         ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Decision scores [k, n] of one logistic fit per fold (all folds solved together), and the solution.
    The default tolerance is the layer sweep's: plenty to rank candidates."""
    coef, intercept, _ = logistic_fold_fit(Z, y01, fit_masks, C, class_weight, tol=tol, max_iter=max_iter, init=init)
    return (Z @ coef.T.astype(Z.dtype)).T + intercept[:, None], (coef, intercept)


def score_candidates(
    features: Callable[[int, str], np.ndarray],
    logits: np.ndarray | None,
    y,
    categories,
    folds: DomainFolds,
    layers: Sequence[int],
    positions: Sequence[str],
    feature_sets: Sequence[str] = FEATURE_SETS,
    Cs: Sequence[float] = (1e-3, 1e-2),
    logit_weight: float = 1.0,
    centering: str = "none",
    domains=None,
    class_weight="balanced",
    blas_threads: int | None = 1,
) -> CandidateSearch:
    """Held-out-domain within-category AUROC of every (site, feature set, C).

    features(layer, position) -> X [n, hidden] for ALL n rows (the folds pick rows); logits [n, m] or None;
    y [n] 1 = correct; categories [n]; domains [n] (needed for centering="domain").
    """
    _check_choice("centering", centering, CENTERINGS)
    for f in feature_sets:
        _check_choice("features", f, FEATURE_SETS)
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs={list(Cs)!r} must be a non-empty list of positive numbers")
    if centering == "domain" and domains is None:
        raise ValueError("centering='domain' needs the rows' domains")
    y01 = np.asarray(y).astype(np.int64)
    stats_rows = folds.fit.any(axis=0)
    start = time.perf_counter()
    scores: list[CandidateScore] = []
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for layer in layers:
            for position in positions:
                X = np.asarray(features(layer, position))
                if centering == "domain":
                    X = center_by_group(X, domains)
                for feature_set in feature_sets:
                    Z = design_matrix(X, logits, feature_set, logit_weight, stats_rows)
                    previous = None
                    for C in sorted(Cs):  # small C first: each solution warm-starts the next
                        s, previous = fold_logistic_scores(Z, y01, folds.fit, C, class_weight, previous)
                        per = heldout_within_auroc(s, y01, categories, folds)
                        scores.append(CandidateScore(Candidate(int(layer), str(position), feature_set, float(C)),
                                                     _mean(per.values()), per))
    settings = {"layers": [int(v) for v in layers], "positions": list(positions), "feature_sets": list(feature_sets),
                "Cs": [float(c) for c in Cs], "logit_weight": logit_weight, "centering": centering}
    return CandidateSearch(scores, folds.domains, time.perf_counter() - start, settings)


# ----------------------------------------------------------------------------------------------
# Measurement: probe and baselines on held-out domains, calibrated on the other domains
# ----------------------------------------------------------------------------------------------


@dataclass
class TransferTable:
    """rows: {method: {metric: mean over held-out domains}}; per_domain: {method: {domain: {metric: value}}}."""

    rows: dict[str, dict[str, float]]
    per_domain: dict[str, dict[str, dict[str, float]]]
    domains: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"rows": self.rows, "per_domain": self.per_domain, "domains": list(self.domains)}

    def best(self, prefix_excluded: str) -> str | None:
        """The method not starting with `prefix_excluded` with the highest held-out within-category AUROC."""
        others = [m for m in self.rows if not m.startswith(prefix_excluded)]
        return max(others, key=lambda m: np.nan_to_num(self.rows[m]["within_cat_auroc"], nan=-1.0)) if others else None


def _domain_metrics(p, y, categories, n_bins) -> dict[str, float]:
    return {"within_cat_auroc": within_category_auroc(p, y, categories).mean, "ece": ece(p, y, n_bins),
            "brier": brier(p, y), "n": int(len(y)), "accuracy": float(np.mean(y))}


def transfer_table(
    probe_scores: dict[str, np.ndarray],
    baselines: dict[str, np.ndarray],
    y,
    categories,
    folds: DomainFolds,
    calibrator_factory: Callable[[], object],
    label: str,
    n_bins: int = 15,
) -> TransferTable:
    """probe_scores: {method: fold scores [k, n]} (one score per row from each fold's probe; higher = more
    likely correct). baselines: {name: [n]} as the store records them (oriented here). Each fold's calibrator
    (from `calibrator_factory`) is fit on the fold's calibration rows and applied to the held-out domain; raw
    baselines that are probabilities get a "(raw)" row as well. Returns per-domain metrics and their means."""
    y, categories = np.asarray(y), np.asarray(categories).astype(str)
    per_domain: dict[str, dict[str, dict[str, float]]] = {}

    def add(method: str, f: int, p: np.ndarray) -> None:
        held = folds.held_out[f]
        per_domain.setdefault(method, {})[folds.domains[f]] = _domain_metrics(p, y[held], categories[held], n_bins)

    sources = {m: (s, True) for m, s in probe_scores.items()}
    sources |= {f"{name} ({label})": (np.broadcast_to(oriented(name, v), (len(folds.domains), len(y))), True)
                for name, v in baselines.items()}
    for f in range(len(folds.domains)):
        held, calib = folds.held_out[f], folds.calibrate[f]
        for method, (scores, _) in sources.items():
            calibrator = calibrator_factory().fit(scores[f][calib], y[calib], categories=categories[calib])
            add(method, f, calibrator.predict(scores[f][held], categories=categories[held]))
        for name, values in baselines.items():
            raw = raw_probability(name, np.asarray(values)[held])
            if raw is not None:
                add(f"{name} (raw)", f, raw)
    rows = {m: {k: _mean(d[k] for d in by_domain.values()) for k in TRANSFER_METRICS}
            for m, by_domain in per_domain.items()}
    return TransferTable(rows, per_domain, folds.domains)


def generic_fold_scores(X: np.ndarray, y, fit_masks: np.ndarray, probe_factory: Callable[[], object]) -> np.ndarray:
    """Decision scores [k, n]: a fresh `probe_factory()` fit on each fold's rows (any probe kind; slower)."""
    y = np.asarray(y)
    return np.array([probe_factory().fit(X[m], y[m]).decision_function(X) for m in fit_masks])
