"""Grade a model's short answer against the accepted aliases of a question.

Pipeline: `cut_answer` keeps only the model's own answer (up to the first line break or stop sequence),
`normalize_answer` puts answer and aliases into one canonical form, `grade` applies the selected rule.

Normalisation (`normalize_answer`), applied to answer, aliases and question alike:
- Unicode NFKC, case folding, accents dropped from Latin letters ("Bogotá" == "Bogota");
- numbers canonical: "12", "12.0", "+12" and "twelve" -> "12"; "1,000" -> "1000"; "forty-two" -> "42";
  "-5" keeps its sign;
- SQuAD: punctuation removed (dots and apostrophes inside a word are deleted, so "U.S.A." == "USA";
  other punctuation splits words, so "Guinea-Bissau" == "Guinea Bissau"), articles a/an/the dropped,
  whitespace collapsed.

Graders (`GRADERS`), chosen by `grader=`:
- "exact": the whole normalized answer equals a normalized alias.
- "contains" (default): exact, or an alias occurs in the answer on word boundaries ("Rome" is found in
  "It is Rome." but not in "Romeo").
- "f1": exact, or SQuAD token F1 between answer and an alias >= `f1_threshold`.

Two rules keep labels honest for small models that answer in sentences:
- Echo rule: an alias that already stands in the question earns credit only by an exact match, never by
  containment or F1 alone. "Which country is Mexico City in?" answered "Mexico City." must not be
  credited for containing "Mexico" (CONVENTIONS, Labels). The cost: "The city of Mexico City is in
  Mexico" is not credited either; that answer restates the question and is graded conservatively.
- First-named rule: an answer is judged by what it names first. Containment and F1 look only at the
  part of the answer before the first contrast or alternative word (`CONTRAST_WORDS`: not, no, or, but,
  never, instead, rather, ...). So "Sydney, not Canberra" and "Sydney or Canberra" are wrong for the gold
  Canberra, while "Canberra, not Sydney" is right. An alias that itself contains such a word (a
  title like "War or Peace") is searched in the whole answer. This is deliberately conservative:
  "Not Sydney but Canberra" is graded wrong.

An empty answer (nothing left after cutting and normalizing) is always wrong.
Each `Grade` records the rule that gave credit ("exact" | "contains" | "f1" | "none"), the alias that
matched, the best F1 over the aliases, and for an uncredited answer a short `reason`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

GRADERS = ("exact", "contains", "f1")

ARTICLES = frozenset({"a", "an", "the"})
# Words after which an answer names alternatives or negations ("Sydney, not Canberra"); see docstring.
CONTRAST_WORDS = frozenset(
    {
        "not",
        "no",
        "nor",
        "or",
        "but",
        "never",
        "instead",
        "rather",
        "unlike",
        "except",
        "isnt",
        "wasnt",
        "arent",
    }
)

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}

# A number token: optional sign (only at a word start), digits with optional thousands commas and decimals.
_NUMBER = r"(?:(?<![\w.,])[-+−])?(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?![\w])"
# A word: letters/digits, with dots or apostrophes inside it kept together ("u.s.a", "don't").
_WORD = r"[^\W_]+(?:[.'’][^\W_]+)*"
_TOKEN_RE = re.compile(f"({_NUMBER})|({_WORD})")


def _fold_latin_accents(text: str) -> str:
    """Drop combining marks that follow an ASCII letter ("é" -> "e"); other scripts are left intact."""
    out: list[str] = []
    for ch in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(ch) and out and out[-1].isascii() and out[-1].isalpha():
            continue
        out.append(ch)
    return unicodedata.normalize("NFC", "".join(out))


def _canonical_number(token: str) -> str:
    token = token.replace("−", "-").replace(",", "")
    sign = "-" if token.startswith("-") else ""
    token = token.lstrip("+-")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    token = token.lstrip("0") or "0"
    if token.startswith("."):
        token = "0" + token
    return token if token == "0" else sign + token


def _merge_number_words(tokens: list[str]) -> list[str]:
    """Replace runs of number words by their value: ["forty", "two"] -> ["42"]; "one hundred and five" -> "105".

    A run continues only along valid English number grammar, so "one two" stays two numbers.
    """
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if (
            tokens[i] not in _UNITS
            and tokens[i] not in _TENS
            and tokens[i] != "hundred"
            and tokens[i] not in _SCALES
        ):
            out.append(tokens[i])
            i += 1
            continue
        total, current, last, last_scale = 0, 0, None, None
        j = i
        while j < len(tokens):
            word = tokens[j]
            if (
                word == "and"
                and last in {"hundred", "scale"}
                and j + 1 < len(tokens)
                and (tokens[j + 1] in _UNITS or tokens[j + 1] in _TENS)
            ):
                j += 1
                continue
            if (
                word in _UNITS
                and last in {None, "tens", "hundred", "scale"}
                and not (last == "tens" and _UNITS[word] >= 10)
                and not (last is not None and _UNITS[word] == 0)
            ):
                current += _UNITS[word]
                last = "unit"
            elif word in _TENS and last in {None, "hundred", "scale"}:
                current += _TENS[word]
                last = "tens"
            elif word == "hundred" and last in {None, "unit"} and current < 100:
                current = max(current, 1) * 100
                last = "hundred"
            elif (
                word in _SCALES
                and last in {None, "unit", "tens", "hundred"}
                and (last_scale is None or _SCALES[word] < last_scale)
            ):
                total += max(current, 1) * _SCALES[word]
                current, last, last_scale = 0, "scale", _SCALES[word]
            else:
                break
            j += 1
        out.append(str(total + current))
        i = j
    return out


def normalize_tokens(text: str) -> list[str]:
    """The normalized words of `text` (see module docstring); `normalize_answer` joins them with spaces."""
    text = _fold_latin_accents(unicodedata.normalize("NFKC", text or "").casefold())
    tokens: list[str] = []
    for number, word in _TOKEN_RE.findall(text):
        if number:
            tokens.append(_canonical_number(number))
        else:
            tokens.append(re.sub(r"[.'’]", "", word))
    return [t for t in _merge_number_words(tokens) if t not in ARTICLES]


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation plus numbers and Unicode: "The U.S.A.!" -> "usa", "Twelve" -> "12"."""
    return " ".join(normalize_tokens(text))


