"""Activation store: safetensors shards + JSON, resumable, memory-mapped reads.

Layout of a store directory:
    settings.json                 written FIRST: format version, settings key, n_rows, settings
    shards/shard-00000.safetensors one tensor per (layer, position) `act.L<layer>.<position>` [rows, hidden]
                                   (float16 or float32), one per baseline `baseline.<name>` [rows] float64;
                                   the rows' JSON records in the header metadata. Written atomically.
    manifest.json                 written LAST (its presence = complete): settings + all records.

`settings` is any JSON dict with at least: fingerprint (ModelFingerprint.to_dict()), layers,
positions, dtype, dataset_hash, shard_size; add prompt/generation settings freely. Its hash
(`store_key`) identifies the store: an interrupted run with the same settings resumes (completed
shards are skipped), a complete one is reused, different settings in the same directory are an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.settings import POSITIONS, STORE_DTYPES
from probecal.files import atomic_write_bytes, atomic_write_text
from probecal.fingerprint import ModelFingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
REQUIRED_SETTINGS = ("fingerprint", "layers", "positions", "dtype", "dataset_hash", "shard_size")


class StoreError(RuntimeError):
    """The store cannot be written or read as asked; the message names the path and what differs."""


@dataclass
class ShardData:
    """What `compute_shard` returns for the rows of one shard.

    activations: `[rows, len(layers), len(positions), hidden]` float32.
    records: one JSON-able dict per row (id, category, question, answers, model answer, label, ...).
    baselines: name -> `[rows]` float (same names in every shard).
    n_tokens: generated tokens, for the progress bar's tokens/s.
    """

    activations: np.ndarray
    records: list[dict[str, Any]]
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
        raise StoreError(f"store positions: unknown {unknown or 'empty list'}; allowed: {', '.join(POSITIONS)}")
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
            header = {"format_version": FORMAT_VERSION, "key": self.key, "n_rows": n_rows, "settings": self.settings}
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
        self, index: int, activations: np.ndarray, records: Sequence[dict[str, Any]], baselines: dict[str, np.ndarray]
    ) -> Path:
        """Write shard `index` atomically. activations `[rows, layers, positions, hidden]`."""
        rows = len(self.shard_rows(index))
        expected = (rows, len(self.layers), len(self.positions), self.hidden)
        if np.shape(activations) != expected:
            raise StoreError(f"shard {index}: activations have shape {np.shape(activations)}, expected {expected} "
                             "[rows, layers, positions, hidden]")
        if len(records) != rows:
            raise StoreError(f"shard {index}: {len(records)} records for {rows} rows")
        tensors = {}
        for li, layer in enumerate(self.layers):
            for pi, position in enumerate(self.positions):
                tensors[_tensor_name(layer, position)] = np.ascontiguousarray(activations[:, li, pi, :], dtype=self.dtype)
        for name, values in baselines.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != (rows,):
                raise StoreError(f"shard {index}: baseline {name!r} has shape {values.shape}, expected ({rows},)")
            tensors[f"baseline.{name}"] = values
        try:
            records_json = json.dumps(list(records))
        except (TypeError, ValueError) as err:
            raise StoreError(f"shard {index}: records are not JSON-serializable: {err}") from None
        from safetensors.numpy import save

        metadata = {"format_version": str(FORMAT_VERSION), "key": self.key, "index": str(index), "rows": str(rows),
                    "records": records_json}
        path = self.shard_path(index)
        atomic_write_bytes(path, save(tensors, metadata=metadata))
        return path

    def finalize(self) -> Path:
        """Check every shard is there, then write manifest.json (the store is complete from then on)."""
        missing = self.missing_shards()
        if missing:
            raise StoreError(f"cannot finalize {self.path}: shards {missing} are missing")
        records: list[dict[str, Any]] = []
        shards, baseline_names = [], None
        for index in range(self.num_shards):
            path = self.shard_path(index)
            meta = _shard_metadata(path)
            records += json.loads(meta["records"])
            names = sorted(k.removeprefix("baseline.") for k in _shard_keys(path) if k.startswith("baseline."))
            if baseline_names is not None and names != baseline_names:
                raise StoreError(f"shard {path} has baselines {names}, other shards have {baseline_names}")
            baseline_names = names
            shards.append({"file": f"{SHARD_DIR}/{path.name}", "rows": len(self.shard_rows(index))})
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


class ActivationStore:
    """Read side of a complete store. `read(layer, position)` -> `[n, hidden]` float32, loading only
    that tensor from each (memory-mapped) shard."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self._baselines: dict[str, np.ndarray] | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.manifest["records"]

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
        from safetensors import safe_open

        parts = []
        for path in self._shard_files():
            with safe_open(str(path), framework="numpy") as fh:
                parts.append(fh.get_tensor(name))
        return np.concatenate(parts)

    def read(self, layer: int, position: str) -> np.ndarray:
        """`[n, hidden]` float32 activations at one capture site."""
        if layer not in self.layers:
            raise StoreError(f"layer {layer} is not in the store at {self.path}; stored layers: {list(self.layers)}")
        if position not in self.positions:
            raise StoreError(f"position {position!r} is not in the store at {self.path}; stored: {list(self.positions)}")
        return self._concat(_tensor_name(layer, position)).astype(np.float32)

    @property
    def baselines(self) -> dict[str, np.ndarray]:
        """name -> `[n]` float64 (see extract.generation.BASELINE_NAMES for directions)."""
        if self._baselines is None:
            self._baselines = {name: self._concat(f"baseline.{name}") for name in self.manifest["baselines"]}
        return self._baselines

    def column(self, name: str) -> np.ndarray:
        """`[n]` array of one record field."""
        missing = [i for i, r in enumerate(self.records) if name not in r]
        if missing:
            known = sorted(self.records[0]) if self.records else []
            raise StoreError(f"record field {name!r} is missing in {len(missing)} rows (e.g. row {missing[0]}); "
                             f"fields: {known}")
        return np.asarray([r[name] for r in self.records])


def open_store(path: str | Path) -> ActivationStore:
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.exists():
        if (path / SETTINGS_FILE).exists():
            done = len(list((path / SHARD_DIR).glob("shard-*.safetensors")))
            raise StoreError(f"the store at {path} is incomplete ({done} shard(s) written, no {MANIFEST_FILE}): "
                             "re-run the extraction to resume it")
        raise StoreError(f"no activation store at {path} (no {MANIFEST_FILE})")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{manifest_file}: format_version {manifest.get('format_version')!r}, "
                         f"this probecal reads {FORMAT_VERSION}")
    return ActivationStore(path, manifest)
