"""Abstention thresholds with a finite-sample guarantee.

Policy: answer when p_correct >= threshold, abstain otherwise. Given calibration-split scores
p_cal [n] (higher = more likely correct) and labels y [n] (1 = correct), `choose_threshold` returns the
lowest threshold (largest coverage) for which, with probability >= 1 - delta over the draw of the
calibration split, the risk (1 - accuracy) of the answered set is <= 1 - target_accuracy.

For a candidate t, the answered set holds n_t examples with e_t errors; given n_t, e_t ~ Binomial(n_t, R(t))
where R(t) is the true risk of answering {p >= t}. Candidates are a grid of at most `max_candidates`
thresholds: the scores at which the answered set holds evenly spaced counts of examples.
Both methods scan candidate thresholds from the highest (safest) down; the guarantee holds for the threshold
returned, not merely for each candidate alone:

- "ltt" (Learn then Test, Angelopoulos et al. 2021, fixed-sequence testing): test H_t: R(t) > alpha with
  the binomial-tail p-value P(Binomial(n_t, alpha) <= e_t), from high t to low, each at level delta, and
  stop at the first non-rejection. The sequence starts at the first threshold whose answered set is large
  enough to pass at all (n_t >= log(delta) / log(1 - alpha)). Fixed-sequence testing controls the
  family-wise error at delta without any correction, so every accepted threshold has R(t) <= alpha with
  probability >= 1 - delta.
- "clopper_pearson": simultaneous Clopper-Pearson upper bounds: the bound of each candidate is computed at
  level delta / m (Bonferroni over the m candidates), and the lowest candidate whose bound is <= alpha is
  returned. Needs no ordering assumption
  and every reported bound holds at once, at the price of some coverage.

`risk_upper_bound` in the result is the Clopper-Pearson bound at the level the method used (delta for
ltt, which is <= alpha exactly when the ltt test rejects; delta / m for clopper_pearson).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta, binom

METHODS = ("clopper_pearson", "ltt")


@dataclass(frozen=True)
class ThresholdResult:
    threshold: float | None  # answer when p >= threshold; None when the target is unreachable
    target_accuracy: float
    delta: float
    method: str
    coverage: float  # fraction of the calibration split answered at this threshold (0 if unreachable)
    empirical_accuracy: float | None  # accuracy of the answered calibration examples
    risk_upper_bound: float | None  # upper confidence bound on 1 - accuracy of the answered set
    reachable: bool
    n_calibration: int
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ThresholdResult:
        return cls(**data)


def clopper_pearson_upper(errors: np.ndarray, n: np.ndarray, delta: float) -> np.ndarray:
    """One-sided (1 - delta) upper confidence bound on a binomial rate, per entry; 1 where errors == n."""
    errors = np.asarray(errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = beta.ppf(1 - delta, errors + 1, np.maximum(n - errors, 1e-300))
    return np.where(errors >= n, 1.0, bound)


def _answered_sets(p: np.ndarray, y: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate threshold (descending) [m]: answered count and error count of {p >= t}."""
    order = np.argsort(-p, kind="stable")
    p_sorted = p[order]
    cum_errors = np.concatenate([[0.0], np.cumsum(1.0 - y[order])])
    answered = np.searchsorted(-p_sorted, -candidates, side="right")  # count of p >= t
    return answered, cum_errors[answered]


def _candidate_thresholds(p: np.ndarray, smallest: int, max_candidates: int) -> np.ndarray:
    """Descending thresholds [m <= max_candidates]: the scores at which the answered set reaches about
    `smallest`, ..., n examples in even steps. A coarse grid keeps the Bonferroni factor small and gives
    fixed-sequence testing fewer chances to stop early on noise."""
    p_sorted = np.sort(p)[::-1]
    counts = np.unique(np.linspace(smallest, len(p), max(1, int(max_candidates))).round().astype(int))
    return np.unique(p_sorted[counts - 1])[::-1]


