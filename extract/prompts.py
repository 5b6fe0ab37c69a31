"""Turn prompts into token ids: ONE encoder (`encode_prompt`) for training, self-evaluation, serving and the demo.

Three kinds of prompt, told apart by type:
- `Question(text)`: the training prompt format below (what probes are trained on);
- chat messages (`[{"role": "user", "content": ...}, ...]`): the tokenizer's chat template with the
  generation prompt; the template is authoritative for special tokens (it writes BOS where the model
  wants one), so nothing is added -- the same ids `apply_chat_template(tokenize=True)` and chat servers
  (vLLM, TGI) produce;
- raw text (`str`): the tokenizer's own leading special tokens (BOS for Llama/Gemma/Mistral, nothing for
  Qwen/GPT-2) unless the text already starts with them (a rendered chat template that writes `<s>`), and
  never trailing ones (an EOS at the end of a prompt would tell the model the text is over).
Every kind gets its leading special tokens exactly once: never a doubled BOS, never a missing one.

Question format. Chat models: `num_chat_shots` user/assistant turn pairs from `few_shot_examples` (the
user turn as below, the assistant turn the example's short answer; 0 by default: 3 pairs did not make
SmolLM2-135M answer with one phrase, see benchmarks/bench_prompt_length.py), then the user turn of the question:
`chat_template_format` filled with
`instruction` and the question, all wrapped by the chat template (a chat-message prompt, above).
Base models: `num_few_shot` examples from `few_shot_examples` rendered with `few_shot_format`, then the
question with `few_shot_question_format` (a raw-text prompt, above).

Few-shot examples (text or chat turns) are never the question being asked: an example whose
normalized question equals the row's question is skipped and the next example of the pool takes its place.
This is decided per
question (not per data set), so a question always gets the same prompt, in training and at serving time.

Prompt length is bounded by `max_prompt_tokens`: a longer question prompt is an error naming the row id,
or with `truncate=True` the question (never the template) is shortened from the end until it fits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
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
NUM_CHAT_SHOTS = (
    0  # measured (benchmarks/bench_prompt_length.py): 3 turn pairs did not shorten SmolLM2-135M's answers
)


@dataclass
class PromptSpec:
    """How questions are rendered; embedded in the extract group's config as `extract.prompt`."""

    instruction: str = "Answer the question with a short phrase only."
    chat_template_format: str = "{instruction}\n\nQuestion: {question}"
    few_shot_format: str = "Question: {question}\nAnswer: {answer}\n\n"
    few_shot_question_format: str = "Question: {question}\nAnswer:"
    few_shot_examples: list[dict[str, str]] = field(
        default_factory=lambda: [dict(e) for e in DEFAULT_FEW_SHOT_EXAMPLES]
    )
    num_few_shot: int = 4  # base models: examples as "Question: ...\nAnswer: ..." text
    # Chat models: examples as user/assistant turn pairs. Probe artifacts saved before this field existed were
    # trained without chat shots: `saved_prompt_spec` reads a missing value as 0, not as this default.
    num_chat_shots: int = NUM_CHAT_SHOTS
    max_prompt_tokens: int = 256
    truncate: bool = False


def few_shot_for(question: str, spec: PromptSpec, count: int | None = None) -> list[dict[str, str]]:
    """The few-shot examples shown before `question`: the first `count` (default `num_few_shot`) of the
    pool that are not it."""
    key = normalize_question(question)
    for i, example in enumerate(spec.few_shot_examples):
        if not isinstance(example, dict) or not {"question", "answer"} <= set(example):
            raise ValueError(
                f"extract.prompt.few_shot_examples[{i}] needs keys 'question' and 'answer', got {example!r}"
            )
    usable = [e for e in spec.few_shot_examples if normalize_question(e["question"]) != key]
    return usable[: spec.num_few_shot if count is None else count]


def saved_prompt_spec(saved: Mapping[str, Any]) -> PromptSpec:
    """A PromptSpec from settings saved with a probe or store (known fields only). A field missing there
    means the setting did not exist yet: `num_chat_shots` then is 0 (the chat prompt of that time), not
    today's default, so an old probe keeps reading the prompt it was trained on."""
    known = {f.name for f in fields(PromptSpec)}
    return PromptSpec(**{"num_chat_shots": 0, **{k: v for k, v in saved.items() if k in known}})


def _format(template: str, name: str, **values: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"extract.prompt.{name}={template!r} cannot be filled: {err!r}; allowed placeholders: "
            + ", ".join("{" + k + "}" for k in values)
        ) from None


def chat_messages(question: str, spec: PromptSpec) -> list[dict[str, str]]:
    """The chat turns of one question: `num_chat_shots` (user, assistant) pairs from the few-shot pool
    (never the question itself), then the user turn of the question. Every user turn is
    `chat_template_format`, so the question's turn looks exactly like the examples' turns."""
    if spec.num_chat_shots < 0:
        raise ValueError(f"extract.prompt.num_chat_shots={spec.num_chat_shots}; must be >= 0")

    def user(text: str) -> dict[str, str]:
        content = _format(
            spec.chat_template_format, "chat_template_format", instruction=spec.instruction, question=text
        )
        return {"role": "user", "content": content}

    messages: list[dict[str, str]] = []
    for example in few_shot_for(question, spec, spec.num_chat_shots):
        messages += [user(example["question"]), {"role": "assistant", "content": example["answer"]}]
    return messages + [user(question)]


