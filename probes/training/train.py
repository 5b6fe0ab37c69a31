"""Train and evaluate a probe on an activation store: library code (the `probecal` CLI only turns config
into the objects these take, then writes outputs).

    result = train_probe(store)                      # LogisticProbe + Platt, TrainSpec() defaults
    result = train_probe(store, HybridProbe(...), IsotonicCalibrator(), TrainSpec(select="cv"))
    evaluation = evaluate_probe(result.artifact, store)

Transfer (spec.transfer, probes/evaluation/transfer.py): leave-one-domain-out over the store's domains measures
the probe and every baseline on domains they never saw; with spec.select="transfer" (the default) the probe's
site, features (hidden state, or hidden state + logit signals: the `hybrid` kind) and C are chosen by the
held-out-domain score (probes/selection/candidates.py; spec.select_rule="heldout_then_cv", the default: among
candidates within spec.select_tolerance of the best, the best in-domain CV within-category AUROC).
spec.calibrate_on: the final calibrator is fit on the calibration split (default), on out-of-domain LODO scores
(cross_domain) or both; held-out numbers are nested.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from sklearn.base import clone

from probecal.splits import SPLITS
from probes.artifact import ProbeArtifact, hash_arrays
from probes.calibration import PlattCalibrator, calibrator_kind, fit_cross_domain_prior
from probes.domains import DOMAIN_POSITION, fit_domain_clusters
from probes.estimators import HybridProbe, LogisticProbe
from probes.evaluation.novelty import novelty_transfer
from probes.evaluation.tables import (
    OPTIMISM_NOTE,
    PROBE_METHOD,
    PROBE_RAW_METHOD,
    EvalTable,
    calibrate_baselines,
    evaluate,
)
from probes.evaluation.transfer import (
    DomainFolds,
    TransferTable,
    cross_domain_set,
    design_matrix,
    domain_folds,
    fold_logistic_scores,
    generic_fold_scores,
    nested_cross_domain_sets,
    nested_fit_masks,
    transfer_table,
)
from probes.inference import logit_feature_matrix, raw_probability
from probes.novelty import NOVELTY_POSITION, NoveltyModel
from probes.selection.candidates import CandidateSearch, add_cv_scores, score_candidates
from probes.selection.sweep import SweepResult, cv_masks, sweep
from probes.selection.thresholds import ThresholdResult, choose_threshold
from probes.training.spec import TrainSpec
from probes.training.splits import SplitData, probe_features

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `train_probe` produces: the calibrated artifact and how it was chosen."""

    artifact: ProbeArtifact
    sweep: SweepResult  # in-domain CV AUROC of every (layer, position)
    threshold: ThresholdResult  # the abstention threshold chosen on the calibration split
    transfer: TransferTable | None  # held-out-domain numbers of the probe and every baseline (spec.transfer)
    candidates: CandidateSearch | None  # every transfer candidate's score (spec.select="transfer")
    selection: dict[str, Any]  # what was chosen and by which rule
    transfer_seconds: float
    novelty: dict[str, Any] | None = None  # leave-one-domain-out novelty numbers (probes.evaluation.novelty)

    def outputs(self) -> dict[str, Any]:
        """The entries `probes.evaluation.outputs.write_run_outputs` reads from a training run."""
        return {
            "threshold": self.threshold,
            "transfer": self.transfer,
            "candidates": self.candidates,
            "selection": self.selection,
            "transfer_seconds": self.transfer_seconds,
            "novelty": self.novelty,
        }


class Evaluation(NamedTuple):
    """`evaluate_probe`'s result: the table, {method: p [n_eval]}, the split data and the evaluated rows."""

    table: EvalTable
    methods: dict[str, np.ndarray]
    data: SplitData
    mask: np.ndarray


def candidate_layers(stored: Sequence[int], step: int) -> list[int]:
    """Every `step`-th stored layer, and always the last one (a coarse grid keeps the LODO search fast)."""
    stored = sorted(stored)
    return sorted(set(stored[::step]) | {stored[-1]})


def _logistic_settings(probe: Any) -> dict[str, Any] | None:
    """The LogisticProbe settings a transfer candidate inherits from `probe` (None: another kind)."""
    if type(probe) is not LogisticProbe:
        return None
    params = probe.get_params()
    return {k: params[k] for k in ("class_weight", "max_iter", "tol", "random_state")}


def _candidate_probe(candidate, base: dict, logit_names: list[str], logit_weight: float):
    if candidate.features == "hidden+logits":
        return HybridProbe(
            logit_features=tuple(logit_names), logit_weight=logit_weight, C=candidate.C, **base
        )
    return LogisticProbe(C=candidate.C, **base)


