"""Transfer selection: which (site, feature set, C) to deploy, by the held-out-domain score.

Every candidate is scored by leave-one-domain-out (`probes.evaluation.transfer.DomainFolds`: fit on the other
domains, score the held-out one) with the within-category AUROC, all folds in one batched logistic solve.
`CandidateSearch.best`: rule "heldout" takes the best held-out score; "heldout_then_cv" takes, among candidates
within a tolerance of it, the best in-domain CV within-category AUROC (`add_cv_scores`: CV folds of the train
split, for those few candidates only). The selected candidate's held-out score is optimistic (chosen on it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from probes.evaluation.metrics import within_category_auroc
from probes.evaluation.transfer import (
    FEATURE_SETS,
    DomainFolds,
    check_choice,
    design_matrix,
    fold_logistic_scores,
    nan_mean,
)

CENTERINGS = ("none", "domain")  # subtract each domain's mean activation (label-free) before the probe
# How select=transfer picks among candidates (train.select_rule):
#   heldout         - the best held-out-domain within-category AUROC
#   heldout_then_cv - among candidates within `tolerance` of that best, the best in-domain CV within-cat AUROC
SELECT_RULES = ("heldout", "heldout_then_cv")


def center_by_group(X: np.ndarray, groups) -> np.ndarray:
    """X [n, d] minus the mean of each row's group (no labels used): removes "which domain is this"."""
    X = np.array(X, dtype=np.float64, copy=True)
    groups = np.asarray(groups).astype(str)
    for g in np.unique(groups):
        rows = groups == g
        X[rows] -= X[rows].mean(axis=0)
    return X


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
    cv_auroc: float = float("nan")  # in-domain CV within-category AUROC (train split folds), when computed


@dataclass
class CandidateSearch:
    scores: list[CandidateScore]
    domains: tuple[str, ...]
    seconds: float
    settings: dict = field(default_factory=dict)

    def best(self, rule: str = "heldout", tolerance: float = 0.01) -> CandidateScore:
        """rule "heldout": the best held-out-domain score. "heldout_then_cv": among the candidates within
        `tolerance` of that best, the one with the best in-domain CV within-category AUROC (needs cv_auroc)."""
        check_choice("rule", rule, SELECT_RULES)
        top = max(self.scores, key=lambda s: np.nan_to_num(s.heldout_auroc, nan=-1.0))
        if rule == "heldout":
            return top
        near = [
            s
            for s in self.scores
            if np.nan_to_num(s.heldout_auroc, nan=-1.0) >= top.heldout_auroc - tolerance
        ]
        return max(near, key=lambda s: (np.nan_to_num(s.cv_auroc, nan=-1.0), s.heldout_auroc))

    def to_dict(self) -> dict:
        return {
            "domains": list(self.domains),
            "seconds": self.seconds,
            "settings": self.settings,
            "scores": [
                {
                    **asdict(s.candidate),
                    "heldout_auroc": s.heldout_auroc,
                    "cv_auroc": s.cv_auroc,
                    "per_domain": s.per_domain,
                }
                for s in self.scores
            ],
        }


def heldout_within_auroc(scores: np.ndarray, y, categories, folds: DomainFolds) -> dict[str, float]:
    """{domain: within-category AUROC of that fold's scores on the domain's rows}; scores [k, n]."""
    y, categories = np.asarray(y), np.asarray(categories).astype(str)
    return {
        d: within_category_auroc(
            scores[f][folds.held_out[f]], y[folds.held_out[f]], categories[folds.held_out[f]]
        ).mean
        for f, d in enumerate(folds.domains)
    }


