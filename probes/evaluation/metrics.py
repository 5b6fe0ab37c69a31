"""Metrics for P(correct): p [n] in [0, 1] (higher = more likely correct), y [n] with 1 = correct.

Conventions, once:
- Ranking metrics (AUROC, AUPRC) treat "correct" as the positive class and are undefined (nan) when y
  holds one class only (all correct or all wrong).
- ECE/MCE compare p with the observed accuracy in bins of p: "uniform" = equal-width bins on [0, 1],
  "quantile" = equal-mass bins (edges at quantiles of p; tied values always share a bin).
- Selective prediction answers the examples with the highest p. Tied scores are never split arbitrarily:
  the risk-coverage curve has one point per distinct threshold t (answered set {p >= t}), and metrics
  at a fixed count k (AURC, selective accuracy) use the expectation over random tie-breaking, so they do
  not depend on the input order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("uniform", "quantile")
# The columns every headline table shows (run summary, metrics.json, `probecal summarize`).
HEADLINE_METRICS = ("auroc", "within_cat_auroc", "ece", "brier", "aurc", "sel_acc@0.8")
# The one table of metric directions: these are better when LOWER; every other metric is better when higher.
LOWER_IS_BETTER = frozenset({"ece", "ece_quantile", "within_cat_ece", "mce", "brier", "nll", "aurc", "eaurc"})
DEFAULT_COVERAGES = (0.5, 0.8, 0.9)


def _check(p, y) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y)
    if p.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"p and y must be 1-D arrays of the same length; got {p.shape} and {y.shape}")
    if len(p) == 0:
        raise ValueError("metrics need at least one example")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("y must hold 0 (wrong) / 1 (correct)")
    if np.any(np.isnan(p)):
        raise ValueError("p contains nan")
    return p, y.astype(np.float64)


def _both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def auroc(p, y) -> float:
    """Area under the ROC curve for detecting correct answers; nan if y has one class only."""
    from sklearn.metrics import roc_auc_score

    p, y = _check(p, y)
    return float(roc_auc_score(y, p)) if _both_classes(y) else float("nan")


def auprc(p, y) -> float:
    """Average precision with correct = positive; nan if y has one class only."""
    from sklearn.metrics import average_precision_score

    p, y = _check(p, y)
    return float(average_precision_score(y, p)) if _both_classes(y) else float("nan")


def brier(p, y) -> float:
    p, y = _check(p, y)
    return float(np.mean((p - y) ** 2))


def nll(p, y, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood of y under p (p clipped to [eps, 1 - eps] so a confident miss is finite)."""
    p, y = _check(p, y)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per bin [n_bins]: edges [n_bins + 1], centers, mean confidence and accuracy (nan when the bin is
    empty), counts."""

    edges: np.ndarray
    centers: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    counts: np.ndarray

    def to_dict(self) -> dict[str, list]:
        return {
            k: getattr(self, k).tolist() for k in ("edges", "centers", "confidence", "accuracy", "counts")
        }


def reliability_curve(p, y, n_bins: int = 15, strategy: str = "uniform") -> ReliabilityCurve:
    p, y = _check(p, y)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed; allowed values: {', '.join(STRATEGIES)}")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins={n_bins!r} must be >= 1")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))
        edges[0], edges[-1] = min(edges[0], 0.0), max(edges[-1], 1.0)
    # bin b holds edges[b] <= p < edges[b+1] (the last bin also holds p == 1); equal values share a bin.
    index = np.clip(np.searchsorted(edges[1:-1], p, side="right"), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=n_bins) / counts
        accuracy = np.bincount(index, weights=y, minlength=n_bins) / counts
    return ReliabilityCurve(edges, (edges[:-1] + edges[1:]) / 2, confidence, accuracy, counts)


def ece(p, y, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Expected calibration error: sum over bins of (count / n) * |mean p - accuracy|."""
    curve = reliability_curve(p, y, n_bins, strategy)
    filled = curve.counts > 0
    gaps = np.abs(curve.confidence[filled] - curve.accuracy[filled])
    return float(np.sum(curve.counts[filled] * gaps) / curve.counts.sum())


