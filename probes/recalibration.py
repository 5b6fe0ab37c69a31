"""Recalibration: refit only the calibrator and the abstention threshold of a probe on a new domain's rows.

A probe's direction transfers between domains better than its calibration does (ECE 0.147 on new question
forms against 0.053 in domain), so `recalibrate` keeps the probe and its raw score and refits the map
score -> P(correct) and the threshold on labelled rows of the new traffic. Higher scores and p = more
likely correct, as everywhere in probecal.

    rows = RecalibrationRows(score [n], y [n], domain [n], ...)   # from a file, the feedback DB, or a store
    result = recalibrate(parent_artifact, rows, kind="platt")
    if result.accepted: result.artifact.save(dir)                  # new artifact, lineage in metadata.parent

Protocol (one seeded split, stratified by domain x label, `heldout_fraction` of the rows held out):
1. fit the new calibrator on the fit part;
2. on the held-out part compare the parent's P(correct) with the new one: ECE, Brier, AUROC with bootstrap
   95% intervals, and paired bootstrap intervals of the differences (new - parent, same resamples);
3. REFUSAL RULE: the new calibrator is refused when it is worse than the parent beyond noise on the
   held-out part: the paired 95% interval of ECE(new) - ECE(parent) or of Brier(new) - Brier(parent)
   lies entirely above 0. (A worse point estimate inside the noise is reported, not refused.)
4. the calibrator written: Platt and temperature are strictly monotone in the score, so the sets
   {p >= t} are the raw score's top-k sets whatever the fit; they are refit on all rows and the threshold
   is chosen on all rows. Isotonic (merges scores into steps) and per-domain (reorders rows across
   domains) calibrators could adapt the answered sets to the labels they were fit on: the fit-part
   calibrator is kept and the threshold is chosen on the held-out part only, so its guarantee holds.
5. the threshold: probes.selection.thresholds.choose_threshold (LTT or Clopper-Pearson) at the parent's
   target accuracy and delta. When the new rows cannot support the target, the artifact abstains on
   every answer (threshold ABSTAIN_ALL, reachable False, a message saying so) instead of dropping the
   threshold: answering nothing is the only policy the data guarantees.

Shrinkage (kind="shrinkage", for 5-20 labels per domain): the parent's calibrator (its global fallback for a
per-domain parent) stays the global map and each domain gets one offset on its logit, fit by MAP with the
prior N(0, tau^2) (probes.calibration.ShrinkageCalibrator). No rows are held out: step 2 compares the parent
with CROSS-FITTED probabilities (SHRINKAGE_FOLDS folds stratified by domain x label; each row's p comes from
offsets fit without that row's fold, the same prior and tau), on every row. The refusal rule is the one above
on those rows: each p_new is out-of-sample, so a calibrator that fits noise reads worse there, and the final
calibrator (fit on all rows) is the cross-fitted ones with a little more data. The threshold is chosen on the
cross-fitted p. tau: recalibrate(tau=...), else (prior="cross_domain") the width training estimated across its
domains, else the parent's when it is a shrinkage calibrator, else the empirical-Bayes width across the new
rows' domains (>= 3 domains), else DEFAULT_TAU. prior="cross_domain" shrinks toward the Platt map training fit
on out-of-domain scores instead of the parent's calibrator: a new domain starts at the average new domain's
level, so 20 labels only have to move it by its own offset (docs/recalibration.md: floor + 0.028 at 20 labels
on held-out facts domains vs + 0.037 around the parent's calibrator).

Small data: MIN_FIT_ROWS (measured by benchmarks/bench_recalibration_rows.py: Platt 30, isotonic 50) is the
number of rows a calibrator must be fit on; below it `recalibrate` raises NotEnoughRows, saying how many more
rows it needs. For ECE <= 0.05 expect ~150 rows for Platt and ~300 for isotonic (ROWS_FOR_ECE_005).
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logit

from probes.artifact import ProbeArtifact, hash_arrays
from probes.calibration import (
    CALIBRATORS,
    DEFAULT_TAU,
    PerCategoryCalibrator,
    PlattCalibrator,
    ShrinkageCalibrator,
    TemperatureCalibrator,
    calibrator_kind,
    cross_domain_platt,
    estimate_tau,
)
from probes.domains import CLUSTER_PREFIX, DomainClusters, decode_state, fit_domain_clusters
from probes.evaluation.metrics import auroc, bootstrap_ci, brier, domain_calibration, ece
from probes.selection.thresholds import ThresholdResult, choose_threshold

KINDS = ("platt", "temperature", "isotonic", "per_domain", "shrinkage")

# Rows a calibrator must be FIT on, measured by benchmarks/bench_recalibration_rows.py (ECE with 15 uniform
# bins on 20,000 fresh rows of a synthetic new domain, mean over 100 fits):
#   rows fit on          30     50     100    150    200    300
#   platt (logistic)     0.090  0.063  0.053  0.042  0.035  0.027
#   isotonic (logistic)  0.124  0.092  0.075  0.063  0.056  0.044
#   isotonic (non-log.)  0.113  0.084  0.065  0.052  0.048  0.040   (platt stays ~0.10 there: wrong shape)
# MIN_FIT_ROWS (refused below): mean ECE <= 0.10, i.e. a refit is unlikely to be worse than a parent at
# ~0.15. ROWS_FOR_ECE_005 (advice, not enforced): mean ECE <= 0.05. Isotonic needs about twice Platt's rows.
# Temperature has no offset: on a domain whose accuracy moved it stays at ~0.12 however many rows it gets.
MIN_FIT_ROWS = {"platt": 30, "temperature": 30, "isotonic": 50, "shrinkage": 5}
ROWS_FOR_ECE_005 = {"platt": 150, "temperature": None, "isotonic": 300, "shrinkage": None}
# Shrinkage needs few rows (the prior keeps a domain with few labels at the parent) and holds none out.
SHRINKAGE_FOLDS = 10
# Per-domain: each domain with at least MIN_FIT_ROWS[base] rows (both classes) gets its own calibrator,
# the others use the global fallback fit on all domains, which itself needs MIN_FIT_ROWS[base] rows.
PER_DOMAIN_BASE = "platt"

# Above every probability: a policy "answer when p >= ABSTAIN_ALL" answers nothing.
ABSTAIN_ALL = math.nextafter(1.0, 2.0)
# Calibrators whose answered sets {p >= t} are the raw score's top-k sets whatever they were fit on.
STRICTLY_MONOTONE = ("platt", "temperature")


class NotEnoughRows(ValueError):
    """Too few labelled rows (or one class only) to recalibrate safely; the message says how many more."""


@dataclass(frozen=True)
class RecalibrationRows:
    """Labelled rows of the new traffic, all [n].

    score: the probe's raw decision_function (higher = more likely correct) at the artifact's site.
    y: 1 = correct, 0 = wrong. domain: group key for per-domain calibration ("" = one domain).
    parent_p: the parent's P(correct) for the row when it was recorded (served rows); None = recompute
    from the parent's calibrator. source: where the rows came from (for messages and the lineage record).
    """

    ids: np.ndarray
    score: np.ndarray
    y: np.ndarray
    domain: np.ndarray
    parent_p: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.score)
        for name in ("ids", "y", "domain") + (("parent_p",) if self.parent_p is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{self.source or 'rows'}: {name} has {len(getattr(self, name))} entries, score has {n}"
                )
        if not np.all(np.isfinite(np.asarray(self.score, dtype=np.float64))):
            raise ValueError(f"{self.source or 'rows'}: score contains nan or inf")
        if not np.all(np.isin(self.y, (0, 1))):
            raise ValueError(f"{self.source or 'rows'}: correct must be 0/1")

    def __len__(self) -> int:
        return len(self.score)

    def subset(self, mask: np.ndarray) -> RecalibrationRows:
        return RecalibrationRows(
            self.ids[mask],
            self.score[mask],
            self.y[mask],
            self.domain[mask],
            None if self.parent_p is None else self.parent_p[mask],
            self.source,
        )

    def data_hash(self) -> str:
        return hash_arrays(
            self.ids.astype(str),
            self.score.astype(np.float64),
            self.y.astype(np.int64),
            self.domain.astype(str),
        )


def make_rows(score, y, domain=None, ids=None, parent_p=None, source: str = "") -> RecalibrationRows:
    """RecalibrationRows from plain sequences (domain None = one domain, ids None = row numbers)."""
    score = np.asarray(score, dtype=np.float64)
    n = len(score)
    return RecalibrationRows(
        ids=np.asarray([str(i) for i in range(n)] if ids is None else ids).astype(str),
        score=score,
        y=np.asarray(y).astype(np.int64),
        # a null domain is no domain (""), never a domain named "None"
        domain=np.asarray(
            ["" if d is None else str(d) for d in ([None] * n if domain is None else domain)], dtype=str
        ),
        parent_p=None if parent_p is None else np.asarray(parent_p, dtype=np.float64),
        source=source,
    )


# -- small-data rules -------------------------------------------------------------------------------
def min_total_rows(kind: str, heldout_fraction: float) -> int:
    """Labelled rows needed so that the fit part holds MIN_FIT_ROWS of the kind (the held-out rest
    checks it). Platt/temperature are refit on all rows in the end, but the check needs its own part.
    Shrinkage holds nothing out (cross-fitting checks it)."""
    if kind == "shrinkage":
        return MIN_FIT_ROWS[kind]
    base = PER_DOMAIN_BASE if kind == "per_domain" else kind
    return math.ceil(MIN_FIT_ROWS[base] / (1.0 - heldout_fraction))


def check_enough_rows(rows: RecalibrationRows, kind: str, heldout_fraction: float) -> None:
    need = min_total_rows(kind, heldout_fraction)
    where = f"{rows.source}: " if rows.source else ""
    if len(rows) < need:
        base = PER_DOMAIN_BASE if kind == "per_domain" else kind
        if kind == "shrinkage":
            raise NotEnoughRows(
                f"{where}{len(rows)} labelled rows; recalibrating with shrinkage needs at least {need}: "
                f"label {need - len(rows)} more rows"
            )
        raise NotEnoughRows(
            f"{where}{len(rows)} labelled rows; recalibrating with {kind} needs at least {need} "
            f"({MIN_FIT_ROWS[base]} to fit {base}, the floor measured by benchmarks/bench_recalibration_rows.py, "
            f"plus a held-out {heldout_fraction:.0%} to check it): label {need - len(rows)} more rows"
        )
    n_correct = int(rows.y.sum())
    if n_correct < 2 or len(rows) - n_correct < 2:
        raise NotEnoughRows(
            f"{where}{n_correct} correct and {len(rows) - n_correct} wrong answers among {len(rows)} rows: "
            "need at least 2 of each (one in the fit part, one held out) to calibrate"
        )


def cross_fit_folds(y: np.ndarray, domain: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """fold [n] int in [0, min(n_folds, n)): seeded, stratified by domain x label (each stratum dealt round
    robin from a random start, so every fold gets about its share of each domain's correct and wrong rows)."""
    rng = np.random.default_rng(seed)
    k = max(2, min(int(n_folds), len(y)))
    fold = np.zeros(len(y), dtype=np.int64)
    strata = np.char.add(np.asarray(domain).astype(str), np.char.add("\x00", np.asarray(y).astype(str)))
    start = 0
    for stratum in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == stratum))
        fold[rows] = (start + np.arange(len(rows))) % k
        start = (start + len(rows)) % k
    return fold


