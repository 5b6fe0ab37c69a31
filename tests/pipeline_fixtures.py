"""Synthetic activation stores and sweeps for pipeline, report and notebook tests (no model needed).

`write_synthetic_store` writes a complete store through `StoreWriter`, with records and baselines shaped
like the ones `extract.runner.extract_to_store` writes. Activations are Gaussian noise except at ONE
capture site (`SIGNAL_SITE` by default), where the label shifts the mean along a fixed direction, so a
sweep must pick that site. Importable as a module so that the notebook test can build the same store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from extract.generation import BASELINE_NAMES
from extract.store import ActivationStore, StoreWriter, open_store
from probes.selection.sweep import SweepResult, sweep

SIGNAL_SITE = (2, "answer_last")
CATEGORY_ACCURACY = {"capitals": 0.7, "arithmetic": 0.35}  # different difficulty, as in real data sets
SPLIT_PATTERN = ("train", "train", "train", "calibration", "test")  # 60 / 20 / 20


def synthetic_fingerprint(hidden: int, num_layers: int, name: str = "synthetic-model") -> dict:
    return {
        "name": name,
        "source_hash": "synthetic",
        "architecture": "SyntheticForCausalLM",
        "hidden_size": hidden,
        "num_layers": num_layers,
    }


def _labels_and_splits(n_rows: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray, list[str]]:
    """Categories, labels [n] (1 = correct) and splits, with both labels in every (category, split)."""
    names = list(CATEGORY_ACCURACY)
    categories = [names[i % len(names)] for i in range(n_rows)]
    labels = np.zeros(n_rows, dtype=int)
    splits = [""] * n_rows
    for name in names:
        rows = [i for i, c in enumerate(categories) if c == name]
        n_correct = round(CATEGORY_ACCURACY[name] * len(rows))
        labels[rng.permutation(rows)[:n_correct]] = 1
        # Deal each label's rows over the split pattern, so every split holds both labels.
        for label in (0, 1):
            for k, i in enumerate(r for r in rows if labels[r] == label):
                splits[i] = SPLIT_PATTERN[k % len(SPLIT_PATTERN)]
    return categories, labels, splits


def _baselines(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weakly informative logit baselines, in the units `extract.generation` records them in."""
    noisy = 0.6 * labels + rng.normal(0.0, 0.5, len(labels))  # higher = more confident
    mean_logprob = np.minimum(-1.5 + noisy, -0.01)
    values = {
        "mean_logprob": mean_logprob,
        "min_logprob": mean_logprob - rng.uniform(0.1, 2.0, len(labels)),
        "mean_entropy": np.maximum(2.0 - noisy, 0.01),  # LOWER = more confident
        "first_token_prob": np.clip(0.4 + 0.3 * noisy, 0.01, 0.99),
        "sequence_prob": np.exp(3 * mean_logprob),
        "perplexity": np.exp(-mean_logprob),  # LOWER = more confident
    }
    assert set(values) == set(BASELINE_NAMES), "keep the synthetic baselines in step with extract.capture"
    return values


def write_synthetic_store(
    path: str | Path,
    n_rows: int = 150,
    hidden: int = 12,
    layers: Sequence[int] = (0, 1, 2, 3),
    positions: Sequence[str] = ("prompt_last", "answer_last"),
    signal_site: tuple[int, str] = SIGNAL_SITE,
    signal: float = 1.5,
    shard_size: int = 64,
    seed: int = 0,
    edit_record: Callable[[int, dict], dict] | None = None,
) -> ActivationStore:
    """Write a complete synthetic store at `path` and open it.

    Activations `[n_rows, hidden]` per site are N(0, 1); at `signal_site` correct rows (label 1) are shifted
    by `signal` along a fixed unit direction. Two categories of different accuracy, splits 60/20/20 with
    both labels in every split. edit_record(i, record) -> record: change row i's record before it is written.
    """
    if signal_site[0] not in layers or signal_site[1] not in positions:
        raise ValueError(
            f"signal_site {signal_site} is not among layers {list(layers)} x positions {list(positions)}"
        )
    rng = np.random.default_rng(seed)
    categories, labels, splits = _labels_and_splits(n_rows, rng)
    direction = rng.normal(size=hidden)
    direction /= np.linalg.norm(direction)
    acts = rng.normal(size=(n_rows, len(layers), len(positions), hidden)).astype(np.float32)
    li, pi = list(layers).index(signal_site[0]), list(positions).index(signal_site[1])
    acts[:, li, pi, :] += (signal * labels[:, None] * direction[None, :]).astype(np.float32)
    baselines = _baselines(labels, rng)

    records = []
    for i in range(n_rows):
        answer = "paris" if labels[i] else "berlin"
        records.append(
            {
                "id": f"q{i}",
                "category": categories[i],
                "question": f"synthetic question {i}?",
                "answers": ["paris"],
                "split": splits[i],
                "label": int(labels[i]),
                "grader_rule": "exact" if labels[i] else "none",
                "matched": "paris" if labels[i] else None,
                "grade_reason": "" if labels[i] else "no alias found",
                "f1": float(labels[i]),
                "verbalized_parsed": None,
                "model_answer": answer,
                "raw_generation": answer + "\n",
                "n_answer_tokens": 1,
                "truncated": i % 17 == 0,
                "empty_answer": False,
                "answer_in_text": True,
            }
        )
        if edit_record is not None:
            records[-1] = edit_record(i, records[-1])
    settings = {
        "fingerprint": synthetic_fingerprint(hidden, max(layers)),
        "layers": list(layers),
        "positions": list(positions),
        "dtype": "float32",
        "dataset_hash": f"synthetic-{seed}-{n_rows}",
        "shard_size": shard_size,
        "dataset": "synthetic",
    }
    writer = StoreWriter(path, settings, n_rows)
    for index in range(writer.num_shards):
        rows = writer.shard_rows(index)
        writer.write_shard(
            index,
            acts[rows.start : rows.stop],
            records[rows.start : rows.stop],
            {k: v[rows.start : rows.stop] for k, v in baselines.items()},
        )
    writer.finalize()
    return open_store(path)


def write_synthetic_sweep(
    store: ActivationStore, path: str | Path, n_folds: int = 3, seed: int = 0
) -> SweepResult:
    """Sweep every stored site on the store's train split (as `probes.training.train_probe` does); write JSON."""
    train = store.column("split") == "train"
    y = store.column("label").astype(int)[train]
    result = sweep(
        lambda layer, pos: store.read(layer, pos)[train],
        y,
        list(store.layers),
        list(store.positions),
        n_folds=n_folds,
        seed=seed,
        categories=store.column("category")[train],
    )
    result.to_json(path)
    return result