def mce(p, y, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Maximum calibration error: the largest |mean p - accuracy| over non-empty bins."""
    curve = reliability_curve(p, y, n_bins, strategy)
    filled = curve.counts > 0
    return float(np.max(np.abs(curve.confidence[filled] - curve.accuracy[filled])))


@dataclass(frozen=True)
class RiskCoverage:
    """One point per distinct threshold, from the highest: answer {p >= threshold}. Arrays [k]."""

    thresholds: np.ndarray
    coverage: np.ndarray
    risk: np.ndarray  # 1 - accuracy of the answered set

    def to_dict(self) -> dict[str, list]:
        return {k: getattr(self, k).tolist() for k in ("thresholds", "coverage", "risk")}


def risk_coverage_curve(p, y) -> RiskCoverage:
    p, y = _check(p, y)
    order = np.argsort(-p, kind="stable")
    p_sorted, errors = p[order], 1.0 - y[order]
    # the last index of each run of equal p: answering "p >= t" answers the whole run
    last = np.flatnonzero(np.append(p_sorted[1:] != p_sorted[:-1], True))
    answered = last + 1
    return RiskCoverage(p_sorted[last], answered / len(p), np.cumsum(errors)[last] / answered)


def _expected_errors_at_each_count(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """E[errors among the top k] for k = 1..n [n], averaging over random orders of tied scores: inside a
    run of m tied scores holding e errors, the first j of them hold j * e / m errors in expectation."""
    order = np.argsort(-p, kind="stable")
    p_sorted, errors = p[order], 1.0 - y[order]
    starts = np.flatnonzero(np.insert(p_sorted[1:] != p_sorted[:-1], 0, True))
    run_lengths = np.diff(np.append(starts, len(p)))
    run_errors = np.add.reduceat(errors, starts)
    errors_before = np.repeat(np.cumsum(run_errors) - run_errors, run_lengths)
    position_in_run = np.arange(len(p)) - np.repeat(starts, run_lengths) + 1
    return errors_before + position_in_run * np.repeat(run_errors / run_lengths, run_lengths)


def aurc(p, y) -> float:
    """Area under the risk-coverage curve: mean over k = 1..n of the risk of the top-k answered set
    (Geifman & El-Yaniv), ties averaged. Lower is better."""
    p, y = _check(p, y)
    k = np.arange(1, len(p) + 1)
    return float(np.mean(_expected_errors_at_each_count(p, y) / k))


def optimal_aurc(y) -> float:
    """AURC of a perfect ranking (all correct answers first) for these labels."""
    y = np.asarray(y, dtype=np.float64)
    k = np.arange(1, len(y) + 1)
    return float(np.mean(np.maximum(0.0, k - y.sum()) / k))


def eaurc(p, y) -> float:
    """Excess AURC: AURC minus the AURC of a perfect ranking (0 = perfect ranking)."""
    p, y = _check(p, y)
    return aurc(p, y) - optimal_aurc(y)


def selective_accuracy(p, y, coverage: float) -> float:
    """Accuracy of the ceil(coverage * n) highest-p examples (ties averaged)."""
    p, y = _check(p, y)
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage={coverage!r} must be in (0, 1]")
    k = max(1, int(np.ceil(coverage * len(p) - 1e-9)))
    return float(1.0 - _expected_errors_at_each_count(p, y)[k - 1] / k)


def coverage_at_accuracy(p, y, target: float) -> float:
    """Largest coverage of an answered set {p >= t} whose accuracy is >= target (0.0 if none).
    Empirical, no guarantee: see probes/selection/thresholds.py for a threshold with a confidence bound."""
    curve = risk_coverage_curve(p, y)
    ok = 1.0 - curve.risk >= target - 1e-12
    return float(curve.coverage[ok].max()) if ok.any() else 0.0


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    p,
    y,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval (resampling examples with replacement) of metric(p, y).
    Resamples where the metric is nan (e.g. AUROC on one class) are dropped; (nan, nan) if all are.
    Note for ECE: the binned estimator is biased upwards and resampling adds to that bias, so the ECE
    interval sits above the point estimate and may not contain it; read it as the spread, not a correction."""
    p, y = _check(p, y)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n)):
        idx = rng.integers(0, len(p), len(p))
        values.append(metric(p[idx], y[idx]))
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class WithinCategoryAUROC:
    mean: float  # mean AUROC over categories where both classes occur (nan if none)
    n_used: int  # how many categories entered the mean
    n_categories: int
    per_category: dict[str, float]  # nan for categories with one class only


def within_category_auroc(p, y, categories) -> WithinCategoryAUROC:
    """AUROC inside each category, and their mean. Pooled AUROC over categories of different difficulty
    mostly rewards knowing which category is easy; this view does not."""
    p, y = _check(p, y)
    cats = np.asarray(categories).astype(str)
    if cats.shape != p.shape:
        raise ValueError(f"categories has shape {cats.shape} but p has shape {p.shape}")
    per = {str(c): auroc(p[cats == c], y[cats == c]) for c in np.unique(cats)}
    used = [v for v in per.values() if not np.isnan(v)]
    return WithinCategoryAUROC(float(np.mean(used)) if used else float("nan"), len(used), len(per), per)


