"""`probecal recalibrate ... recalibrate.reload=URL`: the accepted child artifact is announced to the server
with POST /admin/reload (absolute probe_dir, bearer token when given); a refused one is never announced; a
server error is reported with its message."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from probes.artifact import ProbeArtifact
from probes.recalibration import request_reload
from tests.unit.probes.test_recalibration import parent_artifact, platt
from tests.unit.probes.test_recalibration_shrinkage import domains_rows


@pytest.fixture()
def server():
    """A stand-in for `probecal serve`'s /admin/reload that records what it was sent."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((self.path, body, self.headers.get("Authorization")))
            ok = (
                ProbeArtifact.load(body["probe_dir"]) is not None if "bad" not in body["probe_dir"] else False
            )
            status, answer = (
                (200, {"object": "reload", "current": {"digest": "d1"}}) if ok else (400, {"error": "x"})
            )
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", calls
    httpd.shutdown()
    thread.join()


def write_rows(path, n_per_domain, seed):
    s, y, d = domains_rows(n_per_domain, seed=seed)
    path.write_text(
        "".join(
            json.dumps({"id": i, "score": s[i], "correct": int(y[i]), "domain": str(d[i])}) + "\n"
            for i in range(len(s))
        )
    )
    return path


def test_accepted_artifact_is_reloaded_refused_one_is_not(server, tmp_path, monkeypatch, capsys):
    from probes.cli import main as cli

    url, calls = server
    monkeypatch.setattr("sys.argv", ["probecal"])
    parent_dir = parent_artifact(platt(0.8, -0.6)).save(tmp_path / "parent")
    rows = write_rows(tmp_path / "rows.jsonl", 20, seed=8)
    args = [
        "recalibrate",
        f"evaluate.probe_dir={parent_dir}",
        f"recalibrate.rows={rows}",
        "recalibrate.kind=shrinkage",
        f"recalibrate.reload={url}",
        "recalibrate.admin_token=sekret",
        "train.n_bootstrap=50",
    ]
    cli.main([*args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert calls == [
        ("/admin/reload", {"probe_dir": str((tmp_path / "run" / "probe").resolve())}, "Bearer sekret")
    ]
    assert f"{url} now serves d1" in capsys.readouterr().out
    # a worse artifact (a wide prior chasing noise on a calibrated parent) is refused: no reload is requested
    from tests.unit.probes.test_recalibration_shrinkage import domains_rows as rows_of

    s, y, d = rows_of(6, seed=7, shifts={f"d{k}": 0.0 for k in range(40)})
    noisy = tmp_path / "noisy.jsonl"
    noisy.write_text(
        "".join(
            json.dumps({"id": i, "score": s[i], "correct": int(y[i]), "domain": d[i]}) + "\n"
            for i in range(len(s))
        )
    )
    with pytest.raises(SystemExit):
        cli.main(
            [
                *args[:2],
                f"recalibrate.rows={noisy}",
                *args[3:],
                "recalibrate.tau=50",
                f"hydra.run.dir={tmp_path / 'r2'}",
            ]
        )
    assert len(calls) == 1 and "no artifact written" in capsys.readouterr().err


def test_request_reload_reports_server_errors(server, tmp_path):
    url, _ = server
    with pytest.raises(ValueError, match="answered 400"):
        request_reload(url, tmp_path / "bad")
    with pytest.raises(ValueError, match="must be the server's base URL"):
        request_reload("127.0.0.1:8000", tmp_path)
    with pytest.raises(ValueError, match="cannot reach the server"):
        request_reload("http://127.0.0.1:9", tmp_path, timeout=2)
