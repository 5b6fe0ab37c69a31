"""The inference math of every probe and calibrator kind, in numpy alone: the one place it lives.

    decision score [n] = PROBE_DECISIONS[kind].function(X [n, features], *the kind's saved tensors)
    P(correct) [n]     = CALIBRATOR_PROBABILITIES[kind].function(score [n], *the kind's saved tensors)
                         (per_category: one base calibrator per category + a global fallback, see below;
                          shrinkage: the global calibrator's logit + a per-category offset)

Higher score and higher P(correct) = more likely correct. The sklearn estimators (probes.estimators,
probes.calibration) call these same functions from `decision_function` / `predict`, and
`probe_decision` / `calibrated_probability` build them straight from an artifact's params + tensors, so
probes.scorer.ProbeScorer needs numpy and safetensors only (no scikit-learn, no scipy). A newly
registered probe or calibrator kind needs an entry here before ProbeScorer can serve it
(tests/unit/test_inference.py checks every registered kind).

A hybrid probe reads X = [hidden state, logit features]: `logit_feature_matrix` turns the model's raw logit
signals (extract.generation.BASELINE_NAMES, as generation records them per answer) into its feature columns,
and `probe_input` joins them to the hidden state. Training (probes.training, probes.evaluation.transfer)
and serving (probes.runtime.wrapper, ProbeScorer) all build a hybrid's input through these two functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

GLOBAL_KEY = "__global__"  # per-category tensors: "<category>/<name>", the fallback under this category name
PER_CATEGORY = "per_category"
SHRINKAGE = "shrinkage"
TAU_KEY = (
    "__prior__"  # shrinkage tensors: "__prior__/tau" (the prior's width), "<domain>/offset", "<domain>/n"
)
LOGIT_CLIP = 1e-9  # a base calibrator's p is clipped to [1e-9, 1 - 1e-9] before its logit is shifted


class InferenceError(ValueError):
    """A kind without numpy inference, or saved tensors that do not fit the kind."""


def sigmoid(z) -> np.ndarray:
    """1 / (1 + exp(-z)), without overflow for large negative z."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# -- probes: X [n, features] -> decision score [n] (a logit) ------------------------------------------
def logistic_decision(X, mean, scale, coef, intercept) -> np.ndarray:
    """Standardize, then a linear logit: ((X - mean) / scale) @ coef + intercept."""
    return ((X - mean) / scale) @ coef + intercept


def mass_mean_decision(X, direction, scale, offset) -> np.ndarray:
    """Projection on the mass-mean direction, scaled and shifted into a logit."""
    return scale * (X @ direction) + offset


def mlp_decision(X, mean, scale, w1, b1, w2, b2) -> np.ndarray:
    """Standardize, one ReLU layer, a linear logit."""
    hidden = np.maximum(((X - mean) / scale) @ w1 + b1, 0.0)
    return hidden @ w2 + b2


# -- the model's logit signals: which way each one points ---------------------------------------------
HIGHER_IS_CONFIDENT = {
    "mean_logprob": 1, "min_logprob": 1, "sum_logprob": 1, "first_logprob": 1,
    "p_true": 1, "verbalized": 1, "max_prob": 1, "mean_prob": 1, "first_token_prob": 1, "sequence_prob": 1,
    "mean_entropy": -1, "max_entropy": -1, "perplexity": -1,
}  # fmt: skip
LOGPROB_SCORES = {"mean_logprob", "min_logprob", "sum_logprob", "first_logprob"}
# first_token_prob and sequence_prob are the names extract.generation.BASELINE_NAMES records
PROBABILITY_SCORES = {"p_true", "verbalized", "max_prob", "mean_prob", "first_token_prob", "sequence_prob"}


def oriented(name: str, scores, directions: dict[str, int] | None = None) -> np.ndarray:
    """scores [n] turned so that higher = more confident (negated where lower means more confident)."""
    sign = {**HIGHER_IS_CONFIDENT, **(directions or {})}.get(name, 1)
    if sign not in (1, -1):
        raise ValueError(f"direction of {name!r} must be 1 or -1; got {sign!r}")
    return sign * np.asarray(scores, dtype=np.float64)


def raw_probability(name: str, scores) -> np.ndarray | None:
    """The baseline's own P(correct) [n] when it has one (exp of a log-probability, or a probability), else None."""
    if name in LOGPROB_SCORES:
        return np.exp(np.minimum(np.asarray(scores, dtype=np.float64), 0.0))
    if name in PROBABILITY_SCORES:
        return np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    return None


# -- a hybrid probe's input: hidden state + logit signals ---------------------------------------------
PROBABILITY_FLOOR = 1e-6  # log of a probability signal is clipped here (a 0 would be -inf)


