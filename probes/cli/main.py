"""`probecal STAGE [hydra overrides...]`: one entry point, one Hydra config, several stages."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from probes.cli.recalibrate import stage_recalibrate

log = logging.getLogger("probecal")

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "What is the chemical symbol for gold?",
    "What is 12 + 30?",
)


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _build(node):
    from probes.cli.config import instantiate_group

    return instantiate_group(node)


def _extract(cfg: DictConfig):
    """Load the model and data, and fill (or reuse) the activation store.

    Returns (loaded, store, splits): `splits` [n] are the ones the current data config assigns, which can
    differ from those recorded in a reused store (data.seed and the fractions do not change activations,
    so they are not part of the store's key); the train and evaluate stages use these.
    Under torchrun / accelerate launch every rank loads the model on its own device and computes its
    share of the store's shards (extract.distributed); only rank 0 reports.
    """
    from contextlib import nullcontext
    from dataclasses import replace

    from extract.distributed import distributed_context, main_rank_first
    from extract.models import PACKAGED_MODELS, load_model
    from extract.runner import accuracy_table, extract_to_store, rows_and_splits

    data_spec = _build(cfg.data)
    rows, splits = rows_and_splits(data_spec)
    model_spec = _build(cfg.model)
    # A GGUF model is de-quantized into the shared model cache on first use: one rank does that.
    gguf = model_spec.name in PACKAGED_MODELS or str(model_spec.path).endswith(".gguf")
    with distributed_context(model_spec.device) as dist:
        with main_rank_first(dist) if gguf else nullcontext():
            loaded = load_model(replace(model_spec, device=dist.device))
        store = extract_to_store(loaded, rows, splits, _build(cfg.extract), data_spec.name, dist=dist)
    if not dist.is_main:
        return loaded, store, splits
    if store.column("split").tolist() != list(splits):
        log.info("the store at %s was extracted with other splits (data.seed or fractions); using this run's",
                 store.path)
    table = accuracy_table(store)
    (_run_dir() / "store.txt").write_text(f"{store.path}\n")
    print(f"\nactivation store: {store.path}\n\nModel accuracy by category ({loaded.fingerprint.name}, "
          f"{data_spec.name}):\n{table}\n")
    return loaded, store, splits


def stage_extract(cfg: DictConfig) -> None:
    """Generate, grade and capture hidden states into the activation store."""
    _extract(cfg)


def stage_train(cfg: DictConfig) -> None:
    """Extract (or reuse the store), sweep layers x positions, fit + calibrate the probe, evaluate, report."""
    from extract.distributed import is_main_process
    from probes.cli.pipeline import evaluate_on_store, threshold_report, train_probe, write_run_outputs

    start = time.perf_counter()
    run_dir = _run_dir()
    loaded, store, splits = _extract(cfg)
    if not is_main_process():  # under torchrun the other ranks only help with the extraction
        return
    train_spec = OmegaConf.to_object(cfg.train)
    artifact, sweep_result, extra = train_probe(store, cfg.probe, cfg.calibration, train_spec, seed=cfg.seed,
                                                splits=splits)
    table, methods, data, mask = evaluate_on_store(artifact, store, cfg.calibration, train_spec, "test", cfg.seed,
                                                   splits=splits)
    thresholds = threshold_report(extra["threshold"], methods["probe"], data.y[mask])
    artifact = artifact.with_metadata(
        metrics={"test": {k: table.rows["probe"].get(k) for k in table.columns()}},
        thresholds=[thresholds], extract_settings=store.settings,
    )
    artifact.save(run_dir / "probe")
    model_name = loaded.fingerprint.name
    notes = {
        "model": model_name, "data": cfg.data.name, "store": str(store.path),
        "selected site": f"layer {artifact.metadata.layer}, {artifact.metadata.position}",
        "probe": artifact.metadata.kind, "calibration": artifact.metadata.calibrator_kind,
        "split sizes": json.dumps(data.sizes()),
        "abstention": _threshold_sentence(thresholds),
    }
    report, headline = write_run_outputs(
        run_dir, f"probecal: {model_name} on {cfg.data.name}", table, methods, data, mask, train_spec,
        sweep_result, {"notes": notes, "thresholds": thresholds, "selected": notes["selected site"],
                       "model": model_name, "data": cfg.data.name, "seconds": time.perf_counter() - start},
    )
    print(f"\nselected {notes['selected site']}; {notes['abstention']}\n")
    print(f"Test split, probe vs best baseline:\n{headline}\n\nreport: {report}")


def _threshold_sentence(info: dict) -> str:
    if not info.get("reachable"):
        return (f"target accuracy {info['target_accuracy']:.0%} is not reachable with confidence "
                f"{1 - info['delta']:.0%} on the calibration split: no abstention threshold")
    return (f"abstain below p={info['threshold']:.3f} (target {info['target_accuracy']:.0%} at delta "
            f"{info['delta']}); on test: accuracy {info['test_accuracy']:.3f} at coverage {info['test_coverage']:.3f}")


def stage_evaluate(cfg: DictConfig) -> None:
    """Evaluate a saved probe (evaluate.probe_dir=...) on the configured data set."""
    from extract.distributed import is_main_process
    from probes.artifact import ProbeArtifact
    from probes.cli.pipeline import SPLITS, evaluate_on_store, write_run_outputs

    if not cfg.evaluate.probe_dir:
        raise SystemExit("probecal evaluate needs evaluate.probe_dir=<run dir>/probe")
    if cfg.evaluate.split not in {*SPLITS, "all"}:
        raise SystemExit(f"evaluate.split={cfg.evaluate.split!r}; allowed: {', '.join(SPLITS)}, all")
    artifact = ProbeArtifact.load(cfg.evaluate.probe_dir)
    loaded, store, splits = _extract(cfg)
    if not is_main_process():
        return
    artifact.fingerprint.check_matches(loaded.fingerprint, "probe")
    train_spec = OmegaConf.to_object(cfg.train)
    split = None if cfg.evaluate.split == "all" else cfg.evaluate.split
    table, methods, data, mask = evaluate_on_store(artifact, store, cfg.calibration, train_spec, split, cfg.seed,
                                                   splits=splits)
    title = f"probecal evaluate: probe {cfg.evaluate.probe_dir} on {cfg.data.name} ({cfg.evaluate.split})"
    report, headline = write_run_outputs(_run_dir(), title, table, methods, data, mask, train_spec, None,
                                         {"notes": {"probe": str(cfg.evaluate.probe_dir)}})
    print(f"\n{headline}\n\nreport: {report}")


def stage_serve(cfg: DictConfig) -> None:
    from probes.serving.app import build_probed_model, serve

    settings = _build(cfg.serve)
    settings.validate()
    serve(settings, build_probed_model(_build(cfg.model), settings))


def stage_summarize(cfg: DictConfig) -> None:
    """Collect metrics.json of a sweep (summarize.dir=...) into summary.csv / summary.md."""
    from probes.evaluation.summary import summarize

    csv_path, md_path, table = summarize(Path(cfg.summarize.dir), cfg.summarize.sort_by)
    print(f"{table}\n\nwritten: {csv_path}, {md_path}")


def stage_demo(cfg: DictConfig) -> None:
    """Load the configured model and answer a few built-in questions."""
    import torch

    from extract.models import load_model
    from extract.prompts import Question, encode_prompt

    loaded = load_model(_build(cfg.model))
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt_spec = _build(cfg.extract).prompt
    for question in DEMO_QUESTIONS:
        ids = encode_prompt(Question(question), tokenizer, loaded.uses_chat_template, prompt_spec)
        input_ids = torch.tensor([ids], device=loaded.device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=24,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        print(f"Q: {question}\nA: {answer.strip().splitlines()[0] if answer.strip() else ''}\n")


STAGES: dict[str, tuple[Callable[[DictConfig], None], str]] = {
    "run": (stage_train, "the main job: extract -> train (sweep, select, calibrate) -> evaluate -> report"),
    "extract": (stage_extract, "generate + grade answers and capture hidden states into the store"),
    "train": (stage_train, "sweep layers/positions, fit + calibrate the probe, evaluate on test, report"),
    "evaluate": (stage_evaluate, "evaluate a saved probe (evaluate.probe_dir=...) on any data set"),
    "serve": (stage_serve, "OpenAI-compatible HTTP server with confidence, abstention and feedback"),
    "recalibrate": (stage_recalibrate, "refit a saved probe's calibrator + threshold on new rows (evaluate.probe_dir=...)"),
    "summarize": (stage_summarize, "collect metrics.json of a multirun (summarize.dir=...) into one table"),
    "demo": (stage_demo, "load the model and answer a few built-in questions"),
}


def usage() -> str:
    lines = ["usage: probecal STAGE [key=value ...] [-m for a multirun sweep]", "", "stages:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in STAGES.items()]
    lines += [
        "",
        "Every setting is a Hydra override, e.g.",
        "  probecal run model=gemma3_270m probe=mass_mean calibration=isotonic extract.layers=[8,12]",
        "  probecal run -m model=smollm2_135m_instruct,gemma3_270m",
        "`probecal STAGE --cfg job` prints the composed config; `probecal STAGE --help` lists config groups.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import hydra

    from probes.cli.config import register_configs

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    stage = argv[0]
    if stage not in STAGES:
        print(f"probecal: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    func = STAGES[stage][0]
    register_configs()

    @hydra.main(config_path="pkg://probecal_conf", config_name="config", version_base="1.3")
    def _task(cfg: DictConfig) -> None:
        OmegaConf.resolve(cfg)
        try:
            func(cfg)
        except (ValueError, OSError, RuntimeError) as err:
            # Our errors name the file / field / option; a traceback only helps when debugging probecal itself.
            if os.environ.get("PROBECAL_DEBUG"):
                raise
            print(f"probecal {stage}: error: {err}\n(set PROBECAL_DEBUG=1 for the traceback)", file=sys.stderr)
            sys.exit(2)

    sys.argv = [f"probecal {stage}", *argv[1:]]
    _task()
    return 0


if __name__ == "__main__":
    sys.exit(main())
