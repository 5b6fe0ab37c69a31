"""The run report: PNG plots a person can read, and one Markdown + one self-contained HTML page.

Everything here takes arrays on ONE split (normally the test split); p = P(correct), y = 1 correct.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from probecal.files import atomic_write_text
from probes.evaluation.metrics import reliability_curve, risk_coverage_curve
from probes.evaluation.tables import EvalTable
from probes.selection.sweep import SweepResult

OVERCONFIDENCE_GAP = 0.10  # mean confidence above accuracy by more than this is flagged


@dataclass
class ReportInputs:
    title: str
    table: EvalTable
    y: np.ndarray  # [n] 1 = correct, on the evaluated split
    categories: np.ndarray  # [n] str
    probe_raw: np.ndarray  # [n] uncalibrated probe P(correct)
    probe: np.ndarray  # [n] calibrated probe P(correct)
    baselines: dict[str, np.ndarray]  # {name: calibrated P(correct) [n]}
    best_baseline: str | None
    sweep: SweepResult | None = None
    n_bins: int = 15
    notes: list[str] = field(default_factory=list)  # extra Markdown paragraphs (settings, threshold, ...)
    # leave-one-domain-out (metrics.json["transfer"]: rows, per_domain, domains, selection, candidates, ...)
    transfer: dict | None = None
    in_domain_by_domain: dict[str, dict[str, float]] | None = (
        None  # {method: {domain: within-cat AUROC}} on `y`
    )
    # (heading, Markdown) sections placed after the held-out table: novelty, refusal gap, ...
    sections: list[tuple[str, str]] = field(default_factory=list)
    # per-domain calibration of the probe (metrics.json["calibration"]: margin, in_domain, held_out)
    calibration: dict | None = None


def _subplots(*grid: int, figsize: tuple[float, float]):
    """A figure that is not registered with pyplot: no global backend switch, nothing to close."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def plot_layer_sweep(sweep: SweepResult, path: Path) -> Path:
    """AUROC by layer, one line per position, with the CV spread as a band."""
    fig, ax = _subplots(figsize=(7, 4.2))
    draw_layer_sweep(ax, sweep)
    return _save(fig, path)


