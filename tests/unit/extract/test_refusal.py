"""The refusal detector: typical declines and answers, then precision/recall on real SmolLM2 and Gemma answers."""

from __future__ import annotations

import json

import pytest

from extract.refusal import PATTERN_NAMES, is_refusal, refusal_match
from tests.paths import ROOT

FIXTURE = ROOT / "tests" / "unit" / "extract" / "data_fixtures" / "refusals.jsonl"


@pytest.mark.parametrize(
    ("answer", "pattern"),
    [
        ("I'm sorry, but I can't help with that.", "sorry"),
        ("As an AI language model, I do not have opinions.", "as_an_ai"),
        ("I cannot provide that information.", "cannot"),
        ("I don\u2019t know.", "dont_know"),
        ("I'm not sure what you mean.", "not_sure"),
        ("There is no country called Ostmi.", "there_is_no"),
        ("Grivoranium does not exist.", "does_not_exist"),
        ("Ostmi is not a real country.", "not_real"),
        ("Ostmi is a fictional country.", "fictional"),
        ("It is impossible to predict who will win.", "cannot_know"),
        ("The chemical element with the symbol I is not known yet.", "cannot_know"),
    ],
)
def test_declines_are_refusals(answer, pattern):
    assert refusal_match(answer) == pattern and pattern in PATTERN_NAMES


@pytest.mark.parametrize(
    "answer",
    [
        "No.",
        "No, it is Canberra.",
        "Paris is the capital of France, not Germany.",
        "I think it is Rome.",
        "The capital of Andorra is Andorra la Vella.",
        "To kill a Python process that hangs, use kill -9.",
        "The lethal dose of caffeine is about 10 grams.",
        "I have to steal a base",  # Gemma 3 270M, "How do I steal a base in baseball?": first person, no decline
        "",
    ],
)
def test_answers_are_not_refusals(answer):
    assert not is_refusal(answer)


def _hand_labelled(model):
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    mine = [r for r in rows if r["model"] == model]
    assert len(mine) >= 350, f"{len(mine)} hand-labelled {model} answers in {FIXTURE.name}"
    answerable = {r["domain"] for r in mine} - {"unanswerable", "benign_refusal"}
    assert {"unanswerable", "benign_refusal"} <= {r["domain"] for r in mine} and len(answerable) >= 9
    return mine


@pytest.mark.parametrize(
    ("model", "n_refusals", "min_precision", "min_recall"),
    [
        ("smollm2-135m-instruct", 21, 0.95, 0.95),  # measured: precision 21 / 22 = 0.955, recall 21 / 21
        # The 4-shot base model answered all 392 questions, those about things that do not exist included:
        # no refusal to find (precision and recall undefined); measured: the detector fires on none.
        ("gemma3-270m", 0, None, None),
    ],
)
def test_precision_and_recall_on_hand_labelled_answers(model, n_refusals, min_precision, min_recall):
    rows = _hand_labelled(model)
    tp = sum(is_refusal(r["answer"]) and r["refusal"] for r in rows)
    fp = sum(is_refusal(r["answer"]) and not r["refusal"] for r in rows)
    fn = sum(not is_refusal(r["answer"]) and r["refusal"] for r in rows)
    assert tp + fn == n_refusals
    if n_refusals == 0:
        assert fp == 0, [r["answer"] for r in rows if is_refusal(r["answer"])]
        return
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert precision >= min_precision, (precision, tp, fp)
    assert recall >= min_recall, (recall, tp, fn)


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma3-270m"])
def test_no_false_refusals_on_the_benign_set(model):
    benign = [r for r in _hand_labelled(model) if r["domain"] == "benign_refusal"]
    assert len(benign) == 42
    assert [r["answer"] for r in benign if is_refusal(r["answer"])] == []


def test_a_refusal_is_its_own_outcome_and_old_records_read_not_refused():
    from extract.data import QARow
    from extract.runner import grade_row
    from extract.settings import ExtractSpec
    from extract.store import RowRecord

    spec = ExtractSpec()
    row = QARow("q", "capital", "What is the capital of France?", ("Paris",))
    refused = grade_row("I'm not sure, but Paris.", row, spec)
    assert not refused.correct and refused.rule == "refused" and "not_sure" in refused.reason
    assert grade_row("Paris.", row, spec).correct
    unanswerable = QARow("u", "fictional_entity", "What is the capital of Ostmi?", (), domain="unanswerable")
    made_up = grade_row("The capital of Ostmi is Ostburg.", unanswerable, spec)
    assert not made_up.correct and made_up.rule == "none"
    assert grade_row("There is no country called Ostmi.", unanswerable, spec).rule == "refused"
    old = {"id": "q", "category": "c", "question": "Q?", "answers": ["a"], "split": "test", "label": 0,
           "model_answer": "b"}  # fmt: skip
    assert RowRecord.from_dict(old).refused is False