def within_category_ece(p, y, categories, n_bins: int = 15, strategy: str = "uniform") -> float:
    """ECE inside each category, averaged with weights = category sizes (what per-category calibration
    should lower; pooled ECE can hide categories that are over- and under-confident in opposite ways)."""
    p, y = _check(p, y)
    cats = np.asarray(categories).astype(str)
    if cats.shape != p.shape:
        raise ValueError(f"categories has shape {cats.shape} but p has shape {p.shape}")
    values = [(np.sum(cats == c), ece(p[cats == c], y[cats == c], n_bins, strategy)) for c in np.unique(cats)]
    return float(sum(n * v for n, v in values) / len(p))


def metric_row(
    p,
    y,
    categories=None,
    n_bins: int = 15,
    n_bootstrap: int = 1000,
    seed: int = 0,
    coverages=DEFAULT_COVERAGES,
    target_accuracy: float = 0.9,
) -> dict[str, float]:
    """All metrics for one method as a flat dict (one table row). ECE intervals are bootstrap 95%."""
    p, y = _check(p, y)
    row: dict[str, float] = {
        "n": len(p),
        "accuracy": float(y.mean()),
        "auroc": auroc(p, y),
        "auprc": auprc(p, y),
        "brier": brier(p, y),
        "nll": nll(p, y),
    }
    for strategy in STRATEGIES:
        name = "ece" if strategy == "uniform" else "ece_quantile"
        row[name] = ece(p, y, n_bins, strategy)
        low, high = bootstrap_ci(lambda a, b, s=strategy: ece(a, b, n_bins, s), p, y, n_bootstrap, seed)
        row[f"{name}_low"], row[f"{name}_high"] = low, high
    row["mce"] = mce(p, y, n_bins)
    row["aurc"] = aurc(p, y)
    row["eaurc"] = eaurc(p, y)
    for coverage in coverages:
        row[f"sel_acc@{coverage:g}"] = selective_accuracy(p, y, coverage)
    row[f"cov@acc{target_accuracy:g}"] = coverage_at_accuracy(p, y, target_accuracy)
    if categories is not None:
        within = within_category_auroc(p, y, categories)
        row["within_cat_auroc"] = within.mean
        row["within_cat_n"] = within.n_used
        row["within_cat_ece"] = within_category_ece(p, y, categories, n_bins)
    return row


def per_category_rows(p, y, categories, **kwargs) -> dict[str, dict[str, float]]:
    """metric_row for each category's examples."""
    p, y = _check(p, y)
    cats = np.asarray(categories).astype(str)
    return {str(c): metric_row(p[cats == c], y[cats == c], **kwargs) for c in np.unique(cats)}


# ----------------------------------------------------------------------------------------------
# Calibration per domain: what a user whose traffic is one domain sees
# ----------------------------------------------------------------------------------------------

# A domain counts as calibrated when its ECE is within this margin of its floor (issue 19).
WITHIN_FLOOR_MARGIN = 0.03


def ece_floor(p, n_bins: int = 15, draws: int = 100, seed: int = 0) -> float:
    """The ECE a perfectly calibrated p [n] reads on these rows: labels drawn from p itself (mean over `draws`
    seeded draws, so it is deterministic). The binning noise floor of a small domain (about 0.1 at 50 rows,
    0.05 at 200), below which a measured ECE says nothing."""
    p = np.asarray(p, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return float(np.mean([ece(p, (rng.random(len(p)) < p).astype(int), n_bins) for _ in range(int(draws))]))


SMOOTH_ECE_MIN_SIGMA = (
    1e-3  # the bandwidth search stops here (as relplot's eps): the mesh stays <= 20,000 points
)


def smooth_ece_at(p, y, sigma: float) -> float:
    """Kernel smooth ECE at bandwidth sigma (Błasiok & Nakkiran 2023): the residuals y - p, kernel-smoothed
    over p with a Gaussian reflected at 0 and 1, integrated in absolute value against the smoothed density of
    p: sum_t |sum_i K(t, p_i) (y_i - p_i)| / sum_t sum_i K(t, p_i) on a uniform mesh t of max(2001, 20 / sigma)
    points over [0, 1]. As in `relplot`, each row is first split linearly between its two nearest mesh points
    (an error far below sigma) and the kernel is applied as one convolution, whatever the number of rows."""
    from scipy.signal import fftconvolve

    p, y = _check(p, y)
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r} must be > 0")
    size = max(2001, int(round(20.0 / sigma)))
    at = p * (size - 1)
    left = np.clip(np.floor(at).astype(int), 0, size - 2)
    right_share = at - left
    grid = np.zeros((2, size))  # [residual, mass] on the mesh
    for index, share in ((left, 1.0 - right_share), (left + 1, right_share)):
        np.add.at(grid[0], index, share * (y - p))
        np.add.at(grid[1], index, share)
    # mirror images about 0 and 1 keep the kernel's mass inside [0, 1]
    extended = np.concatenate([grid[:, :0:-1], grid, grid[:, -2::-1]], axis=1)
    offsets = np.arange(-(size - 1), size) / (size - 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)[None, :]
    residual, density = fftconvolve(extended, kernel, mode="valid", axes=1)
    return float(np.sum(np.abs(residual)) / np.sum(density))


