"""Runtime wrapper: a calibrated probability of correctness with every generation, and abstention.

`ProbedModel` joins a live transformers model and a saved probe artifact. It hooks only the layer the
probe reads and captures the probe's position during the normal `generate` call (no
`output_hidden_states`, no second pass over the sequence): see `extract.generation.generate_and_capture`.

Pre-generation mode: a probe trained at `prompt_last` scores the question from the prompt alone; with an
abstention threshold, rows below it get the abstention message and are never generated (one prefill
forward per prompt is spent on scoring; the rows that are answered run their normal generation).

Hybrid probes (kind `hybrid`) read the hidden state AND the answer's logit signals (mean log-probability,
sequence probability, ...): `generate` takes them from the same generation pass (extract.generation's
baselines) and `score` runs the whole forward to the LM head to compute them the same way. They need the
answer, so a `prompt_last` hybrid scores after generation only: pre-generation abstention is off for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.forward import answer_signals, states_and_logits, states_up_to_layer
from extract.generation import generate_and_capture
from extract.grading import cut_answer
from extract.hooks import capture_hidden_states
from extract.models import LoadedModel, from_transformers, load_model
from extract.prompts import PromptSpec, Question, encode_prompt, render_prompt, saved_prompt_spec
from extract.refusal import is_refusal
from extract.settings import GenerationSpec
from extract.streaming import BatchFeed, finish_text
from extract.tokens import cut_generation, eos_token_ids, left_pad, pool_states, position_ids
from probes.artifact import ProbeArtifact
from probes.inference import probe_input

DEFAULT_ABSTENTION_MESSAGE = "I don't know."
log = logging.getLogger(__name__)


def _prompt_spec(saved: dict[str, Any]) -> PromptSpec:
    """The prompt settings stored with the probe; fields this version no longer has are ignored, loudly."""
    known = {f.name for f in fields(PromptSpec)}
    unknown = sorted(set(saved) - known)
    if unknown:
        log.warning(
            "probe artifact prompt settings %s are unknown to this probecal version: ignored", unknown
        )
    return saved_prompt_spec(saved)  # a field missing there keeps its meaning of then (num_chat_shots=0)


@dataclass(frozen=True)
class ProbedGeneration:
    """One generated sequence with its confidence. Higher `p_correct` = more likely correct."""

    text: str  # the generated text, stop string excluded (the abstention message when abstained)
    p_correct: float  # calibrated probability that the answer is correct
    score: float  # raw probe score (decision function) before calibration
    layer: int  # hidden-state layer the probe read (0 = embeddings, i = output of block i)
    position: str  # prompt_last | answer_last | answer_mean
    abstained: bool  # True when p_correct fell below the threshold
    threshold: float | None  # abstention threshold in force (None: no abstention policy)
    finish_reason: str  # "stop" (stop sequence / EOS), "length" (max_new_tokens), "abstained"
    prompt_tokens: int
    completion_tokens: int  # tokens generated, up to and including the one completing the stop string / EOS
    completion_ids: tuple[int, ...] = ()  # those tokens (empty when abstained before generating)
    answer_chars: tuple[int, int] | None = None  # [start, end) of `text` the probe scored (None: prompt_last)
    artifact: str | None = (
        None  # digest of the probe artifact that scored it (hot reload: which one served it)
    )
    novelty: float | None = None  # how far the question lies from training (probes.novelty; 1.0 = cut-off)
    in_domain: bool | None = None  # novelty <= 1 (None: the artifact has no novelty model)
    domain: str | None = None  # the domain its calibration used: the client's tag, else the assigned cluster
    # True when `domain` is the artifact's cluster of the prompt (no client tag)
    domain_assigned: bool = False
    # the model's own answer declined (extract.refusal); probecal does not override it
    model_refused: bool = False
    # [hidden] the question's prompt_last state at the probe's layer (what novelty and domain clusters read),
    # stored with the feedback so `probecal recalibrate recalibrate.refit_domains=K` can refit the clusters
    prompt_state: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "prompt_state"}


# Raw completion text, chat messages, or a Question (asked in the format the probe was trained on).
Prompt = str | list[dict[str, str]] | Question


@dataclass(frozen=True)
class ProbedScore:
    """The confidence of a completion another engine generated (`ProbedModel.score`)."""

    p_correct: float  # calibrated probability that the answer is correct (higher = more likely correct)
    score: float
    layer: int
    position: str
    abstained: bool
    threshold: float | None
    prompt_tokens: int
    completion_tokens: int  # tokens of the completion scored (up to EOS)
    answer_tokens: tuple[int, int]  # [start, end) of the completion tokens the probe read (graded answer)
    answer_text: str  # the graded answer: completion cut at the stop string / first line, stripped
    artifact: str | None = None  # digest of the probe artifact that scored it
    novelty: float | None = None  # see ProbedGeneration
    in_domain: bool | None = None
    domain: str | None = None  # as ProbedGeneration.domain
    domain_assigned: bool = False
    model_refused: bool = False  # the graded answer is a refusal (extract.refusal)
    prompt_state: np.ndarray | None = field(default=None, repr=False, compare=False)  # see ProbedGeneration

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "prompt_state"}


class ProbedModel:
    """A model + probe. `generate` returns a `ProbedGeneration` per prompt.

    threshold: abstain when p_correct < threshold. "artifact" (default) uses the threshold stored in the
    artifact by `probecal train` (None there = never abstain); a float overrides it; None disables.
    abstain_before_generating: for `prompt_last` probes, skip generation of abstained rows.
    domains: `generate` / `score` take one domain tag per prompt; a per-domain calibrator applies that
    domain's fit (unknown domains and "" use its global fallback; other calibrators ignore it).
    Hot reload: `load_artifact` reads + verifies another artifact for this model (any thread),
    `swap_artifact` installs it between two batches (it waits for the call in progress).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        artifact: ProbeArtifact,
        threshold: float | str | None = "artifact",
        abstention_message: str = DEFAULT_ABSTENTION_MESSAGE,
        abstain_before_generating: bool = True,
        max_batch_size: int = 16,
        max_batch_tokens: int | None = None,
    ):
        self.loaded = loaded
        self.max_batch_tokens = max_batch_tokens  # score: most padded tokens per forward (None: no bound)
        self.abstention_message = abstention_message
        self.max_batch_size = max_batch_size
        self._threshold_setting = threshold
        self._abstain_before_generating_setting = abstain_before_generating
        self._install(artifact)
        self._lock = threading.Lock()  # one generate / score call at a time (and the artifact swap)
        # one encode at a time (fast tokenizers are not re-entrant); separate from the model lock so that
        # counting a prompt's tokens never waits for a generation (lock order: model, then tokenizer)
        self._tokenizer_lock = threading.Lock()

    def _install(self, artifact: ProbeArtifact) -> None:
        """Every attribute derived from the artifact (the hooks are registered per call, so a new layer or
        position takes effect at the next call)."""
        threshold = self._threshold_setting
        self.artifact = artifact
        self.layer = artifact.metadata.layer
        self.position = artifact.metadata.position
        self.threshold = artifact.abstention_threshold() if threshold == "artifact" else threshold
        # a hybrid probe's logit signals come from the answer: empty for hidden-only probes
        self.logit_features = tuple(artifact.metadata.params.get("logit_features") or ())
        self.abstain_before_generating = (
            self._abstain_before_generating_setting
            and self.position == "prompt_last"
            and not self.logit_features
        )
        if self._abstain_before_generating_setting and self.position == "prompt_last" and self.logit_features:
            log.info(
                "hybrid prompt_last probe: it reads the answer's logit signals, so it scores after generation "
                "(no pre-generation abstention)"
            )
        settings = artifact.metadata.extract_settings or {}
        self.prompt_spec = _prompt_spec(settings.get("prompt", {}))
        self.default_stop = list(settings.get("generation", {}).get("stop_strings", ["\n"]))
        self.artifact_digest = artifact.digest

    # -- hot reload ----------------------------------------------------------------------------------
    def load_artifact(self, probe_dir: str | Path) -> ProbeArtifact:
        """Read and verify (digest, kinds, this model's fingerprint) an artifact; does not install it."""
        return ProbeArtifact.load(probe_dir, expected_fingerprint=self.loaded.fingerprint)

    def swap_artifact(self, artifact: ProbeArtifact) -> ProbeArtifact:
        """Install `artifact` once the generate / score call in progress has finished; returns the old one."""
        with self._lock:
            old = self.artifact
            self._install(artifact)
        return old

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_transformers(
        cls, model: Any, tokenizer: Any, probe_dir: str | Path, name: str | None = None, **kwargs: Any
    ) -> ProbedModel:
        """Wrap objects the caller already loaded; the artifact must match the model (name, sizes)."""
        artifact = ProbeArtifact.load(probe_dir)
        loaded = from_transformers(model, tokenizer, name=name or artifact.fingerprint.name)
        return cls(loaded, ProbeArtifact.load(probe_dir, expected_fingerprint=loaded.fingerprint), **kwargs)

    @classmethod
    def from_config(cls, model_spec: Any, probe_dir: str | Path, **kwargs: Any) -> ProbedModel:
        loaded = load_model(model_spec)
        artifact = ProbeArtifact.load(probe_dir, expected_fingerprint=loaded.fingerprint)
        return cls(loaded, artifact, **kwargs)

    # -- properties the server uses ----------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.loaded.fingerprint.name

    @property
    def max_context_tokens(self) -> int:
        config = self.loaded.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(getattr(text_config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        """Token ids valid for both the tokenizer and the model's embedding lie in [0, vocab_size)."""
        embedding = self.loaded.model.get_input_embeddings().num_embeddings
        return min(int(embedding), len(self.loaded.tokenizer))

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self._encode(prompt))  # the tokenizer lock only: never waits for the model

    # -- prompts -----------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        """The one encoder training uses too (`extract.prompts.encode_prompt`): a Question gets exactly
        the ids the probe was trained on; BOS exactly once for every kind of prompt."""
        try:
            with self._tokenizer_lock:
                return encode_prompt(
                    prompt, self.loaded.tokenizer, self.loaded.uses_chat_template, self.prompt_spec
                )
        except ValueError as err:
            raise ValueError(f"{self.model_name}: {err}") from None

    def question_prompt(self, question: str) -> str:
        """The prompt text the probe was trained on, for one question (for display; `ask` and
        `generate(Question(q))` encode the question itself, which is what the probe saw)."""
        return render_prompt(
            question, self.loaded.tokenizer, self.loaded.uses_chat_template, self.prompt_spec
        )

    # -- scoring -----------------------------------------------------------------------------------
    def _score(
        self,
        vectors: np.ndarray,
        domains: Sequence[str] | None = None,
        signals: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """vectors [n, hidden], domains [n] or None, signals: the answers' logit signals (name -> [n], as
        extract.generation records them; a hybrid probe needs them) -> (p_correct [n], raw score [n])."""
        X = probe_input(vectors, self.logit_features, signals)
        if domains is None:
            return self.artifact.predict(X)
        return self.artifact.predict(X, categories=np.asarray([d or "" for d in domains], dtype=str))

    def _novelty(self, prompt_vectors) -> list[tuple[float | None, bool | None]]:
        """[n, hidden] prompt_last states at the probe's layer -> (novelty, in_domain) per row (Python types,
        so they serialize; (None, None) without a novelty model)."""
        novelty = self.artifact.score_novelty(prompt_vectors)
        if novelty is None:
            return [(None, None)] * len(prompt_vectors)
        return [(float(v), bool(v <= 1.0)) for v in novelty]

    def _resolve_domains(
        self, domains: Sequence[str | None] | None, prompt_vectors: np.ndarray | None, n: int
    ) -> tuple[list[str | None] | None, list[bool]]:
        """(domain per row, assigned per row): a client tag wins; untagged rows (None or "") get the artifact's
        cluster of their prompt_last state at the probe's layer (probes.domains), when it carries clusters."""
        clusters = getattr(self.artifact, "domains", None)
        tags = [None] * n if domains is None else list(domains)
        untagged = [i for i, d in enumerate(tags) if not d]
        if clusters is None or prompt_vectors is None or not untagged:
            return (None if domains is None else tags), [False] * n
        for i, name in zip(untagged, clusters.assign(np.asarray(prompt_vectors)[untagged]), strict=True):
            tags[i] = str(name)
        return tags, [i in set(untagged) for i in range(n)]

    def _abstains(self, p: float) -> bool:
        # a Python bool: numpy's would not serialize in a /v1/score response
        return bool(self.threshold is not None and p < self.threshold)

    def score_prompts(
        self, prompt_ids: Sequence[Sequence[int]], domains: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """prompt_last probe only: one prefill forward per batch, hooks on the probe's layer."""
        if self.logit_features:
            raise ValueError(
                f"this hybrid probe reads the answer's logit signals {list(self.logit_features)}: it "
                "cannot score a prompt before generation; use generate or score"
            )
        vectors = self.prompt_states(prompt_ids)
        return self._score(vectors, self._resolve_domains(domains, vectors, len(vectors))[0])

    def prompt_states(self, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """[n, hidden] prompt_last states at the probe's layer: one prefill forward per batch."""
        model, tok = self.loaded.model, self.loaded.tokenizer
        vectors = []
        with capture_hidden_states(model, [self.layer]) as recorder, torch.no_grad():
            for begin in range(0, len(prompt_ids), self.max_batch_size):
                recorder.clear()
                ids, mask = left_pad(
                    prompt_ids[begin : begin + self.max_batch_size], tok.pad_token_id, self.loaded.device
                )
                model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
                vectors.append(recorder.last_token(self.layer)[0].float().cpu().numpy())
        return np.concatenate(vectors)

    # -- generation --------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        streamer: Any = None,
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        domains: Sequence[str | None] | None = None,
    ) -> list[ProbedGeneration]:
        # on_text(i, piece): text pieces of prompt i as they are generated (a whole batch at once); the
        # pieces of a prompt concatenate to a prefix of its final `text`. cancelled(): polled every step,
        # True stops the generation (raises extract.streaming.GenerationCancelled). The returned text
        # stops before the stop string; `answer_chars` says which part the probe scored: the graded
        # answer (the text cut at the first stop string or line break, stripped).
        """Generate for each prompt (a completion string, a chat message list or a `Question`) with its
        confidence."""
        single = isinstance(prompts, (str, Question)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)
        )
        batch: list[Prompt] = [prompts] if single else list(prompts)
        if domains is not None and len(domains) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(domains)} domains")
        with self._lock:
            prompt_ids = [self._encode(p) for p in batch]
            results: list[ProbedGeneration | None] = [None] * len(batch)
            todo = list(range(len(batch)))
            resolved, assigned = (None if domains is None else list(domains)), [False] * len(batch)
            if self.abstain_before_generating and self.threshold is not None:
                vectors = self.prompt_states(prompt_ids)
                resolved, assigned = self._resolve_domains(domains, vectors, len(batch))
                p_pre, s_pre = self._score(vectors, resolved)
                novelty_pre = self._novelty(vectors)
                for i in range(len(batch)):
                    if self._abstains(p_pre[i]):
                        results[i] = self._result(
                            self.abstention_message,
                            p_pre[i],
                            s_pre[i],
                            True,
                            "abstained",
                            len(prompt_ids[i]),
                            0,
                            novelty=novelty_pre[i],
                            domain=None if resolved is None else resolved[i],
                            domain_assigned=assigned[i],
                            prompt_state=vectors[i],
                        )
                todo = [i for i in todo if results[i] is None]
            if todo and streamer is not None and len(todo) > 1:
                raise ValueError("a transformers streamer takes one prompt; use on_text for several")
            if todo:
                spec = GenerationSpec(
                    max_new_tokens=max_new_tokens,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else 1.0,
                    top_p=top_p,
                    batch_size=self.max_batch_size,
                    stop_strings=self.default_stop if stop is None else list(stop),
                )
                eos = set(eos_token_ids(self.loaded.model, self.loaded.tokenizer))
                # prompt_last beside the probe's site (the same forward computes it, one more vector per
                # row): the novelty model reads it, untagged requests get their domain cluster from it, and
                # it is stored with the feedback so the clusters can be refit from served traffic
                assign = getattr(self.artifact, "domains", None) is not None and not any(assigned)
                positions = list(dict.fromkeys([self.position, "prompt_last"]))
                feed = BatchFeed(
                    self.loaded.tokenizer,
                    len(todo),
                    max_new_tokens,
                    eos,
                    spec.stop_strings,
                    on_text=None if on_text is None else (lambda k, piece: on_text(todo[k], piece)),
                    cancelled=cancelled,
                )
                capture = generate_and_capture(
                    self.loaded.model,
                    self.loaded.tokenizer,
                    [prompt_ids[i] for i in todo],
                    [self.layer],
                    positions,
                    spec,
                    partial(cut_answer, stop_sequences=spec.stop_strings),
                    streamer=_Tee(feed, streamer) if streamer is not None else feed,
                )
                prompt_states = np.asarray(capture.activations[:, 0, positions.index("prompt_last"), :])
                if assign:
                    todo_resolved, todo_assigned = self._resolve_domains(
                        None if domains is None else [domains[i] for i in todo], prompt_states, len(todo)
                    )
                    if todo_resolved is not None:
                        resolved = resolved if resolved is not None else [None] * len(batch)
                        for k, i in enumerate(todo):
                            resolved[i], assigned[i] = todo_resolved[k], todo_assigned[k]
                p, score = self._score(
                    capture.activations[:, 0, 0, :],
                    None if resolved is None else [resolved[i] for i in todo],
                    capture.baselines,
                )
                novelty = self._novelty(prompt_states)
                for k, i in enumerate(todo):
                    text, n_tokens, finish = finish_text(
                        self.loaded.tokenizer, feed.tokens[k], max_new_tokens, eos, spec.stop_strings
                    )
                    answer = capture.answers[k]
                    at = text.find(answer) if answer and not capture.empty_answer[k] else -1
                    chars = None if self.position == "prompt_last" or at < 0 else (at, at + len(answer))
                    results[i] = self._result(
                        text,
                        p[k],
                        score[k],
                        self._abstains(p[k]),
                        finish,
                        len(prompt_ids[i]),
                        n_tokens,
                        completion_ids=tuple(feed.tokens[k][:n_tokens]),
                        answer_chars=chars,
                        novelty=novelty[k],
                        domain=None if resolved is None else resolved[i],
                        domain_assigned=assigned[i],
                        prompt_state=prompt_states[k],
                    )
        return results  # type: ignore[return-value]

    # -- scoring completions another engine generated ----------------------------------------------
    def prompt_ids(self, prompt: Prompt | Sequence[int]) -> list[int]:
        """Token ids of a prompt (encoded as `generate` encodes it; token ids pass through)."""
        if _is_ids(prompt) and prompt:
            return list(prompt)
        return self._encode(prompt)

    def score(
        self,
        prompts: Sequence[Prompt | Sequence[int]],
        completions: Sequence[str | Sequence[int]],
        stop: list[str] | None = None,
        domains: Sequence[str | None] | None = None,
    ) -> list[ProbedScore]:
        """The confidence `generate` would give had the model generated `completions` itself.

        One forward per batch over prompt + completion, up to the end of the graded answer and up to the
        probe's layer only; for a hybrid probe the whole forward, to the LM head (its logit signals are the
        answer tokens' log-probabilities and entropies, computed as generation computes them).
        The completion is cut as `generate` cuts it: at EOS, at the first stop string
        (`stop`, default: the probe's training stop strings), then to its first line. Token ids in and out
        avoid tokenizer drift; a text completion is encoded without special tokens.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if domains is not None and len(domains) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(domains)} domains")
        tok = self.loaded.tokenizer
        stops = self.default_stop if stop is None else list(stop)
        eos = set(eos_token_ids(self.loaded.model, tok))
        out: list[ProbedScore] = []
        with self._lock:
            ids = [list(p) if _is_ids(p) and p else self._encode(p) for p in prompts]
            with self._tokenizer_lock:
                comp = [
                    list(c) if _is_ids(c) else tok(c, add_special_tokens=False)["input_ids"]
                    for c in completions
                ]
            spans = [self._answer_span(c, stops, eos) for c in comp]
            hybrid = bool(self.logit_features)
            for chunk in self._score_chunks(ids, comp, spans):
                sequences = []
                for i in chunk:
                    start, end, _ = spans[i]
                    use_answer = (hybrid or self.position != "prompt_last") and end > start
                    sequences.append(ids[i] + comp[i][:end] if use_answer else ids[i])
                signals = None
                if hybrid:  # the whole forward: the logit signals need the LM head
                    # the answer's tokens are scored by the positions just before them, which end one
                    # before each (left-padded) sequence's end: the LM head runs on those only
                    keep = max(spans[i][1] - spans[i][0] + 1 for i in chunk)
                    hidden, logits, width = states_and_logits(
                        self.loaded.model, sequences, self.layer, tok.pad_token_id, keep_last=keep
                    )
                    kept_from = width - logits.shape[1]  # 0 when the model has no output embeddings to hook
                    rows = [
                        answer_signals(
                            logits[r],
                            comp[i],
                            width - len(sequences[r]) + len(ids[i]) - kept_from,
                            spans[i][0],
                            spans[i][1],
                            tok.eos_token_id if tok.eos_token_id is not None else min(eos, default=None),
                        )
                        for r, i in enumerate(chunk)
                    ]
                    signals = {name: np.array([row[name] for row in rows]) for name in rows[0]}
                else:  # stops at the probe's layer
                    hidden, width = states_up_to_layer(
                        self.loaded.model, sequences, self.layer, tok.pad_token_id
                    )
                vectors, prompt_vectors = [], []
                for r, i in enumerate(chunk):
                    start, end, _ = spans[i]
                    prompt_last = width - len(sequences[r]) + len(ids[i]) - 1
                    vectors.append(pool_states(hidden[r], prompt_last, start, end, self.position))
                    prompt_vectors.append(hidden[r, prompt_last])
                prompt_states = torch.stack(prompt_vectors).float().cpu().numpy()
                novelty = self._novelty(prompt_states)
                resolved, assigned = self._resolve_domains(
                    None if domains is None else [domains[i] for i in chunk], prompt_states, len(chunk)
                )
                p, score = self._score(torch.stack(vectors).cpu().numpy(), resolved, signals)
                for r, i in enumerate(chunk):
                    start, end, answer = spans[i]
                    out.append(
                        ProbedScore(
                            p_correct=float(p[r]),
                            score=float(score[r]),
                            layer=self.layer,
                            position=self.position,
                            abstained=self._abstains(p[r]),
                            threshold=self.threshold,
                            prompt_tokens=len(ids[i]),
                            completion_tokens=len(comp[i]),
                            answer_tokens=(start, end),
                            answer_text=answer,
                            artifact=self.artifact_digest,
                            novelty=novelty[r][0],
                            in_domain=novelty[r][1],
                            domain=None if resolved is None else resolved[r],
                            domain_assigned=assigned[r],
                            model_refused=is_refusal(answer),
                            prompt_state=prompt_states[r],
                        )
                    )
        return out

    def _score_chunks(self, ids: list, comp: list, spans: list) -> list[list[int]]:
        """Consecutive rows in forwards of at most max_batch_size rows and max_batch_tokens padded tokens
        (rows x the longest sequence; a single longer row runs alone): memory stays bounded whatever the
        completions' lengths."""
        chunks: list[list[int]] = [[]]
        longest = 0
        for i in range(len(ids)):
            length = len(ids[i]) + spans[i][1]
            rows, width = len(chunks[-1]) + 1, max(longest, length)
            too_many = self.max_batch_tokens is not None and rows * width > self.max_batch_tokens
            if chunks[-1] and (rows > self.max_batch_size or too_many):
                chunks.append([])
                width = length
            chunks[-1].append(i)
            longest = width
        return [c for c in chunks if c]

    def _answer_span(self, completion: list[int], stops: list[str], eos: set[int]) -> tuple[int, int, str]:
        """[start, end) of the graded answer within `completion` and its text, cut as generation cuts it."""
        cut = cut_generation(
            self.loaded.tokenizer, completion, eos, stops, partial(cut_answer, stop_sequences=stops)
        )
        return cut.start, cut.end, cut.answer

    def ask(self, questions: str | Sequence[str], **kwargs: Any) -> list[ProbedGeneration]:
        """Generate answers to questions formatted with the prompt the probe was trained on."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        return self.generate([Question(q) for q in questions], **kwargs)

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str | ProbedGeneration]:
        """Yield text pieces as they are generated, then the final `ProbedGeneration`; the pieces
        concatenate to its `text` (an abstention yields the abstention message as one piece)."""
        import queue

        pieces: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}

        def work():
            try:
                outcome["result"] = self.generate(
                    prompt, on_text=lambda i, piece: pieces.put(piece), **kwargs
                )[0]
            except BaseException as err:  # re-raised in the caller's thread
                outcome["error"] = err
            pieces.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        sent = ""
        while (piece := pieces.get()) is not None:
            sent += piece
            yield piece
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        if result.text.startswith(sent) and len(result.text) > len(sent):
            yield result.text[len(sent) :]
        yield result

    def _result(
        self,
        text,
        p,
        score,
        abstained,
        finish,
        prompt_tokens,
        completion_tokens,
        completion_ids=(),
        answer_chars=None,
        novelty=(None, None),
        domain=None,
        domain_assigned=False,
        prompt_state=None,
    ) -> ProbedGeneration:
        # Judged on the model's own answer (the graded part), before an abstention message replaces it.
        refused = finish != "abstained" and is_refusal(cut_answer(text))
        if abstained and finish != "abstained":
            text, answer_chars = self.abstention_message, None
        return ProbedGeneration(
            text=text,
            p_correct=float(p),
            score=float(score),
            layer=self.layer,
            position=self.position,
            abstained=bool(abstained),
            threshold=self.threshold,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            completion_ids=completion_ids,
            answer_chars=answer_chars,
            artifact=self.artifact_digest,
            novelty=novelty[0],
            in_domain=novelty[1],
            domain=domain,
            domain_assigned=bool(domain_assigned),
            model_refused=refused,
            prompt_state=prompt_state,
        )


def _is_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


class _Tee:
    """Hands every `put`/`end` to two streamers (the batch feed and a caller's own streamer)."""

    def __init__(self, *streamers: Any):
        self.streamers = streamers

    def put(self, value: Any) -> None:
        for s in self.streamers:
            s.put(value)

    def end(self) -> None:
        for s in self.streamers:
            s.end()
