"""The teacher-forced scoring forward: hidden states (and logit signals) of given token sequences.

`states_up_to_layer` runs one forward over left-padded sequences and raises out of the model as soon
as the probe's layer has produced its output: blocks above that layer, the final norm and the LM head
never run (the expensive vocabulary projection included). A hybrid probe also reads the answer's logit
signals, which need the LM head: `states_and_logits` runs the whole forward (same hook, no early stop) and
`answer_signals` turns its logits into the signals generation records (extract.generation.answer_baselines).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from extract.generation import answer_baselines, next_token_stats
from extract.hooks import find_decoder_blocks, hook_layer
from extract.tokens import left_pad, position_ids


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
    model: Any, sequences: Sequence[Sequence[int]], layer: int, pad_id: int, keep_last: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """As `states_up_to_layer`, from a whole forward: (hidden `[batch, width, hidden]` float32, logits
    `[batch, width, vocab]` as the model returns them, width).

    keep_last: the LM head runs on the last `keep_last` positions only (logits `[batch, keep_last, vocab]`,
    index j = padded position width - keep_last + j): a full-vocabulary projection of every position costs
    width x vocab floats per row (3 GB for one 3,000-token completion), the answer needs a few rows."""
    head = model.get_output_embeddings() if keep_last is not None else None
    handle = None
    if head is not None:  # slice the hidden states on their way into the LM head (any architecture)
        handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, -keep_last:], *args[1:]))
    try:
        return _forward(model, sequences, layer, pad_id, stop_at_layer=False)
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
    model: Any, sequences: Sequence[Sequence[int]], layer: int, pad_id: int, stop_at_layer: bool
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    layout = find_decoder_blocks(model)
    device = next(model.parameters()).device
    ids, mask = left_pad(sequences, pad_id, device)
    captured: list[torch.Tensor] = []

    def keep(hidden: torch.Tensor) -> None:
        captured.append(hidden.detach().float())
        if stop_at_layer:
            raise _ReachedLayer

    handle = hook_layer(layout, layer, keep)
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
        handle.remove()
    if not captured:
        raise RuntimeError(f"the forward never reached layer {layer}: the hooked module was not called")
    return captured[0], logits, ids.shape[1]
