"""Did the model decline to answer? A pattern list over the graded answer (extract.grading.cut_answer's output).

A refusal is its own outcome (RowRecord.refused): never graded as a correct answer, counted apart in the
accuracy table, and the right behaviour on an unanswerable question. It is what the model says about its own
knowledge or willingness, so the patterns look for first-person declines and statements that the asked-about
thing cannot be known:
- declines: "I'm sorry, but", "I cannot / can't / am unable to", "I won't", "as an AI", "I must decline";
- not knowing: "I don't know", "I'm not sure / certain / aware", "I don't have (the) information", "no
  information (is) available";
- the thing does not exist or cannot be known: "there is no (such|known|country|...)", "does not exist", "is
  not a real / recognised ...", "fictional / made-up / hypothetical", "cannot be predicted", "impossible to
  know", "not (yet) known", "has not (yet) been discovered".
Not refusals: an answer that is short or negative ("No.", "No, it is Canberra."), a correction that still
answers ("Paris is the capital of France, not Germany."), a hedge followed by an answer ("I think it is Rome.").
Measured on hand-labelled real answers of SmolLM2-135M-Instruct (477) and Gemma 3 270M base (392, none a refusal)
in tests/unit/extract/data_fixtures/refusals.jsonl (scripts/sample_refusal_answers.py writes them to label).
"""

from __future__ import annotations

import re

# (name, pattern): the name is what `refusal_match` returns, so a report can say which rule fired.
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("sorry", r"\b(?:i'?m|i am) (?:so |very |really )?sorry\b|\bsorry,? (?:but|i)\b|\bi apologi[sz]e\b"),
    (
        "as_an_ai",
        r"\bas an? (?:ai|artificial intelligence|language model|llm|assistant)\b|\bi'?m (?:just )?an ai\b",
    ),
    (
        "cannot",
        r"\bi (?:cannot|can ?not|can'?t|am unable to|'?m unable to|am not able to|'?m not able to|"
        r"won'?t be able to|will not|won'?t|must decline|have to decline|do not feel comfortable)\b",
    ),
    (
        "dont_know",
        r"\bi (?:do not|don'?t|really don'?t) (?:know|have (?:any |the |enough |that )?(?:information|data|"
        r"knowledge|access|details|answer))\b|\bi have no (?:idea|information|knowledge|data)\b",
    ),  # fmt: skip
    ("not_sure", r"\b(?:i'?m|i am) not (?:sure|certain|aware|familiar)\b|^not sure\b|\bno idea\b"),
    (
        "no_information",
        r"\bno (?:information|data|records?|reliable information|details) (?:is |are )?"
        r"(?:available|about|on|regarding|exists?)\b",
    ),  # fmt: skip
    (
        "there_is_no",
        r"\bthere (?:is|are|was) no (?:such|known|country|countries|city|cities|element|elements|capital|"
        r"currency|record|official|way to (?:know|predict|tell)|evidence|information|answer)\b",
    ),
    (
        "does_not_exist",
        r"\b(?:does not|doesn'?t|do not|don'?t|did not|didn'?t) (?:actually |really )?exist\b|"
        r"\bnon-?existent\b|\bno such\b",
    ),  # fmt: skip
    ("not_real", r"\bis not an? (?:real|known|recogni[sz]ed|actual|valid|existing)\b|\bnot a real\b"),
    ("fictional", r"\b(?:fictional|fictitious|imaginary|made[- ]up|hypothetical|invented)\b"),
    (
        "cannot_know",
        r"\b(?:impossible|not possible|too early|difficult|hard) to (?:know|predict|say|determine|tell)\b|"
        r"\bcannot be (?:predicted|known|determined)\b|\bpredict the future\b|"
        r"\b(?:has|have) not (?:yet )?been (?:decided|determined|announced|discovered|named)\b|"
        r"\b(?:is|are) (?:not yet |still )?(?:unknown|not yet known)\b|\bnot known yet\b|"
        r"\bthe answer (?:is|was) not\b|\bis not (?:specified|provided|available)\b",
    ),
)
REFUSAL_PATTERNS = tuple((name, re.compile(pattern)) for name, pattern in _PATTERNS)
PATTERN_NAMES = tuple(name for name, _ in _PATTERNS)


def _canonical(text: str) -> str:
    """Lower case, curly apostrophes straightened, whitespace collapsed."""
    return " ".join((text or "").replace("\u2019", "'").replace("\u2018", "'").casefold().split())


def refusal_match(answer: str) -> str | None:
    """The name of the first refusal pattern found in `answer` (the graded answer), None when it is an answer."""
    text = _canonical(answer)
    for name, pattern in REFUSAL_PATTERNS:
        if pattern.search(text):
            return name
    return None


def is_refusal(answer: str) -> bool:
    """True when the model declines or says it cannot know (see the module docstring); "No." is an answer."""
    return refusal_match(answer) is not None
