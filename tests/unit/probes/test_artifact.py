"""Probe artifacts: save -> load -> identical predictions for every probe x calibrator; refusals are clear."""

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from extract.models import ModelFingerprint
from probes import __version__
from probes.artifact import (
    DIGEST_KEY,
    METADATA_FILE,
    TENSORS_FILE,
    ArtifactError,
    ProbeArtifact,
    ProbeMetadata,
    artifact_digest,
    hash_arrays,
    json_default,
)
from probes.calibration import CALIBRATORS, PerCategoryCalibrator
from probes.estimators import PROBES
from probes.selection.thresholds import choose_threshold

HIDDEN = 32
FINGERPRINT = ModelFingerprint("tiny-llama", "f" * 64, "LlamaForCausalLM", HIDDEN, 3)
FAST_PARAMS = {"logistic": {"Cs": (0.01, 1.0), "cv": 3}, "mlp": {"hidden_size": 8, "max_iter": 30}}


def data(n=240, seed=0, width=HIDDEN):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, width)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(size=n) > 0).astype(int)
    cats = np.where(np.arange(n) % 2 == 0, "capitals", "elements")
    return X, y, cats


def as_json(meta: ProbeMetadata) -> str:
    return json.dumps(asdict(meta), default=json_default, sort_keys=True)


def input_width(kind: str) -> int:
    """A hybrid probe reads the hidden state followed by its logit signals."""
    return HIDDEN + len(PROBES[kind]().get_params().get("logit_features") or ())


def make_artifact(kind="logistic", calibrator="platt"):
    X, y, cats = data(width=input_width(kind))
    train, cal = slice(0, 160), slice(160, None)
    probe = PROBES[kind](**FAST_PARAMS.get(kind, {})).fit(X[train], y[train])
    calibrator_obj = None
    if calibrator == "per_category":
        calibrator_obj = PerCategoryCalibrator(min_count=20).fit(
            probe.decision_function(X[cal]), y[cal], cats[cal]
        )
    elif calibrator is not None:
        calibrator_obj = CALIBRATORS[calibrator]().fit(probe.decision_function(X[cal]), y[cal])
    p_cal = ProbeArtifact(probe, calibrator_obj, None).predict(X[cal], cats[cal])[0]
    threshold = choose_threshold(p_cal, y[cal], target_accuracy=0.6, delta=0.2)
    return ProbeArtifact.create(
        probe,
        calibrator_obj,
        layer=2,
        position="answer_last",
        fingerprint=FINGERPRINT,
        training_data_hash=hash_arrays(X[train], y[train]),
        split_sizes={"train": 160, "calibration": 80},
        metrics={"test_auroc": np.float64(0.8), "ece": float("nan")},
        thresholds=[threshold.to_dict()],
    )


@pytest.mark.parametrize("calibrator", [*CALIBRATORS, "per_category", None])
@pytest.mark.parametrize("kind", list(PROBES))
def test_save_load_gives_identical_predictions(tmp_path, kind, calibrator):
    artifact = make_artifact(kind, calibrator)
    artifact.save(tmp_path / "probe")
    loaded = ProbeArtifact.load(tmp_path / "probe", expected_fingerprint=FINGERPRINT)
    X, _, cats = data(seed=1, width=input_width(kind))
    np.testing.assert_array_equal(loaded.probe.predict_proba(X), artifact.probe.predict_proba(X))
    for a, b in zip(loaded.predict(X, cats), artifact.predict(X, cats), strict=True):
        np.testing.assert_array_equal(a, b)
    assert as_json(loaded.metadata) == as_json(artifact.metadata)  # (nan in metrics: compare as text)
    assert (loaded.metadata.layer, loaded.metadata.position) == (2, "answer_last")


def test_files_and_metadata_contents(tmp_path):
    artifact = make_artifact()
    artifact.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [METADATA_FILE, TENSORS_FILE]
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta["format_version"] == 2 and meta["kind"] == "logistic" and meta["calibrator_kind"] == "platt"
    assert meta["model_fingerprint"] == FINGERPRINT.to_dict()
    assert meta["library_version"] == __version__ and meta["created_at"]
    assert meta["thresholds"][0]["target_accuracy"] == 0.6
    assert len(meta["digest"]) == 64 and "tensors_sha256" not in meta and meta["parent"] is None
    assert meta["digest"] == artifact.digest == ProbeArtifact.load(tmp_path).digest
    from safetensors.numpy import load_file

    assert set(load_file(tmp_path / TENSORS_FILE)) == {
        "probe.mean", "probe.scale", "probe.coef", "probe.intercept", "probe.C", "probe.classes",
        "calibrator.a", "calibrator.b",
    }  # fmt: skip
    assert ProbeArtifact.load(tmp_path).thresholds == artifact.thresholds


