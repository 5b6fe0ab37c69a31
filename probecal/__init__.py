"""probecal: a calibrated probability of correctness for every answer of an open-weight LLM, read from the
model's own hidden states.

The public API, loaded lazily: `import probecal` imports nothing heavy (no torch, no scikit-learn); each
name is imported from its home module the first time it is touched (as vLLM's `MODULE_ATTRS`).

    import probecal
    loaded = probecal.load_model("smollm2-135m-instruct")
    store = probecal.extract_to_store(loaded, probecal.load_questions("facts", limit=300))
    result = probecal.train_probe(store)
    result.artifact.save("outputs/probe")
    pm = probecal.ProbedModel.from_transformers(loaded.model, loaded.tokenizer, "outputs/probe")
    print(pm.ask("What is the capital of France?")[0].p_correct)

The torch-free helpers both sides share also live here (`probecal.files`, `probecal.fingerprint`,
`probecal.splits`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
MODULE_ATTRS: dict[str, str] = {
    # extract/: model, data, activation store (torch)
    "load_model": "extract.models",
    "from_transformers": "extract.models",
    "ModelSpec": "extract.models",
    "load_questions": "extract.data",
    "DataSpec": "extract.data",
    "ExtractSpec": "extract.settings",
    "extract_to_store": "extract.runner",
    "open_store": "extract.store",
    # probes/: probe core (numpy + scikit-learn)
    "LogisticProbe": "probes.estimators",
    "HybridProbe": "probes.estimators",
    "MassMeanProbe": "probes.estimators",
    "MLPProbe": "probes.estimators",
    "PlattCalibrator": "probes.calibration",
    "TemperatureCalibrator": "probes.calibration",
    "IsotonicCalibrator": "probes.calibration",
    "PerCategoryCalibrator": "probes.calibration",
    "ShrinkageCalibrator": "probes.calibration",
    "fit_domain_clusters": "probes.domains",
    "ProbeArtifact": "probes.artifact",
    "ProbeScorer": "probes.scorer",
    "NoveltyModel": "probes.novelty",
    # training and recalibration (library code the CLI calls)
    "TrainSpec": "probes.training.spec",
    "TrainResult": "probes.training.train",
    "train_probe": "probes.training.train",
    "evaluate_probe": "probes.training.train",
    "domain_calibration": "probes.evaluation.metrics",
    "recalibrate": "probes.recalibration",
    "label_queue": "probes.recalibration",
    # runtime: a live model with its probe
    "ProbedModel": "probes.runtime.wrapper",
}

__all__ = sorted(MODULE_ATTRS)


def __getattr__(name: str) -> Any:
    module = MODULE_ATTRS.get(name)
    if module is None:
        raise AttributeError(f"module 'probecal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
