"""`probecal recalibrate ... data=jsonl data.path=...` end to end on the tiny model, for every probe kind the
default selection can produce (logistic, hybrid): the data path hands the probe the hidden state AND, for a
hybrid probe, the answer's logit signals (probes.training.splits.probe_features, as training does)."""

import json
import sys

import numpy as np
import pytest

from extract.models import ModelSpec, load_model
from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator
from probes.estimators import LogisticProbe
from tests import tiny_models
from tests.unit.probes.serving.test_hybrid_serving import hybrid_artifact
from tests.unit.probes.training.test_train import _write_tiny_dataset


def logistic_artifact(fingerprint, directory):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(80, fingerprint.hidden_size))
    y = (X[:, 0] > 0).astype(int)
    probe = LogisticProbe(C=1.0).fit(X, y)
    calibrator = PlattCalibrator().fit(probe.decision_function(X), y)
    extract_settings = {"generation": {"stop_strings": ["?"]}}
    return ProbeArtifact.create(
        probe, calibrator, 1, "answer_last", fingerprint, extract_settings=extract_settings
    )


@pytest.mark.parametrize("kind", ["logistic", "hybrid"])
def test_recalibrate_from_data_reads_what_the_probe_reads(kind, tmp_path, monkeypatch, capsys):
    from probes.cli.main import main

    folder = tiny_models.save_tiny_llama(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    _write_tiny_dataset(data, n_rows=80)
    fingerprint = load_model(ModelSpec(name="tiny-llama", path=str(folder), device="cpu")).fingerprint
    parent_dir = tmp_path / "parent"
    if kind == "hybrid":
        parent = hybrid_artifact(fingerprint, 1, "answer_last", parent_dir)[0]
        assert parent.metadata.params["logit_features"]
    else:
        logistic_artifact(fingerprint, parent_dir).save(parent_dir)
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["probecal"])
    args = [
        "recalibrate",
        f"recalibrate.probe_dir={parent_dir}",
        "model=hf",
        f"model.path={folder}",
        "model.name=tiny-llama",
        "model.device=cpu",
        "data=jsonl",
        f"data.path={data}",
        "extract.generation.max_new_tokens=2",
        f"extract.store_root={tmp_path / 'stores'}",
        "train.n_bootstrap=20",
        f"hydra.run.dir={run}",
    ]
    try:
        main(args)
    except SystemExit as err:  # refused (worse, reversed): a clear exit 2, the report written
        assert err.code == 2
    err = capsys.readouterr().err
    assert "features" not in err and "Traceback" not in err
    report = json.loads((run / "recalibration.json").read_text())
    assert report["record"]["n_rows"] == 80
    assert report["accepted"] == (run / "probe" / "probe.json").is_file()
