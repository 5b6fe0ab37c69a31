"""Train and evaluate probes on an activation store; the CLI stages call these.

Splits are the ones recorded in the store (`split` per row, seeded and stratified by category):
the layer sweep and the probe use `train` only, the calibrator and the abstention threshold use
`calibration`, and every in-domain number uses `test`.

Transfer (train.transfer, probes/evaluation/transfer.py): leave-one-domain-out over the store's domains
measures the probe and every baseline on domains they never saw; with train.select=transfer (the default)
the probe's site, features (hidden state, or hidden state + logit signals: the `hybrid` kind) and C are the
ones with the best held-out-domain within-category AUROC, instead of the best in-domain CV AUROC
(train.select_rule=heldout_then_cv, the default: among candidates within train.select_tolerance of that best,
the best in-domain CV within-category AUROC). train.calibrate_on: the final calibrator is fit on the
calibration split (default), on out-of-domain LODO scores (cross_domain) or both; held-out numbers are nested.
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
from extract.store import ActivationStore, StoreError
from probecal.files import atomic_write_text
from probes.artifact import ProbeArtifact, hash_arrays, json_default
from probes.cli.config import TrainSpec
from probes.evaluation.metrics import HEADLINE_METRICS
from probes.evaluation.report import ReportInputs, write_report
from probes.evaluation.sweep import SweepResult, cv_masks, sweep
from probes.evaluation.tables import EvalTable, calibrate_baselines, evaluate
from probes.evaluation.thresholds import choose_threshold, realised
from probes.evaluation.transfer import (
    CALIBRATE_ON,
    FEATURE_SETS,
    SELECT_RULES,
    CandidateSearch,
    DomainFolds,
    TransferTable,
    add_cv_scores,
    cross_domain_set,
    design_matrix,
    domain_folds,
    fold_logistic_scores,
    generic_fold_scores,
    nested_cross_domain_sets,
    nested_fit_masks,
    score_candidates,
    transfer_table,
)
from probes.inference import logit_feature_matrix

log = logging.getLogger(__name__)

PROBE_METHOD = "probe"
PROBE_RAW_METHOD = "probe (uncalibrated)"
SELECT_MODES = ("transfer", "cv")
OPTIMISM_NOTE = (
    "the held-out AUROC of the selected candidate is optimistic: the candidate was chosen on that same "
    "score (the other candidates' scores show the spread)"
)


def row_domains(store: ActivationStore) -> np.ndarray:
    """[n] domain of each row: the record's `domain`, else (older stores, empty values) its category."""
    categories = store.column("category").astype(str)
    try:
        domains = store.column("domain").astype(str)
    except (StoreError, KeyError):
        return categories
    return np.where(domains == "", categories, domains)


def probe_features(probe, store: ActivationStore, layer: int, position: str) -> np.ndarray:
    """X [n, hidden (+ m)]: the hidden state at the probe's site, then the logit signals a hybrid probe reads."""
    X = store.read(layer, position)
    names = getattr(probe, "logit_features", None)
    if not names:
        return X
    return np.hstack([X, logit_feature_matrix(store.baselines, list(names))]).astype(np.float32)


