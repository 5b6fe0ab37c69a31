"""Probe estimators: read a hidden-state vector, score how likely the model's answer is correct.

All probes follow the scikit-learn contract (`__init__` only assigns, learned state ends in `_`,
`fit` returns self) and are binary classifiers over `y` with 1 = answer correct:

    fit(X [n, hidden], y [n]) -> self
    decision_function(X [n, hidden]) -> score [n]          higher = more likely correct (a logit)
    predict_proba(X [n, hidden]) -> [n, 2]                 column 1 = P(correct) (uncalibrated)

Prediction is plain numpy over the learned tensors, so `to_tensors()` + `get_params()` fully describe a
fitted probe and `rebuild(kind, params, tensors)` restores it without pickle (see probes/artifact.py).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from probes.inference import logistic_decision, mass_mean_decision, mlp_decision, sigmoid

CLASS_WEIGHTS = ("balanced", None)
SHRINKAGE_WORDS = ("auto",)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def standardize_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and scale [hidden]; constant columns get scale 1 so they map to 0 instead of nan."""
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return mean, scale


def balanced_weights(y01: np.ndarray, class_weight) -> np.ndarray:
    """Per-sample weights [n]: n / (2 * n_class) for "balanced" (sklearn's rule), (w_wrong, w_correct)
    for a pair, else 1."""
    if class_weight is None:
        return np.ones(len(y01))
    if isinstance(class_weight, tuple):
        return np.where(y01 == 1, float(class_weight[1]), float(class_weight[0]))
    n_pos = y01.sum()
    n_neg = len(y01) - n_pos
    return np.where(y01 == 1, len(y01) / (2.0 * n_pos), len(y01) / (2.0 * n_neg))


