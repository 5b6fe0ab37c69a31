"""Compose conf/config.yaml with overrides and build every group, so a broken _target_ fails CI."""

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from probes.cli.config import instantiate_group, register_configs
from tests.paths import CONF


def _compose(overrides):
    register_configs()
    with initialize_config_module(config_module="probecal_conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_option_instantiates(option):
    overrides = [f"model={option}"] + (["model.path=/some/folder"] if option == "hf" else [])
    spec = instantiate_group(_compose(overrides).model)
    assert type(spec).__name__ == "ModelSpec"
    assert spec.name


def test_every_group_with_a_target_instantiates():
    cfg = _compose([])
    built = [
        instantiate_group(node) for node in cfg.values() if hasattr(node, "get") and node.get("_target_")
    ]
    assert built


def test_typo_in_override_is_an_error():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["model.nmae=x"])


def test_override_reaches_object():
    spec = instantiate_group(_compose(["model.dtype=bfloat16", "model.device=cpu"]).model)
    assert (spec.dtype, spec.device) == ("bfloat16", "cpu")


def test_slurm_launcher_config_composes():
    register_configs()
    with initialize_config_module(config_module="probecal_conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.partition=gpu",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.partition, launcher.timeout_min) == (4, "gpu", 240)
