"""`probecal STAGE [hydra overrides...]`: one entry point, one Hydra config, several stages."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from probes.cli.recalibrate import stage_label_queue, stage_recalibrate

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
    from extract.runner import accuracy_table, connect_engine, extract_to_store, rows_and_splits

    extract_spec = _build(cfg.extract)
    engine = connect_engine(extract_spec)  # extract.engine=openai: is the engine up? before anything loads
    data_spec = _build(cfg.data)
    rows, splits = rows_and_splits(data_spec)
    model_spec = _build(cfg.model)
    # A GGUF model is de-quantized into the shared model cache on first use: one rank does that.
    gguf = model_spec.name in PACKAGED_MODELS or str(model_spec.path).endswith(".gguf")
    with distributed_context(model_spec.device) as dist:
        with main_rank_first(dist) if gguf else nullcontext():
            loaded = load_model(replace(model_spec, device=dist.device))
        store = extract_to_store(loaded, rows, splits, extract_spec, data_spec.name, dist=dist, engine=engine)
    if not dist.is_main:
        return loaded, store, splits
    if store.column("split").tolist() != list(splits):
        log.info(
            "the store at %s was extracted with other splits (data.seed or fractions); using this run's",
            store.path,
        )
    table = accuracy_table(store)
    (_run_dir() / "store.txt").write_text(f"{store.path}\n")
    print(
        f"\nactivation store: {store.path}\n\nModel accuracy by category ({loaded.fingerprint.name}, "
        f"{data_spec.name}):\n{table}\n"
    )
    return loaded, store, splits


def stage_extract(cfg: DictConfig) -> None:
    """Generate, grade and capture hidden states into the activation store."""
    _extract(cfg)


def stage_train(cfg: DictConfig) -> None:
    """Extract (or reuse the store), sweep layers x positions, fit + calibrate the probe, evaluate, report."""
    from extract.distributed import is_main_process
    from probes.evaluation.outputs import threshold_report, write_run_outputs
    from probes.training import evaluate_probe, train_probe

    start = time.perf_counter()
    run_dir = _run_dir()
    loaded, store, splits = _extract(cfg)
    if not is_main_process():  # under torchrun the other ranks only help with the extraction
        return
    train_spec = OmegaConf.to_object(cfg.train)
    calibrator = _build(cfg.calibration)
    trained = train_probe(store, _build(cfg.probe), calibrator, train_spec, seed=cfg.seed, splits=splits)
    artifact, sweep_result, extra = trained.artifact, trained.sweep, trained.outputs()
    table, methods, data, mask = evaluate_probe(
        artifact, store, calibrator, train_spec, "test", cfg.seed, splits=splits
    )
    thresholds = threshold_report(extra["threshold"], methods["probe"], data.y[mask])
    from probes.evaluation.refusal_gap import measure_refusal_gap

    # measured in every run; without a reachable threshold probecal never abstains, and the table says so
    threshold = thresholds["threshold"] if thresholds.get("reachable") else None
    extra["refusal_gap"] = measure_refusal_gap(artifact, store, threshold, splits=splits)
    artifact = artifact.with_metadata(
        metrics={"test": {k: table.rows["probe"].get(k) for k in table.columns()}},
        thresholds=[thresholds],
        extract_settings=store.settings,
    )
    artifact.save(run_dir / "probe")
    model_name = loaded.fingerprint.name
    notes = {
        "model": model_name,
        "data": cfg.data.name,
        "store": str(store.path),
        "selected site": f"layer {artifact.metadata.layer}, {artifact.metadata.position}",
        "probe": artifact.metadata.kind,
        "calibration": artifact.metadata.calibrator_kind,
        "split sizes": json.dumps(data.sizes()),
        "abstention": _threshold_sentence(thresholds),
        "selection": f"train.select={train_spec.select}: {extra['selection']['candidate']} "
        f"(by {extra['selection']['by']})",
    }
    report, headline = write_run_outputs(
        run_dir,
        f"probecal: {model_name} on {cfg.data.name}",
        table,
        methods,
        data,
        mask,
        train_spec,
        sweep_result,
        {
            **extra,
            "notes": notes,
            "thresholds": thresholds,
            "selected": notes["selected site"],
            "model": model_name,
            "data": cfg.data.name,
            "seconds": time.perf_counter() - start,
        },
    )
    print(f"\nselected {notes['selected site']} ({notes['selection']}); {notes['abstention']}\n")
    where = "Test split" + (
        " (in domain) and held-out domains (leave-one-domain-out)" if extra.get("transfer") else ""
    )
    print(f"{where}, probe vs best baseline:\n{headline}\n\nreport: {report}")


def _threshold_sentence(info: dict) -> str:
    if not info.get("reachable"):
        return (
            f"target accuracy {info['target_accuracy']:.0%} is not reachable with confidence "
            f"{1 - info['delta']:.0%} on the calibration split: no abstention threshold"
        )
    return (
        f"abstain below p={info['threshold']:.3f} (target {info['target_accuracy']:.0%} at delta "
        f"{info['delta']}); on test: accuracy {info['test_accuracy']:.3f} at coverage {info['test_coverage']:.3f}"
    )


def stage_evaluate(cfg: DictConfig) -> None:
    """Evaluate a saved probe (evaluate.probe_dir=...) on the configured data set."""
    from extract.distributed import is_main_process
    from probecal.splits import SPLITS
    from probes.artifact import ProbeArtifact
    from probes.evaluation.outputs import write_run_outputs
    from probes.training import evaluate_probe

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
    table, methods, data, mask = evaluate_probe(
        artifact, store, _build(cfg.calibration), train_spec, split, cfg.seed, splits=splits
    )
    title = f"probecal evaluate: probe {cfg.evaluate.probe_dir} on {cfg.data.name} ({cfg.evaluate.split})"
    report, headline = write_run_outputs(
        _run_dir(),
        title,
        table,
        methods,
        data,
        mask,
        train_spec,
        None,
        {"notes": {"probe": str(cfg.evaluate.probe_dir)}},
    )
    print(f"\n{headline}\n\nreport: {report}")


def stage_serve(cfg: DictConfig) -> None:
    from probes.serving.app import build_probed_model, serve

    settings = _build(cfg.serve)
    settings.validate()
    check_port(settings.host, settings.port)
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
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answer = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        print(f"Q: {question}\nA: {answer.strip().splitlines()[0] if answer.strip() else ''}\n")


STAGES: dict[str, tuple[Callable[[DictConfig], None], str]] = {
    "run": (stage_train, "the main job: extract -> train (sweep, select, calibrate) -> evaluate -> report"),
    "extract": (stage_extract, "generate + grade answers and capture hidden states into the store"),
    "train": (stage_train, "sweep layers/positions, fit + calibrate the probe, evaluate on test, report"),
    "evaluate": (stage_evaluate, "evaluate a saved probe (evaluate.probe_dir=...) on any data set"),
    "serve": (stage_serve, "OpenAI-compatible HTTP server with confidence, abstention and feedback"),
    "recalibrate": (
        stage_recalibrate,
        "refit a saved probe's calibrator + threshold on new rows (recalibrate.probe_dir=...)",
    ),
    "label-queue": (
        stage_label_queue,
        "list served answers to label first (evaluate.probe_dir=... label_queue.from_feedback=...)",
    ),
    "summarize": (stage_summarize, "collect metrics.json of a multirun (summarize.dir=...) into one table"),
    "demo": (stage_demo, "load the model and answer a few built-in questions"),
}


def usage() -> str:
    lines = ["usage: probecal STAGE [key=value ...] [-m for a multirun sweep]", "", "stages:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in STAGES.items()]
    lines += [f"  {'verify':<10} check stores and probe artifacts on disk: probecal verify PATH [--rehash]"]
    lines += [
        "",
        "Every setting is a Hydra override, e.g.",
        "  probecal run model=gemma3_270m probe=mass_mean calibration=isotonic extract.layers=[8,12]",
        "  probecal run -m model=smollm2_135m_instruct,gemma3_270m",
        "`probecal STAGE --cfg job` prints the composed config; `probecal STAGE --help` lists config groups.",
    ]
    return "\n".join(lines)


DEBUG_HINT = "(PROBECAL_DEBUG=1 shows the traceback)"
VERIFY_USAGE = (
    "usage: probecal verify PATH [PATH ...] [--rehash]   (an activation store or a probe artifact directory)"
)


def _fail(stage: str, message: str) -> int:
    """Print the project's one-line error and return its exit code (2 = bad input)."""
    print(f"probecal {stage}: error: {message} {DEBUG_HINT}", file=sys.stderr)
    return 2


