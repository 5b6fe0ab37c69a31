"""`ModelFingerprint`: which model a store or probe belongs to (torch-free, shared by extract and probes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelFingerprint:
    """Identifies the model a store or probe belongs to. `num_layers` counts decoder blocks;
    captured layers run 0..num_layers (0 = embeddings)."""

    name: str
    source_hash: str
    architecture: str
    hidden_size: int
    num_layers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"model fingerprint lacks field(s) {sorted(missing)}")
        return cls(**{k: data[k] for k in names})

    def differences(self, other: ModelFingerprint, keys=("name", "hidden_size", "num_layers")) -> list[str]:
        return [
            f"{k}: expected {getattr(self, k)!r}, got {getattr(other, k)!r}"
            for k in keys
            if getattr(self, k) != getattr(other, k)
        ]

    def check_matches(self, other: ModelFingerprint, what: str = "artifact") -> None:
        diffs = self.differences(other)
        if diffs:
            raise ValueError(f"{what} was made for another model: " + "; ".join(diffs))
