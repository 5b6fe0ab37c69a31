"""Real answers to hand-label for the refusal detector's fixture (tests/unit/extract/data_fixtures/refusals.jsonl).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/sample_refusal_answers.py --model gemma3-270m \
        --out /tmp/gemma_answers.jsonl

Questions: every benign_refusal question; of the unanswerable set every false_premise and future question plus a
seeded sample of the fictional_entity ones (--unanswerable in all); a seeded, category-stratified sample of facts
(--facts). Answers: the extract stage of `probecal run model=...` with the default extract config
(extract_to_store: the one prompt encoder, greedy generation, answer cut and grading), into a throwaway store.
Each output row has the fixture's fields with "refusal": null: the label is written by a person reading the
answer, not by the detector being measured.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from extract.data import HELDOUT_PATHS, load_questions
from extract.models import ModelSpec, load_model
from extract.runner import extract_to_store

SEED = 0


def sample_rows(n_unanswerable: int, n_facts: int) -> list:
    unanswerable_path, benign_path = HELDOUT_PATHS
    unanswerable = load_questions("jsonl", path=str(unanswerable_path))
    # The made-up entities are most of the set and alike; the fewer false premises and future questions all stay.
    fictional = [r for r in unanswerable if r.category == "fictional_entity"]
    others = [r for r in unanswerable if r.category != "fictional_entity"]
    n_fictional = max(0, min(len(fictional), n_unanswerable - len(others)))
    kept = set(random.Random(SEED).sample(range(len(fictional)), n_fictional))
    unanswerable = [r for i, r in enumerate(fictional) if i in kept] + others
    benign = load_questions("jsonl", path=str(benign_path))
    facts = load_questions("facts", heldout_sets=False, limit=n_facts, seed=SEED)
    return unanswerable + benign + facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="a packaged model name (extract.models)")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--unanswerable", type=int, default=200)
    parser.add_argument("--facts", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = sample_rows(args.unanswerable, args.facts)
    loaded = load_model(ModelSpec(name=args.model))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        store = extract_to_store(
            loaded, rows, ["test"] * len(rows), data_name="refusal_sample", store_root=root
        )
        records = store.records
    with Path(args.out).open("w", encoding="utf-8") as out:
        for r in records:
            row = {"model": args.model, "id": r["id"], "domain": r["domain"], "question": r["question"],
                   "answer": r["model_answer"], "refusal": None}  # fmt: skip
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(records)} answers of {args.model} in {time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
