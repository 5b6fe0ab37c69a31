"""The refusal-gap table of a trained probe: answerable domains from the run's store (test split), the never-fit
domains from a store extracted apart with the same model (e.g. a store made before they were built in).

    PYTHONPATH=. python benchmarks/bench_refusal_gap.py PROBE_DIR RUN_STORE [HELDOUT_STORE]

Refusals in a store written before RowRecord.refused existed are recomputed with extract.refusal.
"""

from __future__ import annotations

import sys

import numpy as np

from extract.refusal import is_refusal
from extract.store import open_store
from probecal.heldout import NEVER_FIT_DOMAINS
from probes.artifact import ProbeArtifact
from probes.evaluation.refusal_gap import gap_inputs, gap_rows, prompt_last_probe, refusal_gap_table


def main(probe_dir: str, run_store: str, heldout_store: str | None = None) -> None:
    artifact = ProbeArtifact.load(probe_dir)
    threshold = artifact.metadata.thresholds[0]["threshold"]
    store = open_store(run_store, verify_hashes=False)
    twin = prompt_last_probe(artifact, store)
    parts = [gap_inputs(artifact, store, gap_rows(store), twin)]
    if heldout_store:
        other = open_store(heldout_store, verify_hashes=False)
        parts.append(gap_inputs(artifact, other, np.isin(other.column("domain"), NEVER_FIT_DOMAINS), twin))
    domains, labels, refused, p = (np.concatenate([part[i] for part in parts]) for i in range(4))
    others = {k: np.concatenate([part[4][k] for part in parts]) for k in parts[0][4]}
    answers = np.concatenate([s.column("model_answer")[m] for s, m in zip(
        [store] + ([other] if heldout_store else []),
        [gap_rows(store)] + ([np.isin(other.column("domain"), NEVER_FIT_DOMAINS)] if heldout_store else []),
        strict=True,
    )])  # fmt: skip
    detected = np.array([is_refusal(a) for a in answers])
    print(
        f"refused rows: recorded {int(refused.sum())}, detected now {int(detected.sum())} of {len(refused)}"
    )
    refused = refused | detected
    labels = np.where(refused, 0, labels)
    print(refusal_gap_table(domains, labels, refused, p, threshold, others).markdown())


if __name__ == "__main__":
    main(*sys.argv[1:])
