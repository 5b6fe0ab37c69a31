"""Compose conf/config.yaml with overrides and build every group, so a broken _target_ fails CI; the group
schemas reject typos; deprecated spellings still work (and say so); every experiment composes."""

import inspect
import json
import logging
from dataclasses import MISSING, fields

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from probes.artifact import ProbeArtifact
from probes.calibration import PerCategoryCalibrator, PlattCalibrator, TemperatureCalibrator
from probes.cli import main as cli
from probes.cli.config import GROUP_SCHEMAS, ServeSchema, instantiate_group, register_configs
from probes.estimators import HybridProbe, LogisticProbe, MassMeanProbe, MLPProbe
from probes.serving.settings import ServeSettings
from tests.paths import CONF
from tests.unit.probes.test_recalibration import new_domain, parent_artifact


def _compose(overrides):
    register_configs()
    with initialize_config_module(config_module="probecal_conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("option", _options("model"))
def test_every_model_option_instantiates(option):
    overrides = [f"model={option}"] + (["model.path=/some/folder"] if option == "hf" else [])
    spec = instantiate_group(_compose(overrides).model)
    assert type(spec).__name__ == "ModelSpec"
    assert spec.name


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in ("data", "extract", "probe", "calibration", "serve") for o in _options(g)],
)
def test_every_group_option_instantiates(group, option):
    built = instantiate_group(_compose([f"{group}={option}"])[group])
    expected = {
        "probe": {
            "logistic": LogisticProbe,
            "hybrid": HybridProbe,
            "mass_mean": MassMeanProbe,
            "mlp": MLPProbe,
        },
        "calibration": {"platt": PlattCalibrator, "temperature": TemperatureCalibrator},
    }.get(group, {})
    if option in expected:
        assert type(built) is expected[option]
    assert type(built).__name__ not in ("dict", "DictConfig")


def test_every_group_with_a_target_instantiates():
    cfg = _compose([])
    built = [
        instantiate_group(node) for node in cfg.values() if hasattr(node, "get") and node.get("_target_")
    ]
    assert len(built) == 6  # model, data, extract, probe, calibration, serve
    assert isinstance(instantiate_group(cfg.serve), ServeSettings)


def test_typo_in_override_is_an_error():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["model.nmae=x"])


def test_override_reaches_object():
    spec = instantiate_group(_compose(["model.dtype=bfloat16", "model.device=cpu"]).model)
    assert (spec.dtype, spec.device) == ("bfloat16", "cpu")


# ------------------------------------------------------------------ typed group schemas


@pytest.mark.parametrize("group, options", GROUP_SCHEMAS.items())
def test_schema_defaults_are_the_estimators_defaults(group, options):
    """One fact, one place: a schema that drifted from its class's __init__ would change what an unset key means."""
    for option, schema in options.items():
        target = instantiate_group(OmegaConf.structured(schema))
        params = {
            name: p
            for name, p in inspect.signature(type(target).__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        names = [f.name for f in fields(schema) if f.name != "_target_"]
        assert sorted(names) == sorted(params), option
        for f in fields(schema):
            if f.name == "_target_":
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            expected = params[f.name].default
            assert default == (list(expected) if isinstance(expected, tuple) else expected), (option, f.name)


def test_serve_schema_is_serve_settings_plus_its_target():
    assert [f.name for f in fields(ServeSchema)] == [f.name for f in fields(ServeSettings)] + ["_target_"]
    settings = instantiate_group(_compose(["serve.port=8123", "serve.upstream=http://h:1/v1"]).serve)
    assert type(settings) is ServeSettings and (settings.port, settings.upstream) == (8123, "http://h:1/v1")


def test_yaml_options_list_only_what_differs_from_their_schema():
    register_configs()
    for group, options in GROUP_SCHEMAS.items():
        for option, schema in options.items():
            text = (CONF / group / f"{option}.yaml").read_text()
            assert f"/schema/{group}/{option}@_here_" in text
            defaults = OmegaConf.structured(schema)
            body = OmegaConf.create(text)
            for key, value in body.items():
                if key != "defaults":
                    assert defaults[key] != value, f"{group}/{option}.yaml repeats {key}={value!r}"


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        (["probe.Cc=1"], "probe.Cc", "keys of probe: _target_, C, Cs, cv"),
        (["probe=mass_mean", "probe.C=1"], "probe.C", "keys of probe: _target_, covariance, shrinkage"),
        (
            ["calibration=per_domain", "calibration.bas=isotonic"],
            "calibration.bas",
            "_target_, base, min_count",
        ),
        (["calibration.base=isotonic"], "calibration.base", "keys of calibration: _target_"),
        (["serve.prot=80"], "serve.prot", "keys of serve: host, port, probe_dir"),
    ],
)
def test_typo_in_a_group_key_is_one_line_naming_the_allowed_keys(overrides, key, allowed):
    register_configs()
    line = cli.config_error(overrides)
    assert line.startswith(f"unknown key {key!r}; ") and allowed in line, line


def test_wrong_type_in_a_group_key_is_an_error():
    register_configs()
    assert cli.config_error(["probe.C=abc"]) == "probe.C=abc: expected float"
    assert cli.config_error(["serve.port=x"]) == "serve.port=x: expected integer"


