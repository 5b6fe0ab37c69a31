"""Layer x position sweep wall time vs a plain scikit-learn baseline, measured in the same run.

    .venv/bin/python benchmarks/bench_sweep.py [--n 3000] [--hidden 576] [--layers 31] [--baseline-sites 93]
                                               [--blas-threads 1]   (0 = the process default)

Synthetic data shaped like a SmolLM2 store's training split: n x hidden float32 features at every
(layer, position), with a correctness signal that grows then fades with depth. The sweep (5 folds per site,
fast fixed-C logistic) is compared with one plain sklearn LogisticRegression(C=1) fit per site on the
standardized features (no CV at all), i.e. the cheapest thing a naive sweep would do 5 times over.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

POSITIONS = ("prompt_last", "answer_last", "answer_mean")


def synthetic_features(n: int, hidden: int, n_layers: int, seed: int = 0):
    """(features(layer, position) -> [n, hidden] float32, y [n]). A few shared noise matrices keep memory
    small; each site mixes them differently and adds a label direction whose strength depends on the site."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.55).astype(np.int64)
    pool = [rng.standard_normal((n, hidden), dtype=np.float32) for _ in range(3)]
    direction = rng.standard_normal(hidden).astype(np.float32) / np.sqrt(hidden)
    signal = (2 * y - 1).astype(np.float32)[:, None] * direction[None, :]

    def features(layer: int, position: str) -> np.ndarray:
        strength = (
            1.2
            * np.exp(-(((layer - 0.6 * n_layers) / (0.3 * n_layers)) ** 2))
            * (1 + POSITIONS.index(position))
            / 3
        )
        a, b = pool[layer % 3], pool[(layer + 1 + POSITIONS.index(position)) % 3]
        return a + 0.5 * b + strength * signal

    return features, y


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from probes.selection.sweep import sweep

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=31, help="capture layers (SmolLM2: 0..30)")
    parser.add_argument("--baseline-sites", type=int, default=0, help="sites for the baseline (0 = all)")
    parser.add_argument("--blas-threads", type=int, default=1, help="BLAS threads for both (0 = leave as is)")
    args = parser.parse_args()
    threads = args.blas_threads or None

    features, y = synthetic_features(args.n, args.hidden, args.layers)
    layers, sites = (
        list(range(args.layers)),
        [(layer, pos) for layer in range(args.layers) for pos in POSITIONS],
    )

    start = time.perf_counter()
    result = sweep(features, y, layers, POSITIONS, n_folds=5, seed=0, blas_threads=threads)
    sweep_s = time.perf_counter() - start

    baseline_sites = sites[: args.baseline_sites or len(sites)]
    start = time.perf_counter()
    with threadpool_limits(limits=threads, user_api="blas"):
        for layer, pos in baseline_sites:
            X = features(layer, pos)
            Z = (X - X.mean(0)) / X.std(0)
            LogisticRegression(C=1.0, max_iter=1000).fit(Z, y)
    per_site = (time.perf_counter() - start) / len(baseline_sites)
    baseline_s = per_site * len(sites)

    print(
        f"data: n={args.n} hidden={args.hidden} sites={len(sites)} ({args.layers} layers x {len(POSITIONS)} positions), "  # noqa: E501
        f"BLAS threads: {threads or 'default'}"
    )
    print(
        f"sweep (5-fold CV per site, {result.probe}): {sweep_s:.1f} s  -> best layer {result.best_layer} "
        f"{result.best_position} AUROC {result.best_row().auroc_mean:.3f}"
    )
    extrapolated = (
        "" if len(baseline_sites) == len(sites) else f" (extrapolated from {len(baseline_sites)} sites)"
    )
    print(
        f"baseline (1 sklearn LogisticRegression(C=1) fit per site, no CV): {baseline_s:.1f} s{extrapolated}"
    )
    print(f"ratio sweep / baseline: {sweep_s / baseline_s:.3f}  (sweep does 5x the fits)")


if __name__ == "__main__":
    main()
