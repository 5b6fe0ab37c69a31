"""Issue #14's target on a synthetic new domain: 100 labelled rows -> ECE on the rest of the domain.

The parent's calibrator says P(correct) = sigmoid(2 s + 1) where the new domain has P(correct | s) =
sigmoid(0.8 s - 0.6) (ECE 0.24 on that domain; today's probe has 0.147 on new question forms). Each seed draws
100 labelled rows, runs the full `probes.recalibration.recalibrate` protocol (50/50 check split, refusal
rule, refit on all rows, threshold), and measures ECE / Brier / AUROC on 20,000 other rows of the domain.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_recalibration_target.py --seeds 50   # ~1 min
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.special import expit

from probecal.fingerprint import ModelFingerprint
from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator
from probes.estimators import PROBES
from probes.evaluation.metrics import auroc, brier, ece
from probes.recalibration import make_rows, recalibrate


def draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = rng.normal(0.0, 1.5, n)
    return s, (rng.random(n) < expit(0.8 * s - 0.6)).astype(int)


def parent() -> ProbeArtifact:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 8)).astype(np.float32)
    probe = PROBES["logistic"](Cs=(1.0,), cv=3).fit(X, (X[:, 0] > 0).astype(int))
    calibrator = PlattCalibrator()
    calibrator.a_, calibrator.b_ = np.float64(2.0), np.float64(1.0)
    return ProbeArtifact.create(
        probe, calibrator, 1, "answer_last", ModelFingerprint("m", "0" * 64, "x", 8, 2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--kind", default="platt")
    args = parser.parse_args()
    art = parent()
    rest_s, rest_y = draw(20_000, np.random.default_rng(12345))
    before = art.calibrator.predict(rest_s)
    after_rows, refused = [], 0
    for seed in range(args.seeds):
        s, y = draw(args.rows, np.random.default_rng(seed))
        result = recalibrate(art, make_rows(s, y), args.kind, seed=seed, n_bootstrap=200)
        if not result.accepted:
            refused += 1
            continue
        p = result.artifact.calibrator.predict(rest_s)
        after_rows.append((ece(p, rest_y), brier(p, rest_y), auroc(p, rest_y)))
    after = np.asarray(after_rows)
    print(
        f"{args.kind}, {args.rows} labelled rows, {args.seeds} seeds, {refused} refused; metrics on 20,000 other rows"
    )
    print("| | ECE | Brier | AUROC |\n|---|---:|---:|---:|")
    print(
        f"| parent | {ece(before, rest_y):.3f} | {brier(before, rest_y):.3f} | {auroc(before, rest_y):.3f} |"
    )
    for name, q in (("recalibrated, mean", None), ("recalibrated, 90th pct", 90)):
        agg = after.mean(0) if q is None else np.percentile(after, q, axis=0)
        print(f"| {name} | {agg[0]:.3f} | {agg[1]:.3f} | {agg[2]:.3f} |")


if __name__ == "__main__":
    main()
