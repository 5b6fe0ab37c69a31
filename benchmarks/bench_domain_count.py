"""Does training on more domains help on a new one? Held-out AUROC and ECE vs the number of training domains.

For each domain D of a run's activation store and each k in --ks (capped at all-but-one): draw k of the
OTHER domains at random (--draws seeded draws), refit the run's probe (same kind, site, features and C) on
their train rows, Platt-calibrate it on their calibration rows, and score every row of D. Reports, averaged
over held-out domains and draws: within-category AUROC on D (ranking inside D's categories), ECE on D
(calibration of a new domain), and beside it the ECE a perfectly calibrated p reads on the same rows
(binning noise alone: labels drawn from p itself), the baseline measured in the same run.

    .venv/bin/python benchmarks/bench_domain_count.py --run outputs/runs/<run> [--store STORE]
        [--plot docs/domains_curve.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.base import clone

from extract.store import open_store
from probecal.heldout import NEVER_FIT_DOMAINS
from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator
from probes.evaluation.metrics import ece, within_category_auroc
from probes.training import probe_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a `probecal run` directory (probe/ and store.txt)")
    parser.add_argument(
        "--ks", default="2,4,8,12,16", help="numbers of training domains (all-but-one is added)"
    )
    parser.add_argument(
        "--store", type=Path, default=None, help="score this store instead (same model and site)"
    )
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--plot", type=Path, default=None, help="write the curve as a PNG here")
    args = parser.parse_args()

    run = Path(args.run)
    artifact = ProbeArtifact.load(run / "probe")
    store = open_store(args.store or Path((run / "store.txt").read_text().strip()))
    Z = probe_features(artifact.probe, store, artifact.metadata.layer, artifact.metadata.position)
    y = store.column("label").astype(int)
    split = store.column("split").astype(str)
    domain = store.column("domain").astype(str)
    category = store.column("category").astype(str)
    # never-fit domains (unanswerable, benign_refusal) hold no correct answers: neither train nor held out here
    domains = sorted(set(domain) - set(NEVER_FIT_DOMAINS))
    C = float(np.ravel(artifact.probe.C_)[0])
    template = clone(artifact.probe).set_params(C=C)
    ks = sorted({k for k in map(int, args.ks.split(",")) if k < len(domains) - 1} | {len(domains) - 1})
    print(
        f"probe: {artifact.metadata.kind} at layer {artifact.metadata.layer} / {artifact.metadata.position}, "
        f"C={C:g}; {len(domains)} domains, {len(y)} rows; k in {ks}, {args.draws} draws per held-out domain\n"
    )
    print("| training domains k | fits | within-cat AUROC on held-out (mean) | ECE on held-out (mean / p90) | "
          "ECE of a calibrated p, same rows |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    curve = []
    for k in ks:
        aurocs, eces, floors = [], [], []
        for held_out in domains:
            others = [d for d in domains if d != held_out]
            in_d = domain == held_out
            draws = 1 if k == len(others) else args.draws  # all-but-one has a single draw
            for draw in range(draws):
                rng = np.random.default_rng([draw, k, domains.index(held_out)])
                chosen = np.isin(domain, rng.choice(others, size=k, replace=False))
                fit, cal = (split == "train") & chosen, (split == "calibration") & chosen
                if len(set(y[fit])) < 2 or len(set(y[cal])) < 2:
                    continue
                probe = clone(template).fit(Z[fit], y[fit])
                platt = PlattCalibrator().fit(probe.decision_function(Z[cal]), y[cal])
                p = platt.predict(probe.decision_function(Z[in_d]))
                aurocs.append(within_category_auroc(p, y[in_d], category[in_d]).mean)
                eces.append(ece(p, y[in_d]))
                floors.append(ece(p, (rng.random(len(p)) < p).astype(int)))
        a, e, f = np.asarray(aurocs), np.asarray(eces), np.asarray(floors)
        curve.append((k, np.nanmean(a), e.mean(), f.mean()))
        print(
            f"| {k} | {len(e)} | {np.nanmean(a):.3f} | {e.mean():.3f} / {np.quantile(e, 0.9):.3f} | {f.mean():.3f} |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kk, auc, ec, fl = (np.asarray(c) for c in zip(*curve, strict=True))
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        ax[0].plot(kk, auc, "o-")
        ax[0].set(xlabel="training domains", ylabel="within-category AUROC, held-out domain")
        ax[1].plot(kk, ec, "o-", label="ECE, held-out domain")
        ax[1].plot(kk, fl, "s--", label="ECE of a calibrated p (floor)")
        ax[1].set(xlabel="training domains", ylabel="ECE")
        ax[1].legend()
        fig.suptitle(f"{len(domains)} domains, {len(y)} rows; {artifact.metadata.kind} probe")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
