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

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from probes.inference import (
    GLOBAL_KEY,
    check_scores,
    isotonic_probability,
    per_category_probability,
    platt_probability,
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
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            cat, _, name = key.rpartition("/")
            grouped.setdefault(cat, {})[name] = value
        if GLOBAL_KEY not in grouped:
            raise ValueError("per-category calibrator tensors lack the global fallback")
        calibrator.global_ = base_cls.from_tensors({}, grouped.pop(GLOBAL_KEY))
        calibrator.per_category_ = {cat: base_cls.from_tensors({}, t) for cat, t in grouped.items()}
        return calibrator


# The one registry of calibrator kinds: the global ones above plus the per-category wrapper.
CALIBRATOR_KINDS: dict[str, type] = {**CALIBRATORS, PerCategoryCalibrator.kind: PerCategoryCalibrator}


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
