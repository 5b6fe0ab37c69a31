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