def smooth_ece(p, y, refine: int = 14) -> float:
    """Smooth ECE with its own bandwidth: sigma* with smooth_ece_at(sigma*) = sigma* (found by bisection on
    [SMOOTH_ECE_MIN_SIGMA, 1], as the `relplot` package does), so no bin count is chosen and the number is
    comparable across domain sizes. ~0 for a perfectly calibrated p on many rows; |offset| for p = truth + a
    constant offset; |y - p| for one row."""
    p, y = _check(p, y)
    high, low = 1.0, 0.0  # invariant: sigma is too small at `low` (below smooth_ece_at(sigma)), not at `high`
    if smooth_ece_at(p, y, high) >= high:
        return smooth_ece_at(p, y, high)
    for _ in range(int(refine)):
        mid = (high + low) / 2
        if mid < SMOOTH_ECE_MIN_SIGMA or mid < smooth_ece_at(p, y, mid):
            low = mid
        else:
            high = mid
    return smooth_ece_at(p, y, high)


def calibration_row(p, y, n_bins: int = 15, seed: int = 0) -> dict[str, float]:
    """One domain's calibration: n, accuracy, mean_p, ece (equal-width bins), ece_floor, smooth_ece and
    within_floor (ece <= ece_floor + WITHIN_FLOOR_MARGIN)."""
    p, y = _check(p, y)
    row = {
        "n": int(len(p)),
        "accuracy": float(y.mean()),
        "mean_p": float(p.mean()),
        "ece": ece(p, y, n_bins),
        "ece_floor": ece_floor(p, n_bins, seed=seed),
        "smooth_ece": smooth_ece(p, y),
    }
    row["within_floor"] = bool(row["ece"] <= row["ece_floor"] + WITHIN_FLOOR_MARGIN)
    return row


def calibration_summary(per_domain: dict[str, dict], pooled_ece: float) -> dict[str, float]:
    """n_domains, n_within (domains within floor + margin), unweighted means over domains of ece, ece_floor and
    smooth_ece, and the pooled ECE (one ECE over every row) given by the caller."""
    rows = list(per_domain.values())

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    return {
        "n_domains": len(rows),
        "n_within": int(sum(bool(r["within_floor"]) for r in rows)),
        "mean_ece": mean("ece"),
        "mean_floor": mean("ece_floor"),
        "mean_smooth_ece": mean("smooth_ece"),
        "pooled_ece": float(pooled_ece),
    }


@dataclass(frozen=True)
class DomainCalibration:
    """per_domain: {domain: calibration_row}; summary: calibration_summary (see those for the keys)."""

    per_domain: dict[str, dict]
    summary: dict[str, float]

    def to_dict(self) -> dict:
        return {"per_domain": self.per_domain, "summary": self.summary}


def domain_calibration(p, y, domains, n_bins: int = 15, seed: int = 0) -> DomainCalibration:
    """Calibration inside each domain (domains [n] str) beside its floor, and the summary a headline reads:
    a pooled ECE can hide per-domain ECEs of 0.2 that cancel out across domains."""
    p, y = _check(p, y)
    domains = np.asarray(domains).astype(str)
    if domains.shape != p.shape:
        raise ValueError(f"domains has shape {domains.shape} but p has shape {p.shape}")
    per = {
        str(d): calibration_row(p[domains == d], y[domains == d], n_bins, seed) for d in np.unique(domains)
    }
    return DomainCalibration(per, calibration_summary(per, ece(p, y, n_bins)))
