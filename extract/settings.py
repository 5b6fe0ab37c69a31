"""Settings of the extract stage: what to generate and which hidden states to capture.

Built by Hydra from `conf/extract/*.yaml` (`_target_` points here); plain dataclasses, so callers
and tests can also build them directly.

Capture sites, named once for the whole project (the Hugging Face `hidden_states` convention):
- layer 0 = the input of the first decoder block (the embedding output, incl. position embeddings
  for GPT-2 and the sqrt(hidden) scale for Gemma);
- layer i (1 <= i < num_layers) = the output of decoder block i (1-based);
- layer num_layers = the output of the final norm, i.e. AFTER the last block AND the final norm
  (Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX), exactly as `hidden_states[-1]` in Hugging Face.
Positions (see `extract.generation`):
- `prompt_last`: the last prompt token (its state is known before any token is generated);
- `answer_last`: the last token of the graded (cut) answer, excluding stop strings, EOS and padding;
- `answer_mean`: the mean over the graded answer's tokens.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from extract.engine import ENGINES
from extract.grading import GRADERS
from extract.prompts import PromptSpec

POSITIONS: tuple[str, ...] = ("prompt_last", "answer_last", "answer_mean")
STORE_DTYPES: tuple[str, ...] = ("float16", "float32")


@dataclass
class GenerationSpec:
    """How answers are generated. Greedy by default; `do_sample=True` uses temperature/top_p.

    max_new_tokens: answer budget; an answer not finished within it is flagged `truncated`.
    stop_strings: generation of a row stops at the first of these (the text before it is graded).
    batch_size: prompts per `model.generate` call (left padding); with extract.engine=openai, rows per
    teacher-forced forward.
    """

    _target_: str = "extract.settings.GenerationSpec"
    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    stop_strings: list[str] = field(default_factory=lambda: ["\n"])


@dataclass
class ExtractSpec:
    """The extract group: capture sites, generation, activation store, optional baselines.

    layers: "all" (0..num_layers) or a list of layer indices (0 = embeddings, see module doc).
    positions: a subset of `POSITIONS`, in the order they are stored.
    store_dtype: float16 | float32 (activations on disk; reading always gives float32).
    shard_size: rows per safetensors shard (the unit of resume after an interruption).
    store_root: stores go to `<store_root>/<model>-<settings key[:12]>`.
    p_true / verbalized: optional self-evaluation baselines (one more model call per question each).
    prompt: how questions become model inputs (extract.prompts.PromptSpec).
    grader: exact | contains | f1 (extract.grading); f1_threshold for the f1 grader.
    engine: hf (transformers' generate, states captured in the same pass) | openai (answers from an
    OpenAI-compatible engine at engine_url, `http://host:port/v1`; states from one teacher-forced forward
    in probecal: extract.engine). engine_model: the served model's name ("" = the one /v1/models lists);
    engine_timeout_s: the most one request may take, whole answer included; engine_concurrency: requests
    in flight at once.
    """

    _target_: str = "extract.settings.ExtractSpec"
    layers: Any = "all"
    positions: list[str] = field(default_factory=lambda: list(POSITIONS))
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    store_dtype: str = "float16"
    shard_size: int = 256
    store_root: str = "outputs/stores"
    p_true: bool = False
    verbalized: bool = False
    prompt: PromptSpec = field(default_factory=PromptSpec)
    grader: str = "contains"
    f1_threshold: float = 0.5
    engine: str = "hf"
    engine_url: str = ""
    engine_model: str = ""
    engine_timeout_s: float = 120.0
    engine_concurrency: int = 16

    def __post_init__(self) -> None:
        # Hydra builds nested nodes without a _target_ as plain dicts.
        if isinstance(self.prompt, dict):
            self.prompt = PromptSpec(**self.prompt)
        if isinstance(self.generation, dict):
            self.generation = GenerationSpec(**self.generation)

    def check(self) -> None:
        if self.grader not in GRADERS:
            raise ValueError(f"extract.grader={self.grader!r}; allowed: {', '.join(GRADERS)}")
        if self.engine not in ENGINES:
            raise ValueError(f"extract.engine={self.engine!r}; allowed: {', '.join(ENGINES)}")
        if self.engine != "openai":
            return
        url = urllib.parse.urlsplit(self.engine_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"extract.engine_url={self.engine_url!r}: extract.engine=openai needs the engine's "
                "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
            )
        if not self.engine_timeout_s > 0:
            raise ValueError(f"extract.engine_timeout_s={self.engine_timeout_s}: must be > 0")
        if isinstance(self.engine_concurrency, bool) or not self.engine_concurrency >= 1:
            raise ValueError(f"extract.engine_concurrency={self.engine_concurrency}: must be an integer >= 1")
        if self.generation.do_sample:
            raise ValueError(
                "extract.engine=openai decodes greedily (probes are trained on greedy answers): "
                "set extract.generation.do_sample=false"
            )
