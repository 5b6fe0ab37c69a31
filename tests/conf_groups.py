"""A config group's node as the CLI composes it (schema defaults + the option's YAML), for tests that build
one group's object. Loading conf/<group>/<option>.yaml alone misses the schema it extends."""

from hydra import compose, initialize_config_module

from probes.cli.config import register_configs


def group_node(group: str, option: str, *overrides: str):
    """cfg[group] of conf/config.yaml composed with `group=option` and `overrides`."""
    register_configs()
    with initialize_config_module(config_module="probecal_conf", version_base="1.3"):
        return compose(config_name="config", overrides=[f"{group}={option}", *overrides])[group]
