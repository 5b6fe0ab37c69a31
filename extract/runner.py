"""The extract stage end to end: data -> prompts -> single-pass generation + capture -> grading -> store.

`extract_to_store` is the one function the CLI, notebooks and the distributed launcher call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from extract.capture import generate_and_capture, resolve_layers
from extract.data import QARow, assign_splits, dataset_hash
from extract.distributed import DistContext
from extract.grading import cut_answer, grade
from extract.models import LoadedModel
from extract.prompts import build_prompt_ids
from extract.self_eval import p_true_confidence, verbalized_confidence
from extract.settings import ExtractSpec
from extract.store import ActivationStore, ShardData, run_extraction, store_dir_for

log = logging.getLogger(__name__)


def store_settings(loaded: LoadedModel, rows: Sequence[QARow], spec: ExtractSpec, data_name: str) -> dict:
    """Everything that changes the store's content; its hash names the store directory."""
    from dataclasses import asdict

    layers = resolve_layers(spec.layers, loaded.fingerprint.num_layers, loaded.fingerprint.name)
    generation = {k: v for k, v in asdict(spec.generation).items() if k not in {"_target_", "batch_size"}}
    prompt = {k: v for k, v in asdict(spec.prompt).items() if k != "_target_"}
    return {
        "fingerprint": loaded.fingerprint.to_dict(),
        "layers": layers,
        "positions": list(spec.positions),
        "dtype": spec.store_dtype,
        "dataset_hash": dataset_hash(rows),
        "dataset": data_name,
        "shard_size": spec.shard_size,
        "chat_template": loaded.uses_chat_template,
        "prompt": prompt,
        "generation": generation,
        "grader": {"grader": spec.grader, "f1_threshold": spec.f1_threshold},
        "self_eval": {"p_true": spec.p_true, "verbalized": spec.verbalized},
    }


def extract_to_store(
    loaded: LoadedModel,
    rows: Sequence[QARow],
    splits: Sequence[str],
    spec: ExtractSpec,
    data_name: str,
    store_root: str | Path | None = None,
    dist: DistContext | None = None,
) -> ActivationStore:
    """Generate, grade and capture every row into a store under `store_root` (default spec.store_root).

    A complete store with the same settings is reused; an interrupted one resumes.
    dist: this process's place in a data-parallel launch (extract.distributed.distributed_context);
    every rank passes the same rows and spec, computes its share of the shards, and gets the store.
    """
    spec.check()
    settings = store_settings(loaded, rows, spec, data_name)
    store_dir = store_dir_for(store_root or spec.store_root, settings)
    prompt_ids = build_prompt_ids(rows, loaded.tokenizer, loaded.uses_chat_template, spec.prompt)
    cut = partial(cut_answer, stop_sequences=spec.generation.stop_strings)

    def compute_shard(index: int, shard_rows: range) -> ShardData:
        batch_rows = [rows[i] for i in shard_rows]
        result = generate_and_capture(
            loaded.model,
            loaded.tokenizer,
            [prompt_ids[i] for i in shard_rows],
            settings["layers"],
            spec.positions,
            spec.generation,
            cut,
        )
        grades = [
            grade(answer, row.answers, row.question, grader=spec.grader, f1_threshold=spec.f1_threshold)
            for answer, row in zip(result.answers, batch_rows, strict=True)
        ]
        baselines = dict(result.baselines)
        questions = [row.question for row in batch_rows]
        if spec.p_true:
            baselines["p_true"] = p_true_confidence(
                loaded.model, loaded.tokenizer, questions, result.answers, loaded.uses_chat_template
            )
        parsed = [None] * len(batch_rows)
        if spec.verbalized:
            values, _ = verbalized_confidence(
                loaded.model, loaded.tokenizer, questions, result.answers, loaded.uses_chat_template
            )
            parsed = (~np.isnan(values)).tolist()
            # An unparseable reply carries no information: 0.5, and the row records that it was not parsed.
            baselines["verbalized"] = np.where(np.isnan(values), 0.5, values)
        records = [
            {
                "id": row.id,
                "category": row.category,
                "question": row.question,
                "answers": list(row.answers),
                "split": splits[i],
                "label": int(g.correct),
                "grader_rule": g.rule,
                "matched": g.matched,
                "grade_reason": g.reason,
                "f1": g.f1,
                "verbalized_parsed": ok,
                **fields,
            }
            for i, row, g, ok, fields in zip(shard_rows, batch_rows, grades, parsed, result.row_fields(), strict=True)
        ]
        return ShardData(result.activations, records, {k: np.asarray(v, float) for k, v in baselines.items()},
                         result.n_generated_tokens)

    return run_extraction(store_dir, len(rows), settings, compute_shard, desc=f"extract {data_name}", dist=dist)


def rows_and_splits(data_spec) -> tuple[list[QARow], list[str]]:
    from extract.data import load_rows

    rows = load_rows(data_spec)
    return rows, assign_splits(rows, data_spec)


def accuracy_table(store: ActivationStore) -> str:
    """Markdown: per category, rows, accuracy, truncated answers (cut by max_new_tokens) and empty answers."""
    records = store.records
    lines = ["| category | n | accuracy | truncated | empty |", "|---|---:|---:|---:|---:|"]
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["category"], []).append(record)
    for name, group in [*sorted(groups.items()), ("all", records)]:
        acc = np.mean([r["label"] for r in group])
        lines.append(f"| {name} | {len(group)} | {acc:.3f} | {sum(r['truncated'] for r in group)} "
                     f"| {sum(r['empty_answer'] for r in group)} |")
    parsed = [r.get("verbalized_parsed") for r in records if r.get("verbalized_parsed") is not None]
    if parsed:
        lines.append(f"\nverbalized confidence: {parsed.count(False)} of {len(parsed)} replies unparseable "
                     "(scored 0.5, flagged per row as verbalized_parsed=false)")
    return "\n".join(lines)
