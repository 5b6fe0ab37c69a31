"""Activation store: safetensors shards + JSON, resumable, memory-mapped reads, checked on open.

Layout of a store directory:
    settings.json                 written FIRST: format version, settings key, n_rows, settings
    shards/shard-00000.safetensors one tensor per (layer, position) `act.L<layer>.<position>` [rows, hidden]
                                   (float16 or float32), one per baseline `baseline.<name>` [rows] float64;
                                   the rows' records (`RowRecord` as JSON) in the header metadata. Written atomically.
    manifest.json                 written LAST (its presence = complete): settings, every shard's file, size
                                   and sha256, and all records.

`settings` is any JSON dict with at least: fingerprint (ModelFingerprint.to_dict()), layers,
positions, dtype, dataset_hash, shard_size; add prompt/generation settings freely. Its hash
(`store_key`) identifies the store: an interrupted run with the same settings resumes (completed
shards are skipped), a complete one is reused, different settings in the same directory are an error.

Integrity: `open_store` checks every shard's presence and size, and (by default) its sha256 against
the manifest, and refuses a damaged store with a `StoreError` naming the files. `extract.runner`
recomputes missing or damaged shards instead of reusing them; `verify_store` is `probecal verify`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from extract.settings import POSITIONS, STORE_DTYPES
from probecal.files import atomic_write_bytes, atomic_write_text, sha256_file
from probecal.fingerprint import ModelFingerprint

log = logging.getLogger(__name__)

# 2: the manifest records every shard's size and sha256 (version 1 had none; see open_store).
FORMAT_VERSION = 2
SETTINGS_FILE = "settings.json"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
REQUIRED_SETTINGS = ("fingerprint", "layers", "positions", "dtype", "dataset_hash", "shard_size")


class StoreError(RuntimeError):
    """The store cannot be written or read as asked; the message names the path and what differs."""


class StoreDamagedError(StoreError):
    """Shards of a complete store are missing or differ from the manifest; `damaged` lists their indices."""

    def __init__(self, message: str, damaged: Sequence[int] = ()):
        super().__init__(message)
        self.damaged = list(damaged)


# ----------------------------------------------------------------------------------------------
# The row record: one fact, one place (written by extract.runner, read by probes and notebooks)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowRecord:
    """What the store knows about one row besides its activations and baselines.

    Fields without a default are required on write. `domain` (a group of related categories) defaults
    to the category, which is what stores written before the field existed get on read; likewise
    `refused` (the model declined, extract.refusal) reads as False from older stores.
    """

    id: str
    category: str
    question: str
    answers: tuple[str, ...]  # every accepted alias
    split: str  # train | calibration | test, as assigned at extraction
    label: int  # 1 = the graded model answer is correct, 0 = wrong
    model_answer: str  # the graded part of the generation (see extract.grading.cut_answer)
    domain: str = ""  # "" -> the category
    grader_rule: str = ""  # exact | contains | f1 | none (the rule that gave credit)
    matched: str | None = None  # the alias that gave credit
    grade_reason: str = ""
    f1: float | None = None  # best token F1 over the aliases
    verbalized_parsed: bool | None = None  # None: the verbalized-confidence baseline was off
    raw_generation: str = ""
    n_answer_tokens: int = 0
    truncated: bool = False  # cut off by max_new_tokens (not the same as a wrong answer)
    empty_answer: bool = False
    answer_in_text: bool = True
    refused: bool = False  # the model declined or said it cannot know (extract.refusal); then label is 0
    answer_reencoded: bool = False  # extract.engine=openai: the engine sent text only; its ids are re-encoded

    def __post_init__(self) -> None:
        if not self.domain:
            object.__setattr__(self, "domain", self.category)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Any, source: str = "record") -> RowRecord:
        """Validate names and types (one clear error naming `source` and the field) and build the record."""
        if isinstance(data, RowRecord):
            return data
        if not isinstance(data, dict):
            raise StoreError(f"{source}: a row record must be a dict or RowRecord, got {type(data).__name__}")
        known = cls.field_names()
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise StoreError(
                f"{source}: unknown record field(s) {unknown}; RowRecord fields: {', '.join(known)}"
            )
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise StoreError(
                f"{source}: missing record field(s) {missing} (required: "
                f"{', '.join(f.name for f in fields(cls) if f.default is MISSING)})"
            )
        values = {}
        for f in fields(cls):
            if f.name in data:
                values[f.name] = _checked_value(data[f.name], str(f.type), f"{source}: field {f.name!r}")
        if values["label"] not in (0, 1):
            raise StoreError(f"{source}: field 'label' = {values['label']!r}; allowed: 0, 1")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (answers as a list)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def _checked_value(value: Any, annotation: str, where: str) -> Any:
    """`value` as the plain Python type `annotation` names (str, int, float, bool, tuple[str, ...], X | None)."""
    if isinstance(value, np.generic):
        value = value.item()
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    for kind in kinds:
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if (
            kind == "tuple[str, ...]"
            and isinstance(value, list | tuple)
            and all(isinstance(v, str) for v in value)
        ):
            return tuple(value)
    raise StoreError(f"{where} = {value!r} ({type(value).__name__}); expected {annotation}")


@dataclass
class ShardData:
    """What `compute_shard` returns for the rows of one shard.

    activations: `[rows, len(layers), len(positions), hidden]` float32.
    records: one `RowRecord` (or a dict of its fields, validated on write) per row.
    baselines: name -> `[rows]` float (same names in every shard).
    n_tokens: generated tokens, for the progress bar's tokens/s.
    """

    activations: np.ndarray
    records: list[RowRecord | dict[str, Any]]
    baselines: dict[str, np.ndarray]
    n_tokens: int = 0


def _canonical(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def store_key(settings: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `settings`; place stores at `<root>/<model>-<key[:12]>`."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()


def store_dir_for(root: str | Path, settings: dict[str, Any]) -> Path:
    name = str(settings["fingerprint"]["name"])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(root) / f"{safe}-{store_key(settings)[:12]}"


def _tensor_name(layer: int, position: str) -> str:
    return f"act.L{layer}.{position}"


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Validate the required keys and return a JSON round-tripped copy (tuples -> lists, etc.)."""
    if not isinstance(settings, dict):
        raise StoreError(f"store settings must be a dict, got {type(settings).__name__}")
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        raise StoreError(f"store settings lack {missing} (required: {', '.join(REQUIRED_SETTINGS)})")
    try:
        settings = json.loads(json.dumps(settings))
    except (TypeError, ValueError) as err:
        raise StoreError(f"store settings are not JSON-serializable: {err}") from None
    if settings["dtype"] not in STORE_DTYPES:
        raise StoreError(f"store dtype={settings['dtype']!r}; allowed: {', '.join(STORE_DTYPES)}")
    if not isinstance(settings["shard_size"], int) or settings["shard_size"] < 1:
        raise StoreError(f"store shard_size={settings['shard_size']!r}: must be a positive integer")
    if not settings["layers"] or not all(isinstance(x, int) for x in settings["layers"]):
        raise StoreError(f"store layers={settings['layers']!r}: must be a non-empty list of integers")
    unknown = [p for p in settings["positions"] if p not in POSITIONS]
    if unknown or not settings["positions"]:
        raise StoreError(
            f"store positions: unknown {unknown or 'empty list'}; allowed: {', '.join(POSITIONS)}"
        )
    try:
        ModelFingerprint.from_dict(settings["fingerprint"])
    except (ValueError, TypeError) as err:
        raise StoreError(f"store settings.fingerprint: {err}") from None
    return settings


