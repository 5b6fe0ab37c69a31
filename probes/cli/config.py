"""Structured configs: the schema Hydra checks `conf/` and command-line overrides against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from extract.data import DataSpec
from extract.models import ModelSpec
from extract.settings import ExtractSpec
from probes.training.spec import TrainSpec


@dataclass
class EvaluateSpec:
    """`evaluate`: a saved probe on the configured data set."""

    probe_dir: str | None = None  # <run dir>/probe written by `probecal train`
    split: str = "test"  # test (baselines calibrated on this data's calibration split) | all (raw baselines)


@dataclass
class RecalibrateSpec:
    """`recalibrate`: refit the calibrator + threshold of evaluate.probe_dir on new labelled rows
    (probes/recalibration.py). Rows come from `rows` (a .jsonl/.csv of id, score or p_correct, correct,
    domain), from `from_feedback` (the server's feedback database), or else from the `data` group (the
    model answers and is graded as in extract, at the probe's one capture site)."""

    kind: str = "platt"  # platt | temperature | isotonic | per_domain (platt per domain, global fallback)
    # | shrinkage (the parent's calibrator + a per-domain MAP logit offset: works from ~5-20 labels per domain)
    rows: str | None = None
    from_feedback: str | None = None
    heldout_fraction: float = 0.5  # held-out share of the rows: before/after metrics, refusal rule
    output_dir: str | None = None  # where the new artifact goes (None = <run dir>/probe)
    target_accuracy: float | None = None  # None = the parent's threshold settings
    delta: float | None = None
    threshold_method: str | None = None
    tau: float | None = None  # shrinkage prior width (logit units); None = the parent's, or estimated
    # base URL of a running `probecal serve` (e.g. http://127.0.0.1:8000): POST /admin/reload with the new
    # artifact once it is written (never when refused); admin_token: its serve.admin_token, if set
    reload: str | None = None
    admin_token: str | None = None


@dataclass
class LabelQueueSpec:
    """`label-queue`: the served answers of a feedback database to label first for evaluate.probe_dir
    (probes.recalibration.label_queue); labels go back through POST /v1/feedback."""

    from_feedback: str | None = None  # the server's feedback database
    limit: int = 50


@dataclass
class SummarizeSpec:
    """`summarize`: one table from the metrics.json files of a multirun."""

    dir: str = "outputs/multirun"
    sort_by: str = "within_cat_auroc"


@dataclass
class ProbecalConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    extract: ExtractSpec = field(default_factory=ExtractSpec)
    probe: Any = None
    calibration: Any = None
    serve: Any = None  # probes.serving.settings.ServeSettings (conf/serve/)
    train: TrainSpec = field(default_factory=TrainSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    summarize: SummarizeSpec = field(default_factory=SummarizeSpec)
    recalibrate: RecalibrateSpec = field(default_factory=RecalibrateSpec)
    label_queue: LabelQueueSpec = field(default_factory=LabelQueueSpec)
    seed: int = 0


def register_configs() -> None:
    """Called by the CLI (not at import time) before Hydra composes `conf/config.yaml`."""
    cs = ConfigStore.instance()
    cs.store(name="probecal_schema", node=ProbecalConfig)


def instantiate_group(node: Any) -> Any:
    """Build the object a config group describes, turning Hydra's nested errors into one clear line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        raise ValueError(f"config group with _target_={target} could not be built: {err}") from None
