import pytest

from extract.grading import GRADERS, Grade, cut_answer, grade, normalize_answer, token_f1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The U.S.A.!", "usa"),
        ("  An   Apple, the pie ", "apple pie"),
        ("12", "12"),
        ("12.0", "12"),
        ("twelve", "12"),
        ("Twelve.", "12"),
        ("+12", "12"),
        ("1,000", "1000"),
        ("0.50", "0.5"),
        ("-5", "-5"),
        ("forty-two", "42"),
        ("one hundred and five", "105"),
        ("one two", "1 2"),  # two numbers, not their sum
        ("Bogotá", "bogota"),
        ("ＡＢＣ", "abc"),  # NFKC folds full-width letters
        ("Guinea-Bissau", "guinea bissau"),
        ("Côte d'Ivoire", "cote divoire"),
        ("Straße", "strasse"),
        ("Москва", "москва"),  # non-Latin scripts are kept
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("generated", "stops", "expected"),
    [
        (" Paris\nQuestion: What is", ["\n"], "Paris"),
        (" Paris Question: next one", ["\n", "Question:"], "Paris"),
        ("\n\n  Rome.\nmore", ["\n"], "Rome."),  # leading blank lines are skipped, not graded as empty
        ("Berlin\r\nnext", [], "Berlin"),  # a line break always ends the answer
        ("", ["\n"], ""),
        ("no stop here", ["\n"], "no stop here"),
    ],
)
def test_cut_answer(generated, stops, expected):
    assert cut_answer(generated, stops) == expected


def test_exact_and_aliases():
    g = grade("Kiev", ["Kyiv", "Kiev"])
    assert g == Grade(True, "exact", "Kiev", 1.0)
    assert grade("the USA", ["United States", "USA"]).matched == "USA"


@pytest.mark.parametrize(
    ("answer", "correct"),
    [("It is Rome.", True), ("Romeo", False), ("Rome's", False), ("Romesburg", False), ("ROME!", True)],
)
def test_containment_on_word_boundaries(answer, correct):
    assert grade(answer, ["Rome"]).correct is correct


def test_numbers_in_several_forms():
    for answer in ["42", "42.0", "forty-two", "Forty two", "The answer is 42.", "1 + 41 = 42"]:
        assert grade(answer, ["42"]).correct, answer
    assert not grade("420", ["42"]).correct
    assert not grade("4.2", ["42"]).correct


def test_competing_candidate_is_not_a_clean_match():
    wrong = grade("Sydney, not Canberra", ["Canberra"], "What is the capital of Australia?")
    assert not wrong.correct and wrong.rule == "none" and "contrast" in wrong.reason
    assert not grade("Sydney or Canberra", ["Canberra"]).correct
    assert grade("Canberra, not Sydney", ["Canberra"]).correct  # the first-named candidate is gold
    assert grade("Trinidad and Tobago", ["Trinidad and Tobago"]).correct  # "and" is not a contrast word


def test_contrast_rule_also_limits_f1():
    # Without the rule token F1 of "sydney not canberra" vs "canberra" would be exactly 0.5.
    assert not grade("Sydney not Canberra", ["Canberra"], grader="f1", f1_threshold=0.5).correct


def test_alias_with_a_contrast_word_is_found():
    assert grade("I think it is No", ["No"]).correct  # nobelium's symbol contains the word "no"


def test_alias_echoed_from_question_needs_exact_match():
    question = "Which country is Mexico City in?"
    g = grade("The city of Mexico City is in Mexico", ["Mexico"], question)
    assert not g.correct and "question" in g.reason
    assert not grade("Mexico City.", ["Mexico"], question).correct
    assert not grade("Mexico City", ["Mexico"], question, grader="f1").correct
    assert grade("Mexico", ["Mexico"], question).rule == "exact"
    # An alias that is not in the question is found by containment as usual.
    assert (
        grade("It is in Mexico", ["Mexico", "United Mexican States"], "Where is Monterrey?").rule
        == "contains"
    )


@pytest.mark.parametrize("answer", ["", "   ", "...", "the"])
def test_empty_answer_is_wrong(answer):
    g = grade(answer, ["Paris"])
    assert (g.correct, g.rule, g.reason) == (False, "none", "empty answer")


def test_unicode_answers():
    assert grade("Bogota", ["Bogotá"]).correct
    assert grade("São Tomé", ["Sao Tome"]).correct
    assert grade("Это Москва", ["Москва"]).correct
    assert grade("Ｐａｒｉｓ", ["Paris"]).correct


def test_grader_selection():
    assert grade("The capital is Paris", ["Paris"], grader="exact").correct is False
    assert grade("The capital is Paris", ["Paris"], grader="contains").rule == "contains"
    f1 = grade("Paris France", ["Paris"], grader="f1", f1_threshold=0.6)
    assert f1.rule == "f1" and f1.f1 == pytest.approx(2 / 3)
    assert not grade("Paris France", ["Paris"], grader="f1", f1_threshold=0.7).correct
    assert set(GRADERS) == {"exact", "contains", "f1"}


def test_bad_grader_and_answers_are_clear_errors():
    with pytest.raises(ValueError, match="grader='fuzzy'; allowed: exact, contains, f1"):
        grade("x", ["x"], grader="fuzzy")
    with pytest.raises(TypeError, match="sequence of aliases"):
        grade("x", "x")
    with pytest.raises(ValueError, match="no usable alias"):
        grade("x", ["", "..."])


def test_token_f1_hand_computed():
    assert token_f1(["a", "b"], ["b", "c"]) == pytest.approx(0.5)
    assert token_f1([], ["b"]) == 0.0
    assert token_f1(["b", "b"], ["b"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
