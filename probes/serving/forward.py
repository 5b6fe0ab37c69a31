"""Torch helpers of the wrapper: a batch-wide token feed (streaming + exact token accounting) and the
scoring forward that stops at the probe's layer.

`BatchFeed` is a transformers streamer for a whole batch: `generate` hands it the prompt ids once, then
the new token of every row at every step (including the last token, which is never fed back to the
model, so the capture hooks cannot see it). It keeps each row's generated ids and, when asked, emits
each row's text as it grows, never past a stop string.

`states_up_to_layer` runs one forward over left-padded sequences and raises out of the model as soon
as the probe's layer has produced its output: blocks above that layer, the final norm and the LM head
never run (the expensive vocabulary projection included). A hybrid probe also reads the answer's logit
signals, which need the LM head: `states_and_logits` runs the whole forward (same hook, no early stop) and
`answer_signals` turns its logits into the signals generation records (extract.generation.answer_baselines).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from extract.generation import answer_baselines, find_stop, left_pad, next_token_stats
from extract.hooks import find_decoder_blocks


class GenerationCancelled(Exception):
    """Every request of the batch went away (clients disconnected): generation was stopped early."""


def decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a generation: the generation config's EOS ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set() if ids is None else {ids} if isinstance(ids, int) else set(ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


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


class _ReachedLayer(Exception):
    """Raised by the hook on the probe's layer: nothing above it is needed."""


def states_up_to_layer(
    model: Any, sequences: Sequence[Sequence[int]], layer: int, pad_id: int
) -> tuple[torch.Tensor, int]:
    """Hidden states at probecal `layer` (0 = embeddings, i = block i, last = after the final norm) of
    left-padded `sequences`, from one forward that stops at that layer.

    Returns (`[batch, width, hidden]` float32, width); row r's token j sits at `width - len(seq_r) + j`.
    Position ids follow the attention mask (as `generate` does), so left padding does not shift them.
    """
    hidden, _, width = _forward(model, sequences, layer, pad_id, stop_at_layer=True)
    return hidden, width


def states_and_logits(
    model: Any, sequences: Sequence[Sequence[int]], layer: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """As `states_up_to_layer`, from a whole forward: (hidden `[batch, width, hidden]` float32, logits
    `[batch, width, vocab]` as the model returns them, width)."""
    return _forward(model, sequences, layer, pad_id, stop_at_layer=False)


def answer_signals(
    logits: torch.Tensor, completion: Sequence[int], base: int, start: int, end: int, empty_token: int | None
) -> dict[str, float]:
    """The logit signals of one answer (extract.generation.BASELINE_NAMES), as generation records them.

    logits `[width, vocab]`: one row of `states_and_logits`, whose sequence holds the completion's first
    token at index `base`; the answer is completion tokens [start, end). Token t is scored by the
    distribution at index base + t - 1 (raw logits, as generation's hook reads them). An empty answer is
    scored on the first completion token (generation's rule); with no completion token at all (the engine
    stopped at once: EOS), on `empty_token` (the EOS id).
    """
    if end > start:
        tokens = list(completion[start:end])
        span = slice(base + start - 1, base + end - 1)
    else:
        first = completion[0] if len(completion) else empty_token
        if first is None:
            raise ValueError("an empty completion needs the EOS token id to score the logit signals")
        tokens, span = [first], slice(base - 1, base)
    logp, entropy, max_prob = next_token_stats(logits[span])
    chosen = logp.gather(-1, torch.as_tensor(tokens, device=logp.device)[:, None])[:, 0]
    as_np = [x.double().cpu().numpy() for x in (chosen, entropy, max_prob)]
    return answer_baselines(*as_np, 0, len(tokens))


def _forward(
    model: Any, sequences: Sequence[Sequence[int]], layer: int, pad_id: int, stop_at_layer: bool
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    layout = find_decoder_blocks(model)
    device = next(model.parameters()).device
    ids, mask = left_pad(sequences, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    captured: list[torch.Tensor] = []

    def keep(hidden: torch.Tensor) -> None:
        captured.append(hidden.detach().float())
        if stop_at_layer:
            raise _ReachedLayer

    if layer == 0:
        handle = layout.blocks[0].register_forward_pre_hook(
            lambda m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    else:
        last_with_norm = layer == layout.num_layers and layout.final_norm is not None
        module = layout.final_norm if last_with_norm else layout.blocks[layer - 1]
        handle = module.register_forward_hook(
            lambda m, args, output: keep(output[0] if isinstance(output, (tuple, list)) else output)
        )
    logits = None
    try:
        with torch.no_grad():
            output = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        logits = output["logits"] if isinstance(output, dict) else output[0]
    except _ReachedLayer:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the forward never reached layer {layer}: the hooked module was not called")
    return captured[0], logits, ids.shape[1]