def draw_layer_sweep(ax, sweep: SweepResult) -> None:
    """Draw the layer-sweep curves on a matplotlib Axes (the notebook draws inline with this)."""
    for position in dict.fromkeys(r.position for r in sweep.rows):
        rows = sorted((r for r in sweep.rows if r.position == position), key=lambda r: r.layer)
        layers = np.array([r.layer for r in rows])
        mean = np.array([r.auroc_mean for r in rows])
        std = np.array([r.auroc_std for r in rows])
        (line,) = ax.plot(layers, mean, marker="o", ms=3, label=position)
        ax.fill_between(layers, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.scatter(
        [sweep.best_layer],
        [sweep.best_row().auroc_mean],
        s=120,
        facecolors="none",
        edgecolors="k",
        label=f"selected: layer {sweep.best_layer}, {sweep.best_position}",
    )
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(
        xlabel="layer (0 = embeddings)",
        ylabel="AUROC (train-split CV, mean ± std)",
        title="Where does the model know it is wrong? AUROC by layer",
    )
    ax.legend(fontsize=8)


def draw_reliability(ax, p, y, n_bins: int, title: str) -> None:
    """Reliability diagram of P(correct) p [n] against y [n] (1 = correct) on an Axes; bin counts above bars."""
    curve = reliability_curve(p, y, n_bins)
    filled = curve.counts > 0
    width = np.diff(curve.edges)
    ax.bar(
        curve.centers[filled],
        curve.accuracy[filled],
        width=width[filled] * 0.9,
        alpha=0.6,
        edgecolor="k",
        label="accuracy in bin",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(
        curve.confidence[filled],
        curve.accuracy[filled],
        "o-",
        color="C3",
        ms=3,
        label="accuracy at the bin's mean confidence",
    )
    for x, acc, count in zip(
        curve.centers[filled], curve.accuracy[filled], curve.counts[filled], strict=True
    ):
        ax.annotate(str(int(count)), (x, min(acc + 0.02, 0.97)), ha="center", fontsize=6)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(correct)", ylabel="fraction correct", title=title)
    ax.legend(fontsize=7, loc="upper left")


def plot_reliability(inputs: ReportInputs, path: Path) -> Path:
    """Raw vs calibrated probe, and the best baseline; numbers above the bars are bin counts."""
    panels = [(inputs.probe_raw, "probe, raw"), (inputs.probe, "probe, calibrated")]
    if inputs.best_baseline:
        panels.append((inputs.baselines[inputs.best_baseline], f"{inputs.best_baseline}"))
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (p, title) in zip(np.atleast_1d(axes), panels, strict=True):
        draw_reliability(ax, p, inputs.y, inputs.n_bins, title)
    fig.suptitle("Reliability diagrams (bin counts above bars)")
    return _save(fig, path)


def plot_risk_coverage(inputs: ReportInputs, path: Path) -> Path:
    fig, ax = _subplots(figsize=(6.5, 4.2))
    for name, p in {"probe (calibrated)": inputs.probe, **inputs.baselines}.items():
        curve = risk_coverage_curve(p, inputs.y)
        style = {"lw": 2.2, "color": "k"} if name.startswith("probe") else {"lw": 1.0}
        ax.step(curve.coverage, curve.risk, where="post", label=name, **style)
    ax.axhline(1 - np.mean(inputs.y), color="grey", ls=":", lw=1, label="answer everything")
    ax.set(
        xlim=(0, 1),
        ylim=(0, None),
        xlabel="coverage (fraction answered)",
        ylabel="risk (error rate of answered)",
        title="Risk-coverage: abstain on the least confident first",
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


def category_confidence(p, y, categories) -> list[tuple[str, int, float, float]]:
    """[(category, n, accuracy, mean confidence)] sorted by overconfidence (confidence - accuracy)."""
    rows = []
    for cat in np.unique(categories):
        mask = categories == cat
        rows.append((str(cat), int(mask.sum()), float(np.mean(y[mask])), float(np.mean(p[mask]))))
    return sorted(rows, key=lambda r: r[3] - r[2], reverse=True)


def plot_categories(inputs: ReportInputs, path: Path) -> Path:
    """Per-category accuracy vs mean calibrated confidence; red labels = overconfident categories."""
    rows = category_confidence(inputs.probe, inputs.y, inputs.categories)
    names = [r[0] for r in rows]
    x = np.arange(len(rows))
    fig, ax = _subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4.4))
    ax.bar(x - 0.2, [r[2] for r in rows], 0.4, label="accuracy")
    ax.bar(x + 0.2, [r[3] for r in rows], 0.4, label="mean P(correct), probe")
    if inputs.best_baseline:
        base = inputs.baselines[inputs.best_baseline]
        ax.scatter(
            x + 0.2,
            [float(np.mean(base[inputs.categories == n])) for n in names],
            marker="_",
            s=300,
            color="k",
            label=f"mean confidence, {inputs.best_baseline}",
        )
    ax.set_xticks(x, names, rotation=30, ha="right")
    for tick, row in zip(ax.get_xticklabels(), rows, strict=True):
        if row[3] - row[2] > OVERCONFIDENCE_GAP:
            tick.set_color("red")
    ax.set(ylim=(0, 1), ylabel="fraction", title="Accuracy vs confidence by category (red: overconfident)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_histogram(inputs: ReportInputs, path: Path) -> Path:
    fig, ax = _subplots(figsize=(6.5, 4.0))
    bins = np.linspace(0, 1, 21)
    y = inputs.y.astype(bool)
    ax.hist(inputs.probe[y], bins=bins, alpha=0.6, label=f"correct answers (n={y.sum()})")
    ax.hist(inputs.probe[~y], bins=bins, alpha=0.6, label=f"wrong answers (n={(~y).sum()})")
    ax.set(
        xlabel="calibrated probe P(correct)", ylabel="answers", title="Confidence of correct vs wrong answers"
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def _category_markdown(inputs: ReportInputs) -> str:
    lines = ["| category | n | accuracy | mean P(correct) | gap | |", "|---|---:|---:|---:|---:|---|"]
    for name, n, acc, conf in category_confidence(inputs.probe, inputs.y, inputs.categories):
        flag = "overconfident" if conf - acc > OVERCONFIDENCE_GAP else ""
        lines.append(f"| {name} | {n} | {acc:.3f} | {conf:.3f} | {conf - acc:+.3f} | {flag} |")
    return "\n".join(lines)


TRANSFER_COLUMNS = ("within_cat_auroc", "ece", "brier", "pooled_ece", "ece_floor")


def transfer_markdown(transfer: dict) -> str:
    """Held-out-domain table (means over domains) and the candidates the selection compared."""
    lines = [
        "| method | " + " | ".join(f"held-out {c}" for c in TRANSFER_COLUMNS) + " |",
        "|---|" + "---:|" * len(TRANSFER_COLUMNS),
    ]
    for method, row in transfer["rows"].items():
        lines.append(f"| {method} | " + " | ".join(_number(row.get(c)) for c in TRANSFER_COLUMNS) + " |")
    parts = ["\n".join(lines)]
    domains = transfer.get("domains", [])
    parts.append(
        f"Leave-one-domain-out over {len(domains)} domains ({', '.join(domains)}): each domain is scored by a "
        "probe fit on the other domains' train rows and calibrated on their calibration rows; numbers are "
        "means over the held-out domains. pooled_ece: one ECE over every held-out row; ece_floor: the "
        "mean ECE a perfectly calibrated probability reads on the same rows (binning noise of small domains)."
    )
    calibrate_on = transfer.get("calibrate_on")
    if calibrate_on and calibrate_on != "calibration":
        parts.append(
            f"The probe's calibrator (train.calibrate_on={calibrate_on}) is fit on out-of-domain scores; its "
            "held-out numbers are nested: for each held-out domain, the calibrator only saw the other "
            "domains, each scored by a probe fit without it and without the held-out domain."
        )
    selection = transfer.get("selection") or {}
    if selection:
        parts.append(f"Selected by {selection.get('by')}: {selection.get('candidate')}.")
    if transfer.get("note"):
        parts.append(f"Note: {transfer['note']}.")
    candidates = (transfer.get("candidates") or {}).get("scores") or []
    if candidates:
        by_option: dict[tuple, tuple[float, float]] = {}
        for (
            c
        ) in candidates:  # best held-out AUROC per (features, C) over sites, with that site's in-domain CV
            key = (c["features"], c["C"])
            value = (np.nan_to_num(c["heldout_auroc"], nan=-1.0), c.get("cv_auroc", np.nan))
            by_option[key] = max(by_option.get(key, (-1.0, np.nan)), value, key=lambda v: v[0])
        rows = [
            "| features | C | best held-out within_cat_auroc over sites | in-domain CV within_cat_auroc there |",
            "|---|---:|---:|---:|",
        ]
        rows += [
            f"| {f} | {C:g} | {v:.3f} | {_number(cv)} |" for (f, C), (v, cv) in sorted(by_option.items())
        ]
        parts += [
            "Options compared (held-out-domain within-category AUROC, best site for each):",
            "\n".join(rows),
        ]
    return "\n\n".join(parts)


CALIBRATION_COLUMNS = ("n", "accuracy", "mean p", "ECE", "floor", "smooth ECE", "within floor")


def calibration_markdown(calibration: dict) -> str:
    """Per-domain calibration of the probe, held-out domains (leave-one-domain-out) and in domain (the
    evaluated split): one row per domain with its floor, and a summary line per part."""
    margin = calibration["margin"]
    parts = [
        f"What a user whose traffic is one domain sees. floor: the ECE a perfectly calibrated probability reads "
        f"on the same rows (labels drawn from p; binning noise, ~0.1 at 50 rows); within floor: ECE <= floor + "
        f"{margin:g}. smooth ECE: kernel smooth ECE (Błasiok & Nakkiran 2023), no bins, comparable across "
        "domain sizes."
    ]
    for key, where in (("held_out", "held-out domain"), ("in_domain", "in domain (test)")):
        part = calibration.get(key)
        if not part:
            continue
        lines = [
            "| domain | " + " | ".join(CALIBRATION_COLUMNS) + " |",
            "|---|" + "---:|" * (len(CALIBRATION_COLUMNS) - 1) + "---|",
        ]
        for domain, r in part["per_domain"].items():
            cells = [str(r["n"])] + [
                _number(r[k]) for k in ("accuracy", "mean_p", "ece", "ece_floor", "smooth_ece")
            ]
            lines.append(
                f"| {domain} ({where}) | "
                + " | ".join(cells)
                + f" | {'yes' if r['within_floor'] else 'NO'} |"
            )
        s = part["summary"]
        parts += [
            "\n".join(lines),
            f"{where}: {s['n_within']} of {s['n_domains']} domains within floor + {margin:g}; mean per-domain "
            f"ECE {s['mean_ece']:.3f} vs mean floor {s['mean_floor']:.3f}; mean smooth ECE "
            f"{s['mean_smooth_ece']:.3f}; pooled ECE {s['pooled_ece']:.3f}.",
        ]
    return "\n\n".join(parts)


def _number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def plot_transfer(transfer: dict, in_domain: dict[str, dict[str, float]] | None, path: Path) -> Path:
    """Per domain: in-domain (test split) vs held-out (leave-one-domain-out) within-category AUROC, for the
    probe and the best held-out baseline."""
    domains = list(transfer["domains"])
    methods = [m for m in ("probe", transfer.get("best_baseline")) if m]
    fig, ax = _subplots(figsize=(max(6.5, 0.9 * len(domains) + 2), 4.2))
    x = np.arange(len(domains))
    width = 0.8 / (2 * len(methods))
    for i, method in enumerate(methods):
        held = [
            transfer["per_domain"].get(method, {}).get(d, {}).get("within_cat_auroc", np.nan) for d in domains
        ]
        inside = [(in_domain or {}).get(method, {}).get(d, np.nan) for d in domains]
        offset = (2 * i - len(methods) + 0.5) * width
        ax.bar(x + offset, inside, width, color=f"C{i}", alpha=0.45, label=f"{method}: in-domain (test)")
        ax.bar(x + offset + width, held, width, color=f"C{i}", label=f"{method}: held-out domain")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, domains, rotation=30, ha="right", fontsize=8)
    ax.set(
        ylim=(0.3, 1.0), ylabel="within-category AUROC", title="In-domain vs held-out-domain AUROC per domain"
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_report(run_dir: Path, inputs: ReportInputs) -> Path:
    """Write plots/*.png, report.md and a self-contained report.html; return the path of report.md."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []
    if inputs.sweep is not None:
        figures.append(("AUROC by layer and position", plot_layer_sweep(inputs.sweep, plots / "layers.png")))
    figures += [
        ("Reliability diagrams", plot_reliability(inputs, plots / "reliability.png")),
        ("Risk-coverage curves", plot_risk_coverage(inputs, plots / "risk_coverage.png")),
        ("Accuracy vs confidence by category", plot_categories(inputs, plots / "categories.png")),
        ("Confidence histogram", plot_histogram(inputs, plots / "confidence_hist.png")),
    ]
    if inputs.transfer is not None:
        figures.append(
            (
                "In-domain vs held-out domains",
                plot_transfer(inputs.transfer, inputs.in_domain_by_domain, plots / "transfer.png"),
            )
        )
    parts = [
        f"# {inputs.title}",
        *inputs.notes,
        "## Evaluation",
        inputs.table.to_markdown(),
        "ECE uses equal-width bins; `ece_low`/`ece_high` are its bootstrap 95% interval.",
        "## Categories",
        _category_markdown(inputs),
    ]
    if inputs.transfer is not None:
        at = parts.index("## Categories")  # right after the in-domain table
        parts[at:at] = ["## Held-out domains (transfer)", transfer_markdown(inputs.transfer)]
    at = parts.index("## Categories")
    for heading, body in reversed(inputs.sections):
        parts[at:at] = [f"## {heading}", body]
    if inputs.calibration is not None:
        at = parts.index("## Categories")  # after the in-domain (and held-out) tables
        parts[at:at] = ["## Calibration per domain", calibration_markdown(inputs.calibration)]
    for caption, path in figures:
        parts += [f"## {caption}", f"![{caption}](plots/{path.name})"]
    markdown = "\n\n".join(parts) + "\n"
    atomic_write_text(run_dir / "report.md", markdown)
    atomic_write_text(run_dir / "report.html", markdown_to_html(markdown, run_dir))
    return run_dir / "report.md"


def markdown_to_html(markdown: str, base: Path) -> str:
    """Render the report's own small Markdown subset (headings, tables, images, paragraphs) with images
    embedded, so the HTML file is viewable offline on its own."""
    out = []
    for block in markdown.strip().split("\n\n"):
        lines = block.splitlines()
        if block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            out.append(f"<h{level}>{html.escape(block.lstrip('#').strip())}</h{level}>")
        elif block.startswith("|"):
            rows = [
                [html.escape(c.strip()) for c in line.strip("|").split("|")]
                for line in lines
                if "---" not in line
            ]
            head = "".join(f"<th>{c}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif (match := re.fullmatch(r"!\[(.*)\]\((.*)\)", block.strip())) is not None:
            data = base64.b64encode((base / match.group(2)).read_bytes()).decode()
            out.append(f'<img alt="{html.escape(match.group(1))}" src="data:image/png;base64,{data}">')
        else:
            out.append(f"<p>{html.escape(block)}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(out)}</body></html>"  # noqa: E501
