"""Questions with accepted answers: the built-in `facts` set, user JSONL/CSV files, Hugging Face QA sets.

Every source becomes a list of `QARow` (id, category, domain, question, answers = all accepted aliases).
A domain groups related categories (geography: capitals, continents, cities; chemistry: ...) so that
evaluation can hold a whole domain out; a row without one has domain = its category.
Sources (`DataSpec.name`):
- facts: extract/data/facts.jsonl shipped with the package (built by scripts/build_facts.py), followed (with
  `heldout_sets`, the default) by the built-in held-out questions: extract/data/unanswerable.jsonl and
  benign_refusal.jsonl (scripts/build_unanswerable.py; domains in probecal.heldout.NEVER_FIT_DOMAINS: evaluated in
  every run, never fit or calibrated on).
- jsonl: one JSON object per line. `question`, `answers` (a string or a list), optional `id`, `category`,
  `domain` and `metadata`; field names are mappable (`question_field`, ...). Other fields go into metadata.
  A row with `"answerable": false` may have no accepted answers (it is graded only by whether the model refused).
- csv: a header row; `answers` holds aliases joined by `answers_separator` ("|"). Other columns go into metadata.
- triviaqa (rc.nocontext), sciq, nq_open: read with the `datasets` extra from the hub (internet), or
  offline from `path`: a .jsonl/.json export of the data set's rows in its own format (TriviaQA's original
  {"Data": [...]} JSON works too), a .parquet file, or a folder written by `Dataset.save_to_disk`.

Bad input raises `DataError` naming the file, line and field. With `skip_bad_rows=True` bad rows are
skipped instead and the count plus the first few reasons are logged (and returned by `load_rows_report`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.grading import normalize_tokens
from probecal.splits import SPLITS

log = logging.getLogger(__name__)

SOURCES = ("facts", "jsonl", "csv", "triviaqa", "sciq", "nq_open")
FACTS_PATH = Path(__file__).resolve().parent / "data" / "facts.jsonl"
# Loaded after facts (DataSpec.heldout_sets): never fit or calibrated on, evaluated in every run.
HELDOUT_PATHS = tuple(
    Path(__file__).resolve().parent / "data" / f for f in ("unanswerable.jsonl", "benign_refusal.jsonl")
)
DEFAULT_CATEGORY = "default"
# Hub ids and configs, and the split used when `hf_split` is not set (TriviaQA's test answers are hidden).
HF_SOURCES = {
    "triviaqa": ("mandarjoshi/trivia_qa", "rc.nocontext", "validation"),
    "sciq": ("allenai/sciq", None, "test"),
    "nq_open": ("google-research-datasets/nq_open", None, "validation"),
}
MAX_REASONS_SHOWN = 5


class DataError(ValueError):
    """A data file or row is unusable; the message names the file, line and field."""


@dataclass(frozen=True)
class QARow:
    """One question. `answers`: every accepted alias (empty only for an unanswerable row, `answerable` False).
    Equality and hash ignore `metadata`.

    `domain` (keyword-only, so positional construction stays `QARow(id, category, question, answers)`):
    the group of related categories the row belongs to; empty or absent = the row's category.
    """

    id: str
    category: str
    domain: str = field(default="", kw_only=True)
    question: str
    answers: tuple[str, ...]
    metadata: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.domain:
            object.__setattr__(self, "domain", self.category)
        if isinstance(self.answers, str):
            object.__setattr__(self, "answers", (self.answers,))
        elif not isinstance(self.answers, tuple):
            object.__setattr__(self, "answers", tuple(self.answers))

    @property
    def answerable(self) -> bool:
        """False for a row with no accepted answer (graded only by whether the model refused)."""
        return bool(self.answers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "category": self.category,
            "domain": self.domain,
            "question": self.question,
            "answers": list(self.answers),
            "metadata": self.metadata,
        }


@dataclass
class DataSpec:
    """Which questions to use and how to split them. Built by Hydra from the `data` group.

    name: facts | jsonl | csv | triviaqa | sciq | nq_open.
    path: the file for jsonl/csv; for HF sets an optional local file or folder (else the hub is used).
    limit: keep at most this many rows, chosen with `seed`, in proportion to the categories.
    fractions: train / calibration / test shares (sum to 1), assigned per category, by normalized question.
    heldout_sets: facts only: also load the built-in unanswerable and benign-refusal questions (never fit).
    """

    _target_: str = "extract.data.DataSpec"
    name: str = "facts"
    path: str | None = None
    question_field: str = "question"
    answers_field: str = "answers"
    id_field: str = "id"
    category_field: str = "category"
    domain_field: str = "domain"  # a row without one gets domain = its category
    answers_separator: str = "|"  # csv only: how aliases are joined in one cell
    hf_split: str | None = None  # HF sets: which split to read (default per set, see HF_SOURCES)
    limit: int | None = None
    skip_bad_rows: bool = False
    train_fraction: float = 0.6
    calibration_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    heldout_sets: bool = True


@dataclass
class LoadReport:
    """What `load_rows_report` read: the rows and, with skip_bad_rows, the reasons rows were skipped."""

    rows: list[QARow]
    skipped: list[str]
    source: str


# ---------------------------------------------------------------------------------------------- helpers


def normalize_question(text: str) -> str:
    """Key under which two questions count as the same: NFKC, case-folded, words and math symbols only,
    articles dropped ("What is the capital of France?" == "what is capital of france")."""
    tokens = re.findall(r"[^\W_]+|[+\-*/×÷=<>^%]", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(t for t in tokens if t not in {"a", "an", "the"})


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line; a non-UTF-8 line is an error naming its line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the data file: {err.strerror or err}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: not UTF-8 text (byte {err.start}); save the file as UTF-8"
            ) from None


def _as_aliases(value: Any, where: str, field_name: str, separator: str | None = None) -> tuple[str, ...]:
    if isinstance(value, str):
        items = value.split(separator) if separator else [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise DataError(
            f"{where}: field {field_name!r} must be a string or a list of strings, got {type(value).__name__}"
        )
    if not all(isinstance(item, str) for item in items):
        raise DataError(f"{where}: field {field_name!r} must contain only strings")
    aliases = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not aliases:
        raise DataError(f"{where}: field {field_name!r} is empty: a row needs at least one accepted answer")
    if not any(
        normalize_tokens(alias) for alias in aliases
    ):  # the grader could never match it (late failure)
        shown = ", ".join(repr(a[:40]) for a in aliases[:5])
        raise DataError(
            f"{where}: field {field_name!r}: every accepted answer ({shown}) is empty after normalisation "
            "(punctuation only), so no answer can be graded against it"
        )
    return aliases


def _make_row(
    record: dict, where: str, spec: DataSpec, default_id: str, separator: str | None = None
) -> QARow:
    """Validate one record (a dict from JSONL/CSV) into a QARow; `where` is "file:line"."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    question = record.get(spec.question_field)
    if question is None:
        raise DataError(f"{where}: missing field {spec.question_field!r} (the question)")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field {spec.question_field!r} must be a non-empty string")
    answerable = record.get("answerable", True)
    if not isinstance(answerable, bool):
        raise DataError(f"{where}: field 'answerable' must be true or false, got {answerable!r}")
    if not answerable:
        if record.get(spec.answers_field):
            raise DataError(f"{where}: an unanswerable row (answerable: false) must have no accepted answers")
        answers: tuple[str, ...] = ()
    elif spec.answers_field not in record or record[spec.answers_field] is None:
        raise DataError(f"{where}: missing field {spec.answers_field!r} (the accepted answers)")
    else:
        answers = _as_aliases(record[spec.answers_field], where, spec.answers_field, separator)
    row_id = record.get(spec.id_field)
    if row_id is None or row_id == "":
        row_id = default_id
    elif not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise DataError(f"{where}: field {spec.id_field!r} must be a string or an integer")
    category = record.get(spec.category_field) or DEFAULT_CATEGORY
    if not isinstance(category, str):
        raise DataError(f"{where}: field {spec.category_field!r} must be a string")
    domain = record.get(spec.domain_field) or category
    if not isinstance(domain, str):
        raise DataError(f"{where}: field {spec.domain_field!r} must be a string")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise DataError(f"{where}: field 'metadata' must be a JSON object")
    used = {
        spec.question_field,
        spec.answers_field,
        spec.id_field,
        spec.category_field,
        spec.domain_field,
        "metadata",
        "answerable",
    }
    extra = {k: v for k, v in record.items() if k not in used}
    return QARow(
        str(row_id), category.strip(), question.strip(), answers, {**extra, **metadata}, domain=domain.strip()
    )


