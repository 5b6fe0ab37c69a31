"""Engine-agnostic scoring: a hidden-state vector in, a calibrated P(correct) out.

For serving engines that expose hidden states themselves (vLLM, SGLang, your own forward hooks).
Needs numpy (and scikit-learn/scipy through the probe classes), never transformers or a model.

Layer indexing: probecal's layer L is Hugging Face's `hidden_states[L]`: L = 0 is the embedding output,
L = i the output of decoder block i (1-based), and the LAST layer (L = num_layers) is taken AFTER the final
norm. Engines differ: a forward hook on `model.layers[k]` (0-based) gives probecal layer k + 1, and for the
last block a hook on the block gives the state BEFORE the final norm (hook the final norm module instead).
SGLang's `return_hidden_states` and vLLM's hidden-state outputs return the final (post-norm) state of the
last layer, i.e. probecal layer num_layers only; probes trained on other layers need a hook there.
The position matters too: `answer_last` is the state when the answer's last token is fed back to the
model, `prompt_last` the state of the last prompt token (available right after prefill).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from probes.artifact import ProbeArtifact


class ProbeScorer:
    """Load a probe artifact and map vectors to calibrated probabilities (higher = more likely correct).

        scorer = ProbeScorer("outputs/runs/.../probe")
        p = scorer.p_correct(vector)            # vector [hidden] -> float, or [n, hidden] -> [n]
        scorer.layer, scorer.position           # where the vector must come from
        scorer.digest                           # the artifact's identity (metadata + tensors), for logs

    Loading refuses an artifact whose digest does not match (see probes.artifact).
    """

    def __init__(self, probe_dir: str | Path):
        self.artifact = ProbeArtifact.load(probe_dir)
        self.layer = self.artifact.metadata.layer
        self.position = self.artifact.metadata.position
        self.hidden_size = self.artifact.fingerprint.hidden_size
        self.digest = self.artifact.digest

    def p_correct(self, vectors, categories=None):
        """[hidden] -> float, or [n, hidden] -> [n] calibrated P(correct). Accepts numpy or torch (CPU/GPU)."""
        array = _to_numpy(vectors)
        single = array.ndim == 1
        array = np.atleast_2d(array)
        if array.ndim != 2 or array.shape[1] != self.hidden_size:
            raise ValueError(
                f"expected vectors of size {self.hidden_size} (layer {self.layer}, {self.position}); got shape "
                f"{tuple(np.shape(vectors))}"
            )
        p, _ = self.artifact.predict(array, categories=categories)
        return float(p[0]) if single else p

    def abstains(self, p: float, threshold: float | None = None) -> bool:
        """True when p is below `threshold` (default: the threshold stored with the probe, if any)."""
        limit = self.artifact.abstention_threshold() if threshold is None else threshold
        return limit is not None and p < limit


def _to_numpy(vectors) -> np.ndarray:
    if hasattr(vectors, "detach"):  # torch tensor, any device / dtype
        vectors = vectors.detach().float().cpu().numpy()
    return np.asarray(vectors, dtype=np.float64)
