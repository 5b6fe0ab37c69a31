"""A row whose every accepted answer normalises to nothing (NQ-open dev's `---` and `)`) is refused when the
data is LOADED, naming file:line:field (or skipped and counted), never minutes later by the grader."""

import json

import pytest

from extract.data import DataError, DataSpec, load_rows, load_rows_report


def write_nq(tmp_path):
    rows = [
        {"question": "who wrote hamlet?", "answer": ["William Shakespeare"]},
        {"question": "what symbol separates the sections?", "answer": ["---"]},
        {"question": "what closes a parenthesis?", "answer": [")"]},
        {"question": "what is 12 + 30?", "answer": ["42", "--"]},  # one usable alias: kept
    ]
    path = tmp_path / "NQ-open.dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_answers_empty_after_normalisation_are_refused_at_load_time(tmp_path):
    path = write_nq(tmp_path)
    with pytest.raises(
        DataError, match=r"NQ-open.dev.jsonl:2: field 'answer': every accepted answer \('---'\)"
    ):
        load_rows(DataSpec(name="nq_open", path=path))
    report = load_rows_report(DataSpec(name="nq_open", path=path, skip_bad_rows=True))
    assert [r.answers for r in report.rows] == [("William Shakespeare",), ("42", "--")]
    assert len(report.skipped) == 2 and "NQ-open.dev.jsonl:3: field 'answer'" in report.skipped[1]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text('{"question": "q", "answers": ["?!", "..."]}\n')
    with pytest.raises(DataError, match=r"qa.jsonl:1: field 'answers': every accepted answer"):
        load_rows(DataSpec(name="jsonl", path=str(jsonl)))
