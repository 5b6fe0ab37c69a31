"""Leave-one-domain-out (LODO): how does a probe do on a domain it never saw, with no data from outside?

A *domain* is a group of related categories (facts: geography, chemistry, arithmetic, ...; user data may set
one; default = the category). For each domain D of the store: fit on the training-split rows of every OTHER
domain, calibrate on the calibration-split rows of every other domain, and score ALL rows of D (no row of D,
whatever its split, entered that fold's fit or calibration). Numbers are averaged over the held-out domains:
the within-category AUROC (ranking inside each category of D, mean over D's categories), ECE and Brier.

In-domain CV is not evidence of transfer: on new question forms the default probe fell from 0.87 to 0.69
within-category AUROC, below the model's own sequence probability. This module MEASURES transfer (the probe and
every logit baseline); `probes.selection.candidates` SELECTS a probe by it, on the same folds.

Speed: every held-out domain is one "fold" of `probes.estimators.logistic_fold_fit`, so one call fits the
probe for all domains at once (one Gram matrix and one Cholesky factor per site and C). Standardization uses
the column statistics of all fit rows of the store (no labels; as in the layer sweep): a held-out domain adds
only its share of the per-feature scale, never its labels.

Cross-domain calibration (`cross_domain_set`, `nested_fit_masks`, `nested_cross_domain_sets`): a calibrator fit on
each domain's rows scored by the LODO probe that never saw that domain. Its held-out estimate is nested: for
held-out D, the calibrator sees only the other domains, each scored by a probe fit without D and without it
(k (k - 1) fits in one batched solve); `transfer_table(calibration_sets=...)` refuses a set holding D's rows.
Held-out ECE means over small domains sit on a binning noise floor (`ece_floor`, ~0.1 at 60 rows): each held-out
domain gets its floor and a smooth ECE (comparable across domain sizes) beside its ECE
(`probes.evaluation.metrics.calibration_row`); the table also gives `pooled_ece` (one ECE over every held-out
row) and `TransferTable.calibration(method)`, the per-domain calibration summary a headline reads.

Logit features: `logit_feature_matrix` (defined in probes.inference, which serving shares) turns the store's
logit signals into unbounded, oriented columns (higher = more confident) that a hybrid probe reads next to the
hidden state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from probes.estimators import logistic_fold_fit, standardize_stats
from probes.evaluation.metrics import (
    DomainCalibration,
    brier,
    calibration_row,
    calibration_summary,
    ece,
    within_category_auroc,
)
from probes.inference import oriented, raw_probability

FEATURE_SETS = ("hidden", "hidden+logits")  # what a transfer candidate reads
TRANSFER_METRICS = (
    "within_cat_auroc",
    "ece",
    "brier",
    "ece_floor",
    "smooth_ece",
)  # means over held-out domains
# What the final calibrator is fit on (train.calibrate_on):
#   calibration  - the probe's scores on the in-domain calibration split (fit on every domain)
#   cross_domain - out-of-domain scores: each domain's calibration rows scored by the LODO probe fit WITHOUT it
#   both         - the two sets pooled
CALIBRATE_ON = ("calibration", "cross_domain", "both")


def check_choice(name: str, value, allowed) -> None:
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
        raise ValueError(
            f"domains {domains.shape}, fit_rows {fit_rows.shape} and calibration_rows "
            f"{calibration_rows.shape} must have the same shape [n]"
        )
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
            f"{len(np.unique(domains))} domain(s) ({', '.join(map(str, np.unique(domains)[:8]))}), {len(names)} usable. "  # noqa: E501
            "Give rows a `domain` (a group of related categories) or set train.transfer=false"
        )
    return DomainFolds(tuple(names), np.array(fits), np.array(calibrates), np.array(helds))


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


def design_matrix(
    X: np.ndarray, logits: np.ndarray | None, features: str, logit_weight: float = 1.0, stats_rows=None
) -> np.ndarray:
    """Standardized [n, d (+ m)] float32 design: hidden columns, then (for "hidden+logits") the logit columns
    times `logit_weight` (a weight w divides their L2 penalty by w^2: a few strong signals among hundreds of
    hidden columns). stats_rows [n] bool: rows whose column statistics standardize (None = all)."""
    check_choice("features", features, FEATURE_SETS)
    parts = [X]
    if features == "hidden+logits":
        if logits is None or logits.shape[1] == 0:
            raise ValueError(
                "features='hidden+logits' needs the store's logit signals (baselines); none given"
            )
        parts.append(logits)
    full = np.hstack(parts).astype(np.float64) if len(parts) > 1 else np.asarray(X, dtype=np.float64)
    rows = slice(None) if stats_rows is None else np.asarray(stats_rows, bool)
    mean, scale = standardize_stats(full[rows])
    Z = (full - mean) / scale
    if features == "hidden+logits":
        Z[:, X.shape[1] :] *= logit_weight
    return Z.astype(np.float32)


def nan_mean(values) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def fold_logistic_scores(
    Z: np.ndarray,
    y01: np.ndarray,
    fit_masks: np.ndarray,
    C: float,
    class_weight="balanced",
    init=None,
    tol: float = 1e-3,
    max_iter: int = 200,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Decision scores [k, n] of one logistic fit per fold (all folds solved together), and the solution.
    The default tolerance is the layer sweep's: plenty to rank candidates."""
    coef, intercept, _ = logistic_fold_fit(
        Z, y01, fit_masks, C, class_weight, tol=tol, max_iter=max_iter, init=init
    )
    return (Z @ coef.T.astype(Z.dtype)).T + intercept[:, None], (coef, intercept)


