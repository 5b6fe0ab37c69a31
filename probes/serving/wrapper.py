"""Runtime wrapper: a calibrated probability of correctness with every generation, and abstention.

`ProbedModel` joins a live transformers model and a saved probe artifact. It hooks only the layer the
probe reads and captures the probe's position during the normal `generate` call (no
`output_hidden_states`, no second pass over the sequence): see `extract.generation.generate_and_capture`.

Pre-generation mode: a probe trained at `prompt_last` scores the question from the prompt alone; with an
abstention threshold, rows below it get the abstention message and are never generated (one prefill
forward per prompt is spent on scoring; the rows that are answered run their normal generation).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.generation import generate_and_capture, left_pad
from extract.grading import cut_answer
from extract.hooks import capture_hidden_states
from extract.models import LoadedModel, from_transformers, load_model
from extract.prompts import PromptSpec, render_prompt
from extract.settings import GenerationSpec
from probes.artifact import ProbeArtifact

DEFAULT_ABSTENTION_MESSAGE = "I don't know."
log = logging.getLogger(__name__)


def _prompt_spec(saved: dict[str, Any]) -> PromptSpec:
    """The prompt settings stored with the probe; fields this version no longer has are ignored, loudly."""
    known = {f.name for f in fields(PromptSpec)}
    unknown = sorted(set(saved) - known)
    if unknown:
        log.warning("probe artifact prompt settings %s are unknown to this probecal version: ignored", unknown)
    return PromptSpec(**{k: v for k, v in saved.items() if k in known})


@dataclass(frozen=True)
class ProbedGeneration:
    """One generated sequence with its confidence. Higher `p_correct` = more likely correct."""

    text: str  # the generated text (the abstention message when abstained before generating)
    p_correct: float  # calibrated probability that the answer is correct
    score: float  # raw probe score (decision function) before calibration
    layer: int  # hidden-state layer the probe read (0 = embeddings, i = output of block i)
    position: str  # prompt_last | answer_last | answer_mean
    abstained: bool  # True when p_correct fell below the threshold
    threshold: float | None  # abstention threshold in force (None: no abstention policy)
    finish_reason: str  # "stop" (stop sequence / EOS), "length" (max_new_tokens), "abstained"
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Prompt = str | list[dict[str, str]]


class ProbedModel:
    """A model + probe. `generate` returns a `ProbedGeneration` per prompt.

    threshold: abstain when p_correct < threshold. "artifact" (default) uses the threshold stored in the
    artifact by `probecal train` (None there = never abstain); a float overrides it; None disables.
    abstain_before_generating: for `prompt_last` probes, skip generation of abstained rows.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        artifact: ProbeArtifact,
        threshold: float | str | None = "artifact",
        abstention_message: str = DEFAULT_ABSTENTION_MESSAGE,
        abstain_before_generating: bool = True,
        max_batch_size: int = 16,
    ):
        self.loaded = loaded
        self.artifact = artifact
        self.layer = artifact.metadata.layer
        self.position = artifact.metadata.position
        self.threshold = artifact.abstention_threshold() if threshold == "artifact" else threshold
        self.abstention_message = abstention_message
        self.abstain_before_generating = abstain_before_generating and self.position == "prompt_last"
        self.max_batch_size = max_batch_size
        settings = artifact.metadata.extract_settings or {}
        self.prompt_spec = _prompt_spec(settings.get("prompt", {}))
        self.default_stop = list(settings.get("generation", {}).get("stop_strings", ["\n"]))
        self._lock = threading.Lock()  # one generate / tokenizer call at a time (fast tokenizers are not re-entrant)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_transformers(cls, model: Any, tokenizer: Any, probe_dir: str | Path, name: str | None = None,
                          **kwargs: Any) -> ProbedModel:
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

    def count_tokens(self, prompt: Prompt) -> int:
        with self._lock:
            return len(self._encode(prompt))

    # -- prompts -----------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if isinstance(prompt, str):
            return tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not self.loaded.uses_chat_template:
            raise ValueError(f"{self.model_name} has no chat template: send a plain prompt string")
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]

    def question_prompt(self, question: str) -> str:
        """The prompt text the probe was trained on, for one question."""
        return render_prompt(question, self.loaded.tokenizer, self.loaded.uses_chat_template, self.prompt_spec)

    # -- scoring -----------------------------------------------------------------------------------
    def _score(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """vectors [n, hidden] -> (p_correct [n], raw score [n])."""
        return self.artifact.predict(vectors)

    def _abstains(self, p: float) -> bool:
        return self.threshold is not None and p < self.threshold

    def score_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """prompt_last probe only: one prefill forward per batch, hooks on the probe's layer."""
        model, tok = self.loaded.model, self.loaded.tokenizer
        vectors = []
        with capture_hidden_states(model, [self.layer]) as recorder, torch.no_grad():
            for begin in range(0, len(prompt_ids), self.max_batch_size):
                recorder.clear()
                ids, mask = left_pad(prompt_ids[begin : begin + self.max_batch_size], tok.pad_token_id,
                                      self.loaded.device)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                vectors.append(recorder.last_token(self.layer)[0].float().cpu().numpy())
        return self._score(np.concatenate(vectors))

    # -- generation --------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, streamer: Any = None) -> list[ProbedGeneration]:
        """Generate for each prompt (a completion string or a chat message list) with its confidence."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        batch: list[Prompt] = [prompts] if single else list(prompts)
        with self._lock:
            prompt_ids = [self._encode(p) for p in batch]
            results: list[ProbedGeneration | None] = [None] * len(batch)
            todo = list(range(len(batch)))
            if self.abstain_before_generating and self.threshold is not None:
                p_pre, s_pre = self.score_prompts(prompt_ids)
                for i in range(len(batch)):
                    if self._abstains(p_pre[i]):
                        results[i] = self._result(self.abstention_message, p_pre[i], s_pre[i], True, "abstained",
                                                  len(prompt_ids[i]), 0)
                todo = [i for i in todo if results[i] is None]
            if todo:
                spec = GenerationSpec(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                      temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                                      batch_size=self.max_batch_size,
                                      stop_strings=self.default_stop if stop is None else list(stop))
                capture = generate_and_capture(
                    self.loaded.model, self.loaded.tokenizer, [prompt_ids[i] for i in todo], [self.layer],
                    [self.position], spec, partial(cut_answer, stop_sequences=spec.stop_strings), streamer=streamer,
                )
                p, score = self._score(capture.activations[:, 0, 0, :])
                for k, i in enumerate(todo):
                    finish = "length" if capture.truncated[k] else "stop"
                    abstained = self._abstains(p[k])
                    results[i] = self._result(capture.raw_generations[k], p[k], score[k], abstained, finish,
                                              len(prompt_ids[i]), int(capture.n_answer_tokens[k]))
        return results  # type: ignore[return-value]

    def ask(self, questions: str | Sequence[str], **kwargs: Any) -> list[ProbedGeneration]:
        """Generate answers to questions formatted with the prompt the probe was trained on."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        return self.generate([self.question_prompt(q) for q in questions], **kwargs)

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str | ProbedGeneration]:
        """Yield text pieces as they are generated, then the final `ProbedGeneration`."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict[str, Any] = {}

        def work():
            try:
                outcome["result"] = self.generate(prompt, streamer=streamer, **kwargs)[0]
            except BaseException as err:  # re-raised in the caller's thread
                outcome["error"] = err
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["result"]

    def _result(self, text, p, score, abstained, finish, prompt_tokens, completion_tokens) -> ProbedGeneration:
        if abstained and finish != "abstained":
            text = self.abstention_message
        return ProbedGeneration(
            text=text, p_correct=float(p), score=float(score), layer=self.layer, position=self.position,
            abstained=bool(abstained), threshold=self.threshold, finish_reason=finish,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        )
