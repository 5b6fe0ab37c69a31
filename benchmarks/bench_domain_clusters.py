"""Purity of the domain clusters (probes.domains) against the true category and domain, on a real run's store.

The clusters read the prompt_last hidden state at the probe's layer. Two views:
  in-distribution  k-means fit on the train split, test-split rows assigned: purity vs category and vs domain
  held-out domain  for each domain D: k-means fit on the train rows of the other domains, D's rows assigned:
                   purity of D's rows vs their category (do D's categories fall into different clusters?) and the
                   share of D's rows in its largest cluster (is D one new "domain" to the clusters?)
Baseline: purity of a random assignment with the same cluster sizes (measured in the same run).

Measured on the SmolLM2-135M default run (layer 21 prompt_last, 2281 rows, 24 categories, 9 domains):
    k    test purity vs category (random)   vs domain (random)
    9    0.495 (0.134)                      0.804 (0.334)
    16   0.758 (0.163)                      0.925 (0.343)
    24   0.866 (0.163)                      0.963 (0.365)
  held-out domains (k=9 fit without them): arithmetic, number_theory, roman_numerals land in one cluster (share
  1.0); geography's 4 categories split (purity 0.889 vs 0.294 random), currency 0.946 vs 0.583; chemistry,
  english_words, units barely above random.

    PYTHONPATH=. python benchmarks/bench_domain_clusters.py [--run RUN_DIR] [--k 9 16 24]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from extract.store import open_store
from probes.artifact import ProbeArtifact
from probes.domains import DOMAIN_POSITION, fit_domain_clusters, purity
from probes.training.splits import SplitData


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="/work/shared_runs/default_run")
    parser.add_argument("--k", type=int, nargs="+", default=[9, 16, 24])
    args = parser.parse_args()
    run = Path(args.run)
    layer = ProbeArtifact.load(run / "probe").metadata.layer
    store = open_store((run / "store.txt").read_text().strip())
    X = store.read(layer, DOMAIN_POSITION)
    data = SplitData.from_store(store)
    category, domain = data.categories, data.domains
    train, test = data.masks["train"], data.masks["test"]
    rng = np.random.default_rng(0)
    print(
        f"{len(X)} rows, layer {layer} / {DOMAIN_POSITION}; {len(set(category))} categories, {len(set(domain))} domains"
    )
    print("| k | test purity vs category | random | test purity vs domain | random |")
    print("|---:|---:|---:|---:|---:|")
    for k in args.k:
        assigned = fit_domain_clusters(X[train], k, seed=0).assign(X[test])
        shuffled = rng.permutation(assigned)
        print(
            f"| {k} | {purity(assigned, category[test]):.3f} | {purity(shuffled, category[test]):.3f} "
            f"| {purity(assigned, domain[test]):.3f} | {purity(shuffled, domain[test]):.3f} |"
        )
    k = args.k[0]
    print(f"\nheld-out domains (k={k} clusters fit on the other domains' train rows)")
    print("| domain | rows | categories | purity vs category | random | largest cluster share |")
    print("|---|---:|---:|---:|---:|---:|")
    for d in np.unique(domain):
        rows = domain == d
        assigned = fit_domain_clusters(X[train & ~rows], k, seed=0).assign(X[rows])
        _, counts = np.unique(assigned, return_counts=True)
        print(
            f"| {d} | {rows.sum()} | {len(set(category[rows]))} | {purity(assigned, category[rows]):.3f} "
            f"| {purity(rng.permutation(assigned), category[rows]):.3f} | {counts.max() / rows.sum():.3f} |"
        )


if __name__ == "__main__":
    main()
