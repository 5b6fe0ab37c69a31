"""Runtime wrapper: a calibrated probability of correctness with every generation, and abstention.

`ProbedModel` (below) joins a live model and a saved probe. It hooks only the layer the probe reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