def train_probe(
    store: Any,
    probe: Any = None,
    calibrator: Any = None,
    spec: TrainSpec | None = None,
    seed: int = 0,
    splits: Sequence[str] | None = None,
) -> TrainResult:
    """Select the probe (site, features, C), fit it on train, calibrate + pick the threshold on calibration,
    and measure leave-one-domain-out transfer of the probe and every baseline.

    probe: an unfitted estimator (None = `LogisticProbe()`, C chosen by CV); cloned, never fitted in place.
    calibrator: an unfitted calibrator (None = `PlattCalibrator()`); cloned for every fit.
    spec.select="cv": the site with the best in-domain CV AUROC, `probe` as given (its own C choice).
    spec.select="transfer": the (site, feature set, C) with the best held-out-domain within-category AUROC among
    a coarse grid (`probes.selection.candidates.score_candidates`); a logistic `probe` lends its settings to the
    candidates, any other kind keeps its kind and only the site is selected this way.
    splits: [n] split of each store row (None = the ones recorded in the store, see `SplitData.from_store`).
    """
    probe = LogisticProbe() if probe is None else probe
    calibrator = PlattCalibrator() if calibrator is None else calibrator
    spec = TrainSpec() if spec is None else spec
    spec.check()
    data = SplitData.from_store(store, splits)
    for split in ("train", "calibration"):
        data.check_split(split)
    if spec.domain_clusters and DOMAIN_POSITION not in store.positions:  # before the sweep, not after
        raise ValueError(
            f"train.domain_clusters={spec.domain_clusters} clusters the {DOMAIN_POSITION} state, which the "
            f"store at {store.path} lacks (positions {list(store.positions)}): extract with it, or set 0"
        )
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
    configured, base = clone(probe), _logistic_settings(probe)
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
        transfer, outer = measure_transfer(probe, X, store.baselines, data, folds, calibrator, spec)
    scores, rows = probe.decision_function(X[calib]), np.flatnonzero(calib)
    cross_domain_prior = None
    if folds is not None:
        # out-of-domain scores of every domain's calibration rows (each by the probe fit without its domain):
        # the calibrator of train.calibrate_on=cross_domain|both, and the prior stored for new domains
        cross_rows, cross_scores = cross_domain_set(outer, folds, calib)
        cross_rows = cross_rows.astype(int)
        cross_domain_prior = fit_cross_domain_prior(
            cross_scores, data.y[cross_rows], data.calibration_groups[cross_rows]
        )
        if spec.calibrate_on == "cross_domain":
            scores, rows = cross_scores, cross_rows
        elif spec.calibrate_on == "both":
            scores, rows = np.concatenate([scores, cross_scores]), np.concatenate([rows, cross_rows])
    selection["calibrate_on"] = spec.calibrate_on
    fitted_calibrator = clone(calibrator).fit(scores, data.y[rows], categories=data.calibration_groups[rows])
    novelty, novelty_held_out = None, None
    # the question's own state at the probe's layer: the novelty model and the domain clusters read it
    prompts = store.read(layer, NOVELTY_POSITION) if NOVELTY_POSITION in store.positions else None
    if prompts is not None:
        try:
            novelty = NoveltyModel().fit(prompts[train], prompts[calib])
            if folds is not None:
                novelty_held_out = novelty_transfer(prompts, folds, data.masks["test"])
        except ValueError as err:  # e.g. a degenerate store; the probe itself does not need novelty
            log.warning("no novelty model for this probe: %s", err)
    artifact = ProbeArtifact.create(
        probe,
        fitted_calibrator,
        layer,
        position,
        store.fingerprint,
        novelty=novelty,
        training_data_hash=hash_arrays(X[train], data.y[train]),
        split_sizes=data.sizes(),
        cross_domain_calibration=cross_domain_prior,
    )
    if spec.domain_clusters:
        artifact = artifact.with_domains(fit_domain_clusters(prompts[train], spec.domain_clusters, seed))
    p_calib, _ = artifact.predict(X[calib], categories=data.calibration_groups[calib])
    threshold = choose_threshold(
        p_calib, data.y[calib], spec.target_accuracy, spec.delta, spec.threshold_method
    )
    return TrainResult(
        artifact,
        result,
        threshold,
        transfer,
        search,
        selection,
        time.perf_counter() - started,
        novelty_held_out,
    )


