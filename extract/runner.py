"""The extract stage end to end: data -> prompts -> single-pass generation + capture -> grading -> store.

`extract_to_store` is the one function the CLI, notebooks and the distributed launcher call.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from extract.data import DataSpec, QARow, assign_splits, dataset_hash
from extract.distributed import DistContext, DistributedError
from extract.engine import OpenAIEngine, completion_ids
from extract.forward import capture_completions
from extract.generation import CaptureResult, generate_and_capture
from extract.grading import Grade, cut_answer, grade
from extract.hooks import resolve_layers
from extract.models import LoadedModel
from extract.prompts import build_prompt_ids
from extract.refusal import refusal_match
from extract.self_eval import p_true_confidence, verbalized_confidence
from extract.settings import ExtractSpec
from extract.store import (
    MANIFEST_FILE,
    ActivationStore,
    RowRecord,
    ShardData,
    StoreError,
    StoreWriter,
    check_settings,
    open_store,
    read_manifest,
    shard_problems,
    store_dir_for,
    store_key,
)
from extract.tokens import eos_token_ids

log = logging.getLogger(__name__)


def store_settings(
    loaded: LoadedModel,
    rows: Sequence[QARow],
    spec: ExtractSpec,
    data_name: str,
    engine: OpenAIEngine | None = None,
) -> dict:
    """Everything that changes the store's content; its hash names the store directory.

    engine: where the answers came from (extract.engine=openai): its model and server are part of the key,
    so a store of transformers' answers is never reused for an engine's (bf16 or quantized engines answer
    differently) nor the other way round. With hf the key has no engine entry: stores written before
    extract.engine existed keep their key and are reused."""
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
        **({} if engine is None else {"engine": engine.identity()}),
    }


def connect_engine(spec: ExtractSpec) -> OpenAIEngine | None:
    """The engine extract.engine=openai names, checked with GET /models (None for hf): the CLI calls this
    before loading the model, so a wrong URL costs a second, not a model load."""
    spec.check()
    if spec.engine != "openai":
        return None
    return OpenAIEngine.connect(
        spec.engine_url, spec.engine_model, spec.engine_timeout_s, spec.engine_concurrency
    )


def capture_engine_answers(
    loaded: LoadedModel,
    engine: OpenAIEngine,
    prompt_ids: Sequence[Sequence[int]],
    question_ids: Sequence[str],
    layers: Sequence[int],
    spec: ExtractSpec,
    cut: Callable[[str], str],
) -> tuple[CaptureResult, list[bool]]:
    """Greedy answers from the engine, then their states and logit signals from one teacher-forced forward
    per batch (extract.forward.capture_completions). Returns (result, per row: ids re-encoded from text)."""
    tokenizer = loaded.tokenizer
    eos = eos_token_ids(loaded.model, tokenizer)
    answers = engine.complete(prompt_ids, question_ids, spec.generation.max_new_tokens, eos)
    # encoded here, after the requests: a fast tokenizer is not to be shared between threads
    ids, reencoded = zip(
        *(
            completion_ids(a, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], eos)
            for a in answers
        ),
        strict=True,
    )
    vocab = loaded.model.get_input_embeddings().num_embeddings
    for qid, answer in zip(question_ids, ids, strict=True):
        if any(t >= vocab for t in answer):
            raise engine.error(
                qid,
                f"sent token ids outside the model's vocabulary (0..{vocab - 1}): does it serve this model?",
            )
    if any(reencoded):
        log.warning(
            "the engine at %s returned no token ids for %d of %d answers: their text was re-encoded "
            "(recorded per row as answer_reencoded)",
            engine.url,
            sum(reencoded),
            len(reencoded),
        )
    result = capture_completions(
        loaded.model, tokenizer, prompt_ids, ids, layers, spec.positions, spec.generation, cut
    )
    return result, list(reencoded)


def extract_to_store(
    loaded: LoadedModel,
    rows: Sequence[QARow],
    splits: Sequence[str] | None = None,
    spec: ExtractSpec | None = None,
    data_name: str = "custom",
    store_root: str | Path | None = None,
    dist: DistContext | None = None,
    engine: OpenAIEngine | None = None,
) -> ActivationStore:
    """Generate, grade and capture every row into a store under `store_root` (default spec.store_root).

    splits: [n] "train" | "calibration" | "test" per row (None = `assign_splits` with DataSpec's default
    fractions); spec: None = `ExtractSpec()` (every layer, all three positions, greedy decoding).
    A complete store with the same settings is reused; an interrupted one resumes.
    dist: this process's place in a data-parallel launch (extract.distributed.distributed_context);
    every rank passes the same rows and spec, computes its share of the shards, and gets the store.
    engine: with spec.engine=openai, the engine to ask (None: `connect_engine(spec)` here); the answers
    come from it, the states from one teacher-forced forward of `loaded.model` (extract.engine).
    """
    spec = ExtractSpec() if spec is None else spec
    splits = assign_splits(rows, DataSpec()) if splits is None else splits
    spec.check()
    if spec.engine != "openai":
        engine = None
    elif engine is None:
        engine = connect_engine(spec)
    settings = store_settings(loaded, rows, spec, data_name, engine)
    store_dir = store_dir_for(store_root or spec.store_root, settings)
    prompt_ids = build_prompt_ids(rows, loaded.tokenizer, loaded.uses_chat_template, spec.prompt)
    cut = partial(cut_answer, stop_sequences=spec.generation.stop_strings)

    def compute_shard(index: int, shard_rows: range) -> ShardData:
        batch_rows = [rows[i] for i in shard_rows]
        shard_prompts = [prompt_ids[i] for i in shard_rows]
        reencoded = [False] * len(batch_rows)
        if engine is None:
            result = generate_and_capture(
                loaded.model,
                loaded.tokenizer,
                shard_prompts,
                settings["layers"],
                spec.positions,
                spec.generation,
                cut,
            )
        else:
            result, reencoded = capture_engine_answers(
                loaded, engine, shard_prompts, [r.id for r in batch_rows], settings["layers"], spec, cut
            )
        grades = [
            grade_row(answer, row, spec) for answer, row in zip(result.answers, batch_rows, strict=True)
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
            RowRecord(
                id=row.id,
                category=row.category,
                domain=getattr(row, "domain", row.category),
                question=row.question,
                answers=tuple(row.answers),
                split=splits[i],
                label=int(g.correct),
                grader_rule=g.rule,
                matched=g.matched,
                grade_reason=g.reason,
                f1=g.f1,
                verbalized_parsed=ok,
                refused=g.rule == "refused",
                answer_reencoded=again,
                **fields,
            )
            for i, row, g, ok, again, fields in zip(
                shard_rows, batch_rows, grades, parsed, reencoded, result.row_fields(), strict=True
            )
        ]
        return ShardData(
            result.activations,
            records,
            {k: np.asarray(v, float) for k, v in baselines.items()},
            result.n_generated_tokens,
        )

    return run_extraction(
        store_dir, len(rows), settings, compute_shard, desc=f"extract {data_name}", dist=dist
    )


def grade_row(answer: str, row: QARow, spec: ExtractSpec) -> Grade:
    """A refusal is its own outcome (rule "refused", never correct); a row without accepted answers (an
    unanswerable or benign-refusal question) is graded only by that; every other answer by `grade`."""
    pattern = refusal_match(answer)
    if pattern is not None:
        return Grade(False, "refused", None, 0.0, f"the model refused (pattern {pattern})")
    if not row.answerable:
        return Grade(False, "none", None, 0.0, "no accepted answer: graded only by whether the model refused")
    return grade(answer, row.answers, row.question, grader=spec.grader, f1_threshold=spec.f1_threshold)


def rows_and_splits(data_spec) -> tuple[list[QARow], list[str]]:
    from extract.data import load_rows

    rows = load_rows(data_spec)
    return rows, assign_splits(rows, data_spec)


def accuracy_table(store: ActivationStore) -> str:
    """Markdown: per category, rows, accuracy, refusals (their own outcome, never correct), truncated answers
    (cut by max_new_tokens) and empty answers. Accuracy is over answered rows with accepted answers: a category
    without any (unanswerable, benign_refusal) shows "-", and "all" counts answerable rows only."""
    # From `records` (dicts), so that a caller may hand in edited records; typed again here.
    rows = [RowRecord.from_dict(r, f"{store.path}: record {i}") for i, r in enumerate(store.records)]
    lines = [
        "| category | n | accuracy | accuracy (answered) | refused | truncated | empty |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[str, list[RowRecord]] = {}
    for row in rows:
        groups.setdefault(row.category, []).append(row)
    for name, group in [*sorted(groups.items()), ("all", [r for r in rows if r.answers])]:
        graded = [r for r in group if r.answers]
        answered = [r.label for r in graded if not r.refused]
        acc = f"{np.mean([r.label for r in graded]):.3f}" if graded else "-"
        acc_answered = f"{np.mean(answered):.3f}" if answered else "-"
        lines.append(
            f"| {name} | {len(group)} | {acc} | {acc_answered} | {sum(r.refused for r in group)} "
            f"| {sum(r.truncated for r in group)} | {sum(r.empty_answer for r in group)} |"
        )
    parsed = [r.verbalized_parsed for r in rows if r.verbalized_parsed is not None]
    if parsed:
        lines.append(
            f"\nverbalized confidence: {parsed.count(False)} of {len(parsed)} replies unparseable "
            "(scored 0.5, flagged per row as verbalized_parsed=false)"
        )
    return "\n".join(lines)


def write_shards(
    writer: StoreWriter,
    indices: Sequence[int],
    compute_shard: Callable[[int, range], ShardData],
    desc: str = "extract",
    show: bool = True,
    done_rows: int = 0,
) -> None:
    """Compute and write the shards `indices`; a progress bar (starting at `done_rows` rows already
    stored) shows examples, tokens/s and ETA."""
    total = done_rows + sum(len(writer.shard_rows(i)) for i in indices)
    tokens, start = 0, time.perf_counter()
    with tqdm(
        total=total, initial=done_rows, unit="ex", desc=desc, dynamic_ncols=True, disable=not show
    ) as bar:
        for index in indices:
            rows = writer.shard_rows(index)
            data = compute_shard(index, rows)
            writer.write_shard(index, data.activations, data.records, data.baselines)
            tokens += data.n_tokens
            bar.update(len(rows))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")


def run_extraction(
    store_dir: str | Path,
    n_rows: int,
    settings: dict[str, Any],
    compute_shard: Callable[[int, range], ShardData],
    desc: str = "extract",
    dist: DistContext | None = None,
) -> ActivationStore:
    """Fill (or resume, or reuse) the store at `store_dir`, calling `compute_shard(index, rows)` for
    every shard not written yet; a progress bar shows examples, tokens/s and ETA.

    dist: in a data-parallel launch (torchrun), this process's place; every rank calls
    run_extraction with the same arguments, computes its share of the shards and gets the finished
    store back (see extract.distributed). None or a world size of 1: everything in this process.
    """
    store_dir = Path(store_dir)
    checked = check_settings(settings)
    store = reuse_or_repair(store_dir, checked, n_rows, may_delete=dist is None or dist.is_main)
    if store is not None:
        return store
    if dist is not None and dist.enabled:
        return run_extraction_distributed(store_dir, n_rows, checked, compute_shard, desc, dist)
    writer = StoreWriter(store_dir, checked, n_rows)  # raises on other settings, before any work
    missing = writer.missing_shards()
    done_rows = n_rows - sum(len(writer.shard_rows(i)) for i in missing)
    if done_rows:
        log.info("resuming %s: %d of %d rows already stored", store_dir, done_rows, n_rows)
    write_shards(writer, missing, compute_shard, desc, done_rows=done_rows)
    writer.finalize()
    return open_store(store_dir, verify_hashes=False)  # finalize has just hashed every shard


def reuse_or_repair(
    store_dir: Path, settings: dict[str, Any], n_rows: int, may_delete: bool
) -> ActivationStore | None:
    """The complete store at `store_dir` if its manifest is for these settings and every shard is intact
    (present, same size, same sha256). Otherwise None, after deleting (may_delete: one process only)
    the shards that are missing or damaged and the manifest, so that the resume machinery recomputes
    exactly those. Another store's manifest is left alone (StoreWriter then names the differences);
    a damaged manifest is an error naming the file.
    """
    if not (store_dir / MANIFEST_FILE).exists():
        return None
    try:
        manifest = read_manifest(store_dir)
    except StoreError as err:
        # A format-1 manifest (no checksums) of these settings: rebuilt with checksums from its shards.
        try:
            raw = json.loads((store_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise err from None
        if (
            not isinstance(raw, dict)
            or raw.get("format_version") != 1
            or raw.get("key") != store_key(settings)
        ):
            raise
        log.info("the store at %s has no shard checksums (format 1): adding them", store_dir)
        if may_delete:
            (store_dir / MANIFEST_FILE).unlink(missing_ok=True)
        return None
    if manifest["key"] != store_key(settings) or manifest["n_rows"] != n_rows:
        return None
    problems = shard_problems(store_dir, manifest, hashes=True)
    if not problems:
        log.info("reusing the complete store at %s (shard sizes and sha256 checked)", store_dir)
        return ActivationStore(store_dir, manifest)
    log.warning(
        "the store at %s is damaged (%s): recomputing %d shard(s)",
        store_dir,
        "; ".join(problems.values()),
        len(problems),
    )
    if may_delete:
        (store_dir / MANIFEST_FILE).unlink(missing_ok=True)
        for index in problems:
            (store_dir / manifest["shards"][index]["file"]).unlink(missing_ok=True)
    return None


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def run_extraction_distributed(
    store_dir: Path,
    n_rows: int,
    settings: dict[str, Any],
    compute_shard: Callable[[int, range], Any],
    desc: str,
    ctx: DistContext,
):
    """The distributed body of `run_extraction` (steps 1-4 in the `extract.distributed` docstring).

    Every rank calls it with the same arguments; every rank returns the finished `ActivationStore`.
    """
    # 1. rank 0 alone writes (or checks) settings.json and decides what is missing.
    plan: tuple[str, Any] = ("ok", None)
    writer = None
    if ctx.is_main:
        try:
            writer = StoreWriter(store_dir, settings, n_rows)
            plan = ("ok", writer.missing_shards())
        except Exception as err:
            ctx.broadcast(("error", _describe(err)))
            raise
    status, missing = ctx.broadcast(plan)
    if status != "ok":
        raise DistributedError(f"rank 0 could not open the store at {store_dir}: {missing}")
    if writer is None:
        writer = StoreWriter(store_dir, settings, n_rows)  # settings.json exists now: this only checks it

    # 2. this rank's share, written into the same directory.
    mine = ctx.share(missing)
    log.info("rank %d: %d of %d missing shard(s) to compute: %s", ctx.rank, len(mine), len(missing), mine)
    failure = None
    try:
        write_shards(
            writer, mine, compute_shard, f"{desc} [rank {ctx.rank}/{ctx.world_size}]", show=ctx.is_main
        )
    except Exception as err:
        failure = err

    # 3. everyone learns whether everyone succeeded.
    failures = ctx.all_gather(None if failure is None else _describe(failure))
    if failure is not None:
        raise failure
    failed = {rank: message for rank, message in enumerate(failures) if message is not None}
    if failed:
        raise DistributedError(
            f"extraction failed on rank(s) {sorted(failed)}: "
            + "; ".join(f"rank {r}: {m}" for r, m in failed.items())
            + ". Shards written so far are kept: relaunch to resume."
        )

    # 4. rank 0 writes the manifest; the others open the store once it is there.
    outcome = None
    if ctx.is_main:
        try:
            writer.finalize()
        except Exception as err:
            ctx.broadcast(_describe(err))
            raise
    outcome = ctx.broadcast(outcome)
    if outcome is not None:
        raise DistributedError(f"rank 0 could not finalize the store at {store_dir}: {outcome}")
    return open_store(store_dir, verify_hashes=False)  # rank 0's finalize has just hashed every shard