PRIORS = ("parent", "cross_domain")  # what kind=shrinkage shrinks toward (recalibrate.prior)


def shrinkage_prior(parent: ProbeArtifact, prior: str = "parent"):
    """The global calibrator a shrinkage recalibration shrinks toward. prior="parent": the parent's own
    (Platt, temperature, isotonic), or the global fallback of a per-domain / shrinkage parent;
    "cross_domain": the Platt map the parent's training fit on out-of-domain scores (metadata
    cross_domain_calibration), the better start for a domain the probe never saw."""
    if prior == "cross_domain":
        record = parent.metadata.cross_domain_calibration
        if record is None:
            raise ValueError(
                "recalibrate.prior=cross_domain needs the cross-domain calibration that training stores with "
                "leave-one-domain-out (train.transfer=true, the default); this artifact has none (trained "
                "without it, or before probecal stored it): retrain, or use recalibrate.prior=parent"
            )
        return cross_domain_platt(record)
    calibrator = parent.calibrator
    if calibrator is None:
        raise ValueError(
            "recalibrate.kind=shrinkage shifts the parent's calibrator per domain, but the parent artifact has "
            "no calibrator: recalibrate with kind=platt (or per_domain) first"
        )
    return getattr(calibrator, "global_", calibrator)


def check_prior(parent: ProbeArtifact, kind: str, prior: str) -> None:
    """recalibrate.prior is allowed for this kind and parent (before any work: extraction takes minutes)."""
    if prior not in PRIORS:
        raise ValueError(f"recalibrate.prior={prior!r} is not allowed; allowed values: {', '.join(PRIORS)}")
    if prior != "parent" and kind != "shrinkage":
        raise ValueError(
            f"recalibrate.prior={prior} is what kind=shrinkage shrinks toward; kind={kind} fits its own map"
        )
    if kind == "shrinkage":
        shrinkage_prior(parent, prior)


