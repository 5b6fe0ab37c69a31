"""Train and evaluate probes on an activation store; the CLI stages call these.

Splits are the ones recorded in the store (`split` per row, seeded and stratified by category):
the layer sweep and the probe use `train` only, the calibrator and the abstention threshold use
`calibration`, and every reported number uses `test`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.data import SPLITS
from extract.store import ActivationStore
from probecal.files import atomic_write_text
from probes.artifact import ProbeArtifact, hash_arrays, json_default
from probes.cli.config import TrainSpec
from probes.evaluation.metrics import HEADLINE_METRICS
from probes.evaluation.report import ReportInputs, write_report
from probes.evaluation.sweep import SweepResult, sweep
from probes.evaluation.tables import EvalTable, calibrate_baselines, evaluate
from probes.evaluation.thresholds import choose_threshold, realised

log = logging.getLogger(__name__)

PROBE_METHOD = "probe"
PROBE_RAW_METHOD = "probe (uncalibrated)"


@dataclass
class SplitData:
    y: np.ndarray  # [n] 1 = correct
    categories: np.ndarray  # [n] str
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # split name -> [n] bool

    @classmethod
    def from_store(cls, store: ActivationStore, splits: Sequence[str] | None = None) -> SplitData:
        """The store's labels and categories, split by `splits` [n] ("train" | "calibration" | "test").

        splits: None = the splits recorded at extraction. The split seed and fractions are not part of the
        store's settings key (splitting needs no new activations), so a reused store can carry the splits of
        an earlier run: the CLI passes the ones the current data config assigns.
        """
        split = store.column("split") if splits is None else np.asarray(splits, dtype=str)
        if split.shape != (len(store),):
            raise ValueError(f"{len(split)} splits given for the {len(store)} rows of the store at {store.path}")
        unknown = sorted(set(split.tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split name(s) {unknown}; allowed: {', '.join(SPLITS)}")
        masks = {name: split == name for name in SPLITS}
        return cls(store.column("label").astype(int), store.column("category").astype(str), masks)

    def sizes(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.masks.items()}


def _check_split(name: str, data: SplitData) -> None:
    mask = data.masks[name]
    labels = set(np.unique(data.y[mask]).tolist())
    if mask.sum() == 0 or labels != {0, 1}:
        raise ValueError(
            f"the {name} split has {int(mask.sum())} rows with labels {sorted(labels)}: a probe needs both correct "
            "and wrong answers there (use more data or other split fractions)"
        )


def _calibrator(cfg_calibration):
    from probes.cli.config import instantiate_group

    return instantiate_group(cfg_calibration)


def train_probe(
    store: ActivationStore, cfg_probe, cfg_calibration, spec: TrainSpec, seed: int = 0,
    splits: Sequence[str] | None = None,
) -> tuple[ProbeArtifact, SweepResult, dict[str, Any]]:
    """Sweep sites on train, fit the probe at the best site, calibrate + pick the threshold on calibration.

    splits: [n] split of each store row (None = the ones recorded in the store, see `SplitData.from_store`).
    """
    from probes.cli.config import instantiate_group

    data = SplitData.from_store(store, splits)
    for split in ("train", "calibration"):
        _check_split(split, data)
    train, calib = data.masks["train"], data.masks["calibration"]
    layers = spec.layers if spec.layers is not None else list(store.layers)
    positions = spec.positions if spec.positions is not None else list(store.positions)

    result = sweep(lambda layer, pos: store.read(layer, pos)[train], data.y[train], layers, positions,
                   n_folds=spec.n_folds, seed=seed, categories=data.categories[train])
    log.info("sweep: best site layer %d / %s (AUROC %.3f)", result.best_layer, result.best_position,
             result.best_row().auroc_mean)
    X = store.read(result.best_layer, result.best_position)
    probe = instantiate_group(cfg_probe).fit(X[train], data.y[train])
    calibrator = _calibrator(cfg_calibration).fit(
        probe.decision_function(X[calib]), data.y[calib], categories=data.categories[calib]
    )
    artifact = ProbeArtifact.create(
        probe, calibrator, result.best_layer, result.best_position, store.fingerprint,
        training_data_hash=hash_arrays(X[train], data.y[train]), split_sizes=data.sizes(),
    )
    p_calib, _ = artifact.predict(X[calib], categories=data.categories[calib])
    threshold = choose_threshold(p_calib, data.y[calib], spec.target_accuracy, spec.delta, spec.threshold_method)
    return artifact, result, {"threshold": threshold}


def evaluate_on_store(
    artifact: ProbeArtifact, store: ActivationStore, cfg_calibration, spec: TrainSpec, split: str | None = "test",
    seed: int = 0, splits: Sequence[str] | None = None,
) -> tuple[EvalTable, dict[str, np.ndarray], SplitData, np.ndarray]:
    """Probe vs every logit baseline (raw and calibrated the same way) on `split` (None = all rows).

    Baselines are calibrated on the store's calibration split; on a store without one (a new data set
    evaluated with a saved probe), only their raw probabilities are shown.
    splits: [n] split of each store row (None = the ones recorded in the store).
    Returns (table, {method: p [n_eval]}, split data, eval mask).
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)} or None (all rows)")
    artifact.fingerprint.check_matches(store.fingerprint, "store")
    data = SplitData.from_store(store, splits)
    mask = data.masks[split] if split else np.ones(len(data.y), bool)
    if mask.sum() == 0:
        raise ValueError(f"the store at {store.path} has no rows in the {split!r} split")
    X = store.read(artifact.metadata.layer, artifact.metadata.position)
    p, score = artifact.predict(X[mask], categories=data.categories[mask])
    methods: dict[str, np.ndarray] = {PROBE_METHOD: p}
    if artifact.calibrator is not None:
        methods[PROBE_RAW_METHOD] = artifact.probe.predict_proba(X[mask])[:, 1]
    calib = data.masks["calibration"]
    baselines = store.baselines
    if calib.sum() > 0 and split:
        from probes.calibration import calibrator_kind

        # Named after the calibrator that is fit here (cfg_calibration): in `probecal evaluate` it can differ
        # from the one stored with the probe.
        label = calibrator_kind(_calibrator(cfg_calibration))
        methods |= calibrate_baselines(
            {k: v[calib] for k, v in baselines.items()}, data.y[calib], {k: v[mask] for k, v in baselines.items()},
            lambda: _calibrator(cfg_calibration), label,
            categories_calibration=data.categories[calib], categories_test=data.categories[mask],
        )
    else:
        from probes.evaluation.tables import raw_probability

        methods |= {f"{k} (raw)": raw for k, v in baselines.items() if (raw := raw_probability(k, v[mask])) is not None}
    table = evaluate(methods, data.y[mask], data.categories[mask], n_bins=spec.n_bins,
                     n_bootstrap=spec.n_bootstrap, seed=seed)
    return table, methods, data, mask


