"""`TrainSpec`: how a probe is selected, fit, calibrated and thresholded (the `train` config block)."""

from __future__ import annotations

from dataclasses import dataclass, field

from probes.evaluation.transfer import CALIBRATE_ON, FEATURE_SETS
from probes.selection.candidates import SELECT_RULES

SELECT_MODES = ("transfer", "cv")


@dataclass
class TrainSpec:
    """`train`: layer sweep, selection, abstention target (`probes.training.train_probe` reads it)."""

    n_folds: int = 5  # CV folds of the training split for the layer x position sweep
    layers: list[int] | None = None  # restrict the sweep (None = every stored layer)
    positions: list[str] | None = None  # restrict the sweep (None = every stored position)
    # abstain below the threshold that keeps answered accuracy >= this ... (0.75: the grown `facts` data's 470
    # calibration rows cannot certify 0.9 at delta 0.1; 0.75 certifies p >= 0.789, which read 0.918 on test)
    target_accuracy: float = 0.75
    delta: float = 0.1  # ... with probability >= 1 - delta (finite-sample bound on the calibration split)
    threshold_method: str = "ltt"  # ltt (Learn-then-Test) | clopper_pearson (simultaneous bounds)
    n_bins: int = 15  # ECE / reliability bins
    n_bootstrap: int = 1000  # bootstrap resamples for the ECE interval
    # Transfer (probes/evaluation/transfer.py): leave-one-domain-out over the store's domains.
    # transfer: site, features and C by the held-out-domain score | cv: in-domain CV sweep
    select: str = "transfer"
    # measure the held-out-domain numbers of the probe and every baseline (select=cv too)
    transfer: bool = True
    # candidate layers for select=transfer: every Nth stored layer (and the last)
    transfer_layer_step: int = 3
    transfer_positions: list[str] | None = None  # candidate positions (None = every stored position)
    # hidden | hidden+logits
    transfer_features: list[str] = field(default_factory=lambda: ["hidden", "hidden+logits"])
    # fixed C grid (the probe's C)
    transfer_Cs: list[float] = field(default_factory=lambda: [0.0001, 0.001, 0.01])
    # scale of the standardized logit features (divides their L2 penalty by its square)
    logit_weight: float = 3.0
    # heldout: best held-out-domain within-cat AUROC | heldout_then_cv: among candidates within select_tolerance of
    # that best, the best in-domain CV within-cat AUROC (train-split folds, solved in the same batched call)
    select_rule: str = "heldout_then_cv"
    select_tolerance: float = 0.01
    # what the final calibrator is fit on: calibration (the probe's scores on the calibration split) |
    # cross_domain (each domain's calibration rows scored by the leave-one-domain-out probe fit without it) | both
    calibrate_on: str = "calibration"
    # k-means domain clusters of the prompt_last state at the probe's layer (probes/domains.py), saved with the
    # artifact: the server names untagged requests "cluster-<i>" for per-domain calibration (0 = none)
    domain_clusters: int = 0

    def check(self) -> None:
        """Validate the transfer/selection options with messages that name the allowed values."""
        if self.select not in SELECT_MODES:
            raise ValueError(
                f"train.select={self.select!r} is not allowed; allowed values: {', '.join(SELECT_MODES)}"
            )
        if self.select == "transfer" and not self.transfer:
            raise ValueError(
                "train.select=transfer selects by the held-out-domain score: it needs train.transfer=true"
            )
        unknown = [f for f in self.transfer_features if f not in FEATURE_SETS]
        if unknown or not self.transfer_features:
            raise ValueError(
                f"train.transfer_features={list(self.transfer_features)!r}; allowed values: "
                f"a non-empty list of {', '.join(FEATURE_SETS)}"
            )
        if int(self.transfer_layer_step) < 1:
            raise ValueError(f"train.transfer_layer_step={self.transfer_layer_step!r} must be >= 1")
        if not self.transfer_Cs or min(self.transfer_Cs) <= 0:
            raise ValueError(
                f"train.transfer_Cs={list(self.transfer_Cs)!r} must be a non-empty list of positive numbers"
            )
        if not self.logit_weight > 0:
            raise ValueError(f"train.logit_weight={self.logit_weight!r} must be > 0")
        if self.select_rule not in SELECT_RULES:
            raise ValueError(
                f"train.select_rule={self.select_rule!r} is not allowed; allowed values: {', '.join(SELECT_RULES)}"
            )
        if not self.select_tolerance >= 0:
            raise ValueError(f"train.select_tolerance={self.select_tolerance!r} must be >= 0")
        if self.calibrate_on not in CALIBRATE_ON:
            raise ValueError(
                f"train.calibrate_on={self.calibrate_on!r} is not allowed; allowed values: "
                f"{', '.join(CALIBRATE_ON)}"
            )
        if self.calibrate_on != "calibration" and not self.transfer:
            raise ValueError(
                f"train.calibrate_on={self.calibrate_on} calibrates on leave-one-domain-out scores: it "
                "needs train.transfer=true"
            )
