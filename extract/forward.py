"""The teacher-forced scoring forward: hidden states (and logit signals) of given token sequences.

`states_up_to_layer` runs one forward over left-padded sequences and raises out of the model as soon
as the probe's layer has produced its output: blocks above that layer, the final norm and the LM head
never run (the expensive vocabulary projection included). A hybrid probe also reads the answer's logit
signals, which need the LM head: `states_and_logits` runs the whole forward (same hook, no early stop) and
`answer_signals` turns its logits into the signals generation records (extract.generation.answer_baselines).
`capture_completions` is extraction's use of the same forward (extract.engine=openai): an engine's answers in,
generation's `CaptureResult` out, at every stored layer (`layer_states_and_logits`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from extract.generation import (
    BASELINE_NAMES,
    CaptureResult,
    answer_baselines,
    check_prompts,
    finish_row,
    next_token_stats,
)
from extract.hooks import CaptureError, check_positions, find_decoder_blocks, hook_layer, resolve_layers
from extract.settings import GenerationSpec
from extract.tokens import eos_token_ids, left_pad, pool_states, position_ids


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
    hidden, _, width = _forward(model, sequences, [layer], pad_id, stop_at_layer=True)
    return hidden[:, :, 0], width


def states_and_logits(
    model: Any, sequences: Sequence[Sequence[int]], layer: int, pad_id: int, keep_last: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """As `states_up_to_layer`, from a whole forward: (hidden `[batch, width, hidden]` float32, logits
    `[batch, width, vocab]` as the model returns them, width).

    keep_last: the LM head runs on the last `keep_last` positions only (logits `[batch, keep_last, vocab]`,
    index j = padded position width - keep_last + j): a full-vocabulary projection of every position costs
    width x vocab floats per row (3 GB for one 3,000-token completion), the answer needs a few rows."""
    hidden, logits, width = layer_states_and_logits(model, sequences, [layer], pad_id, keep_last)
    return hidden[:, :, 0], logits, width


def layer_states_and_logits(
    model: Any,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int],
    pad_id: int,
    keep_last: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """As `states_and_logits` at several probecal `layers` at once: (hidden `[batch, width, len(layers),
    hidden]` float32, logits, width); the extraction of engine answers reads every stored layer this way."""
    head = model.get_output_embeddings() if keep_last is not None else None
    handle = None
    if head is not None:  # slice the hidden states on their way into the LM head (any architecture)
        handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, -keep_last:], *args[1:]))
    try:
        return _forward(model, sequences, layers, pad_id, stop_at_layer=False)
    finally:
        if handle is not None:
            handle.remove()


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
    model: Any, sequences: Sequence[Sequence[int]], layers: Sequence[int], pad_id: int, stop_at_layer: bool
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(hidden `[batch, width, len(layers), hidden]` float32 on the first layer's device, logits or None
    when stopped early, width). stop_at_layer: raise out of the model once every layer has been seen."""
    layout = find_decoder_blocks(model)
    device = next(model.parameters()).device
    ids, mask = left_pad(sequences, pad_id, device)
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        captured[layer] = hidden.detach().float()
        if stop_at_layer and len(captured) == len(layers):
            raise _ReachedLayer

    handles = [hook_layer(layout, layer, partial(keep, layer)) for layer in layers]
    logits = None
    try:
        with torch.no_grad():
            output = model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
            )
        logits = output["logits"] if isinstance(output, dict) else output[0]
    except _ReachedLayer:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise RuntimeError(f"the forward never reached layer(s) {missing}: the hooked module was not called")
    first = captured[layers[0]]
    # a model split by a device map (device_map="auto") hands each layer over on its block's device
    return torch.stack([captured[la].to(first.device) for la in layers], dim=2), logits, ids.shape[1]


def capture_completions(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    layers: str | Sequence[int] | None,
    positions: Sequence[str],
    generation: GenerationSpec,
    cut_answer: Callable[[str], str],
) -> CaptureResult:
    """The teacher-forced counterpart of `extract.generation.generate_and_capture`, for answers another
    engine generated (extract.engine): the same `CaptureResult`, from one forward per
    `generation.batch_size` prompts over prompt + answer (up to the end of the graded answer).

    completions: the answer's token ids per prompt as generation would hold them (at most
    `generation.max_new_tokens` are read; the EOS it stopped at included). Each is cut as generation cuts
    its tokens (`finish_row`), its states pooled by `pool_states` and its logit signals scored by
    `answer_signals`, so a store built from an engine's answers equals generation's on the same answers
    (states to float rounding: a full forward instead of a KV-cached one).
    """
    layout = find_decoder_blocks(model)
    name = getattr(getattr(model, "config", None), "name_or_path", None) or layout.model_class
    layer_list = resolve_layers(layers, layout.num_layers, name)
    position_list = check_positions(positions)
    if len(completions) != len(prompt_ids):
        raise CaptureError(f"{len(prompt_ids)} prompts but {len(completions)} completions")
    if not prompt_ids:
        raise CaptureError("prompt_ids is empty")
    vocab_size = getattr(model.get_input_embeddings(), "num_embeddings", None)
    check_prompts(prompt_ids, vocab_size)
    for i, completion in enumerate(completions):  # may be empty: an engine that stopped at once, EOS dropped
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < (vocab_size or t + 1) for t in completion):
            raise CaptureError(f"completions[{i}] must be token ids in 0..{(vocab_size or 0) - 1}")
    if tokenizer.pad_token_id is None:
        raise CaptureError("the tokenizer has no pad token: wrap it with extract.models.prepare_tokenizer")
    eos = eos_token_ids(model, tokenizer)
    empty_token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos, default=None)
    rows = [
        finish_row(
            tokenizer, list(c), generation.max_new_tokens, set(eos), generation.stop_strings, cut_answer
        )
        for c in completions
    ]
    n, vectors = len(rows), None
    baselines = {name: np.empty(n) for name in BASELINE_NAMES}
    for begin in range(0, n, generation.batch_size):
        chunk = range(begin, min(n, begin + generation.batch_size))
        answered = {i: rows[i].end > rows[i].start for i in chunk}
        sequences = [
            [*prompt_ids[i], *completions[i][: rows[i].end]] if answered[i] else list(prompt_ids[i])
            for i in chunk
        ]
        # the answer's tokens are scored by the positions just before them: the LM head runs on those only
        keep = max(rows[i].end - rows[i].start + 1 if answered[i] else 1 for i in chunk)
        hidden, logits, width = layer_states_and_logits(
            model, sequences, layer_list, tokenizer.pad_token_id, keep_last=keep
        )
        kept_from = width - logits.shape[1]  # 0 when the model has no output embeddings to hook
        if vectors is None:  # [n, layers, positions, hidden]
            vectors = np.empty((n, len(layer_list), len(position_list), hidden.shape[-1]), np.float32)
        for r, i in enumerate(chunk):
            row = rows[i]
            prompt_last = width - len(sequences[r]) + len(prompt_ids[i]) - 1
            for p, position in enumerate(position_list):
                vectors[i, :, p] = (
                    pool_states(hidden[r], prompt_last, row.start, row.end, position).cpu().numpy()
                )
            signals = answer_signals(
                logits[r], completions[i], prompt_last + 1 - kept_from, row.start, row.end, empty_token
            )
            for key, value in signals.items():
                baselines[key][i] = value
    return CaptureResult.from_rows(
        rows, vectors, baselines, layer_list, position_list, sum(len(c) for c in completions)
    )