def verify_paths(paths: list[str], rehash: bool = False) -> tuple[int, list[str]]:
    """`probecal verify`: check stores (shard sizes + sha256 against the manifest) and probe artifacts
    (the digest over metadata + tensors, kinds, fingerprint). Returns (exit code, one line per path):
    0 all intact, 1 something is damaged, 2 a path is neither a store nor an artifact.
    rehash: upgrade format-1 stores / artifacts (no checksums) by recording checksums of the files as they are."""
    from extract.store import MANIFEST_FILE, SETTINGS_FILE, StoreError, verify_store
    from probes.artifact import METADATA_FILE, ArtifactError, ProbeArtifact, rehash_format1

    code, lines = 0, []
    for raw in paths:
        path = Path(raw)
        try:
            if (path / MANIFEST_FILE).exists() or (path / SETTINGS_FILE).exists():
                lines.append(verify_store(path, rehash=rehash))
            elif (path / METADATA_FILE).exists():
                document = json.loads((path / METADATA_FILE).read_text(encoding="utf-8") or "null")
                if rehash and isinstance(document, dict) and document.get("format_version") == 1:
                    lines.append(rehash_format1(path))
                else:
                    artifact = ProbeArtifact.load(path)
                    meta = artifact.metadata
                    lines.append(
                        f"probe artifact {path}: intact (digest {artifact.digest[:16]}..., layer {meta.layer}, "
                        f"{meta.position}{', recalibrated from ' + meta.parent['digest'][:16] + '...' if meta.parent else ''})"  # noqa: E501
                    )
            else:
                lines.append(
                    f"{path}: neither an activation store ({MANIFEST_FILE}) nor a probe artifact ({METADATA_FILE})"
                )
                code = max(code, 2)
        except (StoreError, ArtifactError, ValueError, OSError) as err:
            lines.append(f"{path}: DAMAGED: {err}")
            code = max(code, 1)
    return code, lines


