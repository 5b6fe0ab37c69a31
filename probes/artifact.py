"""Probe artifacts: a trained probe + calibrator + thresholds in a directory, never pickled.

    <dir>/probe.safetensors   tensors: "probe.<name>" (weights, scaler) and "calibrator.<name>"
    <dir>/probe.json          ProbeMetadata (format version, kinds, params, layer, position, model
                              fingerprint, data hash, split sizes, metrics, thresholds, library version,
                              optional parent lineage) + "digest": one sha256 over the canonical JSON of
                              that metadata AND the bytes of probe.safetensors (`artifact_digest`).

The digest is required on load: an edited layer or threshold, flipped tensor bytes or a deleted digest are
all refused before anything is used. Both files are written atomically (temp file + rename), tensors
first, so a reader never pairs new JSON with old tensors unnoticed (the digest would not match).

Reading and verifying (`read_artifact`: JSON, digest, fingerprint, tensors) needs numpy + safetensors only;
that is all probes.scorer uses. Rebuilding the scikit-learn estimator objects (`ProbeArtifact.load`,
`.create`) imports probes.estimators / probes.calibration inside those functions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from probecal.files import atomic_write_bytes, atomic_write_text, json_default
from probecal.fingerprint import ModelFingerprint

# 2: one digest over metadata + tensors, required (version 1 hashed the tensors only, optionally).
FORMAT_VERSION = 2
DIGEST_KEY = "digest"
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
    # lineage of a recalibrated artifact: {"digest": <the parent's digest>, "recalibration": {data_hash, ...}}
    parent: dict[str, Any] | None = None
    # the novelty model (probes.novelty): {n_components, quantile, cutoff, layer, position}; its tensors are
    # "novelty.*" in probe.safetensors. None: an artifact without one (novelty unavailable)
    novelty: dict[str, Any] | None = None
    # Platt fit on OUT-of-domain scores (each training domain's calibration rows scored by the probe fit without
    # it) and the empirical-Bayes width of the domains' logit offsets around it: {a, b, tau, n_domains}. The
    # prior for shrinkage recalibration of a domain the probe never saw (recalibrate.prior=cross_domain).
    # None: trained without leave-one-domain-out (train.transfer=false) or before probecal stored it
    cross_domain_calibration: dict[str, Any] | None = None
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
        parent = data.get("parent")
        if parent is not None and not (
            isinstance(parent, dict) and isinstance(parent.get("digest"), str) and len(parent["digest"]) == 64
        ):
            raise ArtifactError(
                f'{source}: parent must be null or {{"digest": <64 hex characters>, ...}}; got {parent!r}'
            )
        return cls(**data)

    def abstention_threshold(self) -> float | None:
        """The threshold stored with the probe (None: no threshold, never abstain). An unreachable target
        has threshold None after `probecal train`; after `probecal recalibrate` it keeps a threshold above
        every p (probes.recalibration.ABSTAIN_ALL: abstain on everything), which is returned too."""
        for entry in self.thresholds:
            if entry.get("threshold") is not None:
                return float(entry["threshold"])
        return None


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


def _canonical_json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), default=json_default).encode("utf-8")


def artifact_digest(document: dict[str, Any], tensor_bytes: bytes) -> str:
    """sha256 over the canonical JSON of the metadata `document` (without the digest itself) and the
    bytes of probe.safetensors: any change to either changes it."""
    digest = hashlib.sha256(b"probecal-artifact\0")
    digest.update(_canonical_json({k: v for k, v in document.items() if k != DIGEST_KEY}))
    digest.update(b"\0")
    digest.update(tensor_bytes)
    return digest.hexdigest()


def _metadata_document(metadata: ProbeMetadata) -> dict[str, Any]:
    """The metadata as the JSON types it is saved as (tuples -> lists, numpy -> Python), so the digest of a
    fresh artifact equals the digest recomputed from its saved file."""
    return json.loads(json.dumps(asdict(metadata), default=json_default))


class ProbeArtifact:
    """A fitted probe (+ optional calibrator) and its metadata.

    predict(X [n, hidden], categories=None) -> (p_correct [n], raw score [n]); higher = more likely correct.
    Without a calibrator, p_correct is the probe's own predict_proba[:, 1].
    """

    def __init__(self, probe, calibrator, metadata: ProbeMetadata, novelty=None, domains=None):
        self.probe = probe
        self.calibrator = calibrator
        self.metadata = metadata
        self.novelty = novelty  # probes.novelty.NoveltyModel | None (its settings are metadata.novelty)
        self.domains = domains  # probes.domains.DomainClusters for requests without a domain tag, or None
        self._digest: str | None = None  # set by save/load; otherwise computed on demand

    @property
    def digest(self) -> str:
        """The artifact's identity: sha256 over its canonical metadata and its tensors (see artifact_digest).
        A recalibrated artifact records its parent's digest in `metadata.parent`."""
        if self._digest is None:
            self._digest = artifact_digest(_metadata_document(self.metadata), self._tensor_bytes())
        return self._digest

    def _tensor_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {f"probe.{k}": np.ascontiguousarray(v) for k, v in self.probe.to_tensors().items()}
        if self.calibrator is not None:
            tensors.update(
                {f"calibrator.{k}": np.ascontiguousarray(v) for k, v in self.calibrator.to_tensors().items()}
            )
        if self.novelty is not None:
            tensors.update(
                {f"novelty.{k}": np.ascontiguousarray(v) for k, v in self.novelty.to_tensors().items()}
            )
        if self.domains is not None:
            tensors.update(
                {f"domains.{k}": np.ascontiguousarray(v) for k, v in self.domains.to_tensors().items()}
            )
        return save(tensors)

    @classmethod
    def create(
        cls,
        probe,
        calibrator,
        layer: int,
        position: str,
        fingerprint: ModelFingerprint,
        novelty=None,
        novelty_layer: int | None = None,
        **metadata: Any,
    ) -> ProbeArtifact:
        """Fill kind, params, versions and the timestamp from the objects; the rest comes from `metadata`.
        novelty: a fitted probes.novelty.NoveltyModel of the prompt_last state at `novelty_layer` (default:
        the probe's layer)."""
        from probes import __version__
        from probes.calibration import calibrator_kind
        from probes.estimators import probe_kind
        from probes.novelty import NOVELTY_POSITION

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
            novelty=None
            if novelty is None
            else {
                **novelty.settings(),
                "layer": int(layer if novelty_layer is None else novelty_layer),
                "position": NOVELTY_POSITION,
            },
            **metadata,
        )
        return cls(probe, calibrator, meta, novelty)

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint.from_dict(self.metadata.model_fingerprint)

    @property
    def thresholds(self) -> list[dict[str, Any]]:
        return self.metadata.thresholds

    def abstention_threshold(self) -> float | None:
        """See ProbeMetadata.abstention_threshold."""
        return self.metadata.abstention_threshold()

    def with_metadata(self, **changes: Any) -> ProbeArtifact:
        """A copy whose metadata has `changes` (e.g. test metrics and thresholds known after fitting)."""
        return ProbeArtifact(
            self.probe, self.calibrator, replace(self.metadata, **changes), self.novelty, self.domains
        )

    def with_domains(self, domains) -> ProbeArtifact:
        """A copy carrying `domains` (probes.domains.DomainClusters, or None): saved with it, digest-covered."""
        return ProbeArtifact(self.probe, self.calibrator, self.metadata, self.novelty, domains)

    def score_novelty(self, prompt_vectors) -> np.ndarray | None:
        """[n, hidden] prompt_last states at `metadata.novelty["layer"]` -> novelty [n] (None: no model)."""
        return None if self.novelty is None else self.novelty.score(prompt_vectors)

    def predict(self, X, categories=None) -> tuple[np.ndarray, np.ndarray]:
        raw = self.probe.decision_function(X)
        if self.calibrator is None:
            return self.probe.predict_proba(X)[:, 1], raw
        return self.calibrator.predict(raw, categories=categories), raw

    # -- saving ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensor_bytes = self._tensor_bytes()
        document = _metadata_document(self.metadata)
        self._digest = artifact_digest(document, tensor_bytes)
        atomic_write_bytes(directory / TENSORS_FILE, tensor_bytes)
        document[DIGEST_KEY] = self._digest
        atomic_write_text(directory / METADATA_FILE, json.dumps(document, indent=1))
        return directory

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls, directory: str | Path, expected_fingerprint: ModelFingerprint | None = None
    ) -> ProbeArtifact:
        """Read and verify (`read_artifact`), then rebuild the scikit-learn probe and calibrator objects."""
        from probes.calibration import CALIBRATOR_KINDS, rebuild_calibrator
        from probes.estimators import PROBES, rebuild_probe

        files = read_artifact(
            directory, expected_fingerprint, probe_kinds=PROBES, calibrator_kinds=CALIBRATOR_KINDS
        )
        meta = files.metadata
        try:
            probe = rebuild_probe(meta.kind, meta.params, files.probe_tensors)
            calibrator = (
                None
                if meta.calibrator_kind is None
                else rebuild_calibrator(
                    meta.calibrator_kind, meta.calibrator_params, files.calibrator_tensors
                )
            )
            novelty = files.novelty_model()
        except (ValueError, TypeError, KeyError) as err:
            raise ArtifactError(f"{files.directory}: probe or calibrator cannot be rebuilt: {err}") from None
        # a hybrid probe reads the hidden state plus a few logit signals; only the hidden part must match
        files.check_hidden_size(getattr(probe, "n_hidden_features", probe.n_features_in_))
        domains = None
        if files.domain_tensors:
            from probes.domains import DomainClusters

            try:
                domains = DomainClusters.from_tensors(files.domain_tensors)
            except ValueError as err:
                raise ArtifactError(f"{files.directory}: domain clusters cannot be rebuilt: {err}") from None
        artifact = cls(probe, calibrator, meta, novelty, domains)
        artifact._digest = files.digest
        return artifact


