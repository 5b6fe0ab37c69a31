"""Calibrators: small estimators mapping a 1-D score (higher = more confident) to P(correct).

    fit(scores [n], y [n], categories=None) -> self        y: 1 = correct, 0 = wrong
    predict(scores [n], categories=None) -> p [n] in [0, 1]  higher p = more likely correct

Fit them on the calibration split (disjoint from probe training). They compose with any score: a probe's
decision_function or a logit baseline (oriented so that higher = more confident, see probes/inference.py).
The global calibrators accept and ignore `categories`, so every calibrator has one signature and the
caller need not know whether it is per-category. `to_tensors()` + `get_params()` describe a fitted
calibrator; `rebuild_calibrator(kind, params, tensors)` restores it (no pickle).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from probes.inference import (
    GLOBAL_KEY,
    LOGIT_CLIP,
    TAU_KEY,
    check_scores,
    group_tensors,
    isotonic_probability,
    per_category_probability,
    platt_probability,
    shrinkage_probability,
    temperature_probability,
)


def _scores_labels(scores, y=None) -> tuple[np.ndarray, np.ndarray | None]:
    s = check_scores(scores)
    if y is None:
        return s, None
    y = np.asarray(y)
    if y.shape != s.shape:
        raise ValueError(f"y has shape {y.shape} but scores have shape {s.shape}")
    if len(s) == 0:
        raise ValueError("cannot fit a calibrator on zero examples")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"y must hold 0 (wrong) / 1 (correct); got values {np.unique(y)[:5].tolist()}")
    return s, y.astype(np.float64)


def _binary_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, logits) - targets * logits))


class _Calibrator(BaseEstimator):
    kind: str = ""

    def to_tensors(self) -> dict[str, np.ndarray]:
        check_is_fitted(self)
        return {
            name: np.asarray(getattr(self, name + "_"), dtype=np.float64) for name in self._tensor_names()
        }

    @classmethod
    def from_tensors(cls, params: dict, tensors: dict[str, np.ndarray]):
        missing = set(cls._tensor_names()) - set(tensors)
        if missing:
            raise ValueError(f"{cls.__name__} tensors lack {sorted(missing)}")
        calibrator = cls(**params)
        for name in cls._tensor_names():
            value = np.asarray(tensors[name], dtype=np.float64)
            setattr(calibrator, name + "_", value if value.ndim else np.float64(value))
        return calibrator


class PlattCalibrator(_Calibrator):
    """p = sigmoid(a_ * score + b_), fit by maximum likelihood with Platt's smoothed targets
    ((n+ + 1) / (n+ + 2) and 1 / (n- + 2), as scikit-learn's sigmoid calibration), which keeps a_ and b_
    finite on separable or one-class data. a_ > 0 when higher scores mean more often correct."""

    kind = "platt"

    @staticmethod
    def _tensor_names():
        return ("a", "b")

    def fit(self, scores, y, categories=None):
        s, y = _scores_labels(scores, y)
        n_pos, n_neg = y.sum(), len(y) - y.sum()
        targets = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        # Optimize on standardized scores (well conditioned), then map back to the raw scale.
        center, spread = s.mean(), s.std() or 1.0
        z = (s - center) / spread

        def loss_grad(ab):
            logits = ab[0] * z + ab[1]
            residual = (expit(logits) - targets) / len(z)
            return _binary_nll(logits, targets), np.array([residual @ z, residual.sum()])

        a, b = minimize(loss_grad, np.zeros(2), jac=True, method="L-BFGS-B").x
        self.a_ = np.float64(a / spread)
        self.b_ = np.float64(b - a * center / spread)
        return self

    def predict(self, scores, categories=None) -> np.ndarray:
        """p [n] = P(correct)."""
        check_is_fitted(self)
        s, _ = _scores_labels(scores)
        return platt_probability(s, self.a_, self.b_)


class TemperatureCalibrator(_Calibrator):
    """p = sigmoid(score / temperature_); scores must be logits (e.g. a probe's decision_function).
    One parameter, no offset, so the ranking and the 0.5 point are unchanged."""

    kind = "temperature"

    def __init__(self, min_temperature: float = 1e-2, max_temperature: float = 1e3):
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature

    @staticmethod
    def _tensor_names():
        return ("temperature",)

    def fit(self, scores, y, categories=None):
        s, y = _scores_labels(scores, y)
        if not 0 < self.min_temperature < self.max_temperature:
            raise ValueError(
                f"need 0 < min_temperature < max_temperature; got {self.min_temperature}, {self.max_temperature}"
            )
        bounds = (np.log(self.min_temperature), np.log(self.max_temperature))
        result = minimize_scalar(
            lambda log_t: _binary_nll(s / np.exp(log_t), y), bounds=bounds, method="bounded"
        )
        self.temperature_ = np.float64(np.exp(result.x))
        return self

    def predict(self, scores, categories=None) -> np.ndarray:
        """p [n] = P(correct)."""
        check_is_fitted(self)
        s, _ = _scores_labels(scores)
        return temperature_probability(s, self.temperature_)


class IsotonicCalibrator(_Calibrator):
    """Monotone non-decreasing step map score -> P(correct) (scikit-learn's IsotonicRegression),
    linear between its knots and clipped outside them. Learned: x_ [knots], y_ [knots]."""

    kind = "isotonic"

    @staticmethod
    def _tensor_names():
        return ("x", "y")

    def fit(self, scores, y, categories=None):
        from sklearn.isotonic import IsotonicRegression

        s, y = _scores_labels(scores, y)
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(s, y)
        self.x_, self.y_ = iso.X_thresholds_.astype(np.float64), iso.y_thresholds_.astype(np.float64)
        return self

    def predict(self, scores, categories=None) -> np.ndarray:
        """p [n] = P(correct); np.interp clips outside the knots exactly as IsotonicRegression does."""
        check_is_fitted(self)
        s, _ = _scores_labels(scores)
        return isotonic_probability(s, self.x_, self.y_)


CALIBRATORS: dict[str, type[_Calibrator]] = {
    "platt": PlattCalibrator,
    "temperature": TemperatureCalibrator,
    "isotonic": IsotonicCalibrator,
}


class PerCategoryCalibrator(BaseEstimator):
    """One calibrator per category (when the category is known at run time), falling back to a global one.

    base: a kind in CALIBRATORS. A category gets its own calibrator when the calibration split holds at
    least `min_count` of its examples with both classes present; other categories, unknown categories and
    `categories=None` use the global calibrator fit on all examples.
    Learned: global_ (calibrator), per_category_ {category: calibrator}.
    """

    kind = "per_category"

    def __init__(self, base: str = "platt", min_count: int = 30):
        self.base = base
        self.min_count = min_count

    def _new_base(self) -> _Calibrator:
        if self.base not in CALIBRATORS:
            raise ValueError(f"base={self.base!r} is not allowed; allowed values: {', '.join(CALIBRATORS)}")
        return CALIBRATORS[self.base]()

    def fit(self, scores, y, categories=None):
        s, y = _scores_labels(scores, y)
        self.global_ = self._new_base().fit(s, y)
        self.per_category_ = {}
        if categories is None:
            return self
        cats = np.asarray(categories).astype(str)
        if cats.shape != s.shape:
            raise ValueError(f"categories has shape {cats.shape} but scores have shape {s.shape}")
        for cat in np.unique(cats):
            rows = cats == cat
            if rows.sum() >= self.min_count and 0 < y[rows].sum() < rows.sum():
                self.per_category_[str(cat)] = self._new_base().fit(s[rows], y[rows])
        return self

    def predict(self, scores, categories=None) -> np.ndarray:
        """p [n] = P(correct)."""
        check_is_fitted(self)
        s, _ = _scores_labels(scores)
        per_category = {cat: calibrator.predict for cat, calibrator in self.per_category_.items()}
        return per_category_probability(s, categories, self.global_.predict, per_category)

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Keys "<category>/<name>" ("__global__/<name>" for the fallback); category names live in the keys."""
        check_is_fitted(self)
        tensors = {f"{GLOBAL_KEY}/{k}": v for k, v in self.global_.to_tensors().items()}
        for cat, calibrator in self.per_category_.items():
            tensors.update({f"{cat}/{k}": v for k, v in calibrator.to_tensors().items()})
        return tensors

    @classmethod
    def from_tensors(cls, params: dict, tensors: dict[str, np.ndarray]):
        calibrator = cls(**params)
        base_cls = type(calibrator._new_base())
        grouped = group_tensors(tensors)
        if GLOBAL_KEY not in grouped:
            raise ValueError("per-category calibrator tensors lack the global fallback")
        calibrator.global_ = base_cls.from_tensors({}, grouped.pop(GLOBAL_KEY))
        calibrator.per_category_ = {cat: base_cls.from_tensors({}, t) for cat, t in grouped.items()}
        return calibrator


# -- shrinkage: a per-domain offset on the global logit, with a Gaussian prior around 0 -------------------
MAX_OFFSET = 10.0  # |offset| bound (logit units): a one-class domain's maximum-likelihood offset is infinite
MAX_TAU = 5.0  # the empirical-Bayes prior width is searched in [0, MAX_TAU]
MIN_DOMAINS_FOR_TAU = 3  # domains (both classes present) needed to estimate the prior width from data
# Used when the width cannot be estimated (fewer domains): the empirical-Bayes width of the per-domain offsets
# of leave-one-domain-out probe scores on the SmolLM2-135M default `facts` run (benchmarks/bench_labels_curve.py).
DEFAULT_TAU = 1.28


def _base_logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(q) - np.log1p(-q)


def map_offset(logits: np.ndarray, y: np.ndarray, tau: float) -> float:
    """argmax_d  sum log Bernoulli(y | sigmoid(logits + d)) - d^2 / (2 tau^2), d in [-MAX_OFFSET, MAX_OFFSET].
    tau = inf: the maximum-likelihood offset; tau = 0: 0 (the prior's centre)."""
    if tau <= 0 or len(y) == 0:
        return 0.0
    precision = 0.0 if np.isinf(tau) else 1.0 / tau**2

    def objective(d):
        z = logits + d
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * precision * d * d)

    result = minimize_scalar(
        objective, bounds=(-MAX_OFFSET, MAX_OFFSET), method="bounded", options={"xatol": 1e-9}
    )
    return float(result.x)


def estimate_tau(logits, y, domains) -> float | None:
    """Empirical-Bayes width of the per-domain offsets: each domain with both classes gets its maximum-likelihood
    offset d_k (variance v_k = 1 / its Fisher information); tau maximizes the normal-normal marginal likelihood
    prod_k N(d_k; 0, tau^2 + v_k). None with fewer than MIN_DOMAINS_FOR_TAU such domains.
    logits [n]: the global calibrator's logit of each row; y [n] 0/1; domains [n]."""
    logits, y, domains = np.asarray(logits, float), np.asarray(y, float), np.asarray(domains).astype(str)
    offsets, variances = [], []
    for domain in np.unique(domains):
        rows = domains == domain
        if not 0 < y[rows].sum() < rows.sum():
            continue
        d = map_offset(logits[rows], y[rows], np.inf)
        p = expit(logits[rows] + d)
        offsets.append(d)
        variances.append(1.0 / max(float(np.sum(p * (1 - p))), 1e-12))
    if len(offsets) < MIN_DOMAINS_FOR_TAU:
        return None
    d2, v = np.square(offsets), np.asarray(variances)

    def negative_marginal(tau):
        total = tau**2 + v
        return float(np.sum(np.log(total) + d2 / total))

    return float(minimize_scalar(negative_marginal, bounds=(0.0, MAX_TAU), method="bounded").x)


def fit_cross_domain_prior(scores, y, domains) -> dict[str, float | int | None]:
    """The prior for recalibrating a domain the probe never saw (ProbeMetadata.cross_domain_calibration):
    Platt on OUT-of-domain scores [n] (each row scored by a probe fit without its domain) with labels y [n],
    and tau, the empirical-Bayes width of the domains' [n] logit offsets around it (None: too few domains)."""
    platt = PlattCalibrator().fit(scores, y)
    tau = estimate_tau(platt.a_ * np.asarray(scores, float) + platt.b_, y, domains)
    return {
        "a": float(platt.a_),
        "b": float(platt.b_),
        "tau": None if tau is None else float(tau),
        "n_domains": int(len(np.unique(np.asarray(domains).astype(str)))),
    }


def cross_domain_platt(record: dict[str, Any]) -> PlattCalibrator:
    """The fitted PlattCalibrator of a ProbeMetadata.cross_domain_calibration record."""
    return PlattCalibrator.from_tensors({}, {"a": record["a"], "b": record["b"]})


class ShrinkageCalibrator(BaseEstimator):
    """p = sigmoid(logit(p_global(score)) + offset_[domain]): the global calibrator (kind `base`) shifted per
    domain by one offset fit by maximum a posteriori with the prior offset ~ N(0, tau^2). A domain with a few
    labels stays near the global calibrator; one with many moves freely (its offset tends to the per-domain
    maximum-likelihood shift). Unknown domains and categories=None get the global p. Higher p = more likely
    correct; the ranking inside a domain is the global calibrator's.

    tau: the prior's width in logit units; None = estimated in `fit` by empirical Bayes across the domains it
    is fit on (`estimate_tau`), or DEFAULT_TAU when fewer than MIN_DOMAINS_FOR_TAU domains hold both classes.
    Learned: global_ (calibrator), offsets_ {domain: offset}, counts_ {domain: labelled rows}, tau_.
    """

    kind = "shrinkage"

    def __init__(self, base: str = "platt", tau: float | None = None):
        self.base = base
        self.tau = tau

    def _new_base(self) -> _Calibrator:
        if self.base not in CALIBRATORS:
            raise ValueError(f"base={self.base!r} is not allowed; allowed values: {', '.join(CALIBRATORS)}")
        return CALIBRATORS[self.base]()

    def fit(self, scores, y, categories=None, prior=None):
        """prior: a fitted calibrator of kind `base` to shrink toward, kept as global_ unchanged (as
        scikit-learn's prefit calibration; recalibration passes the parent's); None = fit `base` on all rows."""
        s, y = _scores_labels(scores, y)
        base_cls = type(self._new_base())
        if self.tau is not None and not (np.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"tau={self.tau!r} must be a finite number >= 0 (or None: estimated)")
        if prior is not None:
            check_is_fitted(prior)
            if type(prior) is not base_cls:
                raise ValueError(
                    f"prior is a {type(prior).__name__}; base={self.base!r} needs a {base_cls.__name__}"
                )
            self.global_ = prior
        else:
            self.global_ = base_cls().fit(s, y)
        self.offsets_, self.counts_ = {}, {}
        if categories is None:
            self.tau_ = np.float64(DEFAULT_TAU if self.tau is None else self.tau)
            return self
        cats = np.asarray(categories).astype(str)
        if cats.shape != s.shape:
            raise ValueError(f"categories has shape {cats.shape} but scores have shape {s.shape}")
        logits = _base_logit(self.global_.predict(s))
        tau = self.tau if self.tau is not None else estimate_tau(logits, y, cats)
        self.tau_ = np.float64(DEFAULT_TAU if tau is None else tau)
        for cat in np.unique(cats):
            rows = cats == cat
            self.offsets_[str(cat)] = map_offset(logits[rows], y[rows], float(self.tau_))
            self.counts_[str(cat)] = int(rows.sum())
        return self

    def predict(self, scores, categories=None) -> np.ndarray:
        """p [n] = P(correct)."""
        check_is_fitted(self)
        s, _ = _scores_labels(scores)
        return shrinkage_probability(s, categories, self.global_.predict, self.offsets_)

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Keys "__global__/<name>" (the global calibrator), "__prior__/tau", "<domain>/offset", "<domain>/n"."""
        check_is_fitted(self)
        tensors = {f"{GLOBAL_KEY}/{k}": v for k, v in self.global_.to_tensors().items()}
        tensors[f"{TAU_KEY}/tau"] = np.asarray(self.tau_, dtype=np.float64)
        for cat, offset in self.offsets_.items():
            tensors[f"{cat}/offset"] = np.asarray(offset, dtype=np.float64)
            tensors[f"{cat}/n"] = np.asarray(self.counts_[cat], dtype=np.float64)
        return tensors

    @classmethod
    def from_tensors(cls, params: dict, tensors: dict[str, np.ndarray]):
        calibrator = cls(**params)
        base_cls = type(calibrator._new_base())
        grouped = group_tensors(tensors)
        if GLOBAL_KEY not in grouped or "tau" not in grouped.get(TAU_KEY, {}):
            raise ValueError("shrinkage calibrator tensors lack the global calibrator or the prior width tau")
        calibrator.global_ = base_cls.from_tensors({}, grouped.pop(GLOBAL_KEY))
        calibrator.tau_ = np.float64(np.asarray(grouped.pop(TAU_KEY)["tau"]).item())
        if any({"offset", "n"} - set(t) for t in grouped.values()):
            raise ValueError("shrinkage calibrator tensors: a domain lacks its offset or its count")
        calibrator.offsets_ = {cat: float(np.asarray(t["offset"]).item()) for cat, t in grouped.items()}
        calibrator.counts_ = {cat: int(np.asarray(t["n"]).item()) for cat, t in grouped.items()}
        return calibrator


# The one registry of calibrator kinds: the global ones above plus the per-category wrappers.
CALIBRATOR_KINDS: dict[str, type] = {
    **CALIBRATORS,
    PerCategoryCalibrator.kind: PerCategoryCalibrator,
    ShrinkageCalibrator.kind: ShrinkageCalibrator,
}


def calibrator_kind(calibrator) -> str:
    kind = getattr(type(calibrator), "kind", None)
    if CALIBRATOR_KINDS.get(kind) is not type(calibrator):
        raise ValueError(
            f"{type(calibrator).__name__} is not a probecal calibrator; known: {', '.join(CALIBRATOR_KINDS)}"
        )
    return kind


def rebuild_calibrator(kind: str, params: dict, tensors: dict[str, np.ndarray]):
    """A fitted calibrator from its kind, `get_params()` and `to_tensors()`."""
    if kind not in CALIBRATOR_KINDS:
        raise ValueError(f"unknown calibrator kind {kind!r}; known: {', '.join(CALIBRATOR_KINDS)}")
    return CALIBRATOR_KINDS[kind].from_tensors(params, tensors)
