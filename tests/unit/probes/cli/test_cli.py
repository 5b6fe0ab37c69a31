import pytest

from probes.cli import main as cli


def test_help_lists_every_stage(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in cli.STAGES)


def test_unknown_stage_is_an_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown stage 'trian'" in capsys.readouterr().err


def test_bad_input_gives_one_clear_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["probecal"])
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["extract", "data=jsonl", f"data.path={missing}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"probecal extract: error: data.path='{missing}' is not a file" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------ issue #12 case 9: one line, exit 2


def run_cli(args, tmp_path, capsys):
    """(exit code, stderr lines) of `probecal ARGS` in this process, whether main returns or exits."""
    try:
        code = cli.main([*args, f"hydra.run.dir={tmp_path / 'run'}"])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "override, line",
    [
        ("train.n_folds=abc", "probecal train: error: train.n_folds=abc: expected integer"),
        (
            "model=nonexistent",
            "probecal train: error: model=nonexistent: no such option; allowed: gemma3_270m, hf, smollm2_135m_instruct",
        ),
        ("foo=1", "probecal train: error: unknown key 'foo'; top-level keys: model, data, extract, probe"),
        (
            "train.nfolds=3",
            "probecal train: error: unknown key 'train.nfolds'; keys of train: n_folds, layers",
        ),
        ("model=[a", "probecal train: error: cannot parse an override (no viable alternative at input '[a'"),
    ],
)
def test_config_mistakes_are_one_line_exit_2(tmp_path, capsys, monkeypatch, override, line):
    monkeypatch.delenv("PROBECAL_DEBUG", raising=False)
    code, lines = run_cli(["train", override], tmp_path, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(line), lines
    assert lines[0].endswith("(PROBECAL_DEBUG=1 shows the traceback)")


def test_port_out_of_range_and_busy_port_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.delenv("PROBECAL_DEBUG", raising=False)
    monkeypatch.setattr(
        "probes.serving.app.build_probed_model", lambda *a: pytest.fail("the model was loaded")
    )
    code, lines = run_cli(["serve", "serve.port=70000"], tmp_path, capsys)
    assert (
        code == 2 and len(lines) == 1 and "serve.port=70000; allowed: an integer in 1..65535" in lines[0]
    ), lines
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, lines = run_cli(["serve", f"serve.port={port}"], tmp_path, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"serve.port={port}: cannot listen on 127.0.0.1:{port} (Address already in use)" in lines[0]


def test_debug_gives_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROBECAL_DEBUG", "1")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(ValueError, match="serve.port=70000"):
        cli.main(["serve", "serve.port=70000", f"hydra.run.dir={tmp_path / 'run'}"])


# ------------------------------------------------------------------ probecal verify


def test_verify_store_and_artifact(tmp_path, capsys):
    import json

    from tests.unit.extract.test_integrity import as_format1, build, shard
    from tests.unit.probes.test_artifact import make_artifact

    build(tmp_path / "store")
    make_artifact().save(tmp_path / "probe")
    assert cli.main(["verify", str(tmp_path / "store"), str(tmp_path / "probe")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"store {tmp_path / 'store'}: intact (3 shards") and "sha256 match" in out[0]
    assert out[1].startswith(f"probe artifact {tmp_path / 'probe'}: intact (digest ")

    content = bytearray(shard(tmp_path / "store", 1).read_bytes())
    content[-2] ^= 0xFF
    shard(tmp_path / "store", 1).write_bytes(bytes(content))
    meta = tmp_path / "probe" / "probe.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "layer": 7}))
    assert cli.main(["verify", str(tmp_path / "store"), str(tmp_path / "probe")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "DAMAGED" in err[0] and "shard-00001.safetensors does not match the sha256" in err[0]
    assert "DAMAGED" in err[1] and "changed after it was saved" in err[1]

    make_artifact().save(tmp_path / "old")
    as_format1(tmp_path / "old")
    assert cli.main(["verify", str(tmp_path / "old")]) == 1
    assert cli.main(["verify", str(tmp_path / "old"), "--rehash"]) == 0
    assert "upgraded to format 2" in capsys.readouterr().out
    assert cli.main(["verify", str(tmp_path / "nothing")]) == 2
    assert cli.main(["verify"]) == 2 and "usage: probecal verify PATH" in capsys.readouterr().err


# ------------------------------------------------------------------ issue #21: multirun and string-typed keys


@pytest.mark.parametrize(
    "sweep, line",
    [
        (
            ["probe=logistic,nosuch"],
            "probe=nosuch: no such option; allowed: hybrid, logistic, mass_mean, mlp",
        ),
        (["-m", "train.n_folds=3,a"], "train.n_folds=a: expected integer"),
        (["--multirun", "probe=logistic,mass_mean", "train.nfolds=range(2,4)"], "unknown key 'train.nfolds'"),
    ],
)
def test_a_bad_sweep_value_is_one_line_exit_2_before_any_job_runs(tmp_path, capsys, monkeypatch, sweep, line):
    monkeypatch.delenv("PROBECAL_DEBUG", raising=False)
    monkeypatch.setattr(cli, "stage_train", lambda cfg: pytest.fail("a job ran"))
    args = sweep if sweep[0].startswith("-") else ["-m", *sweep]
    code, lines = run_cli(["train", *args, f"hydra.sweep.dir={tmp_path / 'multi'}"], tmp_path, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"probecal train: error: {line}"), lines


def test_other_hydra_flags_still_go_to_hydra(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "config_error", lambda overrides: pytest.fail("checked by probecal"))
    monkeypatch.setattr(cli, "sweep_config_error", lambda overrides: pytest.fail("checked by probecal"))
    assert cli.main(["train", "--cfg", "job", "train.n_folds=7"]) == 0
    assert "n_folds: 7" in capsys.readouterr().out


@pytest.mark.parametrize("token", ["1234567890123456", "1e30000000000000", "0000000000000017"])
def test_string_typed_keys_keep_the_text_typed(tmp_path, capsys, monkeypatch, token):
    got = {}
    monkeypatch.setattr("probes.serving.app.build_probed_model", lambda *a: None)
    monkeypatch.setattr("probes.serving.app.serve", lambda settings, model: got.update(settings=settings))
    monkeypatch.setattr(cli, "check_port", lambda host, port: None)
    code, lines = run_cli(["serve", f"serve.admin_token={token}", "serve.model_name=1e3"], tmp_path, capsys)
    assert code == 0 and not lines, lines
    assert got["settings"].admin_token == token and got["settings"].model_name == "1e3"


def test_quoting_leaves_null_quoted_sweeps_and_other_keys_alone():
    assert cli.quote_string_values(
        ["serve.admin_token=null", "serve.admin_token='12'", "data.path=a,b", "train.n_folds=3", "probe=mlp"]
    ) == ["serve.admin_token=null", "serve.admin_token='12'", "data.path=a,b", "train.n_folds=3", "probe=mlp"]
    assert cli.quote_string_values(
        ["+serve.upstream=http://h:1/v1", "serve.abstention_message=I don't know"]
    ) == [
        "+serve.upstream='http://h:1/v1'",
        'serve.abstention_message="I don\'t know"',
    ]
    assert {"serve.admin_token", "serve.upstream", "data.path", "recalibrate.output_dir"} <= cli.string_keys()
