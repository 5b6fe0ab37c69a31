"""scripts/reliability_matrix.py (#21), not run whole by `make test`: its judgement of outcomes, and a slice of
its cases (two `probecal` processes) run for real."""

import importlib.util
import json
import sys

import httpx
import pytest

from tests.paths import ROOT

spec = importlib.util.spec_from_file_location(
    "reliability_matrix", ROOT / "scripts" / "reliability_matrix.py"
)
matrix = importlib.util.module_from_spec(spec)
sys.modules["reliability_matrix"] = matrix  # its dataclasses look their module up there
spec.loader.exec_module(matrix)


def reply(status, body, content_type="application/json"):
    text = body if isinstance(body, str) else json.dumps(body)
    return httpx.Response(status, text=text, headers={"content-type": content_type})


ERROR = {
    "error": {"message": "Invalid value for 'n'", "type": "invalid_request_error", "code": "invalid_value"}
}
UPSTREAM_EVENT = (
    'data: {"error": {"message": "cut", "type": "server_error", "code": "upstream_bad_response"}}\n\n'
)
CONFIDENT = 'data: {"choices": [{"confidence": {"p_correct": 0.5}}]}\n\n'
ANSWER = {"choices": [{"text": "paris", "confidence": {"p_correct": 0.7}}]}


@pytest.mark.parametrize(
    "response, expect, got",
    [
        (reply(400, ERROR), matrix.CLEAR, matrix.CLEAR),
        (reply(404, {"detail": "Not Found"}), matrix.CLEAR, matrix.OWN500),  # not OpenAI's error shape
        (
            reply(500, {"error": {"message": "Internal", "type": "server_error"}}),
            matrix.UPSTREAM,
            matrix.OWN500,
        ),
        (
            reply(502, {**ERROR, "error": {**ERROR["error"], "type": "server_error"}}),
            matrix.UPSTREAM,
            matrix.UPSTREAM,
        ),
        (reply(200, ANSWER), matrix.CLEAR, matrix.ACCEPTED),
        (reply(200, ANSWER), matrix.ANSWERED, matrix.ANSWERED),
        (reply(200, {"choices": [{"text": "paris"}]}), matrix.ANSWERED, matrix.LOST),  # no confidence
        (reply(200, CONFIDENT + "data: [DONE]\n\n", "text/event-stream"), matrix.ANSWERED, matrix.ANSWERED),
        (
            reply(200, 'data: {"choices": []}\n\ndata: [DONE]\n\n', "text/event-stream"),
            matrix.ANSWERED,
            matrix.LOST,
        ),
        (reply(200, CONFIDENT, "text/event-stream"), matrix.ANSWERED, matrix.LOST),  # cut before [DONE]
        (reply(200, CONFIDENT + UPSTREAM_EVENT, "text/event-stream"), matrix.UPSTREAM, matrix.UPSTREAM),
        (reply(200, "Traceback (most recent call last):", "text/plain"), matrix.ANSWERED, matrix.OWN500),
    ],
)
def test_outcomes_are_classified_as_the_issue_defines_them(response, expect, got):
    check = (lambda r: matrix._complete(r.json())) if "json" in response.headers["content-type"] else None
    assert matrix.classify(response, expect, check)[0] == got


def test_a_slice_runs_for_real_and_prints_the_table(tmp_path, capsys, monkeypatch):
    world = matrix.build_world(tmp_path)
    chosen = ("-m probe=logistic,nosuch", "port 70000")
    monkeypatch.setitem(
        matrix.SURFACES, "start_up", lambda w: [c for c in matrix.start_up_cases(w) if c.name in chosen]
    )
    cases = matrix.run_matrix(world, ["start_up"], log=lambda line: None)
    assert [(c.name, c.got) for c in cases] == [(name, matrix.CLEAR) for name in reversed(chosen)]
    table = matrix.table(cases)
    assert "| serve start-up + CLI config | 2 | 0 | 2 | 0 | 0 | 0 | 0 | 0 |" in table
