"""Extraction cost for throughput planning: the whole extract stage (prompts, generation + capture,
grading, store writes) on the packaged facts set, for one model at several data sizes.

Per size: wall seconds, seconds per question, prompt and generated tokens per second, and the store's
bytes per row measured from its shard files (against layers x positions x hidden x dtype size). The
ratio column compares each size with the first one, measured in the same process (same load, same
machine state): ~1.0 s/question ratio = cost linear in the number of questions. Every size extracts
into a fresh temporary store, so nothing is reused. Model loading is not timed.

    .venv/bin/python benchmarks/bench_extract_throughput.py --model smollm2-135m-instruct --limits 60 180
    .venv/bin/python benchmarks/bench_extract_throughput.py --model gemma3-270m --limits 60 180
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from extract import runner
from extract.data import DataSpec
from extract.models import ModelSpec, load_model
from extract.prompts import build_prompt_ids
from extract.runner import extract_to_store, rows_and_splits
from extract.settings import ExtractSpec, GenerationSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limits", type=int, nargs="+", default=[60, 180])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(ModelSpec(name=args.model))
    params = sum(p.numel() for p in loaded.model.parameters())
    fp = loaded.fingerprint
    print(
        f"{fp.name}: {params / 1e6:.1f}M parameters, {fp.num_layers} layers, hidden {fp.hidden_size}, "
        f"device {loaded.device}, {torch.get_num_threads()} torch threads"
    )
    decode_steps = count_decode_steps()
    spec = ExtractSpec(
        generation=GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    )

    print(
        "| questions | seconds | s/question | prompt tok/question | decode steps/question | "
        "answer tok/question | decode tok/s | prompt+decode tok/s | store bytes/row | expected bytes/row "
        "| s/question ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    baseline = None
    for limit in args.limits:
        rows, splits = rows_and_splits(DataSpec(name="facts", limit=limit))
        prompt_tokens = sum(
            map(len, build_prompt_ids(rows, loaded.tokenizer, loaded.uses_chat_template, spec.prompt))
        )
        decode_steps.clear()
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            store = extract_to_store(loaded, rows, splits, spec, "facts", store_root=root)
            seconds = time.perf_counter() - start
            answer_tokens = int(np.sum(store.column("n_answer_tokens")))
            shard_bytes = sum(p.stat().st_size for p in Path(store.path, "shards").glob("*.safetensors"))
            expected = (
                len(store.layers) * len(store.positions) * fp.hidden_size * np.dtype(store.dtype).itemsize
            )
        n, decoded = len(rows), sum(decode_steps)
        per_q = seconds / n
        baseline = baseline or per_q
        print(
            f"| {n} | {seconds:.1f} | {per_q:.3f} | {prompt_tokens / n:.1f} | {decoded / n:.1f} | "
            f"{answer_tokens / n:.1f} | {decoded / seconds:.1f} | {(prompt_tokens + decoded) / seconds:.1f} | "
            f"{shard_bytes / n:,.0f} | {expected:,} | {per_q / baseline:.2f} |",
            flush=True,
        )


def count_decode_steps() -> list[int]:
    """Decode steps the model really ran (rows x steps, padding steps of finished rows included):
    wraps the runner's capture call to collect CaptureResult.n_generated_tokens per shard."""
    steps: list[int] = []
    capture = runner.generate_and_capture

    def counting_capture(*args, **kwargs):
        result = capture(*args, **kwargs)
        steps.append(result.n_generated_tokens)
        return result

    runner.generate_and_capture = counting_capture
    return steps


if __name__ == "__main__":
    main()
