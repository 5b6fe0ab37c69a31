"""Single-pass generation with hidden-state capture and the model's own confidence signals.

One `model.generate` call per batch (left padding) does everything: forward hooks on the decoder
blocks keep, for every forward call, only the LAST position's hidden state at each requested layer
(`[batch, hidden]` per layer and step), and a hook on the model's output keeps per-step entropy, max
probability and the chosen token's log-probability (`[batch]` per step). There is no second forward
pass and no `output_hidden_states=True`: per batch the transient buffer is
`[steps, batch, layers, hidden]`, and what is kept is `[examples, layers, positions, hidden]`.

Capture sites and hooks live in `extract.hooks`.

Step bookkeeping (the classic off-by-one): forward call 0 is the prefill; its last position is the
last prompt token (`prompt_last`). Forward call t >= 1 feeds generated token t-1, so the hidden state
of generated token j is the last position of call j+1. A token's state therefore exists only once the
token has been fed back. A row is kept running until every token of its graded answer has been fed
(`StopWhenAnswerFed`), and generation runs for `max_new_tokens + 1` tokens, so the last answer token's
state always exists; the extra token never enters the answer text.

Graded answer -> tokens: `cut_answer` gets the generation up to the first stop string / EOS and
returns the graded answer, which should be a substring of that text (a prefix, normally, stripped).
Its token span is found by decoding prefixes of the generated tokens (`answer_token_span`). When the
returned text is not found in the generation, the whole stripped generation is used and the row is
flagged (`answer_in_text=False`). An EMPTY answer (the model stopped at once, or `cut_answer`
returned "") is flagged `empty_answer`: its `answer_last`/`answer_mean` fall back to `prompt_last`,
and its baselines are computed over the first generated token (the model's confidence in stopping).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from extract.hooks import (
    CaptureError,
    capture_hidden_states,
    check_positions,
    find_decoder_blocks,
    resolve_layers,
)
from extract.settings import GenerationSpec
from extract.tokens import cut_generation, decode, eos_token_ids, find_stop, left_pad, pool_states

log = logging.getLogger(__name__)

BASELINE_NAMES: tuple[str, ...] = (
    "mean_logprob",  # mean log-probability of the answer tokens (higher = more confident)
    "min_logprob",  # lowest token log-probability in the answer
    "mean_entropy",  # mean next-token entropy (nats) over the answer steps (LOWER = more confident)
    "first_token_prob",  # max probability of the distribution the first answer token was drawn from
    "sequence_prob",  # product of the answer token probabilities
    "perplexity",  # exp(-mean_logprob) (LOWER = more confident)
)


def next_token_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw next-token logits `[..., vocab]` -> (log-probabilities `[..., vocab]`, entropy in nats `[...]`,
    max probability `[...]`), in float32: the per-step statistics the baselines are built from (generation's
    hook and the scoring forward of probes.serving both call this)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return logp, -torch.where(p > 0, p * logp, 0.0).sum(-1), p.max(-1).values


class _TokenStats:
    """Model-output hook: per forward call, entropy and max probability of the next-token
    distribution, and (one call later, once the chosen token is fed back) its log-probability.
    Lists of `[batch]` tensors, one per call; raw model logits (before temperature / top-p)."""

    def __init__(self) -> None:
        self.entropy: list[torch.Tensor] = []
        self.max_prob: list[torch.Tensor] = []
        self.chosen_logprob: list[torch.Tensor] = []
        self._prev_logp: torch.Tensor | None = None

    def hook(self, module, args, kwargs, output) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self._prev_logp is not None:
            self._take_chosen(input_ids[:, -1])
        logits = output["logits"] if isinstance(output, dict) else output[0]
        logp, entropy, max_prob = next_token_stats(logits[:, -1])
        self.entropy.append(entropy)
        self.max_prob.append(max_prob)
        self._prev_logp = logp

    def finish(self, last_tokens: torch.Tensor) -> None:
        """The token chosen at the last call is never fed back: take its log-probability here."""
        if self._prev_logp is not None:
            self._take_chosen(last_tokens)

    def _take_chosen(self, tokens: torch.Tensor) -> None:
        self.chosen_logprob.append(
            self._prev_logp.gather(-1, tokens[:, None].to(self._prev_logp.device))[:, 0]
        )
        self._prev_logp = None

    def arrays(self, calls: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chosen log-prob, entropy, max prob), each `[calls, batch]` float64."""
        as_np = [
            torch.stack(x[:calls]).double().cpu().numpy()
            for x in (self.chosen_logprob, self.entropy, self.max_prob)
        ]
        return as_np[0], as_np[1], as_np[2]


