"""Cost of the store's integrity check: sha256 of every shard vs one full read of the store, same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_store_hash.py [--rows 3000 --layers 31 --hidden 576]

The default size is the default store (SmolLM2-135M: 3,000 rows x 31 layers x 3 positions x 576 hidden,
float16, ~320 MB), built synthetically in a temporary directory. Both timings are taken with the files
in the page cache (the state right after extraction, or on the second open), best of --repeats:
  hash:  open_store's check (size + sha256 of every shard, `shard_problems(hashes=True)`)
  read:  every capture site read once through `ActivationStore.read` (what a layer sweep does)
and, for scale, the size-only check that open_store(verify_hashes=False) does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.store import StoreWriter, open_store, read_manifest, shard_problems  # noqa: E402

POSITIONS = ["prompt_last", "answer_last", "answer_mean"]


def build_store(path: Path, rows: int, layers: int, hidden: int, shard_size: int) -> None:
    settings = {
        "fingerprint": {
            "name": "bench",
            "source_hash": "bench",
            "architecture": "X",
            "hidden_size": hidden,
            "num_layers": layers - 1,
        },
        "layers": list(range(layers)),
        "positions": POSITIONS,
        "dtype": "float16",
        "dataset_hash": f"bench-{rows}",
        "shard_size": shard_size,
    }
    writer = StoreWriter(path, settings, rows)
    rng = np.random.default_rng(0)
    for index in range(writer.num_shards):
        span = writer.shard_rows(index)
        acts = rng.standard_normal((len(span), layers, len(POSITIONS), hidden), dtype=np.float32)
        records = [
            {
                "id": f"q{i}",
                "category": "c",
                "question": f"q{i}?",
                "answers": ["a"],
                "split": "train",
                "label": i % 2,
                "model_answer": "a",
            }
            for i in span
        ]
        writer.write_shard(index, acts, records, {"mean_logprob": -rng.random(len(span))})
    writer.finalize()


def best_of(repeats: int, func) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--layers", type=int, default=31)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--shard-size", type=int, default=256)  # the ExtractSpec default
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        start = time.perf_counter()
        build_store(path, args.rows, args.layers, args.hidden, args.shard_size)
        build_s = time.perf_counter() - start
        manifest = read_manifest(path)
        size_mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
        store = open_store(path, verify_hashes=False)

        def read_all():
            for layer in store.layers:
                for position in store.positions:
                    store.read(layer, position)

        read_all()  # warm the page cache for both measurements
        hash_s = best_of(args.repeats, lambda: shard_problems(path, manifest, hashes=True))
        size_s = best_of(args.repeats, lambda: shard_problems(path, manifest, hashes=False))
        read_s = best_of(args.repeats, read_all)
    print(
        f"store: {args.rows} rows x {args.layers} layers x {len(POSITIONS)} positions x {args.hidden} hidden, "
        f"float16, {len(manifest['shards'])} shards, {size_mb:.0f} MB (written in {build_s:.1f} s, incl. hashing)"
    )
    print("| check | seconds | MB/s |\n|---|---:|---:|")
    print(f"| sha256 of every shard (open_store default) | {hash_s:.3f} | {size_mb / hash_s:.0f} |")
    print(f"| size only (verify_hashes=False) | {size_s:.4f} | - |")
    print(f"| read every capture site once (a sweep's reads) | {read_s:.3f} | {size_mb / read_s:.0f} |")
    print(f"hash / read ratio: {hash_s / read_s:.2f}")


if __name__ == "__main__":
    main()
