"""Optional self-evaluation baselines (off by default; `extract.p_true` / `extract.verbalized`).

Each needs one more model call per question, after the answers exist:
- P(True) (Kadavath et al., 2022): the model sees the question and its own answer and is asked
  whether the answer is true; the score is P(True) / (P(True) + P(False)) of the next token
  (higher = the model believes it is correct). One forward pass per batch, no generation.
- Verbalized confidence: the model is asked for a 0-100 % confidence and its reply is parsed
  (`parse_confidence`); replies without a usable number are NaN and counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from extract.prompts import encode_prompt
from extract.tokens import left_pad, position_ids

P_TRUE_PROMPT = (
    "Question: {question}\nProposed answer: {answer}\n"
    "Is the proposed answer true or false? Reply with one word: True or False."
)
VERBALIZED_PROMPT = (
    "Question: {question}\nProposed answer: {answer}\n"
    "How confident are you that the proposed answer is correct? "
    "Reply with a number from 0 to 100 (percent) and nothing else."
)
# Completion cues for models without a chat template (few-shot style base models).
_P_TRUE_CUE = "\nAnswer:"
_VERBALIZED_CUE = "\nConfidence (0-100):"


def _prompt_ids(tokenizer: Any, text: str, cue: str, uses_chat_template: bool) -> list[int]:
    """A user turn for chat models, text + completion cue for base models (BOS exactly once either way)."""
    prompt = [{"role": "user", "content": text}] if uses_chat_template else text + cue
    return encode_prompt(prompt, tokenizer, uses_chat_template)


def _first_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """First token of each spelling (with and without a leading space); unknown words are skipped."""
    ids = []
    for word in words:
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
        if encoded and encoded[0] != tokenizer.unk_token_id and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def _check_lengths(questions: Sequence[str], answers: Sequence[str]) -> None:
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")


def p_true_confidence(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    uses_chat_template: bool,
    batch_size: int = 16,
) -> np.ndarray:
    """`[n]` float64 in [0, 1]: P(True) / (P(True) + P(False)) for the next token after the prompt
    (higher = the model judges its answer correct)."""
    _check_lengths(questions, answers)
    true_ids = _first_token_ids(tokenizer, ["True", " True", "true", " true"])
    false_ids = _first_token_ids(tokenizer, ["False", " False", "false", " false"])
    if not true_ids or not false_ids or set(true_ids) & set(false_ids):
        raise ValueError("the tokenizer cannot tell 'True' from 'False' by their first token")
    device = next(model.parameters()).device
    prompts = [
        _prompt_ids(tokenizer, P_TRUE_PROMPT.format(question=q, answer=a), _P_TRUE_CUE, uses_chat_template)
        for q, a in zip(questions, answers, strict=True)
    ]
    scores = np.empty(len(prompts))
    for begin in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[begin : begin + batch_size], tokenizer.pad_token_id, device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        p_true = probs[:, true_ids].sum(-1)
        p_false = probs[:, false_ids].sum(-1)
        scores[begin : begin + len(ids)] = (p_true / (p_true + p_false)).double().cpu().numpy()
    return scores


_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*(%|percent)?", re.IGNORECASE)


def parse_confidence(reply: str) -> float | None:
    """A confidence in [0, 1] from a free-text reply, or None when there is no usable number.

    The first number counts: "85", "85%", "85 percent" -> 0.85; a decimal without % at most 1
    ("0.85") is read as a fraction; other numbers are percentages and must be within 0..100.
    """
    match = _NUMBER.search(reply)
    if match is None:
        return None
    value = float(match.group(1))
    if match.group(2) is None and "." in match.group(1) and value <= 1.0:
        return value
    return value / 100.0 if value <= 100.0 else None


def verbalized_confidence(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    uses_chat_template: bool,
    batch_size: int = 16,
    max_new_tokens: int = 8,
) -> tuple[np.ndarray, int]:
    """(`[n]` float64 confidence in [0, 1], NaN where unparseable; number of unparseable replies).
    Greedy generation; higher = the model says it is more likely correct."""
    _check_lengths(questions, answers)
    device = next(model.parameters()).device
    prompts = [
        _prompt_ids(
            tokenizer, VERBALIZED_PROMPT.format(question=q, answer=a), _VERBALIZED_CUE, uses_chat_template
        )
        for q, a in zip(questions, answers, strict=True)
    ]
    scores = np.full(len(prompts), np.nan)
    for begin in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[begin : begin + batch_size], tokenizer.pad_token_id, device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        replies = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        for i, reply in enumerate(replies):
            value = parse_confidence(reply)
            if value is not None:
                scores[begin + i] = value
    return scores, int(np.isnan(scores).sum())
