"""Model load time: first load (GGUF de-quantization + cache write) vs cached load, same process.

.venv/bin/python benchmarks/bench_load.py [--models smollm2-135m-instruct gemma3-270m]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from extract.models import ModelSpec, load_model


def timed_load(name: str, cache_dir: str) -> float:
    start = time.perf_counter()
    load_model(ModelSpec(name=name, device="cpu", cache_dir=cache_dir))
    return time.perf_counter() - start


def fresh_process_load(name: str, cache_dir: str) -> float:
    """A cached load as a user sees it: a new Python process, imports included."""
    code = (
        "from extract.models import ModelSpec, load_model; "
        f"load_model(ModelSpec(name={name!r}, device='cpu', cache_dir={cache_dir!r}))"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--repeats", type=int, default=3, help="cached loads to time (the best is reported)")
    args = parser.parse_args()
    print(
        f"| model | first load (s) | cached load in-process (s, best of {args.repeats}) "
        "| cached load, fresh process incl. imports (s) | fresh cached / first |"
    )
    print("|---|---|---|---|---|")
    for name in args.models:
        with tempfile.TemporaryDirectory() as cache_dir:
            first = timed_load(name, cache_dir)
            cached = min(timed_load(name, cache_dir) for _ in range(args.repeats))
            fresh = min(fresh_process_load(name, cache_dir) for _ in range(args.repeats))
        print(f"| {name} | {first:.1f} | {cached:.2f} | {fresh:.1f} | {fresh / first:.2f} |")


if __name__ == "__main__":
    main()
