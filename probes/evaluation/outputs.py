"""What a run writes: metrics.json, sweep.json, the report, and the headline table printed at the end."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from probecal.files import atomic_write_text
from probes.artifact import json_default
from probes.evaluation.metrics import (
    HEADLINE_METRICS,
    WITHIN_FLOOR_MARGIN,
    domain_calibration,
    within_category_auroc,
)
from probes.evaluation.novelty import novelty_headline, novelty_markdown
from probes.evaluation.report import ReportInputs, write_report
from probes.evaluation.tables import OPTIMISM_NOTE, PROBE_METHOD, PROBE_RAW_METHOD, EvalTable
from probes.evaluation.transfer import TransferTable
from probes.selection.candidates import CandidateSearch
from probes.selection.sweep import SweepResult
from probes.selection.thresholds import realised
from probes.training.spec import TrainSpec
from probes.training.splits import SplitData


def best_baseline(table: EvalTable) -> str | None:
    """The non-probe method with the highest within-category AUROC (pooled AUROC breaks ties)."""
    candidates = [m for m in table.rows if not m.startswith(PROBE_METHOD)]

    def key(method: str) -> tuple[float, float]:
        row = table.rows[method]
        return (
            np.nan_to_num(row.get("within_cat_auroc", np.nan), nan=-1.0),
            np.nan_to_num(row["auroc"], nan=-1.0),
        )

    return max(candidates, key=key) if candidates else None


TRANSFER_HEADLINE = ("within_cat_auroc", "ece", "brier")


def _cell(value) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.3f}"


def headline(table: EvalTable, baseline: str | None, transfer: TransferTable | None = None) -> str:
    """The lines printed at the end of a run: probe vs the best baseline on the headline metrics (test split),
    and with `transfer` the same methods on held-out domains (leave-one-domain-out means), plus the best
    baseline on held-out domains when that is another one."""
    shown = [PROBE_METHOD] + ([baseline] if baseline else [])
    columns = list(HEADLINE_METRICS)
    held_columns = [f"held-out {m}" for m in TRANSFER_HEADLINE] if transfer is not None else []
    if transfer is not None:
        held_best = transfer.best(PROBE_METHOD)
        if held_best and held_best not in shown:
            shown.append(held_best)
    lines = [
        "| method | " + " | ".join(columns + held_columns) + " |",
        "|---|" + "---:|" * (len(columns) + len(held_columns)),
    ]
    for method in shown:
        row = table.rows.get(method, {})
        cells = [_cell(row.get(m)) for m in columns]
        if transfer is not None:
            held = transfer.rows.get(method, {})
            cells += [_cell(held.get(m)) for m in TRANSFER_HEADLINE]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def in_domain_by_domain(
    methods: dict[str, np.ndarray], data: SplitData, mask: np.ndarray
) -> dict[str, dict[str, float]]:
    """{method: {domain: within-category AUROC on the evaluated split's rows of that domain}} (the in-domain
    side of the report's in-domain vs held-out plot)."""
    domains = (data.domains if data.domains is not None else data.categories)[mask]
    y, categories = data.y[mask], data.categories[mask]
    return {
        m: {
            str(d): within_category_auroc(p[domains == d], y[domains == d], categories[domains == d]).mean
            for d in np.unique(domains)
        }
        for m, p in methods.items()
    }


def calibration_by_domain(
    p: np.ndarray, data: SplitData, mask: np.ndarray, transfer: TransferTable | None, n_bins: int
) -> dict[str, Any]:
    """metrics.json["calibration"]: the calibrated probe's calibration per domain, beside each domain's floor
    (`probes.evaluation.metrics.domain_calibration`): "in_domain" on the evaluated split's rows (p [mask.sum()]),
    "held_out" from the leave-one-domain-out table (None without one). What a user whose traffic is one
    domain sees; a pooled ECE can hide per-domain ECEs that cancel out."""
    domains = (data.domains if data.domains is not None else data.categories)[mask]
    held = transfer is not None and PROBE_METHOD in transfer.per_domain
    return {
        "margin": WITHIN_FLOOR_MARGIN,
        "in_domain": domain_calibration(p, data.y[mask], domains, n_bins).to_dict(),
        "held_out": transfer.calibration(PROBE_METHOD).to_dict() if held else None,
    }


def calibration_headline(calibration: dict[str, Any]) -> str:
    """The calibration lines of the headline: "N of M held-out domains within floor + 0.03", and the mean
    per-domain ECE against the mean floor (held-out, then in domain)."""
    lines = []
    for key, where in (("held_out", "held-out domains"), ("in_domain", "domains in domain (test split)")):
        if not calibration.get(key):
            continue
        s = calibration[key]["summary"]
        lines.append(
            f"{s['n_within']} of {s['n_domains']} {where} within floor + {calibration['margin']:g}: "
            f"mean per-domain ECE {s['mean_ece']:.3f} vs mean floor {s['mean_floor']:.3f} "
            f"(smooth ECE {s['mean_smooth_ece']:.3f}, pooled ECE {s['pooled_ece']:.3f})"
        )
    return "\n".join(lines)


def transfer_summary(extra: dict[str, Any], baseline: str | None) -> dict[str, Any] | None:
    """metrics.json["transfer"]: held-out-domain table, the selection and the candidate scores."""
    transfer: TransferTable | None = extra.get("transfer")
    if transfer is None:
        return None
    search: CandidateSearch | None = extra.get("candidates")
    return {
        **transfer.to_dict(),
        "method": "leave-one-domain-out: fit on the other domains' train rows, calibrate on their calibration "
        "rows (the probe: as train.calibrate_on says, nested), score every row of the held-out domain; "
        "means over held-out domains",
        "best_baseline": transfer.best(PROBE_METHOD),
        "calibrate_on": (extra.get("selection") or {}).get("calibrate_on"),
        "note": OPTIMISM_NOTE if (extra.get("candidates") is not None) else None,
        "in_domain_best_baseline": baseline,
        "selection": extra.get("selection"),
        "candidates": search.to_dict() if search is not None else None,
        "seconds": extra.get("transfer_seconds"),
    }


def write_run_outputs(
    run_dir: Path,
    title: str,
    table: EvalTable,
    methods: dict[str, np.ndarray],
    data: SplitData,
    mask: np.ndarray,
    spec: TrainSpec,
    sweep_result: SweepResult | None,
    extra: dict[str, Any],
) -> tuple[Path, str]:
    """metrics.json, sweep.json (when there is a sweep) and the report; returns (report path, headline: the
    table and the per-domain calibration lines).

    extra: JSON-able values for metrics.json, "notes" for the report, and from `TrainResult.outputs()` "transfer"
    (TransferTable), "candidates", "selection", "transfer_seconds" (written as metrics.json["transfer"])."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if sweep_result is not None:
        sweep_result.to_json(run_dir / "sweep.json")
    baseline = best_baseline(table)
    transfer: TransferTable | None = extra.get("transfer")
    shown_baselines = {
        m: p
        for m, p in methods.items()
        if not m.startswith(PROBE_METHOD) and (not m.endswith("(raw)") or m == baseline)
    }
    notes = [f"{k}: {v}" for k, v in extra.get("notes", {}).items()]
    gap = extra.get("refusal_gap")  # a RefusalGapTable (probes.evaluation.refusal_gap) or None
    if gap is not None:
        notes.append(refusal_gap_section(gap))
    summary = transfer_summary(extra, baseline)
    calibration = calibration_by_domain(methods[PROBE_METHOD], data, mask, transfer, spec.n_bins)
    inputs = ReportInputs(
        title=title,
        table=table,
        y=data.y[mask],
        categories=data.categories[mask],
        probe_raw=methods.get(PROBE_RAW_METHOD, methods[PROBE_METHOD]),
        probe=methods[PROBE_METHOD],
        baselines=shown_baselines,
        best_baseline=baseline,
        sweep=sweep_result,
        n_bins=spec.n_bins,
        notes=notes,
        transfer=summary,
        in_domain_by_domain=in_domain_by_domain(
            {
                m: methods[m]
                for m in {PROBE_METHOD, baseline, summary and summary["best_baseline"]}
                if m in methods
            },
            data,
            mask,
        )
        if summary
        else None,
        sections=report_sections(extra),
        calibration=calibration,
    )
    report = write_report(run_dir, inputs)
    skipped = {"notes", "transfer", "candidates", "selection", "transfer_seconds", "threshold", "refusal_gap"}
    metrics = {
        "title": title,
        "best_baseline": baseline,
        "headline": {
            m: {k: table.rows[m].get(k) for k in HEADLINE_METRICS} for m in [PROBE_METHOD, baseline] if m
        },
        "table": table.to_dict(),
        "train_spec": asdict(spec),
        **({"transfer": summary} if summary else {}),
        "calibration": calibration,
        **{k: v for k, v in extra.items() if k not in skipped},
        **({"refusal_gap": gap.to_dict()} if gap is not None else {}),
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=json_default))
    under_table = "\n".join([calibration_headline(calibration), *headline_notes(extra)])
    text = headline(table, baseline, transfer) + "\n\n" + under_table
    return report, text + ("\n\n" + refusal_gap_section(gap) if gap is not None else "")


def report_sections(extra: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's sections for what a run measured beside the tables (novelty, ...)."""
    sections = []
    if extra.get("novelty"):
        sections.append(("Novelty: held-out domains vs in-domain", novelty_markdown(extra["novelty"])))
    return sections


def headline_notes(extra: dict[str, Any]) -> list[str]:
    """One line each, printed under the headline table."""
    lines = []
    if extra.get("novelty"):
        lines.append(novelty_headline(extra["novelty"]))
    return lines


def refusal_gap_section(gap) -> str:
    """The refusal-gap table (probes.evaluation.refusal_gap) as a titled Markdown paragraph."""
    return (
        "Refusal gap (answerable domains: test split; unanswerable and benign_refusal: every row, never fit):\n\n"
        + gap.markdown()
    )


def threshold_report(threshold, p_test: np.ndarray, y_test: np.ndarray) -> dict[str, Any]:
    """The calibration-split threshold and what it realised on the test split."""
    info = threshold.to_dict()
    accuracy, coverage = realised(p_test, y_test, threshold.threshold)
    info.update({"test_accuracy": accuracy, "test_coverage": coverage})
    return info
