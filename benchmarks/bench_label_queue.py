"""Chosen vs random labels: per-domain ECE after k labels picked by the label-queue rule vs k random labels.

Inside one domain probes.recalibration.label_queue takes the answers whose P(correct) is nearest the
abstention threshold (0.5 when there is none it can reach). On each held-out `facts` domain of a real run
(leave-one-domain-out probe scores and the fold's global Platt, as benchmarks/bench_labels_curve.py): each draw
splits the domain's rows in half, a label pool and an evaluation half; k labels come from the pool either by
the queue's rule (nearest the threshold of the global p, ties broken at random) or at random; a shrinkage
calibrator (tau from the other domains) is fit on them and read by ECE on the evaluation half (the same rows for
both). Mean over domains of the mean over draws.

    PYTHONPATH=. python benchmarks/bench_label_queue.py [--run RUN_DIR] [--draws 30]

Measured on the SmolLM2-135M default run (threshold 0.764, 30 draws): ECE random -> chosen at k = 5: 0.140 ->
0.155 (+0.014), 10: 0.133 -> 0.126 (-0.007), 20: 0.125 -> 0.117 (-0.009), 50: 0.112 -> 0.111 (-0.001): the rule
helps a little from 10 labels and hurts at 5 (all five near one p say little about the domain's offset).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_labels_curve import fold_inputs, other_domains_tau  # noqa: E402

from probes.calibration import ShrinkageCalibrator  # noqa: E402
from probes.evaluation.metrics import ece  # noqa: E402

KS = (5, 10, 20, 50)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="/work/shared_runs/default_run")
    parser.add_argument("--draws", type=int, default=30)
    args = parser.parse_args()
    artifact, inputs = fold_inputs(Path(args.run))
    threshold = artifact.abstention_threshold()
    centre = threshold if threshold is not None and 0.0 < threshold < 1.0 else 0.5
    print(
        f"queue rule: nearest p = {centre:.3f} ({'the threshold' if centre == threshold else 'no usable threshold'})"
    )
    results = {k: {"random": [], "chosen": []} for k in KS}
    for f, (name, s, y, global_cal, _) in enumerate(inputs):
        tau = other_domains_tau(inputs, f)
        p_global = global_cal.predict(s)
        for k in KS:
            if len(y) // 2 < max(k, 30):
                continue
            rng = np.random.default_rng(f * 1000 + k)
            values = {"random": [], "chosen": []}
            for _ in range(args.draws):
                order = rng.permutation(len(y))
                pool, evaluation = order[: len(y) // 2], order[len(y) // 2 :]
                picks = {
                    "random": rng.choice(pool, k, replace=False),
                    "chosen": pool[np.lexsort((rng.random(len(pool)), np.abs(p_global[pool] - centre)))[:k]],
                }
                for method, rows in picks.items():
                    calibrator = ShrinkageCalibrator(tau=tau).fit(
                        s[rows], y[rows], categories=np.full(k, name), prior=global_cal
                    )
                    p = calibrator.predict(s[evaluation], categories=np.full(len(evaluation), name))
                    values[method].append(ece(p, y[evaluation]))
            for method, v in values.items():
                results[k][method].append(float(np.mean(v)))
    print("| labels/domain | domains | random | chosen (label-queue rule) | chosen - random |")
    print("|---:|---:|---:|---:|---:|")
    for k in KS:
        r, c = np.mean(results[k]["random"]), np.mean(results[k]["chosen"])
        print(f"| {k} | {len(results[k]['random'])} | {r:.3f} | {c:.3f} | {c - r:+.3f} |")


if __name__ == "__main__":
    main()
