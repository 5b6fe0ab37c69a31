"""One table from a sweep: every `metrics.json` under a directory (a Hydra multirun), sorted."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from probecal.files import atomic_write_text
from probes.evaluation.metrics import HEADLINE_METRICS, LOWER_IS_BETTER


def _overrides(job_dir: Path) -> str:
    """The job's command-line overrides as Hydra saved them (`.hydra/overrides.yaml`), one string."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    items = [
        line.removeprefix("- ").strip() for line in path.read_text().splitlines() if line.startswith("- ")
    ]
    return " ".join(items)


def collect(root: Path) -> list[dict]:
    rows = []
    for metrics_file in sorted(Path(root).rglob("metrics.json")):
        data = json.loads(metrics_file.read_text())
        probe = data.get("headline", {}).get("probe", {})
        baseline_name = data.get("best_baseline")
        baseline = data.get("headline", {}).get(baseline_name, {}) if baseline_name else {}
        row = {
            "run": str(metrics_file.parent.relative_to(root)),
            "overrides": _overrides(metrics_file.parent),
            "model": data.get("model", ""),
            "data": data.get("data", ""),
            "site": data.get("selected", ""),
            **{f"probe_{m}": probe.get(m) for m in HEADLINE_METRICS},
            "best_baseline": baseline_name or "",
            **{f"baseline_{m}": baseline.get(m) for m in HEADLINE_METRICS},
        }
        rows.append(row)
    return rows


def _sort_key(value, lower_is_better: bool) -> tuple[bool, float]:
    """Best first, runs without the metric (None / NaN) last whatever the direction."""
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return (missing, 0.0 if missing else float(value) * (1 if lower_is_better else -1))


def summarize(root: Path, sort_by: str = "within_cat_auroc") -> tuple[Path, Path, str]:
    """Write `<root>/summary.csv` and `<root>/summary.md` (best first by the probe's `sort_by`)."""
    if sort_by not in HEADLINE_METRICS:
        raise ValueError(f"summarize.sort_by={sort_by!r}; allowed: {', '.join(HEADLINE_METRICS)}")
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no metrics.json under {root}: point summarize.dir at a multirun directory")
    lower_is_better = sort_by in LOWER_IS_BETTER
    rows.sort(key=lambda r: _sort_key(r[f"probe_{sort_by}"], lower_is_better))
    columns = list(rows[0])
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    writer.writerows(rows)
    csv_path, md_path = Path(root) / "summary.csv", Path(root) / "summary.md"
    atomic_write_text(csv_path, out.getvalue())

    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value if value is not None else "n/a")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    table = "\n".join(lines)
    atomic_write_text(md_path, table + "\n")
    return csv_path, md_path, table