def logistic_fold_fit(
    Z: np.ndarray,
    y01: np.ndarray,
    train_masks: np.ndarray,
    C: float,
    class_weight: str | tuple[float, float] | None = "balanced",
    tol: float = 1e-4,
    max_iter: int = 300,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """L2 logistic regression fit on several row subsets of one matrix at once (the CV folds).

    Z [n, d] (already standardized), y01 [n] in {0, 1}, train_masks [k, n] bool.
    class_weight: "balanced", None or (weight of label 0, weight of label 1).
    init: optional starting (coef [k, d], intercept [k]), e.g. the solution for a nearby C (warm start).
    Returns (coef [k, d], intercept [k], iterations) minimizing, per fold, sklearn's objective
    sum_i w_i * logloss_i + ||coef||^2 / (2 C) over the fold's training rows (intercept unpenalized).

    Why not sklearn: the sweep fits 31 layers x 3 positions x 5 folds. This is bound optimization with
    Böhning's quadratic bound (logistic Hessian <= X'WX / 4). One bound matrix serves every fold: with each
    class's largest per-fold weight given to all of its rows, B = X'W_max X / 4 + penalty dominates every
    fold's Hessian, so one Gram matrix and one Cholesky factor per call suffice, and each iteration costs two matrix
    products shared by all folds. Monotone, no line search; converges linearly (fast when C is small).
    """
    n, d = Z.shape
    k = train_masks.shape[0]
    # float32 input stays float32 for the matrix products (2x faster; plenty for a probe); solves in float64
    dtype = np.float32 if Z.dtype == np.float32 else np.float64
    Z1 = np.hstack([Z, np.ones((n, 1), dtype=dtype)])
    penalty = np.full(d + 1, 1.0 / C)
    penalty[-1] = 0.0  # the intercept is not regularized (as in sklearn)

    weights = np.zeros((n, k))
    for f in range(k):
        rows = train_masks[f]
        weights[rows, f] = balanced_weights(y01[rows], class_weight)
    heaviest = weights.max(axis=1)  # per row: its largest weight over folds (rows of one class share it)
    for c in (0, 1):
        rows = y01 == c
        heaviest[rows] = heaviest[rows].max() if rows.any() else 0.0
    scaled = Z1 * np.sqrt(heaviest, dtype=dtype)[:, None]
    bound = 0.25 * (scaled.T @ scaled).astype(np.float64) + np.diag(
        penalty
    )  # a.T @ a: symmetric rank-k update
    bound[-1, -1] += 1e-9 * max(1.0, bound[-1, -1])  # keeps a one-class problem positive definite
    factor = cho_factor(bound)

    W = np.zeros((k, d + 1)) if init is None else np.column_stack([init[0], init[1]]).astype(np.float64)
    yk = y01[:, None].astype(dtype)
    weights = weights.astype(dtype)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        residual = weights * (expit(Z1 @ W.T.astype(dtype)) - yk)  # [n, k]
        grad = (Z1.T @ residual).T + W * penalty  # [k, d+1]
        step = cho_solve(factor, grad.T).T
        W -= step
        if np.max(np.abs(step)) <= tol * (1.0 + np.max(np.abs(W))):
            break
    return W[:, :d], W[:, d], iterations


class _Probe(ClassifierMixin, BaseEstimator):
    """Shared plumbing: input checks, binary labels, probabilities from the decision function."""

    kind: str = ""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # P(correct) vs P(wrong): binary only
        return tags

    def _fit_inputs(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """Validated X [n, hidden] float and y01 [n] (1 = classes_[1], i.e. "correct" for 0/1 labels)."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) == 1:
            raise ValueError(
                f"{type(self).__name__} needs both classes (correct and wrong answers) in y to fit; "
                f"got one class only: {self.classes_.tolist()}"
            )
        if len(self.classes_) > 2:
            raise ValueError(
                f"Only binary classification is supported. {type(self).__name__} got "
                f"{len(self.classes_)} classes; y must be 1 = correct, 0 = wrong"
            )
        return X, (y == self.classes_[1]).astype(np.int64)

    def _class_weight(self):
        """class_weight as logistic_fold_fit takes it: "balanced", None, or (w for classes_[0], w for classes_[1])."""
        cw = self.class_weight
        if isinstance(cw, dict):
            return (float(cw.get(self.classes_[0], 1.0)), float(cw.get(self.classes_[1], 1.0)))
        _check_choice("class_weight", cw, CLASS_WEIGHTS + ("a dict {label: weight}",))
        return cw

    def _predict_inputs(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=np.float64)

    def predict_proba(self, X) -> np.ndarray:
        """[n, 2]: column 1 = P(classes_[1]) = P(correct) for 0/1 labels (uncalibrated)."""
        p = sigmoid(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[(self.decision_function(X) > 0).astype(int)]

    # -- serialization (no pickle): tensors + JSON params ---------------------------------------
    def to_tensors(self) -> dict[str, np.ndarray]:
        check_is_fitted(self)
        if not np.issubdtype(self.classes_.dtype, np.number):
            raise ValueError(f"only numeric class labels can be saved; got {self.classes_.tolist()}")
        state = {name: np.asarray(getattr(self, name + "_")) for name in self._tensor_names()}
        state["classes"] = self.classes_.astype(np.int64)
        return state

    @classmethod
    def from_tensors(cls, params: dict, tensors: dict[str, np.ndarray]):
        missing = {*cls._tensor_names(), "classes"} - set(tensors)
        if missing:
            raise ValueError(f"{cls.__name__} tensors lack {sorted(missing)}")
        probe = cls(**params)
        for name in cls._tensor_names():
            setattr(probe, name + "_", np.asarray(tensors[name]))
        probe.classes_ = np.asarray(tensors["classes"])
        probe.n_features_in_ = int(probe._n_features_from_tensors())
        return probe


class LogisticProbe(_Probe):
    """Standardization + L2 logistic regression. Higher decision_function = more likely correct.

    C: inverse regularization strength on standardized features; None = chosen from `Cs` by
    stratified `cv`-fold cross-validation (class-weighted held-out log-loss) on the training data only,
    walking Cs from small to large with warm starts and stopping after two consecutive worse values.
    class_weight: "balanced" (weights n / (2 n_class)), None, or a dict {label: weight}.
    Learned: mean_, scale_ [hidden], coef_ [hidden] (on standardized inputs), intercept_ (scalar), C_.
    """

    kind = "logistic"

    def __init__(
        self,
        C: float | None = None,
        Cs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
        cv: int = 5,
        class_weight: str | None = "balanced",
        max_iter: int = 500,
        tol: float = 1e-4,
        random_state: int = 0,
    ):
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    @staticmethod
    def _tensor_names():
        return ("mean", "scale", "coef", "intercept", "C")

    def _n_features_from_tensors(self):
        return self.coef_.shape[0]

    def fit(self, X, y):
        """X [n, hidden], y [n] (1 = correct). Returns self."""
        if self.C is not None and not self.C > 0:
            raise ValueError(f"C={self.C!r} must be > 0 (or None to choose it by cross-validation)")
        X, y01 = self._fit_inputs(X, y)
        self.mean_, self.scale_ = self._standardization(X)
        Z = (X - self.mean_) / self.scale_
        C = float(self.C) if self.C is not None else self._choose_C(Z, y01)
        coef, intercept, self.n_iter_ = logistic_fold_fit(
            Z, y01, np.ones((1, len(y01)), dtype=bool), C, self._class_weight(), self.tol, self.max_iter
        )
        self.coef_, self.intercept_, self.C_ = coef[0], np.float64(intercept[0]), np.float64(C)
        return self

    def _standardization(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale) [n_features] that standardize X before the L2-penalized fit."""
        return standardize_stats(X)

    def _choose_C(self, Z: np.ndarray, y01: np.ndarray) -> float:
        Cs = [float(c) for c in self.Cs]
        if not Cs or min(Cs) <= 0:
            raise ValueError(f"Cs={self.Cs!r} must be a non-empty list of positive numbers")
        n_splits = min(int(self.cv), int(np.bincount(y01).min()))
        if n_splits < 2:  # too few examples of one class for any CV: fall back to the conventional C=1
            return 1.0
        folds = StratifiedKFold(n_splits, shuffle=True, random_state=self.random_state).split(Z, y01)
        masks = np.zeros((n_splits, len(y01)), dtype=bool)
        for f, (train, _) in enumerate(folds):
            masks[f, train] = True
        losses, previous = [], None
        for C in sorted(Cs):  # small C first: each solution warm-starts the next, less regularized one
            coef, intercept, _ = logistic_fold_fit(
                Z, y01, masks, C, self._class_weight(), 1e-3, self.max_iter, init=previous
            )
            previous = (coef, intercept)
            loss = 0.0
            for f in range(n_splits):
                held = ~masks[f]
                logit = Z[held] @ coef[f] + intercept[f]
                w = balanced_weights(y01[held], self._class_weight())
                loss += np.sum(w * (np.logaddexp(0, logit) - y01[held] * logit)) / w.sum()
            losses.append(loss / n_splits)
            # held-out loss is (nearly always) unimodal in C: two worse steps in a row end the path early,
            # which skips the weakly regularized fits that are the slowest to converge
            if len(losses) >= 3 and losses[-1] > losses[-2] > min(losses):
                break
        return sorted(Cs)[int(np.argmin(losses))]

    def decision_function(self, X) -> np.ndarray:
        """score [n] (a logit; higher = more likely correct)."""
        X = self._predict_inputs(X)
        return logistic_decision(X, self.mean_, self.scale_, self.coef_, self.intercept_)


class MassMeanProbe(_Probe):
    """Difference of class means (Marks & Tegmark, "The Geometry of Truth").

    direction = mean(correct) - mean(wrong), or with covariance=True the "IID" variant
    Sigma^-1 (mean(correct) - mean(wrong)) with Sigma the pooled within-class covariance shrunk towards a
    scaled identity (shrinkage "auto" = Ledoit-Wolf, or a float in [0, 1]). A 1-D logistic fit on the
    projection turns it into a logit: decision_function = scale_ * (x @ direction_) + offset_.
    Higher = more likely correct. Learned: direction_ [hidden], scale_, offset_.
    """

    kind = "mass_mean"

    def __init__(self, covariance: bool = False, shrinkage="auto", class_weight: str | None = "balanced"):
        self.covariance = covariance
        self.shrinkage = shrinkage
        self.class_weight = class_weight

    @staticmethod
    def _tensor_names():
        return ("direction", "scale", "offset")

    def _n_features_from_tensors(self):
        return self.direction_.shape[0]

    def fit(self, X, y):
        """X [n, hidden], y [n] (1 = correct). Returns self."""
        if not (
            self.shrinkage in SHRINKAGE_WORDS
            or (isinstance(self.shrinkage, int | float) and 0 <= self.shrinkage <= 1)
        ):
            raise ValueError(
                f"shrinkage={self.shrinkage!r} is not allowed; allowed values: 'auto' or a number in [0, 1]"
            )
        X, y01 = self._fit_inputs(X, y)
        mu_pos, mu_neg = X[y01 == 1].mean(axis=0), X[y01 == 0].mean(axis=0)
        direction = mu_pos - mu_neg
        if self.covariance:
            centered = np.where(y01[:, None] == 1, X - mu_pos, X - mu_neg)
            direction = np.linalg.solve(self._shrunk_covariance(centered), direction)
        projection = X @ direction
        coef, intercept, _ = logistic_fold_fit(
            ((projection - projection.mean()) / (projection.std() or 1.0))[:, None],
            y01,
            np.ones((1, len(y01)), dtype=bool),
            C=1e4,  # nearly unregularized: only a scale and an offset are learned here
            class_weight=self._class_weight(),
        )
        spread = projection.std() or 1.0
        self.direction_ = direction
        self.scale_ = np.float64(coef[0, 0] / spread)
        self.offset_ = np.float64(intercept[0] - coef[0, 0] * projection.mean() / spread)
        return self

    def _shrunk_covariance(self, centered: np.ndarray) -> np.ndarray:
        from sklearn.covariance import ledoit_wolf_shrinkage

        n, d = centered.shape
        cov = centered.T @ centered / n
        if self.shrinkage == "auto":
            shrink = ledoit_wolf_shrinkage(centered, assume_centered=True) if n > 1 else 1.0
        else:
            shrink = float(self.shrinkage)
        target = np.trace(cov) / d or 1.0
        return (1 - shrink) * cov + shrink * target * np.eye(d) + 1e-10 * np.eye(d)

    def decision_function(self, X) -> np.ndarray:
        """score [n] (a logit; higher = more likely correct)."""
        X = self._predict_inputs(X)
        return mass_mean_decision(X, self.direction_, self.scale_, self.offset_)


class MLPProbe(_Probe):
    """Standardization + one hidden ReLU layer + logistic output, trained by scikit-learn's MLPClassifier
    (Adam, L2 `alpha`, early stopping off) with balanced sample weights.

    Higher decision_function = more likely correct. Learned: mean_, scale_ [hidden], w1_ [hidden, h],
    b1_ [h], w2_ [h], b2_ (prediction is numpy over these, so a saved probe needs no sklearn object).
    """

    kind = "mlp"

    def __init__(
        self,
        hidden_size: int = 64,
        alpha: float = 1e-2,
        max_iter: int = 200,
        learning_rate_init: float = 1e-3,
        class_weight: str | None = "balanced",
        random_state: int = 0,
    ):
        self.hidden_size = hidden_size
        self.alpha = alpha
        self.max_iter = max_iter
        self.learning_rate_init = learning_rate_init
        self.class_weight = class_weight
        self.random_state = random_state

    @staticmethod
    def _tensor_names():
        return ("mean", "scale", "w1", "b1", "w2", "b2")

    def _n_features_from_tensors(self):
        return self.w1_.shape[0]

    def fit(self, X, y):
        """X [n, hidden], y [n] (1 = correct). Returns self."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        if int(self.hidden_size) < 1:
            raise ValueError(f"hidden_size={self.hidden_size!r} must be >= 1")
        X, y01 = self._fit_inputs(X, y)
        self.mean_, self.scale_ = standardize_stats(X)
        mlp = MLPClassifier(
            hidden_layer_sizes=(int(self.hidden_size),),
            alpha=self.alpha,
            max_iter=self.max_iter,
            learning_rate_init=self.learning_rate_init,
            random_state=self.random_state,
        )
        with warnings.catch_warnings():
            # A probe trained for a fixed budget is fine for ranking; the warning is noise here.
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp.fit(
                (X - self.mean_) / self.scale_, y01, sample_weight=balanced_weights(y01, self._class_weight())
            )
        self.n_iter_ = mlp.n_iter_
        self.w1_, self.w2_ = mlp.coefs_[0], mlp.coefs_[1][:, 0]
        self.b1_, self.b2_ = mlp.intercepts_[0], np.float64(mlp.intercepts_[1][0])
        return self

    def decision_function(self, X) -> np.ndarray:
        """score [n] (a logit; higher = more likely correct)."""
        X = self._predict_inputs(X)
        return mlp_decision(X, self.mean_, self.scale_, self.w1_, self.b1_, self.w2_, self.b2_)


class HybridProbe(LogisticProbe):
    """LogisticProbe over the hidden state AND the model's own logit signals: X [n, hidden + m], whose last
    m columns are the logit signals named by `logit_features`, in that order, oriented higher = more
    confident (probes.inference.logit_feature_matrix builds them from a store's baselines, and
    probes.inference.probe_input builds X the same way when serving).

    Why: logit signals (sequence probability, mean log-probability) keep their ranking across domains while
    hidden-state directions learned on a few domains do not; the hybrid leans on both. logit_weight scales
    the standardized logit columns, which divides their L2 penalty by logit_weight**2 (a handful of strong
    signals next to hundreds of hidden columns). Higher decision_function = more likely correct.
    Learned: as LogisticProbe (mean_, scale_ and coef_ span hidden + m columns).
    """

    kind = "hybrid"

    def __init__(
        self,
        logit_features=("mean_logprob",),
        logit_weight: float = 1.0,
        C: float | None = None,
        Cs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
        cv: int = 5,
        class_weight: str | None = "balanced",
        max_iter: int = 500,
        tol: float = 1e-4,
        random_state: int = 0,
    ):
        self.logit_features = logit_features
        self.logit_weight = logit_weight
        super().__init__(C, Cs, cv, class_weight, max_iter, tol, random_state)

    @property
    def n_hidden_features(self) -> int:
        """Width of the hidden-state part of X (what the model's hidden size must equal)."""
        check_is_fitted(self)
        return int(self.n_features_in_) - len(self.logit_features)

    def fit(self, X, y):
        """X [n, hidden + m] (hidden state, then the m logit signals), y [n] (1 = correct). Returns self."""
        m = len(self.logit_features)
        if m < 1 or not all(isinstance(name, str) for name in self.logit_features):
            raise ValueError(f"logit_features={self.logit_features!r} must name at least one logit signal")
        if not self.logit_weight > 0:
            raise ValueError(f"logit_weight={self.logit_weight!r} must be > 0")
        return super().fit(X, y)

    def _standardization(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = len(self.logit_features)
        if X.shape[1] <= m:
            raise ValueError(
                f"X has {X.shape[1]} columns; expected the hidden state followed by {m} logit signals"
            )
        mean, scale = standardize_stats(X)
        scale[-m:] /= float(
            self.logit_weight
        )  # standardized logit columns come out logit_weight times larger
        return mean, scale


def register_probe(cls: type[_Probe]) -> type[_Probe]:
    """Add a probe class to the one registry of kinds (keyed by its `kind`), so artifacts can save and load it."""
    if not cls.kind or cls.kind in PROBES:
        raise ValueError(f"{cls.__name__}: probe kind {cls.kind!r} is empty or already registered")
    PROBES[cls.kind] = cls
    return cls


PROBES: dict[str, type[_Probe]] = {}
for _cls in (LogisticProbe, MassMeanProbe, MLPProbe, HybridProbe):
    register_probe(_cls)


def probe_kind(probe) -> str:
    kind = getattr(type(probe), "kind", None)
    if PROBES.get(kind) is not type(probe):
        raise ValueError(f"{type(probe).__name__} is not a probecal probe; known kinds: {', '.join(PROBES)}")
    return kind


def rebuild_probe(kind: str, params: dict, tensors: dict[str, np.ndarray]) -> _Probe:
    """A fitted probe from its kind, `get_params()` and `to_tensors()` (the artifact's contents)."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe kind {kind!r}; known kinds: {', '.join(PROBES)}")
    return PROBES[kind].from_tensors(params, tensors)