def choose_threshold(
    p_cal,
    y,
    target_accuracy: float = 0.9,
    delta: float = 0.1,
    method: str = "clopper_pearson",
    max_candidates: int = 50,
    ltt_start_coverage: float = 0.1,
) -> ThresholdResult:
    """Lowest threshold whose answered set reaches target_accuracy with probability >= 1 - delta.

    p_cal [n]: calibrated P(correct) on the calibration split; y [n]: 1 = correct.
    max_candidates: size of the threshold grid. ltt_start_coverage: ltt's sequence starts at the threshold
    answering this fraction of the calibration split (so ltt never returns a smaller coverage).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; allowed values: {', '.join(METHODS)}")
    if not 0 < target_accuracy < 1:
        raise ValueError(f"target_accuracy={target_accuracy!r} must be in (0, 1)")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    p = np.asarray(p_cal, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if p.ndim != 1 or p.shape != y.shape or len(p) == 0:
        raise ValueError(f"p_cal and y must be non-empty 1-D arrays of one length; got {p.shape}, {y.shape}")
    if not np.all(np.isin(y, (0, 1))) or np.any(np.isnan(p)):
        raise ValueError("y must hold 0/1 and p_cal must not contain nan")
    alpha = 1.0 - target_accuracy
    n = len(p)
    # A set smaller than this cannot pass even with zero errors ((1 - alpha)^k > level): spending grid points
    # (or, for ltt, the start of the fixed sequence) on such sets would only lose coverage.
    weakest_level = delta if method == "ltt" else delta / max(1, int(max_candidates))
    smallest = min(n, int(np.ceil(np.log(weakest_level) / np.log1p(-alpha))))
    if method == "ltt":
        # Fixed-sequence testing stops at its first failure, and tests on a few dozen examples have little
        # power (one error can fail them): start at a fraction of n fixed before seeing any label.
        smallest = max(smallest, min(n, int(np.ceil(ltt_start_coverage * n))))
    candidates = _candidate_thresholds(p, smallest, max_candidates)
    answered, errors = _answered_sets(p, y, candidates)
    if method == "ltt":
        p_values = binom.cdf(errors, answered, alpha)  # small when the set's risk is clearly below alpha
        failures = np.flatnonzero(p_values > delta)
        accepted = (
            failures[0] if len(failures) else len(candidates)
        )  # fixed sequence: stop at the first failure
        level = delta
    else:
        level = delta / len(candidates)
        passing = np.flatnonzero(clopper_pearson_upper(errors, answered, level) <= alpha)
        accepted = passing[-1] + 1 if len(passing) else 0

    if accepted == 0:
        return ThresholdResult(
            None, target_accuracy, delta, method, 0.0, None, None, False, n,
            f"target accuracy {target_accuracy:g} cannot be guaranteed at delta={delta:g} with {n} calibration "
            f"examples ({method}): even the most confident answers do not bound the risk below {alpha:g}. "
            "Lower the target, raise delta, or add calibration data.",
        )  # fmt: skip
    i = accepted - 1  # the lowest accepted threshold
    return ThresholdResult(
        threshold=float(candidates[i]),
        target_accuracy=target_accuracy,
        delta=delta,
        method=method,
        coverage=float(answered[i] / n),
        empirical_accuracy=float(1.0 - errors[i] / answered[i]),
        risk_upper_bound=float(clopper_pearson_upper(errors[i], answered[i], level)),
        reachable=True,
        n_calibration=n,
    )


def realised(p, y, threshold: float | None) -> tuple[float, float]:
    """(accuracy of the answered set {p >= threshold}, coverage) on e.g. the test split.
    Accuracy is nan when nothing is answered (also for threshold None = always abstain)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if threshold is None:
        return float("nan"), 0.0
    answered = p >= threshold
    coverage = float(answered.mean()) if len(p) else 0.0
    return (float(y[answered].mean()) if answered.any() else float("nan")), coverage