@dataclass(frozen=True)
class VerifiedArtifact:
    """What `read_artifact` returns: the artifact's files, read and checked, as plain data (no estimator objects)."""

    directory: Path
    metadata: ProbeMetadata
    fingerprint: ModelFingerprint
    digest: str  # verified against the files
    probe_tensors: dict[str, np.ndarray]  # the probe's to_tensors()
    calibrator_tensors: dict[str, np.ndarray]  # the calibrator's to_tensors() ({} without one)
    novelty_tensors: dict[str, np.ndarray] = field(default_factory=dict)  # NoveltyModel.to_tensors() or {}

    def novelty_model(self):
        """The artifact's probes.novelty.NoveltyModel, or None (an artifact saved without one)."""
        from probes.novelty import NoveltyModel

        if self.metadata.novelty is None:
            return None
        return NoveltyModel.from_tensors(self.metadata.novelty, self.novelty_tensors)

    domain_tensors: dict[str, np.ndarray] = field(default_factory=dict)  # probes.domains clusters ({} = none)

    def check_hidden_size(self, n_hidden: int) -> None:
        """Refuse a probe whose hidden-state width is not the model's hidden size."""
        if n_hidden != self.fingerprint.hidden_size:
            raise ArtifactError(
                f"{self.directory / TENSORS_FILE}: probe reads {n_hidden} hidden features but the model's hidden "
                f"size is {self.fingerprint.hidden_size}"
            )


