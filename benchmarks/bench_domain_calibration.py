"""Per-domain calibration of a trained probe, as a user whose traffic is one domain sees it (issue 19 §1).

Loads a run's probe artifact and its activation store (read-only; nothing new is selected): the in-domain
test split through `probes.training.evaluate_probe`, and the held-out domains by leave-one-domain-out with the
probe exactly as trained (same site, features and C, refit per fold: `probes.training.train.measure_transfer`,
what the run's transfer table measured). For every domain: n, accuracy, mean p, ECE (15 equal-width bins),
its floor (the ECE a perfectly calibrated p reads on the same rows), smooth ECE and whether ECE <= floor + 0.03.
The run's own metrics.json transfer means are printed beside the recomputed ones as the baseline check.

    PYTHONPATH=. python benchmarks/bench_domain_calibration.py --run /work/shared_runs/default_run
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator
from probes.evaluation.metrics import DomainCalibration, domain_calibration
from probes.evaluation.transfer import domain_folds
from probes.training import SplitData, TrainSpec, evaluate_probe, probe_features
from probes.training.train import measure_transfer


def table(title: str, calibration: DomainCalibration) -> str:
    lines = [
        f"{title}",
        f"{'domain':<22}{'n':>6}{'accuracy':>10}{'mean p':>8}{'ECE':>8}{'floor':>8}{'smooth':>8}  within",
    ]
    for domain, r in calibration.per_domain.items():
        lines.append(
            f"{domain:<22}{r['n']:>6}{r['accuracy']:>10.3f}{r['mean_p']:>8.3f}{r['ece']:>8.3f}"
            f"{r['ece_floor']:>8.3f}{r['smooth_ece']:>8.3f}  {'yes' if r['within_floor'] else 'NO'}"
        )
    s = calibration.summary
    lines.append(
        f"{s['n_within']} of {s['n_domains']} domains within floor + 0.03; mean ECE {s['mean_ece']:.3f} vs mean "
        f"floor {s['mean_floor']:.3f}; mean smooth ECE {s['mean_smooth_ece']:.3f}; pooled ECE {s['pooled_ece']:.3f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run dir: probe/, metrics.json, store.txt")
    parser.add_argument("--store", type=Path, help="activation store (default: the path in <run>/store.txt)")
    args = parser.parse_args()
    from extract.store import (
        open_store,
    )  # the benchmark reads the store; the probe core never imports extract

    metrics = json.loads((args.run / "metrics.json").read_text())
    store = open_store(args.store or (args.run / "store.txt").read_text().strip())
    artifact = ProbeArtifact.load(args.run / "probe")
    known = {f.name for f in fields(TrainSpec)}
    spec = TrainSpec(**{k: v for k, v in metrics["train_spec"].items() if k in known} | {"n_bootstrap": 20})
    calibrator = artifact.calibrator if artifact.calibrator is not None else PlattCalibrator()

    started = time.perf_counter()
    _, methods, data, mask = evaluate_probe(artifact, store, PlattCalibrator(), spec, "test")
    domains = data.domains if data.domains is not None else data.categories
    inside = domain_calibration(methods["probe"], data.y[mask], domains[mask], spec.n_bins)

    data = SplitData.from_store(store)
    folds = domain_folds(domains, data.masks["train"], data.masks["calibration"], data.y)
    X = probe_features(artifact.probe, store, artifact.metadata.layer, artifact.metadata.position)
    transfer, _ = measure_transfer(artifact.probe, X, store.baselines, data, folds, calibrator, spec)
    held = transfer.calibration("probe")
    seconds = time.perf_counter() - started

    print(
        f"{metrics['title']}: {artifact.metadata.kind} probe, layer {artifact.metadata.layer} / "
        f"{artifact.metadata.position}; store {store.path} ({len(store)} rows)\n"
    )
    print(table("held-out domains (leave-one-domain-out)", held) + "\n")
    print(table("in domain (test split)", inside) + "\n")
    run_row = metrics["transfer"]["rows"]["probe"]
    print(
        f"check against the run's metrics.json (held-out means): ECE {run_row['ece']:.3f} here "
        f"{transfer.rows['probe']['ece']:.3f}; pooled {run_row['pooled_ece']:.3f} here "
        f"{held.summary['pooled_ece']:.3f}; "
        f"within-cat AUROC {run_row['within_cat_auroc']:.3f} here {transfer.rows['probe']['within_cat_auroc']:.3f}"
    )
    print(f"{seconds:.1f} s")


if __name__ == "__main__":
    main()