def _verify_main(args: list[str]) -> int:
    rehash = "--rehash" in args
    paths = [a for a in args if a != "--rehash"]
    unknown = [a for a in paths if a.startswith("-")]
    if not paths or unknown:
        print(
            f"probecal verify: error: {'unknown option ' + unknown[0] if unknown else 'no path given'}\n{VERIFY_USAGE}",
            file=sys.stderr,
        )
        return 2
    code, lines = verify_paths(paths, rehash)
    print("\n".join(lines), file=sys.stdout if code == 0 else sys.stderr)
    return code


def config_error(overrides: list[str]) -> str | None:
    """One line naming the key and what is allowed, for the first mistake in `overrides`; None if they compose.

    Hydra reports these itself in 6-13 lines and exits 1; composing once more here (a fraction of a second)
    lets the CLI follow the project's rule instead: one line, exit code 2.
    """
    import re

    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    def composed(items: list[str]):
        with initialize_config_module("probecal_conf", version_base="1.3"):
            return compose("config", overrides=items)

    try:
        composed(overrides)
        return None
    except MissingConfigException as err:
        group = str(err.missing_cfg_file or "").split("/")[0]
        given = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == group), "?")
        options = ", ".join(err.options or []) or "see conf/" + group
        return f"{group}={given}: no such option; allowed: {options}"
    except OverrideParseException as err:
        return f"cannot parse an override ({str(err).splitlines()[0]}); the syntax is key=value, e.g. train.n_folds=5"
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
        key = getattr(cause, "full_key", None)
        if isinstance(cause, ConfigAttributeError | ConfigKeyError) and key:
            parent, _, name = key.rpartition(".")
            try:
                # the keys of the options chosen here (probe=mass_mean probe.Cc=1 lists mass_mean's keys)
                try:
                    chosen = composed([o for o in overrides if "." not in o.split("=", 1)[0]])
                except Exception:  # the mistake is a top-level key itself (foo=1)
                    chosen = composed([])
                node = chosen if not parent else OmegaConf.select(chosen, parent)
                allowed = ", ".join(str(k) for k in node.keys()) if hasattr(node, "keys") else "?"
            except Exception:  # the allowed keys are a courtesy; the unknown key is the message
                allowed = "?"
            return f"unknown key {key!r}; {'keys of ' + parent if parent else 'top-level keys'}: {allowed}"
        if isinstance(cause, ValidationError) and key:
            given = next(
                (o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "?"
            )
            expected = re.search(r"could not be converted to (\w+)", str(cause))
            detail = f"expected {expected.group(1).lower()}" if expected else str(cause).splitlines()[0]
            return f"{key}={given}: {detail}"
        return str(err).splitlines()[0]


MULTIRUN_FLAGS = {"-m", "--multirun"}


def sweep_config_error(overrides: list[str]) -> str | None:
    """config_error for a multirun: every value of every sweep (`probe=logistic,nosuch`, `x=range(1,3)`),
    each with the other sweeps at their first value, so a bad value is refused before any job runs.
    Values come from Hydra's own override parser, as its sweeper expands them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return config_error(overrides)  # the syntax error, in config_error's words
    choices: list[list[str]] = []
    for override in parsed:
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        try:
            values = list(override.sweep_string_iterator())
        except HydraException:  # glob(...) needs the config loader: Hydra expands and checks it
            continue
        choices.append([f"{override.get_key_element()}={v}" for v in values] or [override.input_line])
    first = [options[0] for options in choices]
    to_check = [first] + [
        first[:i] + [value] + first[i + 1 :] for i, options in enumerate(choices) for value in options[1:]
    ]
    return next((problem for items in to_check if (problem := config_error(items))), None)


def string_keys() -> set[str]:
    """Dotted keys typed `str` or `str | None` in the structured configs (serve.admin_token, data.path,
    serve.upstream, ...); under probe. and calibration. those of every option's schema."""
    import types
    import typing
    from dataclasses import fields, is_dataclass

    from probes.cli.config import GROUP_SCHEMAS, ProbecalConfig

    def is_str(kind: Any) -> bool:
        union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        return kind is str or (union and set(typing.get_args(kind)) == {str, type(None)})

    def walk(schema: type, prefix: str) -> set[str]:
        hints, keys = typing.get_type_hints(schema), set()
        for f in fields(schema):
            if is_dataclass(hints[f.name]):
                keys |= walk(hints[f.name], f"{prefix}{f.name}.")
            elif is_str(hints[f.name]):
                keys.add(prefix + f.name)
        return keys

    keys = walk(ProbecalConfig, "")
    for group, options in GROUP_SCHEMAS.items():
        for schema in options.values():
            keys |= walk(schema, f"{group}.")
    return keys


def quote_string_values(args: list[str]) -> list[str]:
    """Quote the values of string-typed keys before Hydra parses them: its grammar reads
    serve.admin_token=1234567890123456 as an int, 1e300 as a float and true as a bool, and the text typed
    is lost. Left alone: null, values already quoted, sweeps (a,b), lists, dicts, calls such as range(),
    interpolations, and a value holding both kinds of quote."""
    keys = string_keys()
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        plain = (
            eq
            and key.lstrip("+") in keys
            and value not in ("", "null")
            and value[0] not in "'\"[{"
            and not re.search(r"[,$()]", value)
        )
        if plain and "'" not in value:
            arg = f"{key}='{value}'"
        elif plain and '"' not in value:
            arg = f'{key}="{value}"'
        out.append(arg)
    return out


def check_port(host: str, port) -> None:
    """`serve.port` in range and free on `host`, before the model loads (uvicorn would end in an
    OverflowError traceback, or exit 3 after loading everything)."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"serve.port={port!r}; allowed: an integer in 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "busy"
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ValueError(
                f"serve.port={port}: cannot listen on {host}:{port} ({err.strerror or err}); "
                "stop the other server or choose another serve.port"
            ) from None


def main(argv: list[str] | None = None) -> int:
    import hydra

    from probes.cli.config import register_configs

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    stage = argv[0]
    if stage == "verify":  # checks files; composes no config
        return _verify_main(argv[1:])
    if stage not in STAGES:
        print(f"probecal: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    func = STAGES[stage][0]
    register_configs()
    debug = bool(os.environ.get("PROBECAL_DEBUG"))
    if debug:
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra then re-raises: the whole traceback
    argv[1:] = quote_string_values(argv[1:])
    flags = {a for a in argv[1:] if a.startswith("-")}
    overrides = [a for a in argv[1:] if not a.startswith("-")]
    # A sweep (-m) is checked value by value; Hydra's other flags (--cfg, --help, --info ...) go straight to it.
    if not debug and flags <= MULTIRUN_FLAGS:
        problem = sweep_config_error(overrides) if flags else config_error(overrides)
        if problem:
            return _fail(stage, problem)

    @hydra.main(config_path="pkg://probecal_conf", config_name="config", version_base="1.3")
    def _task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf.errors import OmegaConfBaseException

        from probes.cli.config import warn_deprecated_choices

        try:
            warn_deprecated_choices(HydraConfig.get().runtime.choices)
            OmegaConf.resolve(cfg)
            func(cfg)
        except (ValueError, OSError, RuntimeError, OmegaConfBaseException) as err:
            # Our errors name the file / field / option; a traceback only helps when debugging probecal itself.
            if debug:
                raise
            sys.exit(_fail(stage, str(err)))

    sys.argv = [f"probecal {stage}", *argv[1:]]
    _task()
    return 0


if __name__ == "__main__":
    sys.exit(main())
