"""Training as library code: `train_probe(store, probe, calibrator, spec) -> TrainResult` and
`evaluate_probe(artifact, store) -> Evaluation`; the CLI only turns config into these objects."""

from probes.training.spec import TrainSpec
from probes.training.splits import SplitData, probe_features, row_domains
from probes.training.train import Evaluation, TrainResult, evaluate_probe, measure_transfer, train_probe

__all__ = [
    "Evaluation",
    "SplitData",
    "TrainResult",
    "TrainSpec",
    "evaluate_probe",
    "measure_transfer",
    "probe_features",
    "row_domains",
    "train_probe",
]
