"""Prompt settings against answer length, accuracy and extraction time, on one stratified facts sample.

Each configuration (`shots=N,max_new=T,batch=B`: `extract.prompt.num_chat_shots`, `generation.max_new_tokens`,
`generation.batch_size`) runs the whole extract stage (prompts, generation + capture, grading, store
writes) on the same questions (`--per-category` seeded per category from the packaged facts), in one
process, in the order given, into a fresh temporary store. Printed per configuration: accuracy, decode
steps per question (steps the model ran, padding steps of finished rows included), answer tokens per
question, truncations, prompt tokens per question, s/question and its ratio to the first configuration,
and the extract time that s/question gives for the whole facts set; then accuracy per category. Model
loading is not timed. On a shared CPU run with --threads 1 and compare configurations from one run.

    .venv/bin/python benchmarks/bench_prompt_length.py --threads 1 --per-category 10 \\
        --configs shots=0,max_new=24,batch=16 shots=3,max_new=16,batch=16 shots=3,max_new=16,batch=32
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
from bench_extract_throughput import count_decode_steps  # the same decode-step counter

from extract.data import DataSpec, QARow, assign_splits, load_rows
from extract.models import ModelSpec, load_model
from extract.prompts import build_prompt_ids
from extract.runner import extract_to_store
from extract.settings import ExtractSpec, GenerationSpec

KEYS = {"shots": "num_chat_shots", "max_new": "max_new_tokens", "batch": "batch_size"}


def parse_config(text: str) -> dict[str, int]:
    """`shots=3,max_new=16,batch=32` -> {"num_chat_shots": 3, ...}; a missing key keeps its default."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in KEYS or not value.isdigit():
            raise SystemExit(
                f"bad config part {part!r} in {text!r}: use {', '.join(k + '=<int>' for k in KEYS)}"
            )
        out[KEYS[key]] = int(value)
    return out


def sample(per_category: int, seed: int) -> tuple[list[QARow], int]:
    """(`per_category` rows of every facts category, seeded; the full facts size)."""
    rows = load_rows(DataSpec(name="facts"))
    by_cat: dict[str, list[QARow]] = {}
    for row in rows:
        by_cat.setdefault(row.category, []).append(row)
    picked = [
        r
        for cat in sorted(by_cat)
        for r in random.Random(f"{seed}-{cat}").sample(by_cat[cat], min(per_category, len(by_cat[cat])))
    ]
    return picked, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--per-category", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs", nargs="+", default=["shots=0,max_new=24,batch=16", "shots=3,max_new=16,batch=16"]
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [(text, parse_config(text)) for text in args.configs]

    loaded = load_model(ModelSpec(name=args.model))
    rows, full_size = sample(args.per_category, args.seed)
    splits = assign_splits(rows, DataSpec(name="facts"))
    print(
        f"{loaded.fingerprint.name}, {torch.get_num_threads()} torch threads, {len(rows)} questions "
        f"({args.per_category} per category), full facts set {full_size}"
    )
    decode_steps = count_decode_steps()
    print(
        "| config | accuracy | decode steps/q | answer tok/q | truncated | prompt tok/q | s/question | ratio "
        f"| extract est. for {full_size} q |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    per_category: dict[str, dict[str, float]] = {}
    baseline = None
    for text, values in configs:
        base = ExtractSpec()
        prompt = replace(base.prompt, **{k: v for k, v in values.items() if k == "num_chat_shots"})
        generation = GenerationSpec(
            **{**vars(base.generation), **{k: v for k, v in values.items() if k != "num_chat_shots"}}
        )
        spec = replace(base, prompt=prompt, generation=generation)
        prompt_tokens = sum(
            map(len, build_prompt_ids(rows, loaded.tokenizer, loaded.uses_chat_template, spec.prompt))
        )
        decode_steps.clear()
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            store = extract_to_store(loaded, rows, splits, spec, "facts-sample", store_root=root)
            seconds = time.perf_counter() - start
            labels = store.column("label").astype(float)
            truncated = int(np.sum(store.column("truncated")))
            answer_tokens = float(np.mean(store.column("n_answer_tokens")))
            categories = [r["category"] for r in store.records]
        n = len(rows)
        per_q = seconds / n
        baseline = baseline or per_q
        print(
            f"| {text} | {labels.mean():.3f} | {sum(decode_steps) / n:.1f} | {answer_tokens:.1f} | {truncated} | "
            f"{prompt_tokens / n:.1f} | {per_q:.3f} | {per_q / baseline:.2f} | {per_q * full_size / 60:.1f} min |",
            flush=True,
        )
        for cat in sorted(set(categories)):
            per_category.setdefault(cat, {})[text] = float(
                np.mean([y for y, c in zip(labels, categories, strict=True) if c == cat])
            )
    print("\n| category | " + " | ".join(t for t, _ in configs) + " |")
    print("|---|" + "---:|" * len(configs))
    for cat, accs in per_category.items():
        print(f"| {cat} | " + " | ".join(f"{accs.get(t, float('nan')):.1f}" for t, _ in configs) + " |")


if __name__ == "__main__":
    main()