@pytest.fixture
def saved(tmp_path):
    make_artifact().save(tmp_path)
    return tmp_path


def edit_json(directory, **changes):
    """Edit probe.json AND re-sign it (a consistent but invalid artifact), to reach the checks behind the digest."""
    path = directory / METADATA_FILE
    document = {**json.loads(path.read_text()), **changes}
    document[DIGEST_KEY] = artifact_digest(document, (directory / TENSORS_FILE).read_bytes())
    path.write_text(json.dumps(document))


def test_refuses_another_model_saying_what_differs(saved):
    other = replace(FINGERPRINT, name="smollm2-135m-instruct", hidden_size=576)
    with pytest.raises(
        ArtifactError, match=r"another model: name: expected .*hidden_size: expected 32, got 576"
    ):
        ProbeArtifact.load(saved, expected_fingerprint=other)
    ProbeArtifact.load(
        saved, expected_fingerprint=replace(FINGERPRINT, source_hash="other")
    )  # name/size/layers only


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": 3}, r"probe.json: format_version 3 is not supported"),
        ({"kind": "svm"}, r"probe.json: unknown probe kind 'svm'; known: logistic, mass_mean, mlp"),
        ({"calibrator_kind": "beta"}, r"unknown calibrator kind 'beta'"),
        ({"layr": 3}, r"probe.json: unknown field\(s\) \['layr'\]"),
        ({"model_fingerprint": {"name": "x"}}, r"model_fingerprint: model fingerprint lacks field"),
    ],
)
def test_refuses_bad_metadata_naming_the_file(saved, changes, message):
    edit_json(saved, **changes)
    with pytest.raises(ArtifactError, match=message):
        ProbeArtifact.load(saved)


def test_refuses_missing_field_and_corrupt_json(saved):
    document = json.loads((saved / METADATA_FILE).read_text())
    del document["layer"]
    document[DIGEST_KEY] = artifact_digest(document, (saved / TENSORS_FILE).read_bytes())
    (saved / METADATA_FILE).write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match=r"missing field\(s\) \['layer'\]"):
        ProbeArtifact.load(saved)
    (saved / METADATA_FILE).write_text('{\n "kind": "logistic",\n oops')
    with pytest.raises(ArtifactError, match=r"probe.json: corrupt JSON at line 3"):
        ProbeArtifact.load(saved)


def test_refuses_truncated_or_corrupted_tensors(saved):
    path = saved / TENSORS_FILE
    content = path.read_bytes()
    path.write_bytes(content[:-7])
    with pytest.raises(ArtifactError, match=r"probe.json or probe.safetensors changed after it was saved"):
        ProbeArtifact.load(saved)
    edit_json(saved)  # re-signed over the truncated file: still refused clearly, by the safetensors reader
    with pytest.raises(ArtifactError, match=r"probe.safetensors: cannot be read as safetensors"):
        ProbeArtifact.load(saved)
    make_artifact().save(saved)  # a fresh, valid pair; then one byte of the tensor data flips
    flipped = bytearray(path.read_bytes())
    flipped[-3] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="digest over metadata and tensors does not match"):
        ProbeArtifact.load(saved)


def test_refuses_missing_files_and_wrong_width(tmp_path, saved):
    with pytest.raises(ArtifactError, match=r"probe.json does not exist"):
        ProbeArtifact.load(tmp_path / "nowhere")
    edit_json(saved, model_fingerprint={**FINGERPRINT.to_dict(), "hidden_size": 64})
    with pytest.raises(
        ArtifactError, match="probe reads 32 (hidden )?features but the model.s hidden size is 64"
    ):
        ProbeArtifact.load(saved)


def test_hash_arrays_is_stable_and_sensitive():
    X, y, cats = data()
    assert hash_arrays(X, y) == hash_arrays(X.copy(), y.copy())
    assert hash_arrays(X, y) != hash_arrays(X, 1 - y)
    assert hash_arrays(X, y) != hash_arrays(X.astype(np.float64), y)
    assert len(hash_arrays(cats)) == 64


def test_metadata_is_frozen():
    meta = make_artifact().metadata
    with pytest.raises(AttributeError):
        meta.layer = 5
    assert isinstance(meta, ProbeMetadata)
