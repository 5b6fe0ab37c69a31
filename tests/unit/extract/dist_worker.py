"""One rank of a distributed `run_extraction` with a deterministic stand-in for the model.

Launched by tests/unit/extract/test_distributed.py as
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/unit/extract/dist_worker.py \
        STORE_DIR LOG_DIR N_ROWS [CRASH_AFTER]
Every computed shard index is appended to LOG_DIR/rank<r>.log, so the test sees who computed what.
CRASH_AFTER=k: rank 1 dies (os._exit, like a killed process) when asked for its (k+1)-th shard, but
only after rank 0 has written all of its own shards (so the test knows exactly what is on disk).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from extract.store import ShardData

FINGERPRINT = {"name": "fake", "source_hash": "abc", "architecture": "X", "hidden_size": 5, "num_layers": 2}
SETTINGS = {
    "fingerprint": FINGERPRINT,
    "layers": [0, 2],
    "positions": ["prompt_last", "answer_mean"],
    "dtype": "float32",
    "dataset_hash": "d1",
    "shard_size": 4,
}


def fake_shard(rows: range) -> ShardData:
    """Rows' content depends only on the row index (like a model on fixed prompts)."""
    per_row = [np.random.default_rng(i) for i in rows]
    return ShardData(
        activations=np.stack([rng.normal(size=(2, 2, 5)) for rng in per_row]).astype(np.float32),
        records=[
            {
                "id": f"q{i}",
                "category": "c",
                "question": f"q {i}?",
                "answers": ["a"],
                "split": "train",
                "label": i % 2,
                "model_answer": "a",
            }
            for i in rows
        ],
        baselines={"mean_logprob": np.array([-rng.random() for rng in per_row])},
        n_tokens=3 * len(rows),
    )


def _wait_for(paths: list[Path], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds} s for {paths}")
        time.sleep(0.05)


def main(store_dir: str, log_dir: str, n_rows: str, crash_after: str | None = None) -> None:
    from extract.distributed import distributed_context
    from extract.runner import run_extraction
    from extract.store import StoreWriter

    computed = 0
    with distributed_context("cpu") as ctx:

        def compute_shard(index: int, rows: range) -> ShardData:
            nonlocal computed
            if crash_after is not None and ctx.rank == 1 and computed == int(crash_after):
                writer = StoreWriter(store_dir, SETTINGS, int(n_rows))
                _wait_for([writer.shard_path(i) for i in range(0, writer.num_shards, ctx.world_size)])
                os._exit(17)
            with open(Path(log_dir) / f"rank{ctx.rank}.log", "a") as fh:
                fh.write(f"{index}\n")
            computed += 1
            return fake_shard(rows)

        store = run_extraction(store_dir, int(n_rows), SETTINGS, compute_shard, dist=ctx)
        assert len(store) == int(n_rows)


if __name__ == "__main__":
    main(*sys.argv[1:])