def cut_answer(generated: str, stop_sequences: Sequence[str] = ("\n",)) -> str:
    """The graded part of a generation: up to the first line break or stop sequence, stripped.

    Leading blank space (including blank lines) is skipped first: a model that starts its turn with a
    newline has not answered yet. Everything after the cut (e.g. a few-shot model inventing the next
    "Question:") is never graded.
    """
    text = (generated or "").lstrip()
    end = len(text)
    for stop in [*stop_sequences, "\n", "\r"]:
        if stop:
            pos = text.find(stop)
            if pos != -1:
                end = min(end, pos)
    return text[:end].strip()


@dataclass(frozen=True)
class Grade:
    """The verdict on one answer. `rule`: which rule gave credit, "none" when wrong."""

    correct: bool
    rule: str  # "exact" | "contains" | "f1" | "none"
    matched: str | None  # the alias (as given, not normalized) that matched
    f1: float  # best token F1 over the aliases, on the graded part of the answer
    reason: str = ""  # why an answer got no credit (empty answer, echo of the question, ...)


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return n > 0 and any(list(haystack[i : i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def token_f1(prediction: Sequence[str], truth: Sequence[str]) -> float:
    """SQuAD token F1 between two normalized token lists (0.0 when either is empty)."""
    common = Counter(prediction) & Counter(truth)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction), overlap / len(truth)
    return 2 * precision * recall / (precision + recall)


def _first_named_part(tokens: list[str]) -> list[str]:
    for i, tok in enumerate(tokens):
        if tok in CONTRAST_WORDS:
            return tokens[:i]
    return tokens


def grade(
    answer: str,
    answers: Sequence[str],
    question: str = "",
    grader: str = "contains",
    f1_threshold: float = 0.5,
) -> Grade:
    """Grade an already-cut `answer` against the accepted `answers` (aliases); rules in the module docstring."""
    if grader not in GRADERS:
        raise ValueError(f"grader={grader!r}; allowed: {', '.join(GRADERS)}")
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of aliases, not a single string")
    tokens = normalize_tokens(answer)
    if not tokens:
        return Grade(False, "none", None, 0.0, "empty answer")
    question_tokens = normalize_tokens(question)
    head = _first_named_part(tokens)
    aliases = [(alias, normalize_tokens(alias)) for alias in answers]
    aliases = [(alias, toks) for alias, toks in aliases if toks]
    if not aliases:
        raise ValueError("no usable alias: every accepted answer is empty after normalisation")

    for alias, alias_tokens in aliases:
        if tokens == alias_tokens:
            return Grade(True, "exact", alias, 1.0)

    best_f1, best_alias, echoed = 0.0, None, []
    found_after_contrast = False
    for alias, alias_tokens in aliases:
        scope = tokens if CONTRAST_WORDS & set(alias_tokens) else head
        if _contains(question_tokens, alias_tokens):
            echoed.append(alias)
            continue
        f1 = token_f1(scope, alias_tokens)
        if f1 > best_f1:
            best_f1, best_alias = f1, alias
        if grader == "contains":
            if _contains(scope, alias_tokens):
                return Grade(True, "contains", alias, best_f1)
            if _contains(tokens, alias_tokens):
                found_after_contrast = True
    if grader == "f1" and best_f1 >= f1_threshold:
        return Grade(True, "f1", best_alias, best_f1)

    if found_after_contrast:
        reason = "alias only after a contrast word (not/or/but...): the answer names something else first"
    elif echoed and any(_contains(tokens, toks) for alias, toks in aliases if alias in echoed):
        reason = "alias occurs in the question, so containment alone earns no credit"
    else:
        reason = "no alias matched"
    return Grade(False, "none", None, best_f1, reason)
