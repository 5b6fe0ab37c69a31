"""Structured configs: the schema Hydra checks `conf/` and command-line overrides against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from extract.data import DataSpec
from extract.models import ModelSpec
from extract.settings import ExtractSpec


@dataclass
class TrainSpec:
    """`train`: layer sweep, selection, abstention target (probes/cli/pipeline.py uses it)."""

    n_folds: int = 5  # CV folds of the training split for the layer x position sweep
    layers: list[int] | None = None  # restrict the sweep (None = every stored layer)
    positions: list[str] | None = None  # restrict the sweep (None = every stored position)
    target_accuracy: float = 0.9  # abstain below the threshold that keeps answered accuracy >= this ...
    delta: float = 0.1  # ... with probability >= 1 - delta (finite-sample bound on the calibration split)
    threshold_method: str = "ltt"  # ltt (Learn-then-Test) | clopper_pearson (simultaneous bounds)
    n_bins: int = 15  # ECE / reliability bins
    n_bootstrap: int = 1000  # bootstrap resamples for the ECE interval
    # Transfer (probes/evaluation/transfer.py): leave-one-domain-out over the store's domains.
    select: str = (
        "transfer"  # transfer: site, features and C by the held-out-domain score | cv: in-domain CV sweep
    )
    transfer: bool = (
        True  # measure the held-out-domain numbers of the probe and every baseline (select=cv too)
    )
    transfer_layer_step: int = (
        3  # candidate layers for select=transfer: every Nth stored layer (and the last)
    )
    transfer_positions: list[str] | None = None  # candidate positions (None = every stored position)
    transfer_features: list[str] = field(
        default_factory=lambda: ["hidden", "hidden+logits"]
    )  # hidden | hidden+logits
    transfer_Cs: list[float] = field(
        default_factory=lambda: [0.0001, 0.001, 0.01]
    )  # fixed C grid (the probe's C)
    logit_weight: float = (
        3.0  # scale of the standardized logit features (divides their L2 penalty by its square)
    )
    # heldout: best held-out-domain within-cat AUROC | heldout_then_cv: among candidates within select_tolerance of
    # that best, the best in-domain CV within-cat AUROC (train-split folds, solved in the same batched call)
    select_rule: str = "heldout_then_cv"
    select_tolerance: float = 0.01
    # what the final calibrator is fit on: calibration (the probe's scores on the calibration split) |
    # cross_domain (each domain's calibration rows scored by the leave-one-domain-out probe fit without it) | both
    calibrate_on: str = "calibration"


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
    rows: str | None = None
    from_feedback: str | None = None
    heldout_fraction: float = 0.5  # held-out share of the rows: before/after metrics, refusal rule
    output_dir: str | None = None  # where the new artifact goes (None = <run dir>/probe)
    target_accuracy: float | None = None  # None = the parent's threshold settings
    delta: float | None = None
    threshold_method: str | None = None


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