# ----------------------------------------------------------------------------------------------
# Measurement: probe and baselines on held-out domains, calibrated on the other domains
# ----------------------------------------------------------------------------------------------


@dataclass
class TransferTable:
    """rows: {method: {metric: mean over held-out domains (TRANSFER_METRICS; ece_floor: the ECE a perfectly
    calibrated p reads on the domain's rows), + pooled_ece (one ECE over all held-out rows) and n_within (held-out
    domains whose ECE is within their floor + WITHIN_FLOOR_MARGIN)}};
    per_domain: {method: {domain: {metric: value}}} (calibration_row's keys, within_cat_auroc and brier)."""

    rows: dict[str, dict[str, float]]
    per_domain: dict[str, dict[str, dict[str, float]]]
    domains: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"rows": self.rows, "per_domain": self.per_domain, "domains": list(self.domains)}

    def calibration(self, method: str) -> DomainCalibration:
        """Per-held-out-domain calibration of `method` and its summary (the same keys as
        `probes.evaluation.metrics.domain_calibration` gives on an in-domain split)."""
        per = {d: {k: row[k] for k in CALIBRATION_KEYS} for d, row in self.per_domain[method].items()}
        return DomainCalibration(per, calibration_summary(per, self.rows[method]["pooled_ece"]))

    def best(self, prefix_excluded: str) -> str | None:
        """The method not starting with `prefix_excluded` with the highest held-out within-category AUROC."""
        others = [m for m in self.rows if not m.startswith(prefix_excluded)]
        return (
            max(others, key=lambda m: np.nan_to_num(self.rows[m]["within_cat_auroc"], nan=-1.0))
            if others
            else None
        )


CALIBRATION_KEYS = ("n", "accuracy", "mean_p", "ece", "ece_floor", "smooth_ece", "within_floor")


def _domain_metrics(p, y, categories, n_bins, seed: int) -> dict[str, float]:
    return {
        "within_cat_auroc": within_category_auroc(p, y, categories).mean,
        "brier": brier(p, y),
        **calibration_row(p, y, n_bins, seed=seed),
    }


