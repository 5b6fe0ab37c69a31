"""Recalibration on a real held-out domain: is 100 labelled rows of a new domain enough for ECE <= 0.05?

For each large domain D of a run's activation store: refit the run's probe (same kind, site, features and C)
on the train rows of the OTHER domains and calibrate it (Platt) on their calibration rows -- the "parent",
a probe that never saw D. Then draw `--rows` labelled rows of D, run `probecal recalibrate`'s core
(probes.recalibration.recalibrate, Platt) on them, and measure ECE / Brier / within-category AUROC on the
rest of D, before (parent) and after (child). Repeated over `--draws` seeded draws; prints mean and 90th
percentile. Baseline in the same run: the parent itself (no recalibration).

    .venv/bin/python benchmarks/bench_recalibration_heldout.py --run outputs/runs/<run> [--rows 100 --draws 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.base import clone

from extract.store import open_store
from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator
from probes.evaluation.metrics import brier, ece, within_category_auroc
from probes.recalibration import make_rows, recalibrate
from probes.training import probe_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a `probecal run` directory (probe/ and store.txt)")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--min-domain-rows", type=int, default=200)
    args = parser.parse_args()

    run = Path(args.run)
    artifact = ProbeArtifact.load(run / "probe")
    store = open_store(Path((run / "store.txt").read_text().strip()))
    Z = probe_features(artifact.probe, store, artifact.metadata.layer, artifact.metadata.position)
    y = store.column("label").astype(int)
    split = store.column("split").astype(str)
    domain = store.column("domain").astype(str)
    category = store.column("category").astype(str)
    probe_template = clone(artifact.probe).set_params(C=float(np.ravel(artifact.probe.C_)[0]))
    print(
        f"probe: {artifact.metadata.kind} at layer {artifact.metadata.layer} / {artifact.metadata.position}, "
        f"C={float(np.ravel(artifact.probe.C_)[0]):g}; {args.rows} labelled rows per draw, {args.draws} draws\n"
    )
    print(
        "| held-out domain | rows | accuracy | ECE parent | ECE recalibrated (mean / p90) | "
        "ECE of a calibrated p, same n | Brier parent | Brier recalibrated | within-cat AUROC parent | "
        "recalibrated | refused |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for held_out in sorted(set(domain)):
        in_d = domain == held_out
        if in_d.sum() < args.min_domain_rows:
            continue
        fit, cal = (split == "train") & ~in_d, (split == "calibration") & ~in_d
        probe = clone(probe_template).fit(Z[fit], y[fit])
        platt = PlattCalibrator().fit(probe.decision_function(Z[cal]), y[cal])
        parent = ProbeArtifact.create(
            probe,
            platt,
            artifact.metadata.layer,
            artifact.metadata.position,
            artifact.fingerprint,
            training_data_hash="heldout-" + held_out,
            split_sizes={"train": int(fit.sum()), "calibration": int(cal.sum())},
        )
        idx = np.flatnonzero(in_d)
        score = probe.decision_function(Z[idx])
        results = {"ece0": [], "ece1": [], "floor": [], "b0": [], "b1": [], "a0": [], "a1": []}
        refused = 0
        for draw in range(args.draws):
            order = np.random.default_rng(draw).permutation(len(idx))
            labelled, rest = order[: args.rows], order[args.rows :]
            rows = make_rows(
                score[labelled],
                y[idx][labelled],
                domain=np.full(len(labelled), held_out),
                source=f"{held_out} draw {draw}",
            )
            result = recalibrate(parent, rows, kind="platt", seed=draw, n_bootstrap=200)
            p0 = parent.calibrator.predict(score[rest])
            p1 = result.calibrator.predict(score[rest]) if result.accepted else p0
            refused += not result.accepted
            yr, cr = y[idx][rest], category[idx][rest]
            results["ece0"].append(ece(p0, yr))
            results["ece1"].append(ece(p1, yr))
            # What ECE reads for a PERFECTLY calibrated p on the same number of rows (binning noise alone).
            simulated = np.random.default_rng(1000 + draw).random(len(p1)) < p1
            results["floor"].append(ece(p1, simulated.astype(int)))
            results["b0"].append(brier(p0, yr))
            results["b1"].append(brier(p1, yr))
            results["a0"].append(within_category_auroc(p0, yr, cr).mean)
            results["a1"].append(within_category_auroc(p1, yr, cr).mean)
        r = {k: np.asarray(v) for k, v in results.items()}
        print(
            f"| {held_out} | {len(idx)} | {y[idx].mean():.3f} | {r['ece0'].mean():.3f} | "
            f"{r['ece1'].mean():.3f} / {np.quantile(r['ece1'], 0.9):.3f} | {r['floor'].mean():.3f} | {r['b0'].mean():.3f} | "  # noqa: E501
            f"{r['b1'].mean():.3f} | {np.nanmean(r['a0']):.3f} | {np.nanmean(r['a1']):.3f} | "
            f"{refused}/{args.draws} |"
        )


if __name__ == "__main__":
    main()