def read_artifact(
    directory: str | Path,
    expected_fingerprint: ModelFingerprint | None = None,
    probe_kinds: Collection[str] | None = None,
    calibrator_kinds: Collection[str] | None = None,
) -> VerifiedArtifact:
    """Read an artifact directory and verify it, with numpy + safetensors only: both files present, JSON,
    format version, the digest over metadata and tensors, the metadata fields, the kinds (when
    `probe_kinds` / `calibrator_kinds` are given: the caller's registry), the model fingerprint (against
    `expected_fingerprint` when given) and the safetensors. Raises ArtifactError saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    directory = Path(directory)
    meta_path, tensors_path = directory / METADATA_FILE, directory / TENSORS_FILE
    for path in (meta_path, tensors_path):
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist: not a probe artifact directory")
    try:
        document = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactError(
            f"{meta_path}: corrupt JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{meta_path}: not UTF-8 text ({err.reason})") from None
    if not isinstance(document, dict):
        raise ArtifactError(f"{meta_path}: expected a JSON object, got {type(document).__name__}")
    version = document.get("format_version")
    if version == 1:
        raise ArtifactError(
            f"{meta_path}: format_version 1 has no digest over metadata and tensors, so edits cannot be detected; "
            f"retrain with `probecal train`, or, if you trust these files, run `probecal verify {directory} --rehash`"
        )
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{meta_path}: format_version {version!r} is not supported by probecal (reads version {FORMAT_VERSION})"
        )
    expected_digest = document.pop(DIGEST_KEY, None)
    if not isinstance(expected_digest, str):
        raise ArtifactError(
            f"{meta_path}: no {DIGEST_KEY!r}: the artifact cannot be checked and is refused; "
            "retrain with `probecal train` or restore the saved probe.json"
        )
    try:
        tensor_bytes = tensors_path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{tensors_path}: cannot be read: {err}") from None
    if artifact_digest(document, tensor_bytes) != expected_digest:
        raise ArtifactError(
            f"probe artifact {directory}: {METADATA_FILE} or {TENSORS_FILE} changed after it was saved (the digest "
            "over metadata and tensors does not match: an edited field such as layer or threshold, or damaged "
            "tensors); retrain with `probecal train` or restore both files from the original run"
        )
    meta = ProbeMetadata.from_dict(document, source=str(meta_path))
    if probe_kinds is not None and meta.kind not in probe_kinds:
        raise ArtifactError(f"{meta_path}: unknown probe kind {meta.kind!r}; known: {', '.join(probe_kinds)}")
    if calibrator_kinds is not None:
        known_calibrators = (*calibrator_kinds, None)
        if meta.calibrator_kind not in known_calibrators:
            raise ArtifactError(
                f"{meta_path}: unknown calibrator kind {meta.calibrator_kind!r}; known: {', '.join(map(str, known_calibrators))}"  # noqa: E501
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
    try:
        tensors = load(tensor_bytes)
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(
            f"{tensors_path}: cannot be read as safetensors (truncated or corrupt?): {err}"
        ) from None
    return VerifiedArtifact(
        directory=directory,
        metadata=meta,
        fingerprint=fingerprint,
        digest=expected_digest,
        probe_tensors={k.removeprefix("probe."): v for k, v in tensors.items() if k.startswith("probe.")},
        calibrator_tensors={
            k.removeprefix("calibrator."): v for k, v in tensors.items() if k.startswith("calibrator.")
        },
        novelty_tensors={
            k.removeprefix("novelty."): v for k, v in tensors.items() if k.startswith("novelty.")
        },
        domain_tensors={
            k.removeprefix("domains."): v for k, v in tensors.items() if k.startswith("domains.")
        },
    )


def rehash_format1(directory: str | Path) -> str:
    """`probecal verify DIR --rehash`: upgrade a format-1 artifact (tensor hash only, optional) to a
    digest over metadata and tensors, trusting its metadata as it is now. The old tensor hash, when
    present, must still match. Returns a line saying what was done; refuses anything but format 1."""
    directory = Path(directory)
    meta_path, tensors_path = directory / METADATA_FILE, directory / TENSORS_FILE
    try:
        document = json.loads(meta_path.read_text(encoding="utf-8"))
        tensor_bytes = tensors_path.read_bytes()
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{directory}: cannot be read for --rehash: {err}") from None
    if not isinstance(document, dict) or document.get("format_version") != 1:
        raise ArtifactError(
            f"{meta_path}: --rehash only upgrades format_version 1 artifacts; this one has "
            f"{document.get('format_version') if isinstance(document, dict) else '?'!r} "
            "(a newer artifact that fails its digest must be retrained or restored, not re-signed)"
        )
    old_hash = document.pop("tensors_sha256", None)
    if old_hash is not None and hashlib.sha256(tensor_bytes).hexdigest() != old_hash:
        raise ArtifactError(
            f"{tensors_path}: does not match the tensors_sha256 recorded in {meta_path}: retrain"
        )
    document["format_version"] = FORMAT_VERSION
    document[DIGEST_KEY] = artifact_digest(document, tensor_bytes)
    atomic_write_text(meta_path, json.dumps(document, indent=1))
    ProbeArtifact.load(directory)  # everything else (kinds, fingerprint, tensors) must hold too
    trusted = (
        "tensors matched their recorded sha256"
        if old_hash
        else "no tensor hash was recorded: files trusted as they are"
    )
    return f"probe artifact {directory}: upgraded to format {FORMAT_VERSION} ({trusted}); digest {document[DIGEST_KEY]}"