def test_an_added_key_is_refused_when_the_group_is_built():
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) Cc for probes.estimators.LogisticProbe; allowed: C, Cs"
    ):
        instantiate_group(_compose(["+probe.Cc=1"]).probe)


# ------------------------------------------------------------------ deprecated spellings


def test_per_category_is_an_alias_of_per_domain(caplog):
    from probes.cli.config import warn_deprecated_choices

    old, new = (
        _compose([f"calibration={name}", "calibration.min_count=5"])
        for name in ("per_category", "per_domain")
    )
    assert OmegaConf.to_container(old.calibration) == OmegaConf.to_container(new.calibration)
    calibrator = instantiate_group(old.calibration)
    assert type(calibrator) is PerCategoryCalibrator and calibrator.min_count == 5
    with caplog.at_level(logging.WARNING):
        warn_deprecated_choices({"calibration": "per_category"})
        warn_deprecated_choices({"calibration": "per_domain"})
    assert [r.getMessage() for r in caplog.records] == [
        "calibration=per_category is deprecated; use calibration=per_domain (same calibrator)"
    ]


def test_per_domain_artifact_keeps_the_kind_old_artifacts_carry(tmp_path):
    """calibration=per_domain saves calibrator_kind "per_category", so artifacts saved before the rename load."""
    s, y, _ = new_domain(200, seed=3)
    domains = np.where(np.arange(200) % 2 == 0, "a", "b")
    calibrator = instantiate_group(_compose(["calibration=per_domain"]).calibration).fit(
        s, y, categories=domains
    )
    path = parent_artifact(calibrator).save(tmp_path / "probe")
    assert json.loads((path / "probe.json").read_text())["calibrator_kind"] == "per_category"
    loaded = ProbeArtifact.load(path)
    assert sorted(loaded.calibrator.per_category_) == ["a", "b"]
    np.testing.assert_allclose(loaded.calibrator.predict(s, domains), calibrator.predict(s, domains))


# ------------------------------------------------------------------ recalibrate.probe_dir


def _recalibrate(tmp_path, *overrides):
    s, y, _ = new_domain(200, seed=16)
    domains = np.where(np.arange(200) % 2 == 0, "a", "b")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"id": i, "score": s[i], "correct": int(y[i]), "domain": domains[i]}) + "\n"
            for i in range(200)
        )
    )
    run = tmp_path / "run"
    cli.main(
        [
            "recalibrate",
            f"recalibrate.rows={rows}",
            f"hydra.run.dir={run}",
            "train.n_bootstrap=50",
            *overrides,
        ]
    )
    return json.loads((run / "recalibration.json").read_text())


def test_recalibrate_reads_its_parent_from_recalibrate_probe_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["probecal"])
    parent = parent_artifact().save(tmp_path / "parent")
    decoy = tmp_path / "not_a_probe"
    report = _recalibrate(tmp_path, f"recalibrate.probe_dir={parent}", f"evaluate.probe_dir={decoy}")
    assert report["parent"] == str(parent) and report["spec"]["probe_dir"] == str(parent)
    assert report["accepted"] and report["record"]["n_rows"] == 200
    assert "deprecated" not in capsys.readouterr().out


def test_recalibrate_falls_back_to_evaluate_probe_dir_with_a_warning(tmp_path, monkeypatch, capsys):
    """Hydra's job logging prints warnings on stdout (it replaces pytest's log capture during the run)."""
    monkeypatch.setattr("sys.argv", ["probecal"])
    parent = parent_artifact().save(tmp_path / "parent")
    report = _recalibrate(tmp_path, f"evaluate.probe_dir={parent}", "recalibrate.kind=per_category")
    assert report["parent"] == str(parent) and report["spec"]["kind"] == "per_domain"
    assert report["record"]["kind"] == "per_domain"
    out = capsys.readouterr().out
    assert (
        "[WARNING] - evaluate.probe_dir as the parent of probecal recalibrate is deprecated; "
        f"use recalibrate.probe_dir={parent}"
    ) in out
    assert (
        "recalibrate.kind=per_category is deprecated; use recalibrate.kind=per_domain (same calibrator)"
        in out
    )


def test_recalibrate_without_a_parent_names_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["probecal"])
    monkeypatch.delenv("PROBECAL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["recalibrate", f"hydra.run.dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    assert "needs recalibrate.probe_dir=<run dir>/probe" in capsys.readouterr().err


# ------------------------------------------------------------------ experiments


@pytest.mark.parametrize("name", _options("experiment"))
def test_every_experiment_composes_and_builds(name):
    cfg = _compose([f"+experiment={name}"])
    assert cfg.probe and cfg.calibration
    for group in ("model", "data", "extract", "probe", "calibration", "serve"):
        instantiate_group(cfg[group])
    assert "# @package _global_" in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()[0]


def test_experiments_hold_the_readme_runs():
    assert {"default_smollm2", "gemma3_270m"} <= set(_options("experiment"))
    default = _compose(["+experiment=default_smollm2"])
    plain = _compose([])
    assert OmegaConf.to_container(default, resolve=True) == OmegaConf.to_container(plain, resolve=True)
    gemma = _compose(["+experiment=gemma3_270m", "train.select=cv"])
    assert (gemma.model.name, gemma.data.name, gemma.train.select) == ("gemma3-270m", "facts", "cv")


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