def render_prompt(question: str, tokenizer: Any, uses_chat_template: bool, spec: PromptSpec) -> str:
    """The prompt text for one question, for display and logs. To get ids, use
    `encode_prompt(Question(question), ...)`: re-encoding this text as raw text can add a BOS that the
    chat template left out on purpose."""
    if uses_chat_template:
        return tokenizer.apply_chat_template(
            chat_messages(question, spec), add_generation_prompt=True, tokenize=False
        )
    shots = "".join(
        _format(spec.few_shot_format, "few_shot_format", question=e["question"], answer=e["answer"])
        for e in few_shot_for(question, spec)
    )
    return shots + _format(spec.few_shot_question_format, "few_shot_question_format", question=question)


@dataclass(frozen=True)
class Question:
    """A question to be asked in the training prompt format; `row_id` names it in length errors."""

    text: str
    row_id: str = "question"


ChatMessages = Sequence[Mapping[str, str]]
Prompt = Question | str | ChatMessages


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts BEFORE a text (`[bos]`, or `[]`): checked, not assumed
    (`bos_token` is often set on tokenizers that never add it, e.g. Qwen and GPT-2)."""
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return special[:start]
    return []


def _encode_text(text: str, tokenizer: Any) -> list[int]:
    """Raw text -> ids with the tokenizer's leading special tokens exactly once (none trailing)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prefix = leading_special_ids(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids


def _encode_messages(messages: ChatMessages, tokenizer: Any, uses_chat_template: bool) -> list[int]:
    """Chat messages -> the chat template's ids with the generation prompt (the template writes BOS)."""
    if not uses_chat_template:
        raise ValueError(
            "this model is used without a chat template: send a plain text prompt, not chat messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
            raise ValueError(f"chat message [{i}] needs keys 'role' and 'content', got {message!r}")
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _question_ids(question: str, tokenizer: Any, uses_chat_template: bool, spec: PromptSpec) -> list[int]:
    if uses_chat_template:
        return _encode_messages(chat_messages(question, spec), tokenizer, uses_chat_template)
    return _encode_text(render_prompt(question, tokenizer, uses_chat_template, spec), tokenizer)


def _shorten_question(
    question: str, row_id: str, tokenizer: Any, uses_chat_template: bool, spec: PromptSpec
) -> list[int]:
    """Prompt ids with the question cut from the end until the prompt fits `max_prompt_tokens`."""
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    for keep in range(len(q_ids) - 1, 0, -1):
        shorter = tokenizer.decode(q_ids[:keep], skip_special_tokens=True).strip()
        ids = _question_ids(shorter, tokenizer, uses_chat_template, spec)
        if len(ids) <= spec.max_prompt_tokens:
            return ids
    raise ValueError(
        f"row {row_id!r}: even an empty question leaves no room: the prompt template alone is longer than "
        f"extract.prompt.max_prompt_tokens={spec.max_prompt_tokens}"
    )


def _bounded_question_ids(
    question: Question, tokenizer: Any, uses_chat_template: bool, spec: PromptSpec
) -> tuple[list[int], bool]:
    """(ids within `spec.max_prompt_tokens`, whether the question was shortened to get there)."""
    if spec.max_prompt_tokens < 1:
        raise ValueError(f"extract.prompt.max_prompt_tokens={spec.max_prompt_tokens}; must be >= 1")
    ids = _question_ids(question.text, tokenizer, uses_chat_template, spec)
    if len(ids) <= spec.max_prompt_tokens:
        return ids, False
    if not spec.truncate:
        raise ValueError(
            f"row {question.row_id!r}: prompt is {len(ids)} tokens, more than extract.prompt.max_prompt_tokens="
            f"{spec.max_prompt_tokens}; shorten the question, raise the limit, or set extract.prompt.truncate=true"
        )
    return _shorten_question(question.text, question.row_id, tokenizer, uses_chat_template, spec), True


def encode_prompt(
    prompt: Prompt, tokenizer: Any, uses_chat_template: bool, spec: PromptSpec | None = None
) -> list[int]:
    """Token ids for one prompt, ready for the model (leading special tokens exactly once; no padding).

    prompt: a `Question` (training prompt format of `spec`, bounded by `spec.max_prompt_tokens`), chat
    messages (chat template + generation prompt) or raw text (the tokenizer's BOS unless already there).
    See the module docstring for the rules.
    """
    if isinstance(prompt, Question):
        if spec is None:
            raise ValueError("a Question is formatted with a PromptSpec: pass spec=")
        ids, shortened = _bounded_question_ids(prompt, tokenizer, uses_chat_template, spec)
        if shortened:
            log.warning("truncated the question of row %r to fit max_prompt_tokens", prompt.row_id)
        return ids
    if isinstance(prompt, str):
        return _encode_text(prompt, tokenizer)
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        return _encode_messages(prompt, tokenizer, uses_chat_template)
    raise TypeError(
        f"a prompt is a Question, a str or a non-empty list of chat messages, got {type(prompt).__name__}"
    )


def build_prompt_ids(
    rows: Sequence[Any], tokenizer: Any, uses_chat_template: bool, spec: PromptSpec
) -> list[list[int]]:
    """Token ids per row in the training prompt format: `encode_prompt(Question(row.question, row.id))`.

    rows: QARow-like objects with `id` and `question`. Returns one list of ids per row, each at most
    `spec.max_prompt_tokens` long (or a ValueError naming the first row that is too long, unless
    `spec.truncate`).
    """
    out: list[list[int]] = []
    truncated: list[str] = []
    for row in rows:
        ids, shortened = _bounded_question_ids(
            Question(row.question, row.id), tokenizer, uses_chat_template, spec
        )
        if shortened:
            truncated.append(row.id)
        out.append(ids)
    if truncated:
        log.warning(
            "truncated the question of %d row(s) to fit max_prompt_tokens: %s", len(truncated), truncated[:5]
        )
    return out
