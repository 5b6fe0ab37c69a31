"""Structured configs: the schema Hydra checks `conf/` and command-line overrides against."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from extract.data import DataSpec
from extract.models import ModelSpec
from extract.settings import ExtractSpec
from probes.serving.settings import ServeSettings
from probes.training.spec import TrainSpec

log = logging.getLogger(__name__)


@dataclass
class EvaluateSpec:
    """`evaluate`: a saved probe on the configured data set."""

    probe_dir: str | None = None  # <run dir>/probe written by `probecal train`
    split: str = "test"  # test (baselines calibrated on this data's calibration split) | all (raw baselines)


@dataclass
class RecalibrateSpec:
    """`recalibrate`: refit the calibrator + threshold of the artifact at `probe_dir` on new labelled rows
    (probes/recalibration.py). Rows come from `rows` (a .jsonl/.csv of id, score or p_correct, correct,
    domain), from `from_feedback` (the server's feedback database), or else from the `data` group (the
    model answers and is graded as in extract, at the probe's one capture site)."""

    probe_dir: str | None = None  # the parent artifact (<run dir>/probe); evaluate.probe_dir: deprecated
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
    # what kind=shrinkage shrinks toward: parent (its calibrator) | cross_domain (the out-of-domain Platt map
    # training stored: the better start for question forms the probe never saw)
    prior: str = "parent"
    # K > 0 (with from_feedback): refit K domain clusters on the prompt states the server stored with its
    # untagged responses; the child carries them and untagged rows are recalibrated by their new cluster
    refit_domains: int = 0
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


# ---------------------------------------------------------------- group schemas: probe/, calibration/, serve/
# One dataclass per option, mirroring its estimator's __init__ (same names, same defaults: a test checks),
# stored in the ConfigStore as schema/<group>/<option>; each conf/<group>/<option>.yaml names it first in
# its defaults list and lists only what it changes. A typo (probe.Cc=1) or a wrong type (probe.C=abc) is
# then an error at composition. Kept out of the option's own group so `probe=...` lists only real options.


@dataclass
class LogisticProbeSchema:
    _target_: str = "probes.estimators.LogisticProbe"
    C: float | None = None  # None: chosen from Cs by stratified CV on the training split
    Cs: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    cv: int = 5  # folds for choosing C
    class_weight: str | None = "balanced"  # balanced | None
    max_iter: int = 500
    tol: float = 1e-4
    random_state: int = 0


@dataclass
class HybridProbeSchema(LogisticProbeSchema):
    _target_: str = "probes.estimators.HybridProbe"
    logit_features: list[str] = field(default_factory=lambda: ["mean_logprob"])  # probes.inference names
    logit_weight: float = (
        1.0  # scale of the standardized logit columns (divides their L2 penalty by its square)
    )


@dataclass
class MassMeanProbeSchema:
    _target_: str = "probes.estimators.MassMeanProbe"
    covariance: bool = False  # True: the inverse-covariance ("IID") variant
    shrinkage: Any = "auto"  # auto (Ledoit-Wolf) | a number in [0, 1] (OmegaConf has no str | float type)
    class_weight: str | None = "balanced"


@dataclass
class MLPProbeSchema:
    _target_: str = "probes.estimators.MLPProbe"
    hidden_size: int = 64
    alpha: float = 1e-2  # L2 penalty
    max_iter: int = 200  # epochs
    learning_rate_init: float = 1e-3
    class_weight: str | None = "balanced"  # balanced | None (as sample weights)
    random_state: int = 0


@dataclass
class PlattSchema:
    _target_: str = "probes.calibration.PlattCalibrator"


@dataclass
class TemperatureSchema:
    _target_: str = "probes.calibration.TemperatureCalibrator"
    min_temperature: float = 1e-2  # search bounds for T
    max_temperature: float = 1e3


@dataclass
class IsotonicSchema:
    _target_: str = "probes.calibration.IsotonicCalibrator"


@dataclass
class PerDomainSchema:
    _target_: str = "probes.calibration.PerCategoryCalibrator"
    base: str = "platt"  # platt | temperature | isotonic
    min_count: int = 30  # fewer calibration rows (or one class) in a group: the global fallback


@dataclass
class ServeSchema(ServeSettings):
    """ServeSettings plus the `_target_` that builds it. A subclass rather than ServeSettings itself: the
    settings class stays free of Hydra's key, and OmegaConf rejects a `_target_` key a dataclass lacks."""

    _target_: str = "probes.serving.settings.ServeSettings"


GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "probe": {
        "logistic": LogisticProbeSchema,
        "hybrid": HybridProbeSchema,
        "mass_mean": MassMeanProbeSchema,
        "mlp": MLPProbeSchema,
    },
    "calibration": {
        "platt": PlattSchema,
        "temperature": TemperatureSchema,
        "isotonic": IsotonicSchema,
        "per_domain": PerDomainSchema,
    },
}


@dataclass
class ProbecalConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    extract: ExtractSpec = field(default_factory=ExtractSpec)
    probe: Any = None  # typed by the chosen option's schema (GROUP_SCHEMAS["probe"])
    calibration: Any = None  # typed by the chosen option's schema (GROUP_SCHEMAS["calibration"])
    serve: ServeSchema = field(default_factory=ServeSchema)
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
    for group, options in GROUP_SCHEMAS.items():
        for name, schema in options.items():
            cs.store(group=f"schema/{group}", name=name, node=schema)


# Deprecated spellings still accepted: {group: {old option: new option}} (CHANGELOG).
DEPRECATED_OPTIONS: dict[str, dict[str, str]] = {"calibration": {"per_category": "per_domain"}}


def warn_deprecated_choices(choices: dict[str, Any]) -> None:
    """Log a warning for each deprecated group option in Hydra's `runtime.choices`."""
    for group, renamed in DEPRECATED_OPTIONS.items():
        old = choices.get(group)
        if old in renamed:
            log.warning("%s=%s is deprecated; use %s=%s (same calibrator)", group, old, group, renamed[old])


def instantiate_group(node: Any) -> Any:
    """Build the object a config group describes, turning Hydra's nested errors into one clear line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    schema = OmegaConf.get_type(node) if OmegaConf.is_config(node) else None
    if is_dataclass(schema):  # `+probe.Cc=1` adds a key Hydra's struct check lets through
        allowed = [f.name for f in fields(schema) if f.name != "_target_"]
        unknown = [str(k) for k in node.keys() if k not in allowed and k != "_target_"]
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(unknown)} for {node.get('_target_', schema.__name__)}; "
                f"allowed: {', '.join(allowed)}"
            )
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        raise ValueError(f"config group with _target_={target} could not be built: {err}") from None