def shrinkage_tau(
    parent: ProbeArtifact, rows: RecalibrationRows, prior, tau: float | None, prior_name: str = "parent"
) -> tuple[float, str]:
    """The prior width and where it came from (see the module doc)."""
    if tau is not None:
        return float(tau), "given"
    record = parent.metadata.cross_domain_calibration
    if prior_name == "cross_domain" and record.get("tau") is not None:
        return float(record["tau"]), f"estimated across the parent's {record['n_domains']} training domains"
    if isinstance(parent.calibrator, ShrinkageCalibrator):
        return float(parent.calibrator.tau_), "the parent's"
    p = np.clip(prior.predict(rows.score), 1e-9, 1 - 1e-9)
    estimated = estimate_tau(logit(p), rows.y, rows.domain)
    if estimated is None:
        return DEFAULT_TAU, "default (fewer than 3 domains with both classes to estimate it)"
    return estimated, "empirical Bayes across the new rows' domains"


def shrinkage_cross_fit(prior, tau: float, rows: RecalibrationRows, n_folds: int, seed: int) -> np.ndarray:
    """Out-of-fold P(correct) [n]: each fold scored by a ShrinkageCalibrator (prior, tau) fit on the other folds."""
    fold = cross_fit_folds(rows.y, rows.domain, n_folds, seed)
    base = calibrator_kind(prior)
    p = np.empty(len(rows))
    for f in np.unique(fold):
        inside = fold == f
        calibrator = ShrinkageCalibrator(base=base, tau=tau).fit(
            rows.score[~inside], rows.y[~inside], categories=rows.domain[~inside], prior=prior
        )
        p[inside] = calibrator.predict(rows.score[inside], categories=rows.domain[inside])
    return p


