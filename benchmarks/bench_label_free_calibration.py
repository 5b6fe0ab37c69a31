"""Label-free calibration of a domain the probe never saw (issue 19 §2): options against the default.

Leave-one-domain-out on a run's store with the run's probe (same site, features and C, refit per fold), nested:
for held-out domain D, everything an option learns comes from the OTHER domains, each scored by an inner probe
fit without D and without that domain, so each training domain is as new to its probe as D is to the outer
one. Per option: mean per-domain ECE on the held-out domains, how many are within floor + 0.03, pooled ECE and
within-category AUROC. Options:

- `platt (default)`: Platt on the outer probe's in-domain calibration rows (what `make run` ships).
- `cross_domain`: Platt on the other domains' out-of-domain scores (`train.calibrate_on=cross_domain`).
- `novelty-conditioned`: logistic regression on (calibrated logit, log novelty, their product) fit on the
  out-of-domain scores of the other domains and the in-domain calibration rows: the offset may grow with
  how far a question lies from the training data.
- `domain offset (ridge)`: a domain-level model. For each training domain, its unlabelled traffic's summary
  (mean and spread of the calibrated logit, mean log novelty, the model's own mean sequence_prob and
  mean_logprob) against the logit offset that would have made its mean p equal its accuracy; ridge across
  domains; applied to D's summary, D's logits move by the predicted offset (ranking inside D unchanged).
- `constant offset`: the same with no features (the mean offset of the training domains): the control that
  says whether the summaries carry information.
- `novelty-gated`: the default's p for an answer whose question is in domain (novelty <= 1), the
  `cross_domain` p for a novel one.
- `domain-centred states`: the probe refit on hidden states centred by their domain's mean (every domain's
  own traffic, unlabelled; the logit signals left as they are), so that it cannot read "which domain" and the
  level comes from signals that may transfer; Platt on the in-domain calibration rows.

    PYTHONPATH=. python benchmarks/bench_label_free_calibration.py --run /work/shared_runs/final
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator, map_offset
from probes.evaluation.metrics import domain_calibration, within_category_auroc
from probes.evaluation.transfer import domain_folds, nested_fit_masks
from probes.novelty import NOVELTY_POSITION, NoveltyModel
from probes.training import SplitData, TrainSpec, probe_features
from probes.training.train import fold_scorer

SUMMARY_SIGNALS = ("sequence_prob", "mean_logprob")


class Scoring:
    """One probe fit (a fit mask) with its Platt map and novelty model: calibrated logit and novelty per row."""

    def __init__(self, scores, fit_rows, calibration_rows, y, prompts):
        platt = PlattCalibrator().fit(scores[calibration_rows], y[calibration_rows])
        self.z = platt.a_ * scores + platt.b_
        novelty = NoveltyModel().fit(prompts[fit_rows], prompts[calibration_rows])
        self.log_novelty = np.log(np.maximum(novelty.score(prompts), 1e-3))


def summary(scoring: Scoring, rows: np.ndarray, signals: dict[str, np.ndarray]) -> np.ndarray:
    z = scoring.z[rows]
    return np.array(
        [z.mean(), z.std(), scoring.log_novelty[rows].mean(), *(signals[s][rows].mean() for s in signals)]
    )


def novelty_design(z, log_novelty):
    return np.column_stack([z, log_novelty, z * log_novelty])


def ridge_predict(F: np.ndarray, t: np.ndarray, f: np.ndarray, alpha: float) -> float:
    mean, scale = F.mean(0), F.std(0) + 1e-9
    G = (F - mean) / scale
    w = np.linalg.solve(G.T @ G + alpha * np.eye(G.shape[1]), G.T @ (t - t.mean()))
    return float(t.mean() + ((f - mean) / scale) @ w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run dir: probe/, metrics.json, store.txt")
    parser.add_argument("--store", type=Path, help="activation store (default: the path in <run>/store.txt)")
    parser.add_argument("--alpha", type=float, default=10.0, help="ridge penalty of the domain offset model")
    args = parser.parse_args()
    # the benchmark reads the store; the probe core never imports extract
    from extract.store import open_store

    metrics = json.loads((args.run / "metrics.json").read_text())
    store = open_store(args.store or (args.run / "store.txt").read_text().strip())
    artifact = ProbeArtifact.load(args.run / "probe")
    known = {f.name for f in fields(TrainSpec)}
    spec = TrainSpec(**{k: v for k, v in metrics["train_spec"].items() if k in known})
    started = time.perf_counter()

    data = SplitData.from_store(store)
    y, categories = data.y, data.categories
    folds = domain_folds(data.domains, data.masks["train"], data.masks["calibration"], y)
    layer = artifact.metadata.layer
    X = probe_features(artifact.probe, store, layer, artifact.metadata.position)
    prompts = store.read(layer, NOVELTY_POSITION).astype(np.float64)
    signals = {s: np.asarray(store.baselines[s], float) for s in SUMMARY_SIGNALS if s in store.baselines}
    fit_scores = fold_scorer(artifact.probe, X, y, folds.fit.any(axis=0))
    outer_scores = fit_scores(folds.fit)
    masks, pairs = nested_fit_masks(folds)
    inner_scores = fit_scores(masks)
    n_logits = len(getattr(artifact.probe, "logit_features", ()))
    centred = X.astype(np.float64)
    for domain in np.unique(data.domains):
        rows = data.domains == domain
        centred[rows, : X.shape[1] - n_logits] -= centred[rows, : X.shape[1] - n_logits].mean(0)
    centred_scores = fold_scorer(artifact.probe, centred.astype(np.float32), y, folds.fit.any(axis=0))(
        folds.fit
    )
    print(
        f"{len(folds.domains)} held-out domains, {len(pairs)} inner fits ({time.perf_counter() - started:.0f} s)"
    )

    k = len(folds.domains)
    p_by_option: dict[str, np.ndarray] = {}
    options = (
        "platt (default)",
        "cross_domain",
        "novelty-conditioned",
        "domain offset (ridge)",
        "constant offset",
        "novelty-gated",
        "domain-centred states",
    )
    for name in options:
        p_by_option[name] = np.full(len(y), np.nan)
    for f in range(k):
        held = folds.held_out[f]
        outer = Scoring(outer_scores[f], folds.fit[f], folds.calibrate[f], y, prompts)
        inner = {
            g: Scoring(inner_scores[m], masks[m], folds.calibrate[f] & ~folds.held_out[g], y, prompts)
            for m, (ff, g) in enumerate(pairs)
            if ff == f
        }
        p_by_option["platt (default)"][held] = expit(outer.z[held])

        # out-of-domain rows of every other domain g, as its inner probe scores them
        rows = {g: folds.held_out[g] for g in inner}
        z_ood = np.concatenate([inner[g].z[rows[g]] for g in inner])
        nov_ood = np.concatenate([inner[g].log_novelty[rows[g]] for g in inner])
        y_ood = np.concatenate([y[rows[g]] for g in inner])
        p_by_option["cross_domain"][held] = PlattCalibrator().fit(z_ood, y_ood).predict(outer.z[held])
        novel = outer.log_novelty[held] > 0
        p_by_option["novelty-gated"][held] = np.where(
            novel, p_by_option["cross_domain"][held], p_by_option["platt (default)"][held]
        )

        calib = folds.calibrate[f]
        A = np.vstack(
            [novelty_design(z_ood, nov_ood), novelty_design(outer.z[calib], outer.log_novelty[calib])]
        )
        conditioned = LogisticRegression(C=1e3).fit(A, np.r_[y_ood, y[calib]])
        p_by_option["novelty-conditioned"][held] = conditioned.predict_proba(
            novelty_design(outer.z[held], outer.log_novelty[held])
        )[:, 1]

        F = np.array([summary(inner[g], rows[g], signals) for g in inner])
        # the shift that makes each training domain's mean p its accuracy (its maximum-likelihood offset)
        t = np.array([map_offset(inner[g].z[rows[g]], y[rows[g]], np.inf) for g in inner])
        offset = ridge_predict(F, t, summary(outer, held, signals), args.alpha)
        p_by_option["domain offset (ridge)"][held] = expit(outer.z[held] + offset)
        p_by_option["constant offset"][held] = expit(outer.z[held] + t.mean())
        platt = PlattCalibrator().fit(centred_scores[f][calib], y[calib])
        p_by_option["domain-centred states"][held] = platt.predict(centred_scores[f][held])

    held_any = folds.held_out.any(axis=0)
    domains = data.domains
    print(
        f"\n{metrics['title']}: {artifact.metadata.kind} probe, layer {layer} / {artifact.metadata.position}; "
        f"{held_any.sum()} held-out rows in {k} domains\n"
    )
    print(
        "| option | held-out per-domain ECE (mean) | floor (mean) | within floor + 0.03 | pooled ECE "
        "| within-cat AUROC |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in options:
        p = p_by_option[name][held_any]
        cal = domain_calibration(p, y[held_any], domains[held_any], spec.n_bins)
        s = cal.summary
        auc = np.nanmean(  # per held-out domain, then the mean (as the run's transfer table)
            [within_category_auroc(p_by_option[name][h], y[h], categories[h]).mean for h in folds.held_out]
        )
        print(
            f"| {name} | {s['mean_ece']:.3f} | {s['mean_floor']:.3f} | {s['n_within']} of {s['n_domains']} "
            f"| {s['pooled_ece']:.3f} | {auc:.3f} |"
        )
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
