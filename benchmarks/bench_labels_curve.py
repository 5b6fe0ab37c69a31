"""Per-domain ECE against labels per domain on held-out `facts` domains: shrinkage vs Platt vs isotonic.

For each domain D of a real run's store: the leave-one-domain-out probe (the artifact's kind, features and C,
refit without D: probes.training.measure_transfer) scores D's rows; the fold's global calibrator is Platt on
the fold's calibration rows (other domains), as the transfer table calibrates. Then k labelled rows of D
(k = 5, 10, 20, 50, 100; 30 random draws) fit
  none       the fold's global calibrator as it is (no labels used)
  shrinkage  ShrinkageCalibrator around the global calibrator, tau = empirical Bayes across the OTHER domains'
             leave-one-domain-out offsets (D's labels never set its prior's width)
  recal      the same through probes.recalibration.recalibrate(kind="shrinkage") (the CLI's code path;
             a refused artifact counts as the parent's p), with its acceptance rate
  shrink_xd  shrinkage around a cross-domain global calibrator instead: Platt on the other domains' rows
             scored by their own leave-one-domain-out probes (what train.calibrate_on=cross_domain fits and
             every artifact stores as metadata.cross_domain_calibration)
  recal_xd   the same through recalibrate(kind="shrinkage", prior="cross_domain") (the CLI's
             recalibrate.prior=cross_domain; a refused child counts as the parent's in-domain p), with its
             acceptance rate
  platt      Platt on the k rows alone;   isotonic   isotonic regression on the k rows alone
and each is read by ECE (15 bins) on D's remaining rows, beside the floor: the ECE that a calibrated p (the
shrinkage p) reads on those rows with labels drawn from p itself. Domains with fewer than k + 30 rows are
skipped at that k. Prints the table (mean over domains of the mean over draws) and writes the PNG curve.

Measured numbers (date, command, table): docs/recalibration.md#from-20-labels-the-shrinkage-calibrator.

    PYTHONPATH=. python benchmarks/bench_labels_curve.py [--run RUN_DIR] [--png docs/labels_vs_ece.png]
    (RUN_DIR: a `probecal train` run with probe/ and store.txt; default /work/shared_runs/default_run)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from extract.store import open_store
from probes.artifact import ProbeArtifact
from probes.calibration import (
    IsotonicCalibrator,
    PlattCalibrator,
    ShrinkageCalibrator,
    cross_domain_platt,
    estimate_tau,
    fit_cross_domain_prior,
)
from probes.evaluation.metrics import ece, ece_floor
from probes.evaluation.transfer import domain_folds
from probes.recalibration import make_rows, recalibrate
from probes.training.spec import TrainSpec
from probes.training.splits import SplitData, probe_features
from probes.training.train import measure_transfer

KS = (5, 10, 20, 50, 100)
METHODS = ("none", "shrinkage", "recal", "shrink_xd", "recal_xd", "platt", "isotonic")
MIN_TEST_ROWS = 30


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-9, 1 - 1e-9)
    return np.log(q) - np.log1p(-q)


def fold_inputs(run: Path):
    """Per held-out domain: (name, its rows' LODO scores, labels, the fold's global Platt, its rows' mask in the
    store [n] bool), and the artifact."""
    artifact = ProbeArtifact.load(run / "probe")
    store = open_store((run / "store.txt").read_text().strip())
    meta = artifact.metadata
    X = probe_features(artifact.probe, store, meta.layer, meta.position)
    data = SplitData.from_store(store)
    folds = domain_folds(data.domains, data.masks["train"], data.masks["calibration"], data.y)
    spec = TrainSpec(n_bootstrap=0)
    _, scores = measure_transfer(artifact.probe, X, store.baselines, data, folds, PlattCalibrator(), spec)
    out = []
    for f, domain in enumerate(folds.domains):
        held, calib = folds.held_out[f], folds.calibrate[f]
        global_cal = PlattCalibrator().fit(scores[f][calib], data.y[calib])
        out.append((str(domain), scores[f][held], data.y[held], global_cal, held))
    return artifact, out


def cross_domain_record(inputs, exclude: int) -> dict:
    """What training stores as metadata.cross_domain_calibration, from the other domains' held-out rows (each
    scored by the probe fit without it): their Platt map and offset width (probes.calibration)."""
    others = [(s, y, np.full(len(y), name)) for g, (name, s, y, _, _) in enumerate(inputs) if g != exclude]
    return fit_cross_domain_prior(*(np.concatenate(part) for part in zip(*others, strict=True)))


def other_domains_tau(inputs, exclude: int) -> float:
    logits, ys, names = [], [], []
    for g, (name, s, y, own_global, _) in enumerate(inputs):
        if g != exclude:
            logits.append(logit(own_global.predict(s)))
            ys.append(y)
            names.append(np.full(len(y), name))
    return estimate_tau(np.concatenate(logits), np.concatenate(ys), np.concatenate(names))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="/work/shared_runs/default_run")
    parser.add_argument("--png", default="docs/labels_vs_ece.png")
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument(
        "--xd-tau",
        type=float,
        help="tau of the cross-domain prior (default: estimated on the other domains' rows; the run's "
        "artifact stores the one estimated on their calibration rows: metadata.cross_domain_calibration)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    artifact, inputs = fold_inputs(Path(args.run))
    print(
        f"run {args.run}: {artifact.metadata.kind} probe, layer {artifact.metadata.layer}; "
        f"{len(inputs)} held-out domains"
    )
    # results[k][method] = list over domains of the mean over draws
    results = {k: {m: [] for m in (*METHODS, "floor", "accepted", "accepted_xd")} for k in KS}
    per_domain_20 = []
    for f, (name, s, y, global_cal, _) in enumerate(inputs):
        tau = other_domains_tau(inputs, f)
        record = cross_domain_record(inputs, f)
        if args.xd_tau is not None:
            record["tau"] = args.xd_tau
        global_xd, tau_xd = cross_domain_platt(record), record["tau"]
        parent = ProbeArtifact(artifact.probe, global_cal, artifact.metadata)
        # the CLI's two paths: shrinkage around the parent's calibrator, or around the stored cross-domain map
        recal_paths = {
            "recal": (parent, {"tau": tau}),
            "recal_xd": (parent.with_metadata(cross_domain_calibration=record), {"prior": "cross_domain"}),
        }
        for k in KS:
            if len(y) < k + MIN_TEST_ROWS:
                continue
            rng = np.random.default_rng(f * 1000 + k)
            values = {m: [] for m in (*METHODS, "floor", "accepted", "accepted_xd")}
            for draw in range(args.draws):
                fit = np.zeros(len(y), dtype=bool)
                fit[rng.choice(len(y), k, replace=False)] = True
                rest = ~fit
                domain_fit, domain_rest = np.full(k, name), np.full(int(rest.sum()), name)
                shrink = ShrinkageCalibrator(tau=tau).fit(
                    s[fit], y[fit], categories=domain_fit, prior=global_cal
                )
                p = {
                    "none": global_cal.predict(s[rest]),
                    "shrinkage": shrink.predict(s[rest], categories=domain_rest),
                    "shrink_xd": ShrinkageCalibrator(tau=tau_xd)
                    .fit(s[fit], y[fit], categories=domain_fit, prior=global_xd)
                    .predict(s[rest], categories=domain_rest),
                    "platt": PlattCalibrator().fit(s[fit], y[fit]).predict(s[rest]),
                    "isotonic": IsotonicCalibrator().fit(s[fit], y[fit]).predict(s[rest]),
                }
                accepted = {}
                for method, (parent_of, how) in recal_paths.items():
                    try:
                        rows = make_rows(s[fit], y[fit], domain_fit, parent_p=global_cal.predict(s[fit]))
                        result = recalibrate(
                            parent_of, rows, kind="shrinkage", seed=draw, n_bootstrap=100, **how
                        )
                        accepted[method] = result.accepted
                        p[method] = (result.calibrator if result.accepted else global_cal).predict(
                            s[rest], categories=domain_rest
                        )
                    except ValueError:  # NotEnoughRows (one class among the k): the parent keeps serving
                        accepted[method], p[method] = False, p["none"]
                for m in METHODS:
                    values[m].append(ece(p[m], y[rest]))
                values["floor"].append(ece_floor(p["shrinkage"], draws=20, seed=draw))
                values["accepted"].append(float(accepted["recal"]))
                values["accepted_xd"].append(float(accepted["recal_xd"]))
            for m, v in values.items():
                results[k][m].append(float(np.mean(v)))
            if k == 20:
                per_domain_20.append((name, len(y), tau, {m: float(np.mean(v)) for m, v in values.items()}))
    header = (
        "| labels/domain | domains | "
        + " | ".join(METHODS)
        + " | floor | shrinkage - floor | recal_xd - floor | recal accepted | recal_xd accepted |"
    )
    print(
        "\nper-domain ECE on each held-out domain's remaining rows (mean over domains of the mean over draws)"
    )
    print(header)
    print("|" + "---:|" * (len(METHODS) + 7))
    for k in KS:
        r = {m: float(np.mean(v)) for m, v in results[k].items()}
        print(
            f"| {k} | {len(results[k]['none'])} | "
            + " | ".join(f"{r[m]:.3f}" for m in METHODS)
            + f" | {r['floor']:.3f} | {r['shrinkage'] - r['floor']:+.3f} | {r['recal_xd'] - r['floor']:+.3f}"
            f" | {r['accepted']:.0%} | {r['accepted_xd']:.0%} |"
        )
    print("\nat 20 labels, per domain (rows, tau from the other domains):")
    print("| domain | rows | tau | " + " | ".join(METHODS) + " | floor |")
    print("|---|" + "---:|" * (len(METHODS) + 3))
    for name, n, tau, r in per_domain_20:
        print(
            f"| {name} | {n} | {tau:.2f} | "
            + " | ".join(f"{r[m]:.3f}" for m in METHODS)
            + f" | {r['floor']:.3f} |"
        )
    taus = [other_domains_tau(inputs, f) for f in range(len(inputs))]
    print(
        f"\ntau (empirical Bayes over all {len(inputs)} domains' LODO offsets): {other_domains_tau(inputs, -1):.3f}; "
        f"leave-one-out range {min(taus):.3f}-{max(taus):.3f}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"none": ":", "shrinkage": "-", "recal": "--", "platt": "-.", "isotonic": "-."}
    for m in (*METHODS, "floor"):
        ax.plot(
            KS,
            [np.mean(results[k][m]) for k in KS],
            styles.get(m, "-"),
            marker="o",
            label=m,
            color="black" if m == "floor" else None,
        )
    ax.set_xscale("log")
    ax.set_xticks(KS, [str(k) for k in KS])
    ax.set_xlabel("labelled rows per held-out domain")
    ax.set_ylabel("per-domain ECE on the remaining rows")
    ax.set_title(f"SmolLM2-135M facts, {len(inputs)} held-out domains, {args.draws} draws")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"curve: {args.png}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