def logit_feature_matrix(
    baselines: Mapping[str, np.ndarray], names: Sequence[str] | None = None
) -> np.ndarray:
    """[n, m] logit signals as probe features, oriented (higher = more confident) and unbounded:
    log-probabilities as they are, probabilities as their log (floored at 1e-6), perplexity as its log
    (= -mean log-probability), entropies negated. names: which baselines, in order (None = sorted names)."""
    names = sorted(baselines) if names is None else list(names)
    missing = [n for n in names if n not in baselines]
    if missing:
        raise ValueError(f"logit features {missing} are not among the baselines {sorted(baselines)}")
    columns = []
    for name in names:
        values = np.asarray(baselines[name], dtype=np.float64)
        if name in PROBABILITY_SCORES:
            columns.append(np.log(np.clip(values, PROBABILITY_FLOOR, 1.0)))
        elif name == "perplexity":
            columns.append(-np.log(np.maximum(values, 1e-12)))
        else:
            columns.append(oriented(name, values))
    return np.column_stack(columns) if columns else np.zeros((len(next(iter(baselines.values()))), 0))


def probe_input(vectors: np.ndarray, logit_features: Sequence[str], logit_signals=None) -> np.ndarray:
    """X [n, hidden (+ m)] a probe reads: the hidden states `vectors` [n, hidden], then for a hybrid probe
    (`logit_features`: the m signal names its artifact lists, in order) their feature columns.

    logit_signals: the raw signals of each row's answer, as extract.generation records them (sequence_prob a
    probability, perplexity exp(-mean_logprob), ...): a dict name -> [n] (extra names are ignored), or an
    [n, m] array whose columns follow `logit_features`. Ignored (may be None) for a hidden-only probe.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    names = list(logit_features)
    if not names:
        return vectors
    if logit_signals is None:
        raise ValueError(
            f"this hybrid probe reads the model's logit signals {names} besides the hidden state; "
            "pass logit_signals (a dict name -> [n] values, or an [n, m] array in that order)"
        )
    if isinstance(logit_signals, Mapping):
        missing = [name for name in names if name not in logit_signals]
        if missing:
            raise ValueError(f"logit_signals lack {missing}; this hybrid probe reads {names}")
        signals = {name: np.atleast_1d(np.asarray(logit_signals[name], dtype=np.float64)) for name in names}
    else:
        array = np.asarray(logit_signals, dtype=np.float64)
        array = array[None] if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[1] != len(names):
            raise ValueError(
                f"logit_signals as an array must be [n, {len(names)}] with columns {names}; got shape "
                f"{tuple(np.shape(logit_signals))}"
            )
        signals = {name: array[:, k] for k, name in enumerate(names)}
    for name, values in signals.items():
        if values.shape != (len(vectors),):
            raise ValueError(
                f"logit_signals[{name!r}] has shape {values.shape}; expected [{len(vectors)}] "
                "(one value per vector)"
            )
    return np.hstack([vectors, logit_feature_matrix(signals, names)])


# -- calibrators: score [n] -> P(correct) [n] -------------------------------------------------------
def platt_probability(scores, a, b) -> np.ndarray:
    return sigmoid(a * scores + b)


def temperature_probability(scores, temperature) -> np.ndarray:
    return sigmoid(scores / temperature)


def isotonic_probability(scores, x, y) -> np.ndarray:
    """Linear between the knots x -> y, clipped outside them (as scikit-learn's IsotonicRegression)."""
    return np.interp(scores, x, y)


def per_category_probability(
    scores: np.ndarray,
    categories,
    global_probability: Callable[[np.ndarray], np.ndarray],
    per_category: Mapping[str, Callable[[np.ndarray], np.ndarray]],
) -> np.ndarray:
    """Each row through its category's calibrator; unknown categories and categories=None through the global one."""
    p = global_probability(scores)
    if categories is None:
        return p
    cats = np.asarray(categories).astype(str)
    if cats.shape != scores.shape:
        raise ValueError(f"categories has shape {cats.shape} but scores have shape {scores.shape}")
    for cat, probability in per_category.items():
        rows = cats == cat
        if rows.any():
            p[rows] = probability(scores[rows])
    return p


def shrinkage_probability(
    scores: np.ndarray,
    categories,
    global_probability: Callable[[np.ndarray], np.ndarray],
    offsets: Mapping[str, float],
) -> np.ndarray:
    """sigmoid(logit(p_global(score)) + offset[category]) [n]; unknown categories and categories=None get
    the global p unchanged (offset 0, the prior's centre)."""
    p = global_probability(scores)
    if categories is None:
        return p
    cats = np.asarray(categories).astype(str)
    if cats.shape != scores.shape:
        raise ValueError(f"categories has shape {cats.shape} but scores have shape {scores.shape}")
    shift = np.zeros(len(scores))
    for cat, offset in offsets.items():
        shift[cats == cat] = offset
    shifted = shift != 0
    if shifted.any():
        q = np.clip(p[shifted], LOGIT_CLIP, 1 - LOGIT_CLIP)
        p[shifted] = sigmoid(np.log(q) - np.log1p(-q) + shift[shifted])
    return p


def check_scores(scores) -> np.ndarray:
    """scores as float64 [n]; refuses other shapes, nan and inf."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D [n]; got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain nan or inf")
    return s


# -- the registry: kind -> function + the saved tensors it takes, in order ------------------------------
@dataclass(frozen=True)
class KindMath:
    function: Callable[..., np.ndarray]
    tensors: tuple[str, ...]  # names in the kind's to_tensors(), passed after the input in this order


PROBE_DECISIONS: dict[str, KindMath] = {
    "logistic": KindMath(logistic_decision, ("mean", "scale", "coef", "intercept")),
    "hybrid": KindMath(
        logistic_decision, ("mean", "scale", "coef", "intercept")
    ),  # logistic over hidden + logit signals
    "mass_mean": KindMath(mass_mean_decision, ("direction", "scale", "offset")),
    "mlp": KindMath(mlp_decision, ("mean", "scale", "w1", "b1", "w2", "b2")),
}
# the first tensor of each probe kind is [features]: its length is the width of X the probe reads

CALIBRATOR_PROBABILITIES: dict[str, KindMath] = {
    "platt": KindMath(platt_probability, ("a", "b")),
    "temperature": KindMath(temperature_probability, ("temperature",)),
    "isotonic": KindMath(isotonic_probability, ("x", "y")),
}
CALIBRATOR_INFERENCE_KINDS = (*CALIBRATOR_PROBABILITIES, PER_CATEGORY, SHRINKAGE)


def _arguments(
    table: dict[str, KindMath], what: str, kind: str, tensors: Mapping[str, np.ndarray], dtype=None
):
    if kind not in table:
        known = CALIBRATOR_INFERENCE_KINDS if table is CALIBRATOR_PROBABILITIES else tuple(table)
        raise InferenceError(
            f"{what} kind {kind!r} has no numpy inference function in probes.inference; kinds with one: "
            f"{', '.join(known)}"
        )
    math = table[kind]
    missing = set(math.tensors) - set(tensors)
    if missing:
        raise InferenceError(f"{what} kind {kind!r}: tensors lack {sorted(missing)}")
    return math.function, [np.asarray(tensors[name], dtype=dtype) for name in math.tensors]


def probe_input_width(kind: str, tensors: Mapping[str, np.ndarray]) -> int:
    """Columns of X the saved probe reads (hidden state, plus logit signals for a hybrid probe)."""
    _, args = _arguments(PROBE_DECISIONS, "probe", kind, tensors)
    return int(args[0].shape[0])


def probe_decision(
    kind: str, params: Mapping, tensors: Mapping[str, np.ndarray]
) -> Callable[[np.ndarray], np.ndarray]:
    """X [n, features] (float64, finite) -> decision score [n], from a saved probe's tensors (params unused
    by the current kinds: they shape fitting, not inference)."""
    function, args = _arguments(PROBE_DECISIONS, "probe", kind, tensors)
    return lambda X: function(X, *args)


def calibrated_probability(kind: str, params: Mapping, tensors: Mapping[str, np.ndarray]):
    """(scores [n], categories=None) -> P(correct) [n], from a saved calibrator's params + tensors."""
    probability = _calibrator_probability(kind, params, tensors)
    if kind in (PER_CATEGORY, SHRINKAGE):
        return lambda scores, categories=None: probability(check_scores(scores), categories)
    return lambda scores, categories=None: probability(check_scores(scores))