def fold_scorer(
    probe, X: np.ndarray, y: np.ndarray, stats_rows: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """A function fit masks [k, n] -> decision scores [k, n] of the probe as trained (same kind, features
    and C), refit on each mask. stats_rows [n] bool: rows that standardize the design (fixed-C logistic /
    hybrid probes solve all masks in one batch; any other probe is fit once per mask)."""
    if type(probe) in (LogisticProbe, HybridProbe) and probe.C is not None:
        n_logits = len(getattr(probe, "logit_features", ()))
        hidden = X[:, : X.shape[1] - n_logits]
        logits = X[:, X.shape[1] - n_logits :] if n_logits else None
        Z = design_matrix(
            hidden,
            logits,
            "hidden+logits" if n_logits else "hidden",
            getattr(probe, "logit_weight", 1.0),
            stats_rows,
        )
        return lambda masks: fold_logistic_scores(
            Z, y, masks, float(probe.C), probe._class_weight(), tol=1e-4, max_iter=500
        )[0]
    return lambda masks: generic_fold_scores(X, y, masks, lambda: clone(probe))


def measure_transfer(
    probe,
    X: np.ndarray,
    baselines: dict[str, np.ndarray],
    data: SplitData,
    folds: DomainFolds,
    calibrator: Any,
    spec: TrainSpec,
) -> tuple[TransferTable, np.ndarray]:
    """Held-out-domain numbers of the probe as trained (same kind, features and C; refit per fold) and of every
    baseline, each calibrated on the other domains' calibration rows with (a fresh clone of) `calibrator`.

    The probe's calibrator follows train.calibrate_on, NESTED: for held-out domain D, a cross-domain calibrator
    is fit on the other domains' calibration rows scored by inner probes fit without D and without that domain
    (k (k - 1) fits, one batched solve for a fixed-C logistic / hybrid probe); D's rows never calibrate D.
    Returns (table, the outer fold scores [k, n]: row f = the probe fit without domain f)."""
    fit_scores = fold_scorer(probe, X, data.y, folds.fit.any(axis=0))
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
    label = calibrator_kind(calibrator)
    table = transfer_table(
        {PROBE_METHOD: scores},
        baselines,
        data.y,
        data.categories,
        folds,
        lambda: clone(calibrator),
        label,
        spec.n_bins,
        {PROBE_METHOD: sets} if sets is not None else None,
    )
    return table, scores


def evaluate_probe(
    artifact: ProbeArtifact,
    store: Any,
    calibrator: Any = None,
    spec: TrainSpec | None = None,
    split: str | None = "test",
    seed: int = 0,
    splits: Sequence[str] | None = None,
) -> Evaluation:
    """Probe vs every logit baseline (raw and calibrated the same way) on `split` (None = all rows).

    Baselines are calibrated on the store's calibration split; on a store without one (a new data set
    evaluated with a saved probe), only their raw probabilities are shown.
    splits: [n] split of each store row (None = the ones recorded in the store).
    calibrator: what the baselines are calibrated with (None = Platt); spec: metric settings (None = defaults).
    Returns Evaluation(table, {method: p [n_eval]}, split data, eval mask).
    """
    calibrator = PlattCalibrator() if calibrator is None else calibrator
    spec = TrainSpec() if spec is None else spec
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)} or None (all rows)")
    artifact.fingerprint.check_matches(store.fingerprint, "store")
    data = SplitData.from_store(store, splits)
    mask = data.masks[split] if split else np.ones(len(data.y), bool)
    if mask.sum() == 0:
        raise ValueError(f"the store at {store.path} has no rows in the {split!r} split")
    X = probe_features(artifact.probe, store, artifact.metadata.layer, artifact.metadata.position)
    p, score = artifact.predict(X[mask], categories=data.calibration_groups[mask])
    methods: dict[str, np.ndarray] = {PROBE_METHOD: p}
    if artifact.calibrator is not None:
        methods[PROBE_RAW_METHOD] = artifact.probe.predict_proba(X[mask])[:, 1]
    calib = data.masks["calibration"]
    baselines = store.baselines
    if calib.sum() > 0 and split:
        # Named after the calibrator that is fit here : in `probecal evaluate` it can differ
        # from the one stored with the probe.
        label = calibrator_kind(calibrator)
        methods |= calibrate_baselines(
            {k: v[calib] for k, v in baselines.items()},
            data.y[calib],
            {k: v[mask] for k, v in baselines.items()},
            lambda: clone(calibrator),
            label,
            categories_calibration=data.calibration_groups[calib],
            categories_test=data.calibration_groups[mask],
        )
    else:
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
    return Evaluation(table, methods, data, mask)
