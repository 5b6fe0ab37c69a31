"""Generation's token feed: a batch-wide streamer (streaming + exact token accounting) and the OpenAI
finish rules (text, completion tokens, finish reason) of one generated row.

`BatchFeed` is a transformers streamer for a whole batch: `generate` hands it the prompt ids once, then
the new token of every row at every step (including the last token, which is never fed back to the
model, so the capture hooks cannot see it). It keeps each row's generated ids and, when asked, emits
each row's text as it grows, never past a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from extract.tokens import decode, find_stop


class GenerationCancelled(Exception):
    """Every request of the batch went away (clients disconnected): generation was stopped early."""


def finish_text(
    tokenizer: Any, generated: Sequence[int], max_new_tokens: int | None, eos: set[int], stops: Sequence[str]
) -> tuple[str, int, str]:
    """(text returned, completion tokens, finish reason) of one row's generated ids.

    OpenAI semantics: the text stops before the first stop string (which is not returned) or before
    EOS; completion tokens count the tokens the model generated up to and including the one that
    completed the stop string or the EOS token; finish reason "stop" for both, "length" otherwise.
    """
    window = list(generated if max_new_tokens is None else generated[:max_new_tokens])
    eos_at = next((i for i, t in enumerate(window) if t in eos), None)
    tokens = window if eos_at is None else window[:eos_at]
    text = decode(tokenizer, tokens)
    stop = find_stop(text, stops)
    if stop is not None:
        low, high = 1, len(tokens)  # fewest tokens whose text already holds the stop string
        while low < high:
            mid = (low + high) // 2
            if find_stop(decode(tokenizer, tokens[:mid]), stops) is None:
                low = mid + 1
            else:
                high = mid
        return text[: stop[0]], low, "stop"
    if eos_at is not None:
        return text, eos_at + 1, "stop"
    return text, len(tokens), "length"


class BatchFeed:
    """Streamer for one batch: `tokens[row]` = generated ids (up to max_new_tokens; a final EOS included).

    on_text(row, piece): called with each row's new text, held back while it could still turn into a
    stop string, so the pieces of a row concatenate to a prefix of its final text.
    cancelled(): polled every step; True stops the whole generation (raises GenerationCancelled).
    """

    def __init__(
        self,
        tokenizer: Any,
        rows: int,
        max_new_tokens: int,
        eos: set[int],
        stops: Sequence[str],
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ):
        self.tokenizer, self.max_new_tokens, self.eos = tokenizer, max_new_tokens, eos
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.on_text, self.cancelled = on_text, cancelled
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.emitted = [""] * rows
        self._done = [False] * rows
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt ids
            self._prompt_seen = True
            return
        if self.cancelled is not None and self.cancelled():
            raise GenerationCancelled("every request of this batch was cancelled")
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self._done[row]:
                continue
            if len(self.tokens[row]) >= self.max_new_tokens:
                self._done[row] = True
                continue
            self.tokens[row].append(token)
            if (
                token in self.eos
            ):  # kept, so finish_text sees why the row ended ("stop", EOS counted); no text
                self._done[row] = True
                continue
            if self.on_text is not None:
                self._emit(row)

    def end(self) -> None:
        pass

    def _emit(self, row: int) -> None:
        text = decode(self.tokenizer, self.tokens[row])
        stop = find_stop(text, self.stops)
        if stop is not None:
            safe, self._done[row] = text[: stop[0]], True
        else:
            safe = text[: len(text) - self.hold] if self.hold else text
        safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 character waits for its next token
        if len(safe) > len(self.emitted[row]) and safe.startswith(self.emitted[row]):
            self.on_text(row, safe[len(self.emitted[row]) :])
            self.emitted[row] = safe
