"""Probe artifacts: a trained probe + calibrator + thresholds in a directory, never pickled.

    <dir>/probe.safetensors   tensors: "probe.<name>" (weights, scaler) and "calibrator.<name>"
    <dir>/probe.json          ProbeMetadata (format version, kinds, params, layer, position, model
                              fingerprint, data hash, split sizes, metrics, thresholds, library version)
                              + the sha256 of probe.safetensors, so a corrupted file is caught on load.

Both files are written atomically (temp file + rename), tensors first, so a reader never pairs new JSON
with old tensors unnoticed (the hash would not match).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from probecal.files import atomic_write_text, json_default, sha256_file
from probecal.fingerprint import ModelFingerprint
from probes.calibration import CALIBRATORS, PerCategoryCalibrator, calibrator_kind, rebuild_calibrator
from probes.estimators import PROBES, probe_kind, rebuild_probe

FORMAT_VERSION = 1
TENSORS_FILE = "probe.safetensors"
METADATA_FILE = "probe.json"


class ArtifactError(ValueError):
    """A probe artifact is missing, corrupt, of an unknown kind or version, or made for another model."""


@dataclass(frozen=True)
class ProbeMetadata:
    kind: str  # a key of probes.estimators.PROBES
    params: dict[str, Any]  # the probe's get_params()
    layer: int  # hidden-state layer read (0 = embeddings, i = output of decoder block i)
    position: str  # prompt_last | answer_last | answer_mean
    model_fingerprint: dict[str, Any]  # extract.models.ModelFingerprint.to_dict()
    calibrator_kind: str | None = None  # platt | temperature | isotonic | per_category | None
    calibrator_params: dict[str, Any] = field(default_factory=dict)
    training_data_hash: str = ""
    split_sizes: dict[str, int] = field(default_factory=dict)  # e.g. {"train": 2100, "calibration": 450, ...}
    metrics: dict[str, Any] = field(default_factory=dict)
    thresholds: list[dict[str, Any]] = field(default_factory=list)  # ThresholdResult.to_dict() each
    # the store settings the probe was trained on (prompt, generation, grader): the wrapper prompts alike
    extract_settings: dict[str, Any] = field(default_factory=dict)
    library_version: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "metadata") -> ProbeMetadata:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ArtifactError(f"{source}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        required = {f.name for f in fields(cls) if _no_default(f)}
        missing = required - set(data)
        if missing:
            raise ArtifactError(f"{source}: missing field(s) {sorted(missing)}")
        return cls(**data)


def _no_default(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def hash_arrays(*arrays) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes: identifies the training data of a probe."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        if array.dtype.kind in "OUS":
            array = np.asarray([str(v) for v in array.ravel()]).astype("U")
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()



class ProbeArtifact:
    """A fitted probe (+ optional calibrator) and its metadata.

    predict(X [n, hidden], categories=None) -> (p_correct [n], raw score [n]); higher = more likely correct.
    Without a calibrator, p_correct is the probe's own predict_proba[:, 1].
    """

    def __init__(self, probe, calibrator, metadata: ProbeMetadata):
        self.probe = probe
        self.calibrator = calibrator
        self.metadata = metadata

    @classmethod
    def create(
        cls,
        probe,
        calibrator,
        layer: int,
        position: str,
        fingerprint: ModelFingerprint,
        **metadata: Any,
    ) -> ProbeArtifact:
        """Fill kind, params, versions and the timestamp from the objects; the rest comes from `metadata`."""
        from probes import __version__

        meta = ProbeMetadata(
            kind=probe_kind(probe),
            params=probe.get_params(),
            layer=int(layer),
            position=str(position),
            model_fingerprint=fingerprint.to_dict(),
            calibrator_kind=None if calibrator is None else calibrator_kind(calibrator),
            calibrator_params={} if calibrator is None else calibrator.get_params(),
            library_version=__version__,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **metadata,
        )
        return cls(probe, calibrator, meta)

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint.from_dict(self.metadata.model_fingerprint)

    @property
    def thresholds(self) -> list[dict[str, Any]]:
        return self.metadata.thresholds

    def abstention_threshold(self) -> float | None:
        """The threshold `probecal train` stored (None: no reachable target, never abstain)."""
        for entry in self.metadata.thresholds:
            if entry.get("reachable") and entry.get("threshold") is not None:
                return float(entry["threshold"])
        return None

    def with_metadata(self, **changes: Any) -> ProbeArtifact:
        """A copy whose metadata has `changes` (e.g. test metrics and thresholds known after fitting)."""
        return ProbeArtifact(self.probe, self.calibrator, replace(self.metadata, **changes))

    def predict(self, X, categories=None) -> tuple[np.ndarray, np.ndarray]:
        raw = self.probe.decision_function(X)
        if self.calibrator is None:
            return self.probe.predict_proba(X)[:, 1], raw
        return self.calibrator.predict(raw, categories=categories), raw

    # -- saving ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"probe.{k}": np.ascontiguousarray(v) for k, v in self.probe.to_tensors().items()}
        if self.calibrator is not None:
            tensors.update({f"calibrator.{k}": np.ascontiguousarray(v) for k, v in self.calibrator.to_tensors().items()})
        target = directory / TENSORS_FILE
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{TENSORS_FILE}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            digest = sha256_file(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        document = {**asdict(self.metadata), "tensors_sha256": digest}
        atomic_write_text(directory / METADATA_FILE, json.dumps(document, indent=1, default=json_default))
        return directory

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, expected_fingerprint: ModelFingerprint | None = None) -> ProbeArtifact:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta_path, tensors_path = directory / METADATA_FILE, directory / TENSORS_FILE
        for path in (meta_path, tensors_path):
            if not path.is_file():
                raise ArtifactError(f"{path} does not exist: not a probe artifact directory")
        try:
            document = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{meta_path}: corrupt JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        except UnicodeDecodeError as err:
            raise ArtifactError(f"{meta_path}: not UTF-8 text ({err.reason})") from None
        if not isinstance(document, dict):
            raise ArtifactError(f"{meta_path}: expected a JSON object, got {type(document).__name__}")
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{meta_path}: format_version {version!r} is not supported by probecal (reads version {FORMAT_VERSION})"
            )
        expected_hash = document.pop("tensors_sha256", None)
        meta = ProbeMetadata.from_dict(document, source=str(meta_path))
        if meta.kind not in PROBES:
            raise ArtifactError(f"{meta_path}: unknown probe kind {meta.kind!r}; known: {', '.join(PROBES)}")
        known_calibrators = (*CALIBRATORS, PerCategoryCalibrator.kind, None)
        if meta.calibrator_kind not in known_calibrators:
            raise ArtifactError(
                f"{meta_path}: unknown calibrator kind {meta.calibrator_kind!r}; known: {', '.join(map(str, known_calibrators))}"
            )
        try:
            fingerprint = ModelFingerprint.from_dict(meta.model_fingerprint)
        except (ValueError, TypeError) as err:
            raise ArtifactError(f"{meta_path}: model_fingerprint: {err}") from None
        if expected_fingerprint is not None:
            try:
                fingerprint.check_matches(expected_fingerprint, what=f"probe artifact {directory}")
            except ValueError as err:
                raise ArtifactError(str(err)) from None
        if expected_hash is not None and sha256_file(tensors_path) != expected_hash:
            raise ArtifactError(f"{tensors_path}: contents do not match the sha256 recorded in {meta_path} (corrupt or replaced)")
        try:
            tensors = load_file(tensors_path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ArtifactError(f"{tensors_path}: cannot be read as safetensors (truncated or corrupt?): {err}") from None
        probe_tensors = {k.removeprefix("probe."): v for k, v in tensors.items() if k.startswith("probe.")}
        calibrator_tensors = {k.removeprefix("calibrator."): v for k, v in tensors.items() if k.startswith("calibrator.")}
        try:
            probe = rebuild_probe(meta.kind, meta.params, probe_tensors)
            calibrator = (
                None
                if meta.calibrator_kind is None
                else rebuild_calibrator(meta.calibrator_kind, meta.calibrator_params, calibrator_tensors)
            )
        except (ValueError, TypeError) as err:
            raise ArtifactError(f"{directory}: probe or calibrator cannot be rebuilt: {err}") from None
        if probe.n_features_in_ != fingerprint.hidden_size:
            raise ArtifactError(
                f"{tensors_path}: probe reads {probe.n_features_in_} features but the model's hidden size is {fingerprint.hidden_size}"
            )
        return cls(probe, calibrator, meta)
