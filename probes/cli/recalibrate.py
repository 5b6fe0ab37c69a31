"""`probecal recalibrate`: a saved probe's calibrator and threshold refit on a new domain's labelled rows.

    probecal recalibrate recalibrate.probe_dir=<run>/probe data=jsonl data.path=my_domain.jsonl
    probecal recalibrate recalibrate.probe_dir=<run>/probe recalibrate.rows=scored.jsonl recalibrate.kind=isotonic
    probecal recalibrate recalibrate.probe_dir=<run>/probe recalibrate.from_feedback=outputs/feedback.db \\
        recalibrate.kind=per_domain
    probecal recalibrate evaluate.probe_dir=<run>/probe recalibrate.rows=20_per_domain.jsonl recalibrate.kind=shrinkage

`evaluate.probe_dir` still names the parent when `recalibrate.probe_dir` is unset (deprecated, warned);
`recalibrate.kind=per_category` is a deprecated alias of `per_domain`.

Writes <run dir>/recalibration.json (before/after on the held-out rows, threshold, lineage record) and,
unless the refusal rule of probes/recalibration.py fires, the new artifact (<run dir>/probe by default).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from probecal.files import atomic_write_text, json_default
from probes.artifact import METADATA_FILE, ProbeArtifact
from probes.cli.config import RecalibrateSpec, instantiate_group
from probes.recalibration import (
    RecalibrationRows,
    check_prior,
    label_queue,
    lineage_digests,
    make_rows,
    read_feedback_rows,
    read_rows_file,
    read_served_prompts,
    recalibrate,
    refit_domains,
    request_reload,
)

log = logging.getLogger(__name__)

KIND_ALIASES = {"per_category": "per_domain"}  # deprecated spelling -> kind (CHANGELOG)


def parent_dir(cfg: DictConfig) -> str:
    """The parent artifact: recalibrate.probe_dir, else the deprecated evaluate.probe_dir (warned)."""
    if cfg.recalibrate.probe_dir:
        return str(cfg.recalibrate.probe_dir)
    if cfg.evaluate.probe_dir:
        log.warning(
            "evaluate.probe_dir as the parent of probecal recalibrate is deprecated; use recalibrate.probe_dir=%s",
            cfg.evaluate.probe_dir,
        )
        return str(cfg.evaluate.probe_dir)
    raise ValueError("probecal recalibrate needs recalibrate.probe_dir=<run dir>/probe (the parent artifact)")


def recalibration_spec(cfg: DictConfig) -> RecalibrateSpec:
    """cfg.recalibrate as its dataclass, with probe_dir resolved and a deprecated kind spelling mapped."""
    spec: RecalibrateSpec = OmegaConf.to_object(cfg.recalibrate)
    if spec.kind in KIND_ALIASES:
        log.warning(
            "recalibrate.kind=%s is deprecated; use recalibrate.kind=%s (same calibrator)",
            spec.kind,
            KIND_ALIASES[spec.kind],
        )
    return replace(spec, probe_dir=parent_dir(cfg), kind=KIND_ALIASES.get(spec.kind, spec.kind))


def rows_from_data(cfg: DictConfig, parent: ProbeArtifact, parent_path: str) -> RecalibrationRows:
    """Answer + grade the `data` group's questions with the configured model, capturing only the parent's
    site (one layer, one position: a small store), and score them with the parent's probe."""
    from extract.models import load_model
    from extract.runner import extract_to_store, rows_and_splits
    from probes.training.splits import probe_features

    meta = parent.metadata
    data_spec = instantiate_group(cfg.data)
    questions, splits = rows_and_splits(data_spec)
    loaded = load_model(instantiate_group(cfg.model))
    parent.fingerprint.check_matches(loaded.fingerprint, f"probe artifact {parent_path}")
    extract_spec = replace(instantiate_group(cfg.extract), layers=[meta.layer], positions=[meta.position])
    store = extract_to_store(loaded, questions, splits, extract_spec, data_spec.name)
    for key in ("prompt", "generation", "grader"):
        trained = meta.extract_settings.get(key)
        if trained is not None and trained != store.settings.get(key):
            log.warning(
                "extract.%s differs from the settings the probe was trained with (%s vs %s): the "
                "recalibrated probe describes answers produced this way",
                key,
                store.settings.get(key),
                trained,
            )
    # the one way training and serving build a probe's input: the hidden state, then (hybrid) the answer's
    # logit signals the store recorded
    X = probe_features(parent.probe, store, meta.layer, meta.position)
    domains = store.column("domain")
    p_parent, score = parent.predict(X, categories=domains)
    return make_rows(
        score,
        store.column("label"),
        domains,
        store.column("id"),
        p_parent,
        source=f"{data_spec.name} ({store.path})",
    )