def transfer_table(
    probe_scores: dict[str, np.ndarray],
    baselines: dict[str, np.ndarray],
    y,
    categories,
    folds: DomainFolds,
    calibrator_factory: Callable[[], object],
    label: str,
    n_bins: int = 15,
    calibration_sets: dict[str, list[np.ndarray]] | None = None,
) -> TransferTable:
    """probe_scores: {method: fold scores [k, n]} (one score per row from each fold's probe; higher = more
    likely correct). baselines: {name: [n]} as the store records them (oriented here). Each fold's calibrator
    (from `calibrator_factory`) is fit on the fold's calibration rows and applied to the held-out domain; raw
    baselines that are probabilities get a "(raw)" row as well. Returns per-domain metrics and their means.
    calibration_sets: {method: [k] arrays [2, m] (row index, score)}: fold f's calibrator for that method is
    fit on these rows and scores instead (e.g. `nested_cross_domain_sets`); they must not hold fold f's domain."""
    calibration_sets = calibration_sets or {}
    y, categories = np.asarray(y), np.asarray(categories).astype(str)
    per_domain: dict[str, dict[str, dict[str, float]]] = {}

    pooled: dict[str, tuple[list, list]] = {}

    def add(method: str, f: int, p: np.ndarray) -> None:
        held = folds.held_out[f]
        per_domain.setdefault(method, {})[folds.domains[f]] = _domain_metrics(
            p, y[held], categories[held], n_bins, seed=f
        )
        pooled.setdefault(method, ([], []))[0].append(p)
        pooled[method][1].append(np.flatnonzero(held))

    sources = {m: (s, True) for m, s in probe_scores.items()}
    sources |= {
        f"{name} ({label})": (np.broadcast_to(oriented(name, v), (len(folds.domains), len(y))), True)
        for name, v in baselines.items()
    }
    for f in range(len(folds.domains)):
        held, calib = folds.held_out[f], folds.calibrate[f]
        for method, (scores, _) in sources.items():
            if method in calibration_sets:
                idx, values = calibration_sets[method][f][0].astype(int), calibration_sets[method][f][1]
                if held[idx].any():
                    raise ValueError(
                        f"the calibration set of {method!r} for held-out domain {folds.domains[f]!r} "
                        "holds rows of that domain"
                    )
                calibrator = calibrator_factory().fit(values, y[idx], categories=categories[idx])
            else:
                calibrator = calibrator_factory().fit(
                    scores[f][calib], y[calib], categories=categories[calib]
                )
            add(method, f, calibrator.predict(scores[f][held], categories=categories[held]))
        for name, values in baselines.items():
            raw = raw_probability(name, np.asarray(values)[held])
            if raw is not None:
                add(f"{name} (raw)", f, raw)
    rows = {
        m: {k: nan_mean(d[k] for d in by_domain.values()) for k in TRANSFER_METRICS}
        for m, by_domain in per_domain.items()
    }
    for m, (p, rows_of) in pooled.items():  # one ECE over every held-out row (each from its own fold)
        rows[m]["pooled_ece"] = ece(np.concatenate(p), y[np.concatenate(rows_of)], n_bins)
        rows[m]["n_within"] = int(sum(d["within_floor"] for d in per_domain[m].values()))
    return TransferTable(rows, per_domain, folds.domains)


# ----------------------------------------------------------------------------------------------
# Cross-domain calibration: calibrate on scores of domains the probe never saw
# ----------------------------------------------------------------------------------------------


def cross_domain_set(scores: np.ndarray, folds: DomainFolds, rows, exclude: int | None = None) -> np.ndarray:
    """Row indices and out-of-domain scores for a cross-domain calibrator: for each fold g (domain d_g) other
    than `exclude`, the rows of d_g inside `rows` [n] bool scored by fold g's probe (fit without d_g).
    scores [k, n] (fold g's scores in row g). Returns [2, m]: (row index, score)."""
    rows = np.asarray(rows, bool)
    parts = [(np.flatnonzero(folds.held_out[g] & rows), g) for g in range(len(folds.domains)) if g != exclude]
    idx = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, int)
    values = np.concatenate([scores[g][i] for i, g in parts]) if parts else np.zeros(0)
    return np.vstack([idx, values])


def nested_fit_masks(folds: DomainFolds) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Masks [k (k - 1), n] of the inner leave-one-domain-out fits: for each outer fold f (without D_f) and
    each other domain d_g, the fit rows of fold f minus d_g's rows. Also the (f, g) pair of each mask."""
    pairs = [(f, g) for f in range(len(folds.domains)) for g in range(len(folds.domains)) if g != f]
    return np.array([folds.fit[f] & ~folds.held_out[g] for f, g in pairs]), pairs


def nested_cross_domain_sets(
    inner_scores: np.ndarray, pairs: list[tuple[int, int]], folds: DomainFolds, rows
) -> list[np.ndarray]:
    """For each outer fold f: the cross-domain calibration set ([2, m]: row index, score) built only from the
    other domains, each scored by the inner probe fit without D_f AND without it; D_f's rows never enter.
    inner_scores [k (k - 1), n] in the order of `pairs` (from `nested_fit_masks`)."""
    rows = np.asarray(rows, bool)
    sets = []
    for f in range(len(folds.domains)):
        parts = [(np.flatnonzero(folds.held_out[g] & rows), m) for m, (ff, g) in enumerate(pairs) if ff == f]
        sets.append(
            np.vstack(
                [
                    np.concatenate([i for i, _ in parts]),
                    np.concatenate([inner_scores[m][i] for i, m in parts]),
                ]
            )
        )
    return sets


def generic_fold_scores(
    X: np.ndarray, y, fit_masks: np.ndarray, probe_factory: Callable[[], object]
) -> np.ndarray:
    """Decision scores [k, n]: a fresh `probe_factory()` fit on each fold's rows (any probe kind; slower)."""
    y = np.asarray(y)
    return np.array([probe_factory().fit(X[m], y[m]).decision_function(X) for m in fit_masks])