def out_of_fold_within_auroc(
    scores: np.ndarray, fit_masks: np.ndarray, rows: np.ndarray, y, categories
) -> float:
    """Within-category AUROC of pooled out-of-fold scores: each row of `rows` scored by the fold that did not
    fit it (scores / fit_masks [j, n]; rows [n] bool = the CV rows)."""
    categories = np.asarray(categories).astype(str)
    oof = np.full(scores.shape[1], np.nan)
    for f in range(len(fit_masks)):
        held = rows & ~fit_masks[f]
        oof[held] = scores[f][held]
    ok = rows & ~np.isnan(oof)
    return float(within_category_auroc(oof[ok], np.asarray(y)[ok], categories[ok]).mean)


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
    cv_fit_masks: np.ndarray | None = None,
) -> CandidateSearch:
    """Held-out-domain within-category AUROC of every (site, feature set, C).

    features(layer, position) -> X [n, hidden] for ALL n rows (the folds pick rows); logits [n, m] or None;
    y [n] 1 = correct; categories [n]; domains [n] (needed for centering="domain").
    cv_fit_masks [j, n] bool (optional): in-domain CV folds (training rows of each; the rows of a fold's
    complement inside the union of the masks are scored). Solved in the same batched call as the domain folds;
    each candidate then also gets `cv_auroc`: the within-category AUROC of the pooled out-of-fold scores.
    """
    check_choice("centering", centering, CENTERINGS)
    for f in feature_sets:
        check_choice("features", f, FEATURE_SETS)
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs={list(Cs)!r} must be a non-empty list of positive numbers")
    if centering == "domain" and domains is None:
        raise ValueError("centering='domain' needs the rows' domains")
    y01 = np.asarray(y).astype(np.int64)
    stats_rows = folds.fit.any(axis=0)
    k = len(folds.domains)
    masks = folds.fit if cv_fit_masks is None else np.vstack([folds.fit, np.asarray(cv_fit_masks, bool)])
    cv_rows = None if cv_fit_masks is None else np.asarray(cv_fit_masks, bool).any(axis=0)
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
                        s, previous = fold_logistic_scores(Z, y01, masks, C, class_weight, previous)
                        per = heldout_within_auroc(s[:k], y01, categories, folds)
                        cv = float("nan")
                        if cv_rows is not None:
                            cv = out_of_fold_within_auroc(
                                s[k:], np.asarray(cv_fit_masks, bool), cv_rows, y01, categories
                            )
                        scores.append(
                            CandidateScore(
                                Candidate(int(layer), str(position), feature_set, float(C)),
                                nan_mean(per.values()),
                                per,
                                cv,
                            )
                        )
    settings = {
        "layers": [int(v) for v in layers],
        "positions": list(positions),
        "feature_sets": list(feature_sets),
        "Cs": [float(c) for c in Cs],
        "logit_weight": logit_weight,
        "centering": centering,
    }
    return CandidateSearch(scores, folds.domains, time.perf_counter() - start, settings)


def add_cv_scores(
    search: CandidateSearch,
    features: Callable[[int, str], np.ndarray],
    logits: np.ndarray | None,
    y,
    categories,
    cv_fit_masks: np.ndarray,
    tolerance: float,
    stats_rows,
    logit_weight: float = 1.0,
    class_weight="balanced",
    blas_threads: int | None = 1,
) -> CandidateSearch:
    """In-domain CV within-category AUROC (`cv_auroc`) for the candidates within `tolerance` of the best
    held-out score only (what select_rule=heldout_then_cv compares): a second, small batched solve per
    candidate instead of CV folds for the whole grid. The others keep cv_auroc = nan."""
    top = search.best("heldout").heldout_auroc
    y01 = np.asarray(y).astype(np.int64)
    cv_fit_masks = np.asarray(cv_fit_masks, bool)
    rows = cv_fit_masks.any(axis=0)
    start = time.perf_counter()
    updated = []
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for s in search.scores:
            c = s.candidate
            if np.nan_to_num(s.heldout_auroc, nan=-1.0) >= top - tolerance:
                Z = design_matrix(
                    np.asarray(features(c.layer, c.position)), logits, c.features, logit_weight, stats_rows
                )
                cv_scores, _ = fold_logistic_scores(Z, y01, cv_fit_masks, c.C, class_weight)
                s = CandidateScore(
                    c,
                    s.heldout_auroc,
                    s.per_domain,
                    out_of_fold_within_auroc(cv_scores, cv_fit_masks, rows, y01, categories),
                )
            updated.append(s)
    settings = {**search.settings, "cv_tolerance": tolerance}
    return CandidateSearch(updated, search.domains, search.seconds + time.perf_counter() - start, settings)