def best_baseline(table: EvalTable) -> str | None:
    """The non-probe method with the highest within-category AUROC (pooled AUROC breaks ties)."""
    candidates = [m for m in table.rows if not m.startswith(PROBE_METHOD)]

    def key(method: str) -> tuple[float, float]:
        row = table.rows[method]
        return (np.nan_to_num(row.get("within_cat_auroc", np.nan), nan=-1.0), np.nan_to_num(row["auroc"], nan=-1.0))

    return max(candidates, key=key) if candidates else None


def headline(table: EvalTable, baseline: str | None) -> str:
    """The lines printed at the end of a run: probe vs the best baseline on the headline metrics."""
    shown = [PROBE_METHOD] + ([baseline] if baseline else [])
    lines = ["| method | " + " | ".join(HEADLINE_METRICS) + " |", "|---|" + "---:|" * len(HEADLINE_METRICS)]
    for method in shown:
        row = table.rows[method]
        cells = ["n/a" if row.get(m) is None or np.isnan(row.get(m)) else f"{row[m]:.3f}" for m in HEADLINE_METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_run_outputs(
    run_dir: Path, title: str, table: EvalTable, methods: dict[str, np.ndarray], data: SplitData, mask: np.ndarray,
    spec: TrainSpec, sweep_result: SweepResult | None, extra: dict[str, Any],
) -> tuple[Path, str]:
    """metrics.json, sweep.json (when there is a sweep) and the report; returns (report path, headline table)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if sweep_result is not None:
        sweep_result.to_json(run_dir / "sweep.json")
    baseline = best_baseline(table)
    shown_baselines = {
        m: p for m, p in methods.items() if not m.startswith(PROBE_METHOD) and (not m.endswith("(raw)") or m == baseline)
    }
    notes = [f"{k}: {v}" for k, v in extra.get("notes", {}).items()]
    inputs = ReportInputs(
        title=title, table=table, y=data.y[mask], categories=data.categories[mask],
        probe_raw=methods.get(PROBE_RAW_METHOD, methods[PROBE_METHOD]), probe=methods[PROBE_METHOD],
        baselines=shown_baselines,
        best_baseline=baseline, sweep=sweep_result, n_bins=spec.n_bins, notes=notes,
    )
    report = write_report(run_dir, inputs)
    metrics = {
        "title": title,
        "best_baseline": baseline,
        "headline": {m: {k: table.rows[m].get(k) for k in HEADLINE_METRICS} for m in [PROBE_METHOD, baseline] if m},
        "table": table.to_dict(),
        "train_spec": asdict(spec),
        **{k: v for k, v in extra.items() if k != "notes"},
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=json_default))
    return report, headline(table, baseline)


def threshold_report(threshold, p_test: np.ndarray, y_test: np.ndarray) -> dict[str, Any]:
    """The calibration-split threshold and what it realised on the test split."""
    info = threshold.to_dict()
    accuracy, coverage = realised(p_test, y_test, threshold.threshold)
    info.update({"test_accuracy": accuracy, "test_coverage": coverage})
    return info
