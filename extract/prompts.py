"""Turn questions into model inputs: a chat turn for instruct models, a few-shot prompt for base models.

Chat models: the user turn is `chat_template_format` filled with `instruction` and the question, wrapped
by the tokenizer's chat template with the generation prompt; the template carries BOS (if the model uses
one), so the text is tokenized without adding special tokens again.
Base models: `num_few_shot` examples from `few_shot_examples` rendered with `few_shot_format`, then the
question with `few_shot_question_format`; the tokenizer's BOS is prepended when the tokenizer adds one.

Few-shot examples are never the question being asked: an example whose normalized question equals the
row's question is skipped and the next example of the pool takes its place. This is decided per
question (not per data set), so a question always gets the same prompt, in training and at serving time.

Prompt length is bounded by `max_prompt_tokens`: a longer prompt is an error naming the row id, or with
`truncate=True` the question (never the template) is shortened from the end until it fits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from extract.data import normalize_question

log = logging.getLogger(__name__)

# General-knowledge pairs outside every built-in `facts` category (no capitals, currencies, continents,
# elements or arithmetic). The first `num_few_shot` usable ones are shown; the rest are replacements.
DEFAULT_FEW_SHOT_EXAMPLES: tuple[dict[str, str], ...] = (
    {"question": "How many legs does a spider have?", "answer": "eight"},
    {"question": "Who wrote Romeo and Juliet?", "answer": "William Shakespeare"},
    {"question": "What is the largest ocean on Earth?", "answer": "the Pacific Ocean"},
    {"question": "What color is a ripe banana?", "answer": "yellow"},
    {"question": "Which animal is known as the king of the jungle?", "answer": "the lion"},
    {"question": "What do bees make?", "answer": "honey"},
)


@dataclass
class PromptSpec:
    """How questions are rendered; embedded in the extract group's config as `extract.prompt`."""

    instruction: str = "Answer the question with a short phrase only."
    chat_template_format: str = "{instruction}\n\nQuestion: {question}"
    few_shot_format: str = "Question: {question}\nAnswer: {answer}\n\n"
    few_shot_question_format: str = "Question: {question}\nAnswer:"
    few_shot_examples: list[dict[str, str]] = field(default_factory=lambda: [dict(e) for e in DEFAULT_FEW_SHOT_EXAMPLES])
    num_few_shot: int = 4
    max_prompt_tokens: int = 256
    truncate: bool = False


def few_shot_for(question: str, spec: PromptSpec) -> list[dict[str, str]]:
    """The few-shot examples shown before `question`: the first `num_few_shot` of the pool that are not it."""
    key = normalize_question(question)
    for i, example in enumerate(spec.few_shot_examples):
        if not isinstance(example, dict) or not {"question", "answer"} <= set(example):
            raise ValueError(f"extract.prompt.few_shot_examples[{i}] needs keys 'question' and 'answer', got {example!r}")
    usable = [e for e in spec.few_shot_examples if normalize_question(e["question"]) != key]
    return usable[: spec.num_few_shot]


def _format(template: str, name: str, **values: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"extract.prompt.{name}={template!r} cannot be filled: {err!r}; allowed placeholders: "
            + ", ".join("{" + k + "}" for k in values)
        ) from None


def render_prompt(question: str, tokenizer: Any, uses_chat_template: bool, spec: PromptSpec) -> str:
    """The prompt text for one question (chat template applied; without a BOS the tokenizer adds itself)."""
    if uses_chat_template:
        content = _format(spec.chat_template_format, "chat_template_format", instruction=spec.instruction, question=question)
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    shots = "".join(
        _format(spec.few_shot_format, "few_shot_format", question=e["question"], answer=e["answer"])
        for e in few_shot_for(question, spec)
    )
    return shots + _format(spec.few_shot_question_format, "few_shot_question_format", question=question)


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own special-token handling puts BOS first (checked, not assumed)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos


def _encode(text: str, tokenizer: Any, uses_chat_template: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not uses_chat_template and _tokenizer_adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def _shorten_question(question: str, row_id: str, tokenizer: Any, uses_chat_template: bool, spec: PromptSpec) -> list[int]:
    """Prompt ids with the question cut from the end until the prompt fits `max_prompt_tokens`."""
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    for keep in range(len(q_ids) - 1, 0, -1):
        shorter = tokenizer.decode(q_ids[:keep], skip_special_tokens=True).strip()
        ids = _encode(render_prompt(shorter, tokenizer, uses_chat_template, spec), tokenizer, uses_chat_template)
        if len(ids) <= spec.max_prompt_tokens:
            return ids
    raise ValueError(
        f"row {row_id!r}: even an empty question leaves no room: the prompt template alone is longer than "
        f"extract.prompt.max_prompt_tokens={spec.max_prompt_tokens}"
    )


def build_prompt_ids(rows: Sequence[Any], tokenizer: Any, uses_chat_template: bool, spec: PromptSpec) -> list[list[int]]:
    """Token ids per row, ready for the model (special tokens exactly once; no padding).

    rows: QARow-like objects with `id` and `question`. Returns one list of ids per row, each at most
    `spec.max_prompt_tokens` long (or a ValueError naming the first row that is too long, unless
    `spec.truncate`).
    """
    if spec.max_prompt_tokens < 1:
        raise ValueError(f"extract.prompt.max_prompt_tokens={spec.max_prompt_tokens}; must be >= 1")
    out: list[list[int]] = []
    truncated: list[str] = []
    for row in rows:
        ids = _encode(render_prompt(row.question, tokenizer, uses_chat_template, spec), tokenizer, uses_chat_template)
        if len(ids) > spec.max_prompt_tokens:
            if not spec.truncate:
                raise ValueError(
                    f"row {row.id!r}: prompt is {len(ids)} tokens, more than extract.prompt.max_prompt_tokens="
                    f"{spec.max_prompt_tokens}; shorten the question, raise the limit, or set "
                    "extract.prompt.truncate=true"
                )
            ids = _shorten_question(row.question, row.id, tokenizer, uses_chat_template, spec)
            truncated.append(row.id)
        out.append(ids)
    if truncated:
        log.warning("truncated the question of %d row(s) to fit max_prompt_tokens: %s", len(truncated), truncated[:5])
    return out
