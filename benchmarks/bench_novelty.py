"""Novelty on a real store, leave-one-domain-out: which statistic tells a held-out domain's questions from the
in-domain ones, and how calibration error grows with novelty.

    .venv/bin/python benchmarks/bench_novelty.py --store "$(cat outputs/runs/<run>/store.txt)" --layer 21

Part 1: AUROC (held-out domain rows vs the other domains' test rows), each statistic fit on the other
domains' train rows: the PCA residual (probes.novelty, the one served) and, beside it, a Mahalanobis distance
inside the top-k subspace and a k-nearest-neighbour cosine distance; at prompt_last and answer_last.
Part 2: the hybrid probe (as the default run selects it: hidden + logit signals, C=0.01) fit without each
domain and Platt-calibrated on the other domains; its ECE on held-out rows binned by their novelty, beside
the in-domain test rows (probe fit on every domain), and the floor a calibrated p reads on the same rows.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from extract.store import open_store
from probes.calibration import PlattCalibrator
from probes.estimators import HybridProbe
from probes.evaluation.metrics import auroc, ece, ece_floor
from probes.evaluation.novelty import novelty_transfer
from probes.evaluation.transfer import domain_folds
from probes.novelty import NoveltyModel
from probes.training import probe_features
from probes.training.splits import SplitData


def mahalanobis(fit_rows: np.ndarray, rows: np.ndarray, k: int = 32) -> np.ndarray:
    mu, sd = fit_rows.mean(0), fit_rows.std(0) + 1e-6
    _, s, vt = np.linalg.svd((fit_rows - mu) / sd, full_matrices=False)
    projected = ((rows - mu) / sd) @ vt[:k].T
    return np.sqrt((projected**2 / (s[:k] ** 2 / (len(fit_rows) - 1))).sum(1))


def knn_distance(fit_rows: np.ndarray, rows: np.ndarray, k: int = 10) -> np.ndarray:
    mu, sd = fit_rows.mean(0), fit_rows.std(0) + 1e-6
    a, b = (fit_rows - mu) / sd, (rows - mu) / sd
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return 1.0 - np.sort(b @ a.T, axis=1)[:, -k]  # cosine distance to the k-th nearest training row


def statistic_aurocs(X: np.ndarray, folds, test: np.ndarray) -> dict[str, float]:
    out: dict[str, list[float]] = {"pca residual (served)": [], "mahalanobis k=32": [], "knn k=10": []}
    for f in range(len(folds.domains)):
        held, reference = folds.held_out[f], test & ~folds.held_out[f]
        rows = np.r_[np.flatnonzero(reference), np.flatnonzero(held)]
        labels = np.r_[np.zeros(reference.sum()), np.ones(held.sum())]
        fit_rows = X[folds.fit[f]]
        model = NoveltyModel().fit(fit_rows, X[folds.calibrate[f]])
        out["pca residual (served)"].append(auroc(model.score(X[rows]), labels))
        out["mahalanobis k=32"].append(auroc(mahalanobis(fit_rows, X[rows]), labels))
        out["knn k=10"].append(auroc(knn_distance(fit_rows, X[rows]), labels))
    return {name: (float(np.mean(v)), float(np.min(v))) for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--layer", type=int, default=21)
    args = parser.parse_args()
    start = time.perf_counter()
    store = open_store(args.store)
    data = SplitData.from_store(store)
    train, calib, test = data.masks["train"], data.masks["calibration"], data.masks["test"]
    folds = domain_folds(data.domains, train, calib, data.y)

    print(f"store {store.path}: {len(data.y)} rows, {len(folds.domains)} domains, layer {args.layer}\n")
    print("| position | statistic | AUROC held-out vs in-domain (mean over domains) | worst domain |")
    print("|---|---|---:|---:|")
    for position in ("prompt_last", "answer_last"):
        X = store.read(args.layer, position).astype(np.float64)
        for name, (mean, worst) in statistic_aurocs(X, folds, test).items():
            print(f"| {position} | {name} | {mean:.3f} | {worst:.3f} |")
    served = novelty_transfer(store.read(args.layer, "prompt_last"), folds, test)
    print(
        f"\nserved statistic: {1 - served['heldout_in_domain_share']:.1%} of held-out-domain rows flagged novel, "
        f"{1 - served['reference_in_domain_share']:.1%} of in-domain test rows\n"
    )

    # Part 2: calibration error against novelty
    probe = HybridProbe(logit_features=tuple(sorted(store.baselines)), logit_weight=3.0, C=0.01)
    X = probe_features(probe, store, args.layer, "answer_last")
    prompts = store.read(args.layer, "prompt_last")
    p_all, novelty_all, y_all = [], [], []
    for f in range(len(folds.domains)):
        fitted = HybridProbe(**probe.get_params()).fit(X[folds.fit[f]], data.y[folds.fit[f]])
        calibrator = PlattCalibrator().fit(
            fitted.decision_function(X[folds.calibrate[f]]), data.y[folds.calibrate[f]]
        )
        held = folds.held_out[f]
        p_all.append(calibrator.predict(fitted.decision_function(X[held])))
        novelty_all.append(
            NoveltyModel().fit(prompts[folds.fit[f]], prompts[folds.calibrate[f]]).score(prompts[held])
        )
        y_all.append(data.y[held])
    fitted = HybridProbe(**probe.get_params()).fit(X[train], data.y[train])
    calibrator = PlattCalibrator().fit(fitted.decision_function(X[calib]), data.y[calib])
    p_in = calibrator.predict(fitted.decision_function(X[test]))
    novelty_in = NoveltyModel().fit(prompts[train], prompts[calib]).score(prompts[test])
    p_held, novelty_held, y_held = map(np.concatenate, (p_all, novelty_all, y_all))
    print("| rows | novelty | n | accuracy | mean p | ECE | floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    bins = [(0, 1), (1, 2), (2, 4), (4, np.inf)]
    for label, p, nov, y in (
        ("in-domain test", p_in, novelty_in, data.y[test]),
        ("held-out", p_held, novelty_held, y_held),
    ):
        for lo, hi in bins:
            m = (nov > lo) & (nov <= hi)
            if m.sum() < 20:
                continue
            print(
                f"| {label} | ({lo}, {hi}] | {m.sum()} | {y[m].mean():.3f} | {p[m].mean():.3f} | "
                f"{ece(p[m], y[m]):.3f} | {ece_floor(p[m]):.3f} |"
            )
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