# ---------------------------------------------------------------------------------------------- readers
# Each reader yields (where, row-or-error) so that skip_bad_rows can collect errors without losing places.

Item = tuple[str, "QARow | DataError"]


def _read_jsonl(path: Path, spec: DataSpec) -> Iterator[Item]:
    for lineno, text in _text_lines(path):
        if not text.strip():
            continue  # blank lines are not rows
        where = f"{path}:{lineno}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            yield where, DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})")
            continue
        try:
            yield where, _make_row(record, where, spec, default_id=f"line{lineno}")
        except DataError as err:
            yield where, err


def _read_csv(path: Path, spec: DataSpec) -> Iterator[Item]:
    text = "\n".join(line for _, line in _text_lines(path))
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        return
    for record in reader:
        where = f"{path}:{reader.line_num}"
        if None in record:
            yield where, DataError(f"{where}: more cells than header columns ({reader.fieldnames})")
            continue
        record = {k: v for k, v in record.items() if v not in (None, "") or k == spec.answers_field}
        try:
            yield where, _make_row(record, where, spec, f"line{reader.line_num}", spec.answers_separator)
        except DataError as err:
            yield where, err


def _hf_records(spec: DataSpec) -> Iterator[tuple[str, dict]]:
    """Raw records of an HF set, as (where, record): from a local export or through `datasets`."""
    hub_id, config, default_split = HF_SOURCES[spec.name]
    split = spec.hf_split or default_split
    path = Path(spec.path).expanduser() if spec.path else None
    if path is not None and path.is_file() and path.suffix in {".jsonl", ".json"}:
        if path.suffix == ".json":
            try:
                data = json.loads("\n".join(t for _, t in _text_lines(path)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
            records = data.get("Data", data.get("data")) if isinstance(data, dict) else data
            if not isinstance(records, list):
                raise DataError(f"{path}: expected a JSON list of rows or an object with a 'Data' list")
            for i, record in enumerate(records):
                yield f"{path}: row {i}", record
            return
        for lineno, text in _text_lines(path):
            if text.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})"
                    ) from None
        return
    if path is not None and not path.exists():
        raise DataError(f"data.path={spec.path!r} does not exist")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data={spec.name} needs the `datasets` extra (pip install 'probecal[datasets]') unless data.path "
            "points at a local .jsonl/.json export of the set"
        ) from None
    if path is not None and path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; available: {', '.join(ds)} (set data.hf_split)")
            ds = ds[split]
        source = str(path)
    elif path is not None:
        ds = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
        source = str(path)
    else:
        ds = datasets.load_dataset(hub_id, config, split=split)
        source = f"{hub_id}[{split}]"
    for i, record in enumerate(ds):
        yield f"{source}: row {i}", record