def group_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A grouped calibrator's tensors "<group>/<name>" as {group: {name: tensor}} (groups: domains, GLOBAL_KEY,
    TAU_KEY); the group name is everything before the last "/", so a domain may itself contain "/"."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        group, _, name = key.rpartition("/")
        grouped.setdefault(group, {})[name] = value
    return grouped


def _calibrator_probability(kind: str, params: Mapping, tensors: Mapping[str, np.ndarray]):
    if kind not in (PER_CATEGORY, SHRINKAGE):
        function, args = _arguments(CALIBRATOR_PROBABILITIES, "calibrator", kind, tensors, dtype=np.float64)
        args = [a if a.ndim else np.float64(a) for a in args]  # as the calibrator classes hold them
        return lambda scores: function(scores, *args)
    base = params.get("base")
    if base not in CALIBRATOR_PROBABILITIES:
        raise InferenceError(
            f"{kind} calibrator: base={base!r}; allowed: {', '.join(CALIBRATOR_PROBABILITIES)}"
        )
    grouped = group_tensors(tensors)
    if GLOBAL_KEY not in grouped:
        raise InferenceError(f"{kind} calibrator tensors lack the global fallback")
    fallback = _calibrator_probability(base, {}, grouped.pop(GLOBAL_KEY))
    if kind == SHRINKAGE:
        grouped.pop(TAU_KEY, None)
        if any("offset" not in t for t in grouped.values()):
            raise InferenceError("shrinkage calibrator tensors: a domain lacks its offset")
        offsets = {cat: float(np.asarray(t["offset"]).item()) for cat, t in grouped.items()}
        return lambda scores, categories: shrinkage_probability(scores, categories, fallback, offsets)
    per_category = {cat: _calibrator_probability(base, {}, t) for cat, t in grouped.items()}
    return lambda scores, categories: per_category_probability(scores, categories, fallback, per_category)
