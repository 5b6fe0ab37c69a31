"""Evaluate methods on a split: one tidy table, rows = methods, columns = metrics (probes/evaluation/metrics.py).

A "method" is anything that gives each example a P(correct) in [0, 1]: the probe at its selected site
(calibrated and raw), and each logit baseline, raw when the baseline is itself a probability and after
the same calibrator the probe uses, fit on the same calibration split (`calibrate_baselines`), so probe and
baselines are compared on equal terms.

Direction of each known baseline score (the calibrator and AUROC need higher = more confident, so scores
where lower means more confident are negated first; the table and `oriented` / `raw_probability` live in
probes.inference, beside the hybrid probe's features built from the same signals):

    mean_logprob, min_logprob, sum_logprob, first_logprob   higher = more confident; exp(score) is a probability
    p_true, max_prob, mean_prob, first_token_prob,
    sequence_prob                                           higher = more confident; already a probability
    mean_entropy, max_entropy, perplexity                   LOWER = more confident -> negated; no raw row
Unknown names are taken as higher = more confident, with no raw row (pass `directions` to override).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from probes.evaluation.metrics import metric_row, per_category_rows
from probes.inference import oriented, raw_probability

# columns shown by to_markdown (to_csv / to_dict keep every column)
PROBE_METHOD = "probe"  # the method name of the calibrated probe in every table
PROBE_RAW_METHOD = "probe (uncalibrated)"
OPTIMISM_NOTE = (
    "the held-out AUROC of the selected candidate is optimistic: the candidate was chosen on that same "
    "score (the other candidates' scores show the spread)"
)
SUMMARY_COLUMNS = (
    "auroc", "within_cat_auroc", "auprc", "ece", "within_cat_ece", "ece_low", "ece_high", "ece_quantile", "mce", "brier", "nll",  # noqa: E501
    "aurc", "eaurc", "sel_acc@0.5", "sel_acc@0.8", "sel_acc@0.9", "cov@acc0.9",
)  # fmt: skip


def calibrate_baselines(
    calibration_scores: dict[str, np.ndarray],
    y_calibration,
    test_scores: dict[str, np.ndarray],
    calibrator_factory: Callable[[], object],
    label: str,
    categories_calibration=None,
    categories_test=None,
    directions: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Fit a fresh calibrator per baseline on its calibration-split scores and apply it to its test scores.

    Returns {"<name> (raw)": p [n_test] (only where raw_probability exists), "<name> (<label>)": p [n_test]}.
    Scores are oriented first (higher = more confident), exactly as the probe's scores are.
    """
    methods: dict[str, np.ndarray] = {}
    for name, test in test_scores.items():
        if name not in calibration_scores:
            raise ValueError(f"baseline {name!r} has test scores but no calibration scores")
        raw = raw_probability(name, test)
        if raw is not None:
            methods[f"{name} (raw)"] = raw
        calibrator = calibrator_factory().fit(
            oriented(name, calibration_scores[name], directions),
            y_calibration,
            categories=categories_calibration,
        )
        methods[f"{name} ({label})"] = calibrator.predict(
            oriented(name, test, directions), categories=categories_test
        )
    return methods


@dataclass
class EvalTable:
    """rows: {method: {metric: value}}; per_category: {method: {category: {metric: value}}}."""

    rows: dict[str, dict[str, float]]
    per_category: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def columns(self) -> list[str]:
        return list(dict.fromkeys(k for row in self.rows.values() for k in row))

    def to_dict(self) -> dict:
        return {"rows": self.rows, "per_category": self.per_category}

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        columns = self.columns()
        writer.writerow(["method", *columns])
        for method, row in self.rows.items():
            writer.writerow([method, *(row.get(c, "") for c in columns)])
        return out.getvalue()

    def to_markdown(self, columns=SUMMARY_COLUMNS, digits: int = 3) -> str:
        shown = [c for c in columns if any(c in row for row in self.rows.values())]
        lines = ["| method | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
        for method, row in self.rows.items():
            cells = [_fmt(row.get(c), digits) for c in shown]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def evaluate(
    methods: dict[str, np.ndarray],
    y,
    categories=None,
    n_bins: int = 15,
    n_bootstrap: int = 1000,
    seed: int = 0,
    with_per_category: bool = True,
) -> EvalTable:
    """methods: {name: p [n] = P(correct) in [0, 1]} on one split; y [n]: 1 = correct; categories [n] optional.
    Every method is scored with the same metrics (and the same bootstrap seed)."""
    y = np.asarray(y)
    rows, per_category = {}, {}
    for name, p in methods.items():
        p = np.asarray(p, dtype=np.float64)
        if p.shape != y.shape:
            raise ValueError(f"method {name!r}: p has shape {p.shape} but y has shape {y.shape}")
        if np.any((p < 0) | (p > 1)):
            raise ValueError(
                f"method {name!r}: values outside [0, 1]; pass probabilities (calibrate scores first)"
            )
        rows[name] = metric_row(p, y, categories, n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed)
        if categories is not None and with_per_category:
            per_category[name] = per_category_rows(p, y, categories, n_bins=n_bins, n_bootstrap=0, seed=seed)
    return EvalTable(rows, per_category)