# ----------------------------------------------------------------------------------------------
# Stopping once the answer has been fed back
# ----------------------------------------------------------------------------------------------


class StopWhenAnswerFed(StoppingCriteria):
    """Stopping criterion: a row is done once its generation contains a stop string AND every token
    before that stop string has been fed back to the model (so its hidden state was captured).

    HF's own EOS criterion runs alongside: a row that emits EOS needs nothing more, since the tokens
    before the EOS were all fed. Decodes only rows still running, once per step.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], prompt_len: int, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.prompt_len = prompt_len
        self.eos_ids = eos_ids
        self.done: np.ndarray | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.done is None:
            self.done = np.zeros(input_ids.shape[0], dtype=bool)
        running = np.flatnonzero(~self.done)
        if len(running):
            generated = input_ids[running, self.prompt_len :].tolist()
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            for row, tokens, text in zip(running, generated, texts, strict=True):
                if self.eos_ids.intersection(tokens):
                    self.done[row] = True
                    continue
                stop = find_stop(text, self.stop_strings)
                if stop is not None and decode(self.tokenizer, tokens[:-1]).startswith(text[: stop[0]]):
                    self.done[row] = True
        return torch.as_tensor(self.done, device=input_ids.device)


# ----------------------------------------------------------------------------------------------
# Generate and capture
# ----------------------------------------------------------------------------------------------


@dataclass
class CaptureResult:
    """Answers, hidden states and baselines for `n` prompts, in input order.

    activations: `[n, len(layers), len(positions), hidden]` float32.
    baselines: name -> `[n]` float64 (see `BASELINE_NAMES`; higher logprob/prob = more confident,
    higher entropy/perplexity = less confident).
    truncated: `[n]` bool, the answer did not finish (no stop string / EOS) within max_new_tokens.
    empty_answer: `[n]` bool, the graded answer is empty (positions fall back to prompt_last).
    answer_in_text: `[n]` bool, False when cut_answer's text was not found in the generation.
    """

    answers: list[str]
    raw_generations: list[str]
    n_answer_tokens: np.ndarray
    truncated: np.ndarray
    activations: np.ndarray
    baselines: dict[str, np.ndarray]
    empty_answer: np.ndarray
    answer_in_text: np.ndarray
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    n_generated_tokens: int = 0  # generated tokens incl. padding steps (throughput accounting)

    @classmethod
    def from_rows(cls, rows, activations, baselines, layers, positions, n_generated_tokens) -> CaptureResult:
        """The per-row fields from finished rows (finish_row's answer, raw text, token span, flags)."""
        return cls(
            answers=[row.answer for row in rows],
            raw_generations=[row.raw for row in rows],
            n_answer_tokens=np.array([max(row.end - row.start, 0) for row in rows], dtype=np.int64),
            truncated=np.array([row.truncated for row in rows], dtype=bool),
            activations=activations,
            baselines=baselines,
            empty_answer=np.array([row.end <= row.start for row in rows], dtype=bool),
            answer_in_text=np.array([row.found for row in rows], dtype=bool),
            layers=tuple(layers),
            positions=tuple(positions),
            n_generated_tokens=int(n_generated_tokens),
        )

    def __len__(self) -> int:
        return len(self.answers)

    def row_fields(self) -> list[dict[str, Any]]:
        """Per-row JSON-able fields for store records (answer, raw generation, flags)."""
        return [
            {
                "model_answer": self.answers[i],
                "raw_generation": self.raw_generations[i],
                "n_answer_tokens": int(self.n_answer_tokens[i]),
                "truncated": bool(self.truncated[i]),
                "empty_answer": bool(self.empty_answer[i]),
                "answer_in_text": bool(self.answer_in_text[i]),
            }
            for i in range(len(self))
        ]

    @classmethod
    def concat(cls, parts: Sequence[CaptureResult]) -> CaptureResult:
        if not parts:
            raise ValueError("CaptureResult.concat needs at least one part")
        first = parts[0]
        return cls(
            answers=[a for p in parts for a in p.answers],
            raw_generations=[r for p in parts for r in p.raw_generations],
            n_answer_tokens=np.concatenate([p.n_answer_tokens for p in parts]),
            truncated=np.concatenate([p.truncated for p in parts]),
            activations=np.concatenate([p.activations for p in parts]),
            baselines={k: np.concatenate([p.baselines[k] for p in parts]) for k in first.baselines},
            empty_answer=np.concatenate([p.empty_answer for p in parts]),
            answer_in_text=np.concatenate([p.answer_in_text for p in parts]),
            layers=first.layers,
            positions=first.positions,
            n_generated_tokens=sum(p.n_generated_tokens for p in parts),
        )


@dataclass
class _Row:
    answer: str
    raw: str
    start: int  # first graded-answer token (index into the generated tokens)
    end: int  # one past the last graded-answer token
    truncated: bool
    found: bool


def finish_row(
    tokenizer, generated: list[int], max_new_tokens: int, eos_ids: set[int], stops, cut_answer
) -> _Row:
    """Turn one row's generated tokens into raw text, graded answer and its token span."""
    window = generated[:max_new_tokens]  # the extra (+1) token never enters the answer
    try:
        cut = cut_generation(tokenizer, window, eos_ids, stops, cut_answer)
    except TypeError as err:
        raise CaptureError(str(err)) from None
    raw = cut.text if cut.stop is None else cut.text[: cut.stop[1]]
    truncated = cut.stop is None and cut.eos_at is None
    return _Row(cut.answer, raw, cut.start, cut.end, truncated=truncated, found=cut.found)


def check_prompts(prompt_ids: Sequence[Sequence[int]], vocab_size: int | None) -> None:
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise CaptureError(f"prompt_ids[{i}] is empty")
        if not all(isinstance(t, (int, np.integer)) for t in prompt):
            raise CaptureError(f"prompt_ids[{i}] must be a list of token ids (ints)")
        if vocab_size and not all(0 <= t < vocab_size for t in prompt):
            raise CaptureError(f"prompt_ids[{i}] has a token id outside 0..{vocab_size - 1}")


def _check_generation(spec: GenerationSpec) -> None:
    if spec.max_new_tokens < 1:
        raise CaptureError(f"generation.max_new_tokens={spec.max_new_tokens}: must be >= 1")
    if spec.batch_size < 1:
        raise CaptureError(f"generation.batch_size={spec.batch_size}: must be >= 1")
    if spec.do_sample and not (spec.temperature > 0 and 0 < spec.top_p <= 1):
        raise CaptureError(
            f"generation.temperature={spec.temperature} must be > 0 and top_p={spec.top_p} in (0, 1]"
        )


def answer_baselines(
    logprob: np.ndarray, entropy: np.ndarray, max_prob: np.ndarray, start: int, end: int
) -> dict:
    """`BASELINE_NAMES` -> value for one answer: per generated token t, logprob[t] of the chosen token, entropy[t]
    and max_prob[t] of the distribution it was drawn from (`[steps]` float64); the answer is tokens [start, end)
    (an empty answer is scored on (0, 1), its first generated token)."""
    lp = logprob[start:end]
    mean_lp = float(lp.mean())
    return {
        "mean_logprob": mean_lp,
        "min_logprob": float(lp.min()),
        "mean_entropy": float(entropy[start:end].mean()),
        "first_token_prob": float(max_prob[start]),
        "sequence_prob": float(np.exp(lp.sum())),
        "perplexity": float(np.exp(-mean_lp)),
    }


def generate_and_capture(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    layers: str | Sequence[int] | None,
    positions: Sequence[str],
    generation: GenerationSpec,
    cut_answer: Callable[[str], str],
    progress: Callable[[int, int], None] | None = None,
    streamer: Any = None,
) -> CaptureResult:
    """Generate an answer for every prompt and capture hidden states + baselines in the same pass.

    prompt_ids: token ids per prompt (already templated; no padding). Batches of
    `generation.batch_size` are left-padded. `cut_answer(text_before_stop) -> graded answer`.
    progress(n_examples, n_generated_tokens) is called after each batch.
    streamer: a transformers streamer; it sees one batch, so give at most `generation.batch_size` prompts
    (`put` gets the prompt ids `[batch, prompt_len]`, then the new tokens `[batch]` per step).
    Returns a `CaptureResult` in input order (activations `[n, layers, positions, hidden]`).
    Sampling (`do_sample=True`) draws from torch's global RNG: seed it for reproducible runs.
    """
    layout = find_decoder_blocks(model)
    name = getattr(getattr(model, "config", None), "name_or_path", None) or layout.model_class
    layer_list = resolve_layers(layers, layout.num_layers, name)
    position_list = check_positions(positions)
    _check_generation(generation)
    vocab_size = getattr(model.get_input_embeddings(), "num_embeddings", None)
    check_prompts(prompt_ids, vocab_size)
    if tokenizer.pad_token_id is None:
        raise CaptureError("the tokenizer has no pad token: wrap it with extract.models.prepare_tokenizer")
    if streamer is not None and len(prompt_ids) > generation.batch_size:
        raise CaptureError(
            f"a streamer sees one batch: at most {generation.batch_size} prompts, got {len(prompt_ids)}"
        )
    eos = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device

    parts = []
    with capture_hidden_states(model, layer_list) as recorder:
        for begin in range(0, len(prompt_ids), generation.batch_size):
            batch = prompt_ids[begin : begin + generation.batch_size]
            recorder.clear()
            part = _generate_batch(
                model,
                tokenizer,
                batch,
                recorder,
                position_list,
                generation,
                cut_answer,
                eos,
                device,
                streamer,
            )
            parts.append(part)
            if progress is not None:
                progress(len(batch), part.n_generated_tokens)
    if not parts:
        raise CaptureError("prompt_ids is empty")
    return CaptureResult.concat(parts)


def _generate_batch(
    model, tokenizer, prompts, recorder, positions, spec, cut_answer, eos, device, streamer=None
) -> CaptureResult:
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    prompt_len = input_ids.shape[1]
    stop = StopWhenAnswerFed(tokenizer, spec.stop_strings, prompt_len, set(eos))
    stats = _TokenStats()
    sampling = {"temperature": spec.temperature, "top_p": spec.top_p} if spec.do_sample else {}
    handle = model.register_forward_hook(stats.hook, with_kwargs=True)
    try:
        with torch.no_grad():
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=spec.max_new_tokens + 1,  # +1: see the module docstring
                do_sample=spec.do_sample,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos or None,
                stopping_criteria=StoppingCriteriaList([stop] if spec.stop_strings else []),
                streamer=streamer,
                **sampling,
            )
    finally:
        handle.remove()
    generated = sequences[:, prompt_len:]
    steps = generated.shape[1]
    stats.finish(generated[:, -1])
    if recorder.num_calls < steps:
        raise CaptureError(
            f"recorded {recorder.num_calls} forward calls for {steps} generated tokens: "
            "the model's generate() bypasses the hooked modules"
        )
    logprob, entropy, max_prob = stats.arrays(steps)  # [steps, batch]
    states = recorder.stacked(steps)  # [steps, batch, layers, hidden]; index t = state of token t-1

    rows = [
        finish_row(tokenizer, g, spec.max_new_tokens, set(eos), spec.stop_strings, cut_answer)
        for g in generated.tolist()
    ]
    vectors = torch.empty(
        (len(rows), states.shape[2], len(positions), states.shape[3]),
        dtype=torch.float32,
        device=states.device,
    )
    baselines = {name: np.empty(len(rows)) for name in BASELINE_NAMES}
    for r, row in enumerate(rows):
        if row.end > steps - 1:  # only with a tokenizer whose prefixes do not decode stably
            log.warning(
                "row %d: answer ends at token %d but only %d were fed back: clipped", r, row.end, steps - 1
            )
            row.end = steps - 1
        empty = row.end <= row.start
        for p, position in enumerate(positions):  # states[0] = the last prompt token's state
            vectors[r, :, p] = pool_states(states[:, r], 0, row.start, row.end, position)
        span = (0, 1) if empty else (row.start, row.end)
        for name, value in answer_baselines(logprob[:, r], entropy[:, r], max_prob[:, r], *span).items():
            baselines[name][r] = value
    return CaptureResult.from_rows(
        rows, vectors.cpu().numpy(), baselines, recorder.layers, positions, steps * len(rows)
    )
