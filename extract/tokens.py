"""The token-level rules that training and serving must share: ONE implementation of each.

Extraction (`extract.generation`), the runtime wrapper's `generate` and `score` (`probes.runtime`), `/v1/score`
and the proxy all go through these functions, so what the probe sees at serving time is what it saw in
training. A change here changes both sides at once; `tests/unit/extract/test_tokens.py` pins each rule
against hand-built token sequences.

- `eos_token_ids`: the ids that end a generation (the generation config's EOS ids, then the tokenizer's).
- `decode`: token ids -> text, special tokens skipped.
- `left_pad` + `position_ids`: batches are left-padded; position ids count real tokens only (as `generate`
  does), so a left-padded row is scored at the positions it would have alone.
- `cut_generation`: a generation's tokens -> the graded answer and its token span (EOS, then the first stop
  string, then `cut_answer`, then the span by decoding prefixes).
- `pool_states`: one sequence of per-token states -> the vector a capture position reads (`prompt_last`,
  `answer_last`, `answer_mean`), with the empty-answer fallback to `prompt_last`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from extract.settings import POSITIONS


def decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a generation: the generation config's EOS ids, then the tokenizer's (no repeats)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids `[batch, width]`, attention mask `[batch, width]`): row r's token j at `width - len(seq_r) + j`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[batch, width]` position ids that skip left padding (pads get 0), as `generate` counts them: with
    absolute position embeddings (GPT-2) a padded row would otherwise be read at shifted positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def find_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in `text` (the longest one on a tie), or None.

    Leading blank space (line breaks, blank lines) is skipped: a model that opens its turn with a newline
    has not answered yet, and a stop found there would leave an empty answer to grade or score."""
    best = None
    lead = len(text) - len(text.lstrip())
    for stop in stop_strings:
        if not stop:
            continue
        start = text.find(stop, lead)
        if start >= 0 and (best is None or (start, -len(stop)) < (best[0], best[0] - best[1])):
            best = (start, start + len(stop))
    return best


def answer_token_span(tokenizer: Any, tokens: Sequence[int], text: str, answer: str) -> tuple[int, int, bool]:
    """Token span `[start, end)` of `answer` within `text`, where `text` is a prefix of
    `decode(tokens)` (the generation before its stop string).

    `end` = the fewest tokens whose decoded prefix covers the answer; `start` = the most tokens whose
    decoded prefix lies entirely before the answer. Decoding prefixes (rather than summing per-token
    lengths) stays right for tokenizers that merge spaces or split characters across tokens.
    Returns (start, end, found): found=False when `answer` is not in `text` (the whole stripped
    text is used then); an empty answer gives (0, 0, True).
    """
    target = answer.strip()
    if not target:
        return 0, 0, True
    pos = text.find(target)
    found = pos >= 0
    if not found:
        target = text.strip()
        if not target:
            return 0, 0, False
        pos = text.find(target)
    head, upto = text[:pos], text[: pos + len(target)]
    start, end = 0, len(tokens)
    for k in range(1, len(tokens) + 1):
        prefix = decode(tokenizer, tokens[:k])
        if prefix.startswith(upto):
            end = k
            break
        if head.startswith(prefix):
            start = k
    return start, end, found


@dataclass(frozen=True)
class AnswerCut:
    """What a generation's tokens become: `text` = decode(tokens before EOS); `before` = text before the
    first stop string; `answer` = the graded answer (`cut_answer(before)`); its token span [start, end)."""

    text: str
    before: str
    answer: str
    start: int
    end: int
    found: bool  # the answer was found in `before` (else the whole stripped text was used)
    eos_at: int | None  # index of the first EOS token, if any
    stop: tuple[int, int] | None  # (start, end) of the first stop string in `text`, if any

    @property
    def empty(self) -> bool:
        return self.end <= self.start


def cut_generation(
    tokenizer: Any,
    tokens: Sequence[int],
    eos: Sequence[int] | set[int],
    stops: Sequence[str],
    cut_answer: Callable[[str], str],
) -> AnswerCut:
    """The graded answer of generated `tokens` and its token span: cut at the first EOS, decode, cut at the
    first stop string, then `cut_answer` (e.g. `extract.grading.cut_answer`: the first line, stripped)."""
    eos = set(eos)
    eos_at = next((i for i, t in enumerate(tokens) if t in eos), None)
    kept = list(tokens) if eos_at is None else list(tokens[:eos_at])
    text = decode(tokenizer, kept)
    stop = find_stop(text, stops)
    before = text if stop is None else text[: stop[0]]
    answer = cut_answer(before)
    if not isinstance(answer, str):
        raise TypeError(f"cut_answer returned {type(answer).__name__}, expected str")
    start, end, found = answer_token_span(tokenizer, kept, before, answer)
    return AnswerCut(text, before, answer, start, end, found, eos_at, stop)


def pool_states(states: torch.Tensor, prompt_last: int, start: int, end: int, position: str) -> torch.Tensor:
    """The vector that capture `position` reads from `states` `[tokens, ...]`, where index `prompt_last` holds
    the last prompt token's state and `prompt_last + 1 + k` the state of answer token k (the answer's tokens
    [start, end) of the completion). An empty answer (end <= start) reads the prompt_last state."""
    if position == "prompt_last" or end <= start:
        return states[prompt_last]
    if position == "answer_last":
        return states[prompt_last + end]
    if position == "answer_mean":
        return states[prompt_last + 1 + start : prompt_last + 1 + end].mean(0)
    raise ValueError(f"unknown position {position!r}; allowed: {', '.join(POSITIONS)}")