def _ensure_writable(path: Path) -> None:
    """Fail before any work when the directory cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise StoreError(f"store directory {path} is not writable: {err}") from None


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: store has {a!r}, run has {b!r}")
    return diffs


class StoreWriter:
    """Writes fixed-size shards of `settings['shard_size']` rows; safe to re-create on a partial store."""

    def __init__(self, path: str | Path, settings: dict[str, Any], n_rows: int):
        self.path = Path(path)
        self.settings = check_settings(settings)
        if not isinstance(n_rows, int) or n_rows < 1:
            raise StoreError(f"n_rows={n_rows!r}: must be a positive integer")
        self.n_rows = n_rows
        self.key = store_key(self.settings)
        self.shard_size = self.settings["shard_size"]
        self.layers = list(self.settings["layers"])
        self.positions = list(self.settings["positions"])
        self.hidden = int(self.settings["fingerprint"]["hidden_size"])
        self.dtype = np.dtype(self.settings["dtype"])
        _ensure_writable(self.path)
        settings_file = self.path / SETTINGS_FILE
        if settings_file.exists():
            self._check_same(json.loads(settings_file.read_text()))
        else:
            header = {
                "format_version": FORMAT_VERSION,
                "key": self.key,
                "n_rows": n_rows,
                "settings": self.settings,
            }
            atomic_write_text(settings_file, json.dumps(header, indent=1))
        (self.path / SHARD_DIR).mkdir(exist_ok=True)

    def _check_same(self, header: dict[str, Any]) -> None:
        if header.get("key") == self.key and header.get("n_rows") == self.n_rows:
            return
        diffs = _differences(header.get("settings", {}), self.settings)
        if header.get("n_rows") != self.n_rows:
            diffs.append(f"n_rows: store has {header.get('n_rows')}, run has {self.n_rows}")
        raise StoreError(
            f"the store at {self.path} was written with other settings ({'; '.join(diffs) or 'format'}). "
            "Use another directory (see store_dir_for) or delete this one."
        )

    @property
    def num_shards(self) -> int:
        return math.ceil(self.n_rows / self.shard_size)

    def shard_rows(self, index: int) -> range:
        if not 0 <= index < self.num_shards:
            raise StoreError(f"shard {index} does not exist: valid shards are 0..{self.num_shards - 1}")
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.n_rows))

    def shard_path(self, index: int) -> Path:
        return self.path / SHARD_DIR / f"shard-{index:05d}.safetensors"

    def shard_done(self, index: int) -> bool:
        path = self.shard_path(index)
        if not path.exists():
            return False
        try:
            meta = _shard_metadata(path)
        except Exception:  # an unreadable file (cannot come from our atomic writes, but disks lie)
            log.warning("shard %s is unreadable: it will be recomputed", path)
            return False
        return meta.get("key") == self.key and int(meta.get("rows", -1)) == len(self.shard_rows(index))

    def missing_shards(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_done(i)]

    def write_shard(
        self,
        index: int,
        activations: np.ndarray,
        records: Sequence[RowRecord | dict[str, Any]],
        baselines: dict[str, np.ndarray],
    ) -> Path:
        """Write shard `index` atomically. activations `[rows, layers, positions, hidden]`."""
        rows = len(self.shard_rows(index))
        expected = (rows, len(self.layers), len(self.positions), self.hidden)
        if np.shape(activations) != expected:
            raise StoreError(
                f"shard {index}: activations have shape {np.shape(activations)}, expected {expected} "
                "[rows, layers, positions, hidden]"
            )
        if len(records) != rows:
            raise StoreError(f"shard {index}: {len(records)} records for {rows} rows")
        first_row = self.shard_rows(index).start
        checked = [
            RowRecord.from_dict(r, f"shard {index}, row {first_row + k}") for k, r in enumerate(records)
        ]
        tensors = {}
        for li, layer in enumerate(self.layers):
            for pi, position in enumerate(self.positions):
                tensors[_tensor_name(layer, position)] = np.ascontiguousarray(
                    activations[:, li, pi, :], dtype=self.dtype
                )
        for name, values in baselines.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != (rows,):
                raise StoreError(
                    f"shard {index}: baseline {name!r} has shape {values.shape}, expected ({rows},)"
                )
            tensors[f"baseline.{name}"] = values
        try:
            records_json = json.dumps([r.to_dict() for r in checked])
        except (TypeError, ValueError) as err:
            raise StoreError(f"shard {index}: records are not JSON-serializable: {err}") from None
        from safetensors.numpy import save

        metadata = {
            "format_version": str(FORMAT_VERSION),
            "key": self.key,
            "index": str(index),
            "rows": str(rows),
            "records": records_json,
        }
        path = self.shard_path(index)
        atomic_write_bytes(path, save(tensors, metadata=metadata))
        return path

    def finalize(self) -> Path:
        """Check every shard is there, then write manifest.json with each shard's size and sha256
        (the store is complete from then on)."""
        missing = self.missing_shards()
        if missing:
            raise StoreError(f"cannot finalize {self.path}: shards {missing} are missing")
        records: list[dict[str, Any]] = []
        shards, baseline_names = [], None
        for index in range(self.num_shards):
            path = self.shard_path(index)
            meta = _shard_metadata(path)
            records += json.loads(meta["records"])
            names = sorted(
                k.removeprefix("baseline.") for k in _shard_keys(path) if k.startswith("baseline.")
            )
            if baseline_names is not None and names != baseline_names:
                raise StoreError(f"shard {path} has baselines {names}, other shards have {baseline_names}")
            baseline_names = names
            shards.append(
                {
                    "file": f"{SHARD_DIR}/{path.name}",
                    "rows": len(self.shard_rows(index)),
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "n_rows": self.n_rows,
            "settings": self.settings,
            "shards": shards,
            "baselines": baseline_names,
            "records": records,
        }
        target = self.path / MANIFEST_FILE
        atomic_write_text(target, json.dumps(manifest))
        return target


def _shard_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return fh.metadata() or {}


def _shard_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return list(fh.keys())


REPAIR_HINT = (
    "re-run `probecal extract` with the same settings: damaged shards are recomputed, the others kept"
)


class ActivationStore:
    """Read side of a complete store. `read(layer, position)` -> `[n, hidden]` float32, loading only
    that tensor from each (memory-mapped) shard. `rows` are the typed records (`RowRecord`)."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        source = path / MANIFEST_FILE
        self.rows: tuple[RowRecord, ...] = tuple(
            RowRecord.from_dict(r, f"{source}: record {i}") for i, r in enumerate(manifest["records"])
        )
        self._records: list[dict[str, Any]] | None = None
        self._baselines: dict[str, np.ndarray] | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def records(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (`RowRecord.to_dict()`, every field present); prefer `rows`."""
        if self._records is None:
            self._records = [r.to_dict() for r in self.rows]
        return self._records

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint.from_dict(self.settings["fingerprint"])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.settings["layers"])

    @property
    def positions(self) -> tuple[str, ...]:
        return tuple(self.settings["positions"])

    @property
    def dtype(self) -> str:
        return self.settings["dtype"]

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def _shard_files(self) -> list[Path]:
        return [self.path / shard["file"] for shard in self.manifest["shards"]]

    def _concat(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError, safe_open

        parts = []
        for path in self._shard_files():
            try:
                with safe_open(str(path), framework="numpy") as fh:
                    parts.append(fh.get_tensor(name))
            except (SafetensorError, OSError, ValueError) as err:  # damaged after open_store checked it
                raise StoreError(f"{path}: cannot read tensor {name!r} ({err}); {REPAIR_HINT}") from None
        return np.concatenate(parts)

    def read(self, layer: int, position: str) -> np.ndarray:
        """`[n, hidden]` float32 activations at one capture site."""
        if layer not in self.layers:
            raise StoreError(
                f"layer {layer} is not in the store at {self.path}; stored layers: {list(self.layers)}"
            )
        if position not in self.positions:
            raise StoreError(
                f"position {position!r} is not in the store at {self.path}; stored: {list(self.positions)}"
            )
        return self._concat(_tensor_name(layer, position)).astype(np.float32)

    @property
    def baselines(self) -> dict[str, np.ndarray]:
        """name -> `[n]` float64 (see extract.generation.BASELINE_NAMES for directions)."""
        if self._baselines is None:
            self._baselines = {name: self._concat(f"baseline.{name}") for name in self.manifest["baselines"]}
        return self._baselines

    def column(self, name: str) -> np.ndarray:
        """`[n]` array of one `RowRecord` field."""
        if name not in RowRecord.field_names():
            raise StoreError(
                f"record field {name!r} does not exist; RowRecord fields: "
                f"{', '.join(RowRecord.field_names())}"
            )
        return np.asarray([getattr(r, name) for r in self.rows])


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the store at `path`, checked for shape; a damaged file is a StoreError naming it."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.exists():
        if (path / SETTINGS_FILE).exists():
            done = len(list((path / SHARD_DIR).glob("shard-*.safetensors")))
            raise StoreError(
                f"the store at {path} is incomplete ({done} shard(s) written, no {MANIFEST_FILE}): "
                "re-run the extraction to resume it"
            )
        raise StoreError(f"no activation store at {path} (no {MANIFEST_FILE})")
    repair = (
        f"delete it and re-run `probecal extract` with the same settings: the manifest is rebuilt from "
        f"the shards in {path / SHARD_DIR} without recomputing them"
    )
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StoreError(
            f"{manifest_file} is damaged (invalid JSON at line {err.lineno}, column {err.colno}: "
            f"{err.msg}); {repair}"
        ) from None
    except UnicodeDecodeError as err:
        raise StoreError(f"{manifest_file} is damaged (not UTF-8: {err.reason}); {repair}") from None
    except OSError as err:
        raise StoreError(f"{manifest_file} cannot be read: {err}") from None
    required = ("format_version", "key", "n_rows", "settings", "shards", "baselines", "records")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        present = sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(
            f"{manifest_file} is damaged (expected the keys {', '.join(required)}; found {present}); {repair}"
        )
    version = manifest["format_version"]
    if version == 1:
        raise StoreError(
            f"{manifest_file}: format_version 1 records no shard checksums; re-run `probecal extract` "
            "with the same settings (the shards are kept, checksums are added), or "
            f"`probecal verify {path} --rehash`"
        )
    if version != FORMAT_VERSION:
        raise StoreError(f"{manifest_file}: format_version {version!r}, this probecal reads {FORMAT_VERSION}")
    if len(manifest["records"]) != manifest["n_rows"]:
        raise StoreError(
            f"{manifest_file} is damaged ({len(manifest['records'])} records for n_rows="
            f"{manifest['n_rows']}); {repair}"
        )
    return manifest


def shard_problems(path: str | Path, manifest: dict[str, Any], hashes: bool = True) -> dict[int, str]:
    """index -> what is wrong, for every shard listed in `manifest` that is missing, of another size or
    (hashes=True) of another sha256 than recorded. Empty: the shards are the ones the manifest describes."""
    path = Path(path)
    problems = {}
    for index, shard in enumerate(manifest["shards"]):
        file = path / shard["file"]
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            problems[index] = f"{shard['file']} is missing"
            continue
        except OSError as err:
            problems[index] = f"{shard['file']} cannot be read ({err})"
            continue
        if size != shard["bytes"]:
            problems[index] = f"{shard['file']} has {size} bytes, the manifest recorded {shard['bytes']}"
        elif hashes and sha256_file(file) != shard["sha256"]:
            problems[index] = (
                f"{shard['file']} does not match the sha256 recorded in the manifest (bytes changed)"
            )
    return problems


def open_store(path: str | Path, verify_hashes: bool = True) -> ActivationStore:
    """Open a complete store after checking each shard's presence and size, and (verify_hashes) sha256.

    Hashing reads every shard once (see benchmarks/bench_store_hash.py for its cost next to one read of
    the store); pass verify_hashes=False only right after a check (e.g. just after writing it).
    """
    path = Path(path)
    manifest = read_manifest(path)
    problems = shard_problems(path, manifest, hashes=verify_hashes)
    if problems:
        raise StoreDamagedError(
            f"the store at {path} is damaged: {'; '.join(problems.values())}; {REPAIR_HINT}", sorted(problems)
        )
    return ActivationStore(path, manifest)


def verify_store(path: str | Path, rehash: bool = False) -> str:
    """`probecal verify` on a store: one line saying it is intact, or a StoreError naming what is not.

    rehash: for a format-1 store (no checksums), check that every shard parses and belongs to the store,
    then record the checksums of the shards as they are now (their content is trusted from then on).
    """
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if rehash:
        try:
            old = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise StoreError(
                f"{manifest_file} cannot be read ({err}); re-run `probecal extract` to rebuild it"
            ) from None
        if isinstance(old, dict) and old.get("format_version") == 1:
            header = json.loads((path / SETTINGS_FILE).read_text(encoding="utf-8"))
            writer = StoreWriter(path, header["settings"], int(header["n_rows"]))
            writer.finalize()  # checks every shard's header, key and row count, hashes each one
            log.info("recorded the shard checksums of %s", path)
    store = open_store(path, verify_hashes=True)
    total = sum(shard["bytes"] for shard in store.manifest["shards"])
    return (
        f"store {path}: intact ({len(store.manifest['shards'])} shards, {total / 1e6:.1f} MB, {len(store)} rows, "
        "sizes and sha256 match the manifest)"
    )
