"""Structured configs: the schema Hydra checks `conf/` and command-line overrides against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from extract.data import DataSpec
from extract.models import ModelSpec
from extract.settings import ExtractSpec


@dataclass
class ProbecalConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    extract: ExtractSpec = field(default_factory=ExtractSpec)
    probe: Any = None
    calibration: Any = None
    serve: Any = None  # probes.server.ServeSettings (conf/serve/)
    seed: int = 0


def register_configs() -> None:
    """Called by the CLI (not at import time) before Hydra composes `conf/config.yaml`."""
    cs = ConfigStore.instance()
    cs.store(name="probecal_schema", node=ProbecalConfig)


def instantiate_group(node: Any) -> Any:
    """Build the object a config group describes, turning Hydra's nested errors into one clear line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        raise ValueError(f"config group with _target_={target} could not be built: {err}") from None