def _map_hf(name: str, record: Any, where: str, index: int) -> QARow:
    """One raw record of an HF set in its own format -> QARow."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be an object, got {type(record).__name__}")

    def need(key: str, *alts: str) -> Any:
        for k in (key, *alts):
            if k in record and record[k] is not None:
                return record[k]
        raise DataError(f"{where}: missing field {key!r} ({name} format)")

    if name == "triviaqa":
        question = need("question", "Question")
        answer = need("answer", "Answer")
        if not isinstance(answer, dict):
            raise DataError(f"{where}: field 'answer' must be an object with 'aliases' and 'value'")
        aliases = [answer.get("value") or answer.get("Value")] + list(
            answer.get("aliases") or answer.get("Aliases") or []
        )
        answers = _as_aliases([a for a in aliases if a], where, "answer.aliases")
        row_id = str(need("question_id", "QuestionId"))
        metadata = {"source": record.get("question_source", record.get("QuestionSource", ""))}
    elif name == "sciq":
        question = need("question")
        answers = _as_aliases(need("correct_answer"), where, "correct_answer")
        row_id = f"sciq-{index}"
        metadata = {
            "distractors": [record.get(f"distractor{i}") for i in (1, 2, 3) if record.get(f"distractor{i}")]
        }
    elif name == "nq_open":
        question = need("question")
        answers = _as_aliases(need("answer"), where, "answer")
        row_id = f"nq_open-{index}"
        metadata = {}
    else:  # pragma: no cover - guarded by load_rows_report
        raise AssertionError(name)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string")
    question = question.strip()
    if name == "nq_open" and not question.endswith("?"):
        question += "?"  # NQ-Open questions are lower-case search queries without a question mark
    return QARow(row_id, DEFAULT_CATEGORY, question, answers, metadata)


def _read_hf(spec: DataSpec) -> Iterator[Item]:
    for index, (where, record) in enumerate(_hf_records(spec)):
        try:
            yield where, _map_hf(spec.name, record, where, index)
        except DataError as err:
            yield where, err


# ---------------------------------------------------------------------------------------------- public API


def _source_path(spec: DataSpec) -> Path | None:
    if spec.name == "facts":
        return Path(spec.path).expanduser() if spec.path else FACTS_PATH
    if spec.name in {"jsonl", "csv"}:
        if not spec.path:
            raise DataError(f"data={spec.name} needs data.path=<file>")
        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise DataError(f"data.path={spec.path!r} is not a file")
        return path
    return None


def load_rows_report(spec: DataSpec) -> LoadReport:
    """Read, validate and (with `limit`) subsample the rows `spec` names; see the module docstring."""
    if spec.name not in SOURCES:
        raise DataError(f"data.name={spec.name!r}; allowed: {', '.join(SOURCES)}")
    if spec.limit is not None and spec.limit < 1:
        raise DataError(f"data.limit={spec.limit}; must be a positive number of rows or null")
    path = _source_path(spec)
    if spec.name == "facts" and spec.heldout_sets:
        items: Iterable[Item] = (item for p in (path, *HELDOUT_PATHS) for item in _read_jsonl(p, spec))
    elif spec.name in {"facts", "jsonl"}:
        items = _read_jsonl(path, spec)
    elif spec.name == "csv":
        items = _read_csv(path, spec)
    else:
        items = _read_hf(spec)
    source = str(path) if path else spec.name

    rows: list[QARow] = []
    skipped: list[str] = []
    first_seen: dict[str, str] = {}
    for where, item in items:
        if isinstance(item, QARow) and item.id in first_seen:
            item = DataError(
                f"{where}: duplicate id {item.id!r} in field {spec.id_field!r} (first at {first_seen[item.id]})"
            )
        if isinstance(item, DataError):
            if not spec.skip_bad_rows:
                raise item
            skipped.append(str(item))
            continue
        first_seen[item.id] = where
        rows.append(item)
    if not rows:
        detail = f"; {len(skipped)} bad row(s), first: {skipped[0]}" if skipped else ""
        raise DataError(f"{source}: no usable rows (the file is empty){detail}")
    if skipped:
        shown = "\n  ".join(skipped[:MAX_REASONS_SHOWN])
        log.warning(
            "skipped %d bad row(s) of %s (data.skip_bad_rows=true); first reasons:\n  %s",
            len(skipped),
            source,
            shown,
        )
    if spec.limit is not None and spec.limit < len(rows):
        rows = _stratified_subset(rows, spec.limit, spec.seed)
    return LoadReport(rows, skipped, source)


def load_questions(name: str = "facts", **fields: Any) -> list[QARow]:
    """The rows of a data set by name, e.g. `load_questions("facts", limit=200)` or
    `load_questions("jsonl", path="my.jsonl")`; `fields` are `DataSpec` fields."""
    return load_rows(DataSpec(name=name, **fields))


def load_rows(spec: DataSpec) -> list[QARow]:
    """Validated rows with unique ids, in file order (a seeded, category-stratified subset with `limit`)."""
    return load_rows_report(spec).rows


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` into integer parts proportional to `weights` (largest remainder, ties to the first)."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _by_category(rows: Sequence[QARow]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.category, []).append(i)
    return dict(sorted(groups.items()))


def _stratified_subset(rows: list[QARow], limit: int, seed: int) -> list[QARow]:
    by_cat = _by_category(rows)
    counts = _allocate(limit, [len(idx) for idx in by_cat.values()])
    keep: set[int] = set()
    for (category, idx), n in zip(by_cat.items(), counts, strict=True):
        keep.update(random.Random(_stable_seed("limit", seed, category)).sample(idx, n))
    return [row for i, row in enumerate(rows) if i in keep]


def assign_splits(rows: Sequence[QARow], spec: DataSpec) -> list[str]:
    """Per row "train" | "calibration" | "test": seeded and stratified by category.

    Rows are grouped by `normalize_question`; a whole group goes to one split (so the same question never
    lands in two splits), and a group counts under the category of its first row. Within each category
    the groups are ordered by key, shuffled with a seed derived from (seed, category) and cut by the
    fractions, so the result does not depend on the order of the rows.
    """
    fractions = [spec.train_fraction, spec.calibration_fraction, spec.test_fraction]
    if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DataError(
            "data.train_fraction + data.calibration_fraction + data.test_fraction must be >= 0 and sum to 1, "
            f"got {fractions}"
        )
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(normalize_question(row.question), []).append(i)
    by_category: dict[str, list[str]] = {}
    for key, members in groups.items():
        by_category.setdefault(rows[members[0]].category, []).append(key)
    out = [""] * len(rows)
    for category in sorted(by_category):
        keys = sorted(by_category[category])
        random.Random(_stable_seed("split", spec.seed, category)).shuffle(keys)
        counts = _allocate(len(keys), fractions)
        bounds = [0, counts[0], counts[0] + counts[1], len(keys)]
        for split, lo, hi in zip(SPLITS, bounds, bounds[1:], strict=False):
            for key in keys[lo:hi]:
                for i in groups[key]:
                    out[i] = split
    return out


def dataset_hash(rows: Sequence[QARow]) -> str:
    """sha256 over the rows' canonical JSON (id, category, domain, question, answers, metadata), in order.

    A domain equal to the category (the default) is left out of the hash, so a file written before
    domains existed keeps its hash (and its stores stay resumable); any other domain changes it.
    """
    digest = hashlib.sha256()
    for row in rows:
        record = row.to_dict()
        if record["domain"] == record["category"]:
            del record["domain"]
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()