@dataclass
class SplitData:
    y: np.ndarray  # [n] 1 = correct
    categories: np.ndarray  # [n] str
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # split name -> [n] bool
    domains: np.ndarray | None = None  # [n] str, groups of related categories (None = the categories)

    @classmethod
    def from_store(cls, store: ActivationStore, splits: Sequence[str] | None = None) -> SplitData:
        """The store's labels and categories, split by `splits` [n] ("train" | "calibration" | "test").

        splits: None = the splits recorded at extraction. The split seed and fractions are not part of the
        store's settings key (splitting needs no new activations), so a reused store can carry the splits of
        an earlier run: the CLI passes the ones the current data config assigns.
        """
        split = store.column("split") if splits is None else np.asarray(splits, dtype=str)
        if split.shape != (len(store),):
            raise ValueError(
                f"{len(split)} splits given for the {len(store)} rows of the store at {store.path}"
            )
        unknown = sorted(set(split.tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split name(s) {unknown}; allowed: {', '.join(SPLITS)}")
        masks = {name: split == name for name in SPLITS}
        return cls(
            store.column("label").astype(int), store.column("category").astype(str), masks, row_domains(store)
        )

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


def check_train_spec(spec: TrainSpec) -> None:
    """Validate the transfer/selection options of `train` with messages that name the allowed values."""
    if spec.select not in SELECT_MODES:
        raise ValueError(
            f"train.select={spec.select!r} is not allowed; allowed values: {', '.join(SELECT_MODES)}"
        )
    if spec.select == "transfer" and not spec.transfer:
        raise ValueError(
            "train.select=transfer selects by the held-out-domain score: it needs train.transfer=true"
        )
    unknown = [f for f in spec.transfer_features if f not in FEATURE_SETS]
    if unknown or not spec.transfer_features:
        raise ValueError(
            f"train.transfer_features={list(spec.transfer_features)!r}; allowed values: "
            f"a non-empty list of {', '.join(FEATURE_SETS)}"
        )
    if int(spec.transfer_layer_step) < 1:
        raise ValueError(f"train.transfer_layer_step={spec.transfer_layer_step!r} must be >= 1")
    if not spec.transfer_Cs or min(spec.transfer_Cs) <= 0:
        raise ValueError(
            f"train.transfer_Cs={list(spec.transfer_Cs)!r} must be a non-empty list of positive numbers"
        )
    if not spec.logit_weight > 0:
        raise ValueError(f"train.logit_weight={spec.logit_weight!r} must be > 0")
    if spec.select_rule not in SELECT_RULES:
        raise ValueError(
            f"train.select_rule={spec.select_rule!r} is not allowed; allowed values: "
            f"{', '.join(SELECT_RULES)}"
        )
    if not spec.select_tolerance >= 0:
        raise ValueError(f"train.select_tolerance={spec.select_tolerance!r} must be >= 0")
    if spec.calibrate_on not in CALIBRATE_ON:
        raise ValueError(
            f"train.calibrate_on={spec.calibrate_on!r} is not allowed; allowed values: "
            f"{', '.join(CALIBRATE_ON)}"
        )
    if spec.calibrate_on != "calibration" and not spec.transfer:
        raise ValueError(
            f"train.calibrate_on={spec.calibrate_on} calibrates on leave-one-domain-out scores: it "
            "needs train.transfer=true"
        )


def candidate_layers(stored: Sequence[int], step: int) -> list[int]:
    """Every `step`-th stored layer, and always the last one (a coarse grid keeps the LODO search fast)."""
    stored = sorted(stored)
    return sorted(set(stored[::step]) | {stored[-1]})


def _logistic_base(cfg_probe):
    """The configured probe, and the LogisticProbe settings a transfer candidate inherits from it."""
    from probes.cli.config import instantiate_group
    from probes.estimators import LogisticProbe

    configured = instantiate_group(cfg_probe)
    if type(configured) is not LogisticProbe:
        return configured, None
    params = configured.get_params()
    return configured, {k: params[k] for k in ("class_weight", "max_iter", "tol", "random_state")}


def _candidate_probe(candidate, base: dict, logit_names: list[str], logit_weight: float):
    from probes.estimators import HybridProbe, LogisticProbe

    if candidate.features == "hidden+logits":
        return HybridProbe(
            logit_features=tuple(logit_names), logit_weight=logit_weight, C=candidate.C, **base
        )
    return LogisticProbe(C=candidate.C, **base)


def train_probe(
    store: ActivationStore,
    cfg_probe,
    cfg_calibration,
    spec: TrainSpec,
    seed: int = 0,
    splits: Sequence[str] | None = None,
) -> tuple[ProbeArtifact, SweepResult, dict[str, Any]]:
    """Select the probe (site, features, C), fit it on train, calibrate + pick the threshold on calibration,
    and measure leave-one-domain-out transfer of the probe and every baseline.

    train.select=cv: the site with the best in-domain CV AUROC, the configured probe (its own C choice).
    train.select=transfer: the (site, feature set, C) with the best held-out-domain within-category AUROC among
    a coarse grid (probes.evaluation.transfer.score_candidates); a non-logistic probe group keeps its kind and
    only the site is selected this way.
    splits: [n] split of each store row (None = the ones recorded in the store, see `SplitData.from_store`).
    extra: {"threshold", "transfer" (TransferTable | None), "candidates" (CandidateSearch | None),
    "selection" (what was chosen and how), "transfer_seconds"}.
    """
    import time

    check_train_spec(spec)
    data = SplitData.from_store(store, splits)
    for split in ("train", "calibration"):
        _check_split(split, data)
    train, calib = data.masks["train"], data.masks["calibration"]
    layers = spec.layers if spec.layers is not None else list(store.layers)
    positions = spec.positions if spec.positions is not None else list(store.positions)

    result = sweep(
        lambda layer, pos: store.read(layer, pos)[train],
        data.y[train],
        layers,
        positions,
        n_folds=spec.n_folds,
        seed=seed,
        categories=data.categories[train],
    )
    log.info(
        "sweep: best site layer %d / %s (AUROC %.3f)",
        result.best_layer,
        result.best_position,
        result.best_row().auroc_mean,
    )

    started = time.perf_counter()
    folds = domain_folds(data.domains, train, calib, data.y) if spec.transfer else None
    configured, base = _logistic_base(cfg_probe)
    logit_names = sorted(store.baselines)
    logits = logit_feature_matrix(store.baselines, logit_names) if logit_names else None
    search: CandidateSearch | None = None
    if spec.select == "transfer":
        feature_sets = list(spec.transfer_features) if base is not None else ["hidden"]
        if logits is None:
            feature_sets = [f for f in feature_sets if f == "hidden"] or ["hidden"]
        search = score_candidates(
            lambda layer, pos: store.read(layer, pos),
            logits,
            data.y,
            data.categories,
            folds,
            candidate_layers(layers, spec.transfer_layer_step),
            spec.transfer_positions if spec.transfer_positions is not None else positions,
            feature_sets,
            spec.transfer_Cs,
            spec.logit_weight,
        )
        if (
            spec.select_rule == "heldout_then_cv"
        ):  # in-domain CV (train split folds) of the near-best candidates
            cv_fit = np.zeros((spec.n_folds, len(data.y)), bool)
            cv_fit[:, train] = cv_masks(data.y[train], spec.n_folds, seed, data.categories[train])
            search = add_cv_scores(
                search,
                lambda layer, pos: store.read(layer, pos),
                logits,
                data.y,
                data.categories,
                cv_fit,
                spec.select_tolerance,
                folds.fit.any(axis=0),
                spec.logit_weight,
            )
        chosen = search.best(spec.select_rule, spec.select_tolerance)
        rule = (
            "best held-out-domain within-category AUROC (leave-one-domain-out)"
            if spec.select_rule == "heldout"
            else f"held-out-domain within-category AUROC (leave-one-domain-out) within {spec.select_tolerance:g} "
            "of the best, then the best in-domain CV within-category AUROC"
        )
        log.info(
            "transfer selection (train.select_rule=%s: %s): %s (held-out %.3f, in-domain CV %.3f, %.1f s)",
            spec.select_rule,
            rule,
            chosen.candidate.describe(),
            chosen.heldout_auroc,
            chosen.cv_auroc,
            search.seconds,
        )
        layer, position = chosen.candidate.layer, chosen.candidate.position
        probe = (
            _candidate_probe(chosen.candidate, base, logit_names, spec.logit_weight) if base else configured
        )
        selection = {
            "by": f"train.select_rule={spec.select_rule}: {rule}",
            "rule": spec.select_rule,
            "candidate": chosen.candidate.describe() if base else f"layer {layer} / {position}",
            "heldout_auroc": chosen.heldout_auroc,
            "cv_auroc": chosen.cv_auroc,
            "best_heldout_auroc": search.best("heldout").heldout_auroc,
            "heldout_auroc_note": OPTIMISM_NOTE,
        }
    else:
        layer, position, probe = result.best_layer, result.best_position, configured
        selection = {
            "by": "in-domain CV AUROC (layer sweep)",
            "candidate": f"layer {layer} / {position}",
            "cv_auroc": result.best_row().auroc_mean,
        }

    X = probe_features(probe, store, layer, position)
    probe.fit(X[train], data.y[train])
    transfer, outer = None, None
    if folds is not None:
        transfer, outer = measure_transfer(
            probe, X, store.baselines, data, folds, cfg_calibration, cfg_probe, spec
        )
    scores, rows = probe.decision_function(X[calib]), np.flatnonzero(calib)
    if spec.calibrate_on != "calibration":
        cross = cross_domain_set(
            outer, folds, calib
        )  # out-of-domain scores of every domain's calibration rows
        if spec.calibrate_on == "cross_domain":
            scores, rows = cross[1], cross[0].astype(int)
        else:
            scores, rows = np.concatenate([scores, cross[1]]), np.concatenate([rows, cross[0].astype(int)])
    selection["calibrate_on"] = spec.calibrate_on
    calibrator = _calibrator(cfg_calibration).fit(scores, data.y[rows], categories=data.categories[rows])
    artifact = ProbeArtifact.create(
        probe,
        calibrator,
        layer,
        position,
        store.fingerprint,
        training_data_hash=hash_arrays(X[train], data.y[train]),
        split_sizes=data.sizes(),
    )
    p_calib, _ = artifact.predict(X[calib], categories=data.categories[calib])
    threshold = choose_threshold(
        p_calib, data.y[calib], spec.target_accuracy, spec.delta, spec.threshold_method
    )
    return (
        artifact,
        result,
        {
            "threshold": threshold,
            "transfer": transfer,
            "candidates": search,
            "selection": selection,
            "transfer_seconds": time.perf_counter() - started,
        },
    )


def measure_transfer(
    probe,
    X: np.ndarray,
    baselines: dict[str, np.ndarray],
    data: SplitData,
    folds: DomainFolds,
    cfg_calibration,
    cfg_probe,
    spec: TrainSpec,
) -> tuple[TransferTable, np.ndarray]:
    """Held-out-domain numbers of the probe as trained (same kind, features and C; refit per fold) and of every
    baseline, each calibrated on the other domains' calibration rows with the configured calibrator.

    The probe's calibrator follows train.calibrate_on, NESTED: for held-out domain D, a cross-domain calibrator
    is fit on the other domains' calibration rows scored by inner probes fit without D and without that domain
    (k (k - 1) fits, one batched solve for a fixed-C logistic / hybrid probe); D's rows never calibrate D.
    Returns (table, the outer fold scores [k, n]: row f = the probe fit without domain f)."""
    from probes.calibration import calibrator_kind
    from probes.cli.config import instantiate_group
    from probes.estimators import HybridProbe, LogisticProbe

    if type(probe) in (LogisticProbe, HybridProbe) and probe.C is not None:
        # fixed C: all folds in one batched solve, standardized (and logit-weighted) as the probe does
        n_logits = len(getattr(probe, "logit_features", ()))
        hidden = X[:, : X.shape[1] - n_logits]
        logits = X[:, X.shape[1] - n_logits :] if n_logits else None
        Z = design_matrix(
            hidden,
            logits,
            "hidden+logits" if n_logits else "hidden",
            getattr(probe, "logit_weight", 1.0),
            folds.fit.any(axis=0),
        )

        def fit_scores(masks):
            return fold_logistic_scores(
                Z, data.y, masks, float(probe.C), probe._class_weight(), tol=1e-4, max_iter=500
            )[0]
    else:  # any other probe (or C chosen by CV): one fit per mask

        def fit_scores(masks):
            return generic_fold_scores(X, data.y, masks, lambda: instantiate_group(cfg_probe))

    scores = fit_scores(folds.fit)
    sets = None
    if spec.calibrate_on != "calibration":
        if len(folds.domains) < 3:
            raise ValueError(
                f"train.calibrate_on={spec.calibrate_on} needs at least three usable domains (its "
                f"held-out estimate holds out two at once); the data has {len(folds.domains)}: "
                f"{', '.join(folds.domains)}"
            )
        masks, pairs = nested_fit_masks(folds)
        sets = nested_cross_domain_sets(fit_scores(masks), pairs, folds, data.masks["calibration"])
        if spec.calibrate_on == "both":  # + the fold's own (in-domain for its probe) calibration rows
            sets = [
                np.hstack([np.vstack([np.flatnonzero(folds.calibrate[f]), scores[f][folds.calibrate[f]]]), s])
                for f, s in enumerate(sets)
            ]
    label = calibrator_kind(_calibrator(cfg_calibration))
    table = transfer_table(
        {PROBE_METHOD: scores},
        baselines,
        data.y,
        data.categories,
        folds,
        lambda: _calibrator(cfg_calibration),
        label,
        spec.n_bins,
        {PROBE_METHOD: sets} if sets is not None else None,
    )
    return table, scores


def evaluate_on_store(
    artifact: ProbeArtifact,
    store: ActivationStore,
    cfg_calibration,
    spec: TrainSpec,
    split: str | None = "test",
    seed: int = 0,
    splits: Sequence[str] | None = None,
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
    X = probe_features(artifact.probe, store, artifact.metadata.layer, artifact.metadata.position)
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
            {k: v[calib] for k, v in baselines.items()},
            data.y[calib],
            {k: v[mask] for k, v in baselines.items()},
            lambda: _calibrator(cfg_calibration),
            label,
            categories_calibration=data.categories[calib],
            categories_test=data.categories[mask],
        )
    else:
        from probes.inference import raw_probability

        methods |= {
            f"{k} (raw)": raw
            for k, v in baselines.items()
            if (raw := raw_probability(k, v[mask])) is not None
        }
    table = evaluate(
        methods,
        data.y[mask],
        data.categories[mask],
        n_bins=spec.n_bins,
        n_bootstrap=spec.n_bootstrap,
        seed=seed,
    )
    return table, methods, data, mask


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
    from probes.evaluation.metrics import within_category_auroc

    domains = (data.domains if data.domains is not None else data.categories)[mask]
    y, categories = data.y[mask], data.categories[mask]
    return {
        m: {
            str(d): within_category_auroc(p[domains == d], y[domains == d], categories[domains == d]).mean
            for d in np.unique(domains)
        }
        for m, p in methods.items()
    }


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
    """metrics.json, sweep.json (when there is a sweep) and the report; returns (report path, headline table).

    extra: JSON-able values for metrics.json, "notes" for the report, and from `train_probe` "transfer"
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
    summary = transfer_summary(extra, baseline)
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
    )
    report = write_report(run_dir, inputs)
    skipped = {"notes", "transfer", "candidates", "selection", "transfer_seconds", "threshold"}
    metrics = {
        "title": title,
        "best_baseline": baseline,
        "headline": {
            m: {k: table.rows[m].get(k) for k in HEADLINE_METRICS} for m in [PROBE_METHOD, baseline] if m
        },
        "table": table.to_dict(),
        "train_spec": asdict(spec),
        **({"transfer": summary} if summary else {}),
        **{k: v for k, v in extra.items() if k not in skipped},
    }
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=json_default))
    return report, headline(table, baseline, transfer)


def threshold_report(threshold, p_test: np.ndarray, y_test: np.ndarray) -> dict[str, Any]:
    """The calibration-split threshold and what it realised on the test split."""
    info = threshold.to_dict()
    accuracy, coverage = realised(p_test, y_test, threshold.threshold)
    info.update({"test_accuracy": accuracy, "test_coverage": coverage})
    return info
