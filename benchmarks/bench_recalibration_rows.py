"""How many labelled rows each calibrator needs before its ECE on new-domain traffic is <= 0.05.

probes/recalibration.py refuses to recalibrate below MIN_FIT_ROWS; this script is where those numbers
come from. Synthetic new-domain rows: a probe's raw score s ~ N(0, 1.5) whose true P(correct | s) is
  logistic:     sigmoid(0.8 s - 0.6)                        (the shape Platt assumes)
  non-logistic: correct ~ N(1.0, 0.7), wrong ~ N(-0.5, 1.5), half correct (unequal variances: the true
                curve is not a sigmoid of s, and flattens at both ends)
Each calibrator is fit on n rows and its ECE (15 uniform bins, probes.evaluation.metrics.ece) is measured
on 20,000 fresh rows of the same domain; mean and 90th percentile over `--seeds` draws. The floor in
MIN_FIT_ROWS is where the mean ECE reaches 0.10 (below it a refit is about as likely to hurt as to help a
parent at ~0.15); the rows for ECE <= 0.05 are printed as well (ROWS_FOR_ECE_005).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_recalibration_rows.py --seeds 100   # ~1-2 min
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.special import expit

from probes.calibration import CALIBRATORS
from probes.evaluation.metrics import ece

SIZES = (10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000)
KINDS = ("temperature", "platt", "isotonic")


def draw(shape: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if shape == "logistic":
        s = rng.normal(0.0, 1.5, n)
        return s, (rng.random(n) < expit(0.8 * s - 0.6)).astype(int)
    y = (rng.random(n) < 0.5).astype(int)
    s = np.where(y == 1, rng.normal(1.0, 0.7, n), rng.normal(-0.5, 1.5, n))
    return s, y


def measure(shape: str, seeds: int) -> dict[tuple[str, int], tuple[float, float]]:
    test_s, test_y = draw(shape, 20_000, np.random.default_rng(12345))
    out = {}
    for kind in KINDS:
        for n in SIZES:
            values = []
            for seed in range(seeds):
                s, y = draw(shape, n, np.random.default_rng(seed))
                if y.min() == y.max():  # one class: no calibrator can be fit (the core refuses too)
                    continue
                values.append(ece(CALIBRATORS[kind]().fit(s, y).predict(test_s), test_y))
            out[kind, n] = (float(np.mean(values)), float(np.percentile(values, 90)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    args = parser.parse_args()
    for shape in ("logistic", "non-logistic"):
        result = measure(shape, args.seeds)
        print(f"\n{shape}: ECE on 20,000 new-domain rows, mean / 90th percentile over {args.seeds} fits")
        print("| rows | " + " | ".join(KINDS) + " |\n|---:|" + "---|" * len(KINDS))
        for n in SIZES:
            cells = [f"{result[k, n][0]:.3f} / {result[k, n][1]:.3f}" for k in KINDS]
            print(f"| {n} | " + " | ".join(cells) + " |")
        for kind in KINDS:
            for level in (0.10, 0.05):
                enough = [n for n in SIZES if result[kind, n][0] <= level]
                print(
                    f"{kind}: mean ECE <= {level:.2f} from {enough[0] if enough else 'never (within 1000)'} rows"
                )


if __name__ == "__main__":
    main()