def split_rows(y: np.ndarray, domain: np.ndarray, heldout_fraction: float, seed: int) -> np.ndarray:
    """held_out [n] bool: a seeded split stratified by domain x label (each stratum sends about
    heldout_fraction of its rows to the held-out part; a stratum of one row stays in the fit part)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction!r} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(y), dtype=bool)
    strata = np.char.add(np.asarray(domain).astype(str), np.char.add("\x00", np.asarray(y).astype(str)))
    for stratum in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == stratum))
        held_out[rows[: int(np.floor(heldout_fraction * len(rows) + 0.5)) if len(rows) > 1 else 0]] = True
    return held_out


# -- comparison -------------------------------------------------------------------------------------
def _paired_difference_ci(
    metric: Callable, p_new, p_old, y, n_bootstrap: int, seed: int
) -> tuple[float, float]:
    """95% percentile interval of metric(p_new) - metric(p_old) over the same bootstrap resamples."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_bootstrap)):
        idx = rng.integers(0, len(y), len(y))
        values.append(metric(p_new[idx], y[idx]) - metric(p_old[idx], y[idx]))
    values = np.asarray(values)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def compare(p_parent, p_new, y, n_bins: int = 15, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """ECE / Brier / AUROC of the parent's and the new P(correct) on the same rows, each with a bootstrap
    95% interval, and the paired interval of each difference (new - parent)."""
    p_parent, p_new, y = (np.asarray(a, dtype=np.float64) for a in (p_parent, p_new, y))
    metrics = {"ece": lambda p, t: ece(p, t, n_bins), "brier": brier, "auroc": auroc}
    out: dict[str, Any] = {"n": int(len(y))}
    for name, metric in metrics.items():
        for label, p in (("before", p_parent), ("after", p_new)):
            low, high = bootstrap_ci(metric, p, y, n_bootstrap, seed)
            out[f"{name}_{label}"] = {"value": metric(p, y), "low": low, "high": high}
        low, high = _paired_difference_ci(metric, p_new, p_parent, y, n_bootstrap, seed)
        out[f"{name}_change"] = {
            "value": out[f"{name}_after"]["value"] - out[f"{name}_before"]["value"],
            "low": low,
            "high": high,
        }
    return out


def compare_by_domain(p_parent, p_new, y, domains, n_bins: int = 15) -> dict[str, dict[str, Any]]:
    """Per domain of the held-out part: {domain: {n, accuracy, ece_before, ece_after, ece_floor_before,
    ece_floor_after, smooth_ece_before, smooth_ece_after, within_floor_before, within_floor_after}} (the parent's
    and the new P(correct); floor = the ECE a perfectly calibrated p reads on the same rows, so a domain's ECE is
    read against it, not against 0). Reported, not part of the refusal rule."""
    before = domain_calibration(p_parent, y, domains, n_bins).per_domain
    after = domain_calibration(p_new, y, domains, n_bins).per_domain
    keys = ("ece", "ece_floor", "smooth_ece", "within_floor")
    return {
        d: {"n": before[d]["n"], "accuracy": before[d]["accuracy"]}
        | {f"{k}_{when}": row[d][k] for k in keys for when, row in (("before", before), ("after", after))}
        for d in before
    }


def domain_summary_lines(per_domain: dict[str, dict[str, Any]]) -> list[str]:
    """The per-domain part of `RecalibrationResult.summary`: ECE before -> after beside each one's floor."""
    lines = [
        "per domain (held-out part; floor: the ECE a calibrated p reads on the same rows; "
        "within: ECE <= floor + 0.03):",
        "| domain | n | accuracy | ECE parent (floor) | ECE recalibrated (floor) | smooth ECE parent -> recalibrated | within |",  # noqa: E501
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for d, r in per_domain.items():
        within = "/".join("yes" if r[f"within_floor_{w}"] else "no" for w in ("before", "after"))
        lines.append(
            f"| {d} | {r['n']} | {r['accuracy']:.3f} | {r['ece_before']:.4f} ({r['ece_floor_before']:.3f}) "
            f"| {r['ece_after']:.4f} ({r['ece_floor_after']:.3f}) "
            f"| {r['smooth_ece_before']:.4f} -> {r['smooth_ece_after']:.4f} | {within} |"
        )
    return lines


def refusal_reason(comparison: dict[str, Any]) -> str:
    """'' when the new calibrator may be written; else why not (the REFUSAL RULE of the module doc)."""
    worse = [m for m in ("ece", "brier") if comparison[f"{m}_change"]["low"] > 0]
    if not worse:
        return ""
    parts = [
        f"{m.upper() if m == 'ece' else m} {comparison[f'{m}_before']['value']:.4f} -> {comparison[f'{m}_after']['value']:.4f} "  # noqa: E501
        f"(paired 95% interval of the change [{comparison[f'{m}_change']['low']:+.4f}, {comparison[f'{m}_change']['high']:+.4f}])"  # noqa: E501
        for m in worse
    ]
    return (
        f"the recalibrated probe is worse than its parent on the {comparison['n']} held-out rows beyond noise: "
        + "; ".join(parts)
    )


# -- calibrators and parent probabilities --------------------------------------------------------------
def reversed_direction(calibrator) -> str:
    """'' when P(correct) rises with the probe's score; else which fitted map falls (a negative Platt slope
    or temperature): such a calibrator makes the probe's most confident answers its least trusted, which
    means the rows were not scored by this probe (or their labels are inverted), not a new calibration."""
    parts = (
        [("global", calibrator.global_), *sorted(calibrator.per_category_.items())]
        if isinstance(calibrator, PerCategoryCalibrator)
        else [("", calibrator)]
    )
    falling = [
        f"{name + ' ' if name else ''}{attr} = {float(getattr(c, attr)):.3f}"
        for name, c in parts
        for attr in ("a_", "temperature_")
        if hasattr(c, attr) and float(getattr(c, attr)) < 0
    ]
    if not falling:
        return ""
    return (
        f"the calibrator fit on these rows reverses the probe's direction ({', '.join(falling)} < 0: higher "
        "scores would mean less likely correct); were the rows scored by another probe, or are the labels "
        "inverted?"
    )


def new_calibrator(kind: str):
    if kind == "shrinkage":
        return ShrinkageCalibrator()
    if kind == "per_domain":
        return PerCategoryCalibrator(base=PER_DOMAIN_BASE, min_count=MIN_FIT_ROWS[PER_DOMAIN_BASE])
    if kind not in CALIBRATORS or kind not in KINDS:
        raise ValueError(f"recalibrate.kind={kind!r} is not allowed; allowed values: {', '.join(KINDS)}")
    return CALIBRATORS[kind]()


def parent_probabilities(parent: ProbeArtifact, rows: RecalibrationRows) -> np.ndarray:
    """The parent's P(correct) [n]: as recorded with the rows when they carry it, else its calibrator applied
    to the scores (domains passed as its categories: a per-category parent uses those it knows)."""
    if rows.parent_p is not None:
        return rows.parent_p
    if parent.calibrator is None:
        raise ValueError(
            f"{rows.source or 'rows'}: the parent artifact has no calibrator, so its P(correct) cannot be computed "
            "from scores alone: give rows with p_correct, or hidden states (data=...)"
        )
    return parent.calibrator.predict(rows.score, categories=rows.domain)


def scores_from_parent_p(parent: ProbeArtifact, p: np.ndarray, source: str) -> np.ndarray:
    """Raw scores [n] behind the parent's P(correct), for rows that carry p only. Platt and temperature are
    invertible; other calibrators merge scores, so their rows must carry the score."""
    calibrator = parent.calibrator
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    if isinstance(calibrator, PlattCalibrator) and calibrator.a_ != 0:
        return (logit(p) - calibrator.b_) / calibrator.a_
    if isinstance(calibrator, TemperatureCalibrator):
        return logit(p) * calibrator.temperature_
    kind = "none" if calibrator is None else type(calibrator).__name__
    raise ValueError(
        f"{source}: rows carry p_correct but no score, and the parent's calibrator ({kind}) cannot be "
        "inverted (only platt and temperature can): record the probe's raw score in a `score` field"
    )


# -- the recalibration ---------------------------------------------------------------------------------
@dataclass
class RecalibrationResult:
    accepted: bool
    reason: str  # why it was refused ('' when accepted)
    calibrator: Any
    threshold: ThresholdResult
    comparison: dict[str, Any]  # held-out part: before/after metrics with intervals
    record: dict[str, Any]  # the lineage record: data hash, rows, kind, split, seed, ...
    artifact: ProbeArtifact | None = None  # the new artifact (None when refused)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.comparison
        lines = [
            f"held-out rows: {c['n']} (of {self.record['n_rows']}; fit on {self.record['n_fit']})",
            "| metric | parent | recalibrated | change (paired 95% CI) |",
            "|---|---:|---:|---:|",
        ]
        for name in ("ece", "brier", "auroc"):
            before, after, change = c[f"{name}_before"], c[f"{name}_after"], c[f"{name}_change"]
            lines.append(
                f"| {name.upper() if name != 'brier' else 'Brier'} | {before['value']:.4f} [{before['low']:.3f}, {before['high']:.3f}] "  # noqa: E501
                f"| {after['value']:.4f} [{after['low']:.3f}, {after['high']:.3f}] "
                f"| {change['value']:+.4f} [{change['low']:+.3f}, {change['high']:+.3f}] |"
            )
        if c.get("per_domain"):
            lines += domain_summary_lines(c["per_domain"])
        t = self.threshold
        if t.reachable:
            lines.append(
                f"threshold: abstain below p={t.threshold:.3f} (target {t.target_accuracy:g} at delta "
                f"{t.delta:g}, {t.method}; coverage {t.coverage:.3f} on {t.n_calibration} rows)"
            )
        else:
            lines.append(f"threshold: {t.message}")
        lines += self.notes
        lines.append("accepted" if self.accepted else f"REFUSED: {self.reason}")
        return "\n".join(lines)


def _parent_threshold_settings(parent: ProbeArtifact) -> dict[str, Any]:
    for entry in parent.thresholds:
        if {"target_accuracy", "delta", "method"} <= set(entry):
            return {k: entry[k] for k in ("target_accuracy", "delta", "method")}
    return {}


def guarded_threshold(p, y, target_accuracy: float, delta: float, method: str) -> ThresholdResult:
    """choose_threshold, but an unreachable target abstains on everything (threshold ABSTAIN_ALL) instead
    of dropping the threshold, and the message says so."""
    result = choose_threshold(p, y, target_accuracy, delta, method)
    if result.reachable:
        return result
    return ThresholdResult(
        threshold=ABSTAIN_ALL,
        target_accuracy=target_accuracy,
        delta=delta,
        method=method,
        coverage=0.0,
        empirical_accuracy=None,
        risk_upper_bound=None,
        reachable=False,
        n_calibration=len(p),
        message=(
            f"the {len(p)} new rows cannot support accuracy {target_accuracy:g} at delta {delta:g} ({method}): "
            "abstaining on every answer until more labelled rows arrive (or lower the target)"
        ),
    )


def recalibrate(
    parent: ProbeArtifact,
    rows: RecalibrationRows,
    kind: str = "platt",
    heldout_fraction: float = 0.5,
    seed: int = 0,
    target_accuracy: float | None = None,
    delta: float | None = None,
    threshold_method: str | None = None,
    n_bins: int = 15,
    n_bootstrap: int = 1000,
    tau: float | None = None,
    refit: DomainRefit | None = None,
    prior: str = "parent",
) -> RecalibrationResult:
    """Refit the calibrator (kind in KINDS) and the abstention threshold of `parent` on `rows`.

    prior (kind="shrinkage" only): "parent" shrinks toward the parent's calibrator, "cross_domain" toward the
    out-of-domain Platt map its training stored (shrinkage_prior), with its tau unless `tau` is given.

    target_accuracy / delta / threshold_method: None = the parent's (else 0.9 / 0.1 / ltt).
    tau: the prior width of kind="shrinkage" (None: see the module doc); heldout_fraction is unused there.
    refit: domain clusters refit on served traffic (`refit_domains`, whose rows carry the reassigned domains):
    the child carries them instead of the parent's and its lineage record says how they were fit.
    Raises NotEnoughRows below the small-data minimum. See the module doc for the protocol and rules.
    """
    new_calibrator(kind)  # validates kind before any work
    check_prior(parent, kind, prior)
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(
            f"recalibrate.heldout_fraction={heldout_fraction!r} must be strictly between 0 and 1 (the share of "
            "rows held out to check the new calibrator; 0.5 by default)"
        )
    check_enough_rows(rows, kind, heldout_fraction)
    inherited = _parent_threshold_settings(parent)
    target_accuracy = (
        target_accuracy if target_accuracy is not None else inherited.get("target_accuracy", 0.9)
    )
    delta = delta if delta is not None else inherited.get("delta", 0.1)
    threshold_method = threshold_method or inherited.get("method", "ltt")

    if kind == "shrinkage":
        return _recalibrate_shrinkage(
            parent,
            rows,
            seed,
            target_accuracy,
            delta,
            threshold_method,
            n_bins,
            n_bootstrap,
            tau,
            refit,
            prior,
        )
    held_out = split_rows(rows.y, rows.domain, heldout_fraction, seed)
    fit, check = rows.subset(~held_out), rows.subset(held_out)
    for part, name in ((fit, "fit"), (check, "held-out")):
        if part.y.min() == part.y.max():
            raise NotEnoughRows(
                f"{rows.source or 'rows'}: the {name} part holds one class only; label more rows"
            )
    calibrator = new_calibrator(kind).fit(fit.score, fit.y, categories=fit.domain)
    p_parent = parent_probabilities(parent, check)
    p_new = calibrator.predict(check.score, categories=check.domain)
    comparison = compare(p_parent, p_new, check.y, n_bins, n_bootstrap, seed)
    comparison["per_domain"] = compare_by_domain(p_parent, p_new, check.y, check.domain, n_bins)
    reason = reversed_direction(calibrator) or refusal_reason(comparison)

    notes = []
    if kind in STRICTLY_MONOTONE:
        calibrator = new_calibrator(kind).fit(rows.score, rows.y, categories=rows.domain)
        threshold = guarded_threshold(
            calibrator.predict(rows.score, categories=rows.domain),
            rows.y,
            target_accuracy,
            delta,
            threshold_method,
        )
        reason = reason or reversed_direction(calibrator)
        notes.append(
            f"calibrator refit on all {len(rows)} rows ({kind} is strictly monotone: the held-out numbers "
            "above are for the fit-part calibrator, a conservative estimate)"
        )
    else:
        threshold = guarded_threshold(p_new, check.y, target_accuracy, delta, threshold_method)
        notes.append(
            f"calibrator fit on the {len(fit)} fit rows; threshold chosen on the {len(check)} held-out rows"
        )
    if kind == "per_domain":
        domains, counts = np.unique(rows.domain, return_counts=True)
        own = sorted(calibrator.per_category_)
        short = {
            str(d): int(MIN_FIT_ROWS[PER_DOMAIN_BASE] - c_fit)
            for d in domains
            if str(d) not in own
            for c_fit in [int((fit.domain == d).sum())]
        }
        notes.append(
            f"per-domain calibrators: {', '.join(own) or 'none'}; global fallback for "
            + (
                ", ".join(
                    f"{d} ({n} more fit rows needed)" if n > 0 else f"{d} (one class only)"
                    for d, n in short.items()
                )
                or "unknown domains only"
            )
        )
    record = _record(
        rows, kind, seed, refit, n_fit=len(fit), n_heldout=len(check), heldout_fraction=heldout_fraction
    )
    artifact = None if reason else build_artifact(parent, calibrator, threshold, comparison, record, refit)
    return RecalibrationResult(not reason, reason, calibrator, threshold, comparison, record, artifact, notes)


def _recalibrate_shrinkage(
    parent: ProbeArtifact,
    rows: RecalibrationRows,
    seed: int,
    target_accuracy: float,
    delta: float,
    threshold_method: str,
    n_bins: int,
    n_bootstrap: int,
    tau: float | None,
    refit: DomainRefit | None,
    prior_name: str = "parent",
) -> RecalibrationResult:
    """kind="shrinkage": cross-fitted check on every row, then the offsets fit on all rows (module doc)."""
    prior = shrinkage_prior(parent, prior_name)
    tau, tau_source = shrinkage_tau(parent, rows, prior, tau, prior_name)
    p_cross = shrinkage_cross_fit(prior, tau, rows, SHRINKAGE_FOLDS, seed)
    p_parent = parent_probabilities(parent, rows)
    comparison = compare(p_parent, p_cross, rows.y, n_bins, n_bootstrap, seed)
    comparison["per_domain"] = compare_by_domain(p_parent, p_cross, rows.y, rows.domain, n_bins)
    reason = refusal_reason(comparison)
    calibrator = ShrinkageCalibrator(base=calibrator_kind(prior), tau=tau).fit(
        rows.score, rows.y, categories=rows.domain, prior=prior
    )
    threshold = guarded_threshold(p_cross, rows.y, target_accuracy, delta, threshold_method)
    n_folds = int(cross_fit_folds(rows.y, rows.domain, SHRINKAGE_FOLDS, seed).max()) + 1
    offsets = ", ".join(
        f"{d} {calibrator.offsets_[d]:+.3f} ({calibrator.counts_[d]} rows)"
        for d in sorted(calibrator.offsets_)
    )
    notes = [
        f"shrinkage toward the parent's {'cross-domain ' if prior_name == 'cross_domain' else ''}"
        f"{calibrator_kind(prior)} calibrator, tau {tau:.3f} ({tau_source}); "
        f"per-domain logit offsets: {offsets}",
        f"before/after on all {len(rows)} rows with {n_folds}-fold cross-fitted p (each row's p from offsets fit "
        "without it); threshold chosen on the cross-fitted p; calibrator refit on all rows",
    ]
    record = _record(
        rows,
        "shrinkage",
        seed,
        refit,
        n_fit=len(rows),
        n_heldout=len(rows),
        check=f"{n_folds}-fold cross-fit",
        tau=tau,
        tau_source=tau_source,
        prior=prior_name,
    )
    artifact = None if reason else build_artifact(parent, calibrator, threshold, comparison, record, refit)
    return RecalibrationResult(not reason, reason, calibrator, threshold, comparison, record, artifact, notes)


def _record(
    rows: RecalibrationRows, kind: str, seed: int, refit: DomainRefit | None, **how: Any
) -> dict[str, Any]:
    """The recalibration record a child artifact's lineage carries: the rows, the kind, `how` it was checked,
    and how its domain clusters were refit (when they were)."""
    return {
        "data_hash": rows.data_hash(),
        "n_rows": len(rows),
        "source": rows.source,
        "kind": kind,
        "seed": seed,
        **how,
        "domains": {str(d): int(c) for d, c in zip(*np.unique(rows.domain, return_counts=True), strict=True)},
        **({"domain_refit": refit.record} if refit is not None else {}),
    }


def build_artifact(
    parent: ProbeArtifact,
    calibrator,
    threshold: ThresholdResult,
    comparison: dict[str, Any],
    record: dict[str, Any],
    refit: DomainRefit | None = None,
) -> ProbeArtifact:
    """The parent's probe (same direction, same site) with the new calibrator and threshold and the parent's
    domain clusters (or those `refit` on served traffic); the lineage (`parent`: the parent's digest and the
    recalibration record) is part of the new artifact's metadata."""
    meta = parent.metadata
    return ProbeArtifact.create(
        parent.probe,
        calibrator,
        meta.layer,
        meta.position,
        parent.fingerprint,
        novelty=parent.novelty,  # the same probe saw the same training rows: its novelty model carries over
        novelty_layer=(meta.novelty or {}).get("layer"),
        training_data_hash=meta.training_data_hash,
        split_sizes=dict(meta.split_sizes),
        metrics={"recalibration": comparison},
        thresholds=[threshold.to_dict()],
        extract_settings=dict(meta.extract_settings),
        parent={"digest": parent.digest, "recalibration": record},
    ).with_domains(parent.domains if refit is None else refit.clusters)


# -- reading rows -------------------------------------------------------------------------------------
SCORE_FIELDS = ("score",)
P_FIELDS = ("p_correct", "p")
LABEL_FIELD = "correct"


def _parse_label(value: Any, where: str) -> int:
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    text = str(value).strip().lower()
    if text in {"1", "true", "yes"}:
        return 1
    if text in {"0", "false", "no"}:
        return 0
    raise ValueError(f"{where}: field `correct` must be 0/1 or true/false; got {value!r}")


def _parse_float(value: Any, where: str, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field `{name}` must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: field `{name}` must be finite; got {value!r}")
    return number


def read_rows_file(path: str | Path, parent: ProbeArtifact) -> RecalibrationRows:
    """Rows (id, score and/or p_correct, correct, optional domain) from a .jsonl or .csv file.

    A row with p_correct but no score gets its score by inverting the parent's calibrator (platt and
    temperature only). Errors name the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: recalibration rows file does not exist")
    records: list[tuple[str, dict[str, Any]]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            records.append((where, record))
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            for number, record in enumerate(csv.DictReader(fh), 2):  # line 1 is the header
                records.append((f"{path}:{number}", {k: v for k, v in record.items() if v not in (None, "")}))
    else:
        raise ValueError(f"{path}: rows file must end in .jsonl or .csv")
    if not records:
        raise ValueError(f"{path}: no rows")
    ids, scores, ps, labels, domains = [], [], [], [], []
    for index, (where, record) in enumerate(records):
        if LABEL_FIELD not in record:
            raise ValueError(f"{where}: missing field `correct`")
        labels.append(_parse_label(record[LABEL_FIELD], where))
        score_name = next((f for f in SCORE_FIELDS if f in record), None)
        p_name = next((f for f in P_FIELDS if f in record), None)
        if score_name is None and p_name is None:
            raise ValueError(f"{where}: needs a `score` (the probe's raw score) or a `p_correct` field")
        scores.append(_parse_float(record[score_name], where, score_name) if score_name else math.nan)
        p = _parse_float(record[p_name], where, p_name) if p_name else math.nan
        if p_name and not 0.0 <= p <= 1.0:
            raise ValueError(f"{where}: field `{p_name}` must be in [0, 1]; got {p}")
        ps.append(p)
        ids.append(str(record.get("id", index)))
        domains.append(record.get("domain"))
    score, p_arr = np.asarray(scores), np.asarray(ps)
    missing = np.isnan(score)
    if missing.any():
        score[missing] = scores_from_parent_p(parent, p_arr[missing], str(path))
    # The recorded p is the parent's only if every row has one; otherwise recompute it from the scores.
    parent_p = None if np.isnan(p_arr).any() else p_arr
    return make_rows(score, labels, domains, ids, parent_p, source=str(path))


def lineage_digests(artifact: ProbeArtifact) -> list[str]:
    """[the artifact's digest, its parent's digest (a recalibrated artifact)]: the artifacts whose served
    rows carry this probe's raw score (a recalibration keeps the probe, only the calibrator changes)."""
    parent = artifact.metadata.parent
    return [artifact.digest] + ([parent["digest"]] if parent else [])


def read_feedback_rows(
    db_path: str | Path,
    layer: int | None = None,
    position: str | None = None,
    artifacts: Sequence[str] | None = None,
) -> RecalibrationRows:
    """Labelled responses of the server's feedback database (probes/serving/feedback.py), opened read-only:
    (id, score, p_correct, latest label, domain when the table has that column, else one domain "").

    layer / position: keep only responses scored at this capture site (a score read elsewhere means
    nothing to this probe).
    artifacts: keep only responses scored by these artifact digests (`lineage_digests(parent)`: the parent
    first, then its lineage, whose rows carry the same raw score but another P(correct), so the parent's p
    is then recomputed from the scores); rows scored by any other artifact, or with no digest recorded, are
    dropped and counted in the rows' source. None = every artifact.
    """
    path = Path(db_path)
    if not path.is_file():
        raise ValueError(f"{path}: feedback database does not exist")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise ValueError(f"{path}: cannot open the feedback database ({err})") from None
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(responses)")}
        needed = {"id", "score", "p_correct", "correct", "layer", "position"}
        if not needed <= columns:
            raise ValueError(
                f"{path}: table `responses` lacks column(s) {sorted(needed - columns)} "
                "(not a probecal feedback database?)"
            )
        domain = "domain" if "domain" in columns else "''"
        artifact = "artifact" if "artifact" in columns else "NULL"
        query = (
            f"SELECT id, score, p_correct, correct, COALESCE({domain}, ''), layer, position, {artifact} "
            "FROM responses WHERE correct IS NOT NULL ORDER BY label_seq"
        )
        fetched = conn.execute(query).fetchall()
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path}: not a usable feedback database ({err})") from None
    finally:
        conn.close()
    at_site = [
        r for r in fetched if (layer is None or r[5] == layer) and (position is None or r[6] == position)
    ]
    kept = at_site if artifacts is None else [r for r in at_site if r[7] in set(artifacts)]
    dropped = len(at_site) - len(kept)
    site = "" if layer is None else f" at layer {layer} / {position}"
    by = "" if artifacts is None else f" scored by artifact {artifacts[0][:8]} or its lineage"
    if not kept:
        raise NotEnoughRows(
            f"{path}: no labelled responses{site}{by} ({len(fetched)} labelled in all, {dropped} of them "
            "at this site scored by other artifacts)"
        )
    ids, score, p, y, dom = zip(*[r[:5] for r in kept], strict=True)
    rescored = artifacts is not None and any(r[7] != artifacts[0] for r in kept)
    source = (
        str(path) if not dropped else f"{path} ({dropped} labelled rows scored by other artifacts dropped)"
    )
    return make_rows(score, y, dom, ids, None if rescored else p, source=source)


# -- domain clusters refit on served traffic -----------------------------------------------------------
@dataclass(frozen=True)
class ServedPrompts:
    """Served responses' prompt side, all [m] (the feedback database's `prompt_state`, schema 3).

    ids: response ids. tagged: the client gave the domain (never reassigned). states [m, hidden] float32: the
    prompt_last state at the probe's layer; a NaN row where none was stored (older rows)."""

    ids: np.ndarray
    tagged: np.ndarray
    states: np.ndarray

    @property
    def stored(self) -> np.ndarray:
        return ~np.isnan(self.states).any(axis=1)


@dataclass(frozen=True)
class DomainRefit:
    """Domain clusters refit on served traffic and how (the child's lineage record carries `record`)."""

    clusters: DomainClusters
    record: dict[str, Any]


def read_served_prompts(
    db_path: str | Path, layer: int, position: str, artifacts: Sequence[str] | None = None
) -> ServedPrompts:
    """Every response of the feedback database scored at this site (by these artifact digests; None = any),
    labelled or not, with its stored prompt state. Opened read-only."""
    path = Path(db_path)
    if not path.is_file():
        raise ValueError(f"{path}: feedback database does not exist")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(responses)")}
            if "prompt_state" not in columns:
                raise ValueError(
                    f"{path}: the feedback database stores no prompt states (schema < 3): serve with this "
                    "probecal version to collect them, then refit the domains"
                )
            fetched = conn.execute(
                "SELECT id, domain, domain_assigned, prompt_state, artifact FROM responses "
                "WHERE layer = ? AND position = ? ORDER BY created, id",
                (layer, position),
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path}: not a usable feedback database ({err})") from None
    kept = [r for r in fetched if artifacts is None or r[4] in set(artifacts)]
    states = [decode_state(r[3]) for r in kept]
    width = next((len(v) for v in states if v is not None), 0)
    if width == 0:
        raise NotEnoughRows(f"{path}: no stored prompt states at layer {layer} / {position}")
    # a domain is a client tag unless the server assigned it (rows of before schema 3: by its name)
    tagged = [
        domain is not None and not (assigned if assigned is not None else domain.startswith(CLUSTER_PREFIX))
        for _, domain, assigned, _, _ in kept
    ]
    return ServedPrompts(
        np.asarray([r[0] for r in kept], dtype=str),
        np.asarray(tagged, dtype=bool),
        np.stack([np.full(width, np.nan, np.float32) if v is None else v for v in states]),
    )


def refit_domains(
    parent: ProbeArtifact, rows: RecalibrationRows, served: ServedPrompts, n_clusters: int, seed: int
) -> tuple[RecalibrationRows, DomainRefit]:
    """k-means clusters (probes.domains.fit_domain_clusters, seeded) of the stored prompt states of the
    untagged served responses (the traffic the clusters are for: a client tag always wins), and `rows` with
    every untagged row's domain reassigned by them. An untagged labelled row without a stored state is dropped
    (its old cluster name means another cluster now); tagged rows keep their tag. The rows keep the parent's
    P(correct) under the OLD domains (computed here when they do not carry it): a new "cluster-0" is not the
    parent's "cluster-0", so the parent's p must not be recomputed with the new names.

    The parent's clusters are not mixed in: they describe the training questions, and the refit is there to
    follow what is served now."""
    untagged = ~served.tagged & served.stored
    if n_clusters < 1:
        raise ValueError(
            f"recalibrate.refit_domains={n_clusters} must be >= 1 (0 keeps the parent's clusters)"
        )
    if untagged.sum() < n_clusters:
        raise NotEnoughRows(
            f"recalibrate.refit_domains={n_clusters}: only {int(untagged.sum())} untagged served responses with "
            "a stored prompt state; serve more traffic or ask for fewer clusters"
        )
    clusters = fit_domain_clusters(served.states[untagged], n_clusters=n_clusters, seed=seed)
    where = {rid: i for i, rid in enumerate(served.ids)}
    index = np.asarray([where.get(str(rid), -1) for rid in rows.ids])
    known = index >= 0
    reassign = known & ~served.tagged[index] & served.stored[index]
    keep = ~known | reassign | served.tagged[index]  # untagged with no state: dropped
    domain = rows.domain.astype(object)
    if reassign.any():
        domain[reassign] = clusters.assign(served.states[index[reassign]])
    dropped = int((~keep).sum())
    source = (
        f"{rows.source}; {int(reassign.sum())} untagged rows reassigned to {n_clusters} clusters refit on "
        f"{int(untagged.sum())} served prompts"
        + (f", {dropped} untagged rows without a stored state dropped" if dropped else "")
    )
    parent_p = parent_probabilities(parent, rows)
    out = RecalibrationRows(rows.ids, rows.score, rows.y, domain.astype(str), parent_p, source).subset(keep)
    record = {
        "n_clusters": n_clusters,
        "seed": seed,
        "n_prompts": int(untagged.sum()),
        "prompts_hash": hash_arrays(served.ids[untagged], served.states[untagged].astype(np.float64)),
        "n_reassigned": int(reassign.sum()),
        "n_dropped": dropped,
    }
    return out, DomainRefit(clusters, record)


# -- which answers to label first ------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelRequest:
    """A served answer worth labelling (POST /v1/feedback {"id", "correct"} takes the label)."""

    id: str
    domain: str
    p_correct: float
    prompt: str | None  # as the server stored it (None when serve.store_text is off)
    text: str | None
    reason: str


def label_queue(db_path: str | Path, parent: ProbeArtifact, limit: int = 50) -> list[LabelRequest]:
    """Up to `limit` unlabelled, answered (not abstained) responses of the feedback database scored at the
    parent's site, in the order to label them.

    Rule (greedy): the next label goes to the domain with the fewest labels so far (labelled rows + those
    already queued; ties by name): a per-domain offset moves most with its first labels, and a domain the
    server assigned (cluster-<i>) or that was never labelled starts at 0. Inside that domain, the answer whose
    P(correct) is nearest the abstention threshold (0.5 when the artifact has none it can reach): its label
    decides the answered set and is the least predictable (p near the middle)."""
    path = Path(db_path)
    if not path.is_file():
        raise ValueError(f"{path}: feedback database does not exist")
    meta = parent.metadata
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(responses)")}
            needed = {"id", "p_correct", "correct", "layer", "position", "abstained", "prompt", "text"}
            if not needed <= columns:
                raise ValueError(
                    f"{path}: table `responses` lacks column(s) {sorted(needed - columns)} "
                    "(not a probecal feedback database?)"
                )
            domain = "domain" if "domain" in columns else "''"
            fetched = conn.execute(
                f"SELECT id, p_correct, correct, COALESCE({domain}, ''), prompt, text, abstained FROM responses "
                "WHERE layer = ? AND position = ? ORDER BY id",
                (meta.layer, meta.position),
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path}: not a usable feedback database ({err})") from None
    threshold = parent.abstention_threshold()
    centre = threshold if threshold is not None and 0.0 < threshold < 1.0 else 0.5
    labelled: dict[str, int] = {}
    waiting: dict[str, list[tuple[float, str, tuple]]] = {}
    for row in fetched:
        rid, p, correct, dom, prompt, text, abstained = row
        labelled.setdefault(dom, 0)
        if correct is not None:
            labelled[dom] += 1
        elif not abstained:
            waiting.setdefault(dom, []).append((abs(float(p) - centre), str(rid), row))
    for rows in waiting.values():
        rows.sort(reverse=True)  # nearest the threshold last: pop() takes it
    queued: list[LabelRequest] = []
    counts = dict(labelled)
    while len(queued) < limit and any(waiting.values()):
        dom = min((d for d, rows in waiting.items() if rows), key=lambda d: (counts[d], d))
        distance, _, (rid, p, _, _, prompt, text, _) = waiting[dom].pop()
        queued.append(
            LabelRequest(
                str(rid),
                dom,
                float(p),
                prompt,
                text,
                f"domain {dom or '(untagged)'} has {counts[dom]} labels; p {float(p):.3f} is {distance:.3f} from "
                f"{'the threshold' if centre == threshold else 'p = 0.5'}",
            )
        )
        counts[dom] += 1
    return queued


def request_reload(url: str, probe_dir: str | Path, token: str | None = None, timeout: float = 120.0) -> dict:
    """POST <url>/admin/reload {"probe_dir": <absolute path>} to a running `probecal serve`: the server verifies
    the artifact off its event loop and swaps it in between two batches (requests keep being served; a bad
    artifact is refused there and the old one keeps serving). token: serve.admin_token (None: a loopback
    server without one). Returns the server's JSON answer; raises ValueError with its message on an error."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ValueError(
            f"recalibrate.reload={url!r} must be the server's base URL, e.g. http://127.0.0.1:8000"
        )
    body = json.dumps({"probe_dir": str(Path(probe_dir).resolve())}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url.rstrip("/") + "/admin/reload", body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read().decode() or "{}")
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise ValueError(f"{url}/admin/reload answered {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ValueError(f"{url}/admin/reload: cannot reach the server ({err})") from None