def check_output_dir(output: Path, parent_path: str) -> None:
    """Refuse to write the child where an artifact (the parent above all) or anything else already is: the
    parent would be overwritten and the child's lineage would point at nothing."""
    if output.resolve() == Path(parent_path).resolve():
        raise ValueError(
            f"recalibrate.output_dir={output} is the parent artifact's directory: the parent would be "
            "overwritten; choose a new directory (default: <run dir>/probe)"
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        what = "an artifact" if (output / METADATA_FILE).exists() else "a file or a non-empty directory"
        raise ValueError(
            f"recalibrate.output_dir={output} already holds {what}; a recalibrated artifact is written only "
            "to a new (or empty) directory"
        )


def stage_recalibrate(cfg: DictConfig) -> None:
    """Refit the calibrator + abstention threshold of recalibrate.probe_dir on new rows; refuse a worse one."""
    from hydra.core.hydra_config import HydraConfig

    spec = recalibration_spec(cfg)
    if spec.rows and spec.from_feedback:
        raise ValueError("give recalibrate.rows or recalibrate.from_feedback, not both")
    if spec.refit_domains and not spec.from_feedback:
        raise ValueError(
            f"recalibrate.refit_domains={spec.refit_domains} refits the domain clusters on the prompt states the "
            "server stored: it needs recalibrate.from_feedback=<the server's feedback database>"
        )
    if spec.refit_domains < 0:
        raise ValueError(
            f"recalibrate.refit_domains={spec.refit_domains} must be >= 0 (0 = keep the parent's)"
        )
    if not 0.0 < spec.heldout_fraction < 1.0:
        raise ValueError(
            f"recalibrate.heldout_fraction={spec.heldout_fraction!r} must be strictly between 0 and 1 (the "
            "share of rows held out to check the new calibrator; 0.5 by default)"
        )
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    output = Path(spec.output_dir) if spec.output_dir else run_dir / "probe"
    check_output_dir(output, spec.probe_dir)  # before any work (extraction takes minutes)
    parent = ProbeArtifact.load(spec.probe_dir)
    check_prior(parent, spec.kind, spec.prior)
    refit = None
    if spec.rows:
        rows = read_rows_file(spec.rows, parent)
    elif spec.from_feedback:
        meta = parent.metadata
        rows = read_feedback_rows(spec.from_feedback, meta.layer, meta.position, lineage_digests(parent))
        if spec.refit_domains:
            served = read_served_prompts(
                spec.from_feedback, meta.layer, meta.position, lineage_digests(parent)
            )
            rows, refit = refit_domains(parent, rows, served, spec.refit_domains, cfg.seed)
        if "dropped" in rows.source:
            log.warning("%s", rows.source)
    else:
        rows = rows_from_data(cfg, parent, spec.probe_dir)
    result = recalibrate(
        parent,
        rows,
        spec.kind,
        spec.heldout_fraction,
        cfg.seed,
        spec.target_accuracy,
        spec.delta,
        spec.threshold_method,
        n_bins=cfg.train.n_bins,
        n_bootstrap=cfg.train.n_bootstrap,
        tau=spec.tau,
        refit=refit,
        prior=spec.prior,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "parent": spec.probe_dir,
        "accepted": result.accepted,
        "reason": result.reason,
        "artifact": str(output) if result.accepted else None,
        "record": result.record,
        "held_out": result.comparison,
        "threshold": result.threshold.to_dict(),
        "notes": result.notes,
        "spec": asdict(spec),
        "domain_accuracy": {str(d): float(np.mean(rows.y[rows.domain == d])) for d in np.unique(rows.domain)},
    }
    atomic_write_text(run_dir / "recalibration.json", json.dumps(report, indent=2, default=json_default))
    print(f"\nrecalibration of {spec.probe_dir} on {rows.source} ({spec.kind}):\n{result.summary()}\n")
    if not result.accepted:
        raise ValueError(f"no artifact written: {result.reason} (details: {run_dir / 'recalibration.json'})")
    result.artifact.save(output)
    print(f"new artifact: {output}\nreport: {run_dir / 'recalibration.json'}")
    if spec.reload:
        answer = request_reload(spec.reload, output, spec.admin_token)
        log.info("reload %s: %s", spec.reload, answer)
        print(f"{spec.reload} now serves {answer.get('current', {}).get('digest')} (from {output})")


def stage_label_queue(cfg: DictConfig) -> None:
    """List the served answers to label first (probes.recalibration.label_queue) and write them as JSONL."""
    from hydra.core.hydra_config import HydraConfig

    spec = cfg.label_queue
    if not cfg.evaluate.probe_dir or not spec.from_feedback:
        raise ValueError(
            "probecal label-queue needs evaluate.probe_dir=<run dir>/probe and "
            "label_queue.from_feedback=<the server's feedback database>"
        )
    if spec.limit < 1:
        raise ValueError(f"label_queue.limit={spec.limit} must be at least 1")
    queue = label_queue(spec.from_feedback, ProbeArtifact.load(cfg.evaluate.probe_dir), spec.limit)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(asdict(item), default=json_default) + "\n" for item in queue)
    atomic_write_text(run_dir / "label_queue.jsonl", lines)
    print(f"\n{len(queue)} answers to label first ({spec.from_feedback}):")
    print("| # | id | domain | p_correct | why |\n|---:|---|---|---:|---|")
    for rank, item in enumerate(queue, 1):
        print(
            f"| {rank} | {item.id} | {item.domain or '(untagged)'} | {item.p_correct:.3f} | {item.reason} |"
        )
    print(
        f'queue: {run_dir / "label_queue.jsonl"} (label with POST /v1/feedback {{"id": ..., "correct": ...}})'
    )
