"""Engine-agnostic scoring: a hidden-state vector in, a calibrated P(correct) out.

For serving engines that expose hidden states themselves (vLLM, SGLang, your own forward hooks).
Needs numpy and safetensors only: no scikit-learn, scipy, torch, transformers or model (it reads the artifact
with probes.artifact.read_artifact and scores with probes.inference, the math the estimator classes use).

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

from probes.artifact import ArtifactError, read_artifact
from probes.inference import (
    CALIBRATOR_INFERENCE_KINDS,
    PROBE_DECISIONS,
    InferenceError,
    calibrated_probability,
    probe_decision,
    probe_input,
    probe_input_width,
    sigmoid,
)


class ProbeScorer:
    """Load a probe artifact and map vectors to calibrated probabilities (higher = more likely correct).

        scorer = ProbeScorer("outputs/runs/.../probe")
        p = scorer.p_correct(vector)            # vector [hidden] -> float, or [n, hidden] -> [n]
        scorer.layer, scorer.position           # where the vector must come from
        scorer.digest                           # the artifact's identity (metadata + tensors), for logs
        n = scorer.novelty(prompt_vector)       # > 1: a question unlike training, its p is unverified

    Loading refuses an artifact whose digest does not match (see probes.artifact), and a probe or
    calibrator kind without numpy inference (probes.inference), naming the kind.

    A hybrid probe (kind "hybrid") reads the hidden state AND the answer's logit signals, named in
    `scorer.logit_features` (the default run: all six of extract.generation.BASELINE_NAMES, sorted by name):
        p = scorer.p_correct(vectors, logit_signals={"mean_logprob": [...], "sequence_prob": [...], ...})
    with the raw values an engine can compute from the answer tokens' logits (sequence_prob a probability,
    perplexity = exp(-mean_logprob), entropies in nats; see extract.generation.answer_baselines), or an [n, m]
    array with columns in `scorer.logit_features` order. `scorer.needs_logit_signals` says whether it is one.
    """

    def __init__(self, probe_dir: str | Path):
        files = read_artifact(probe_dir)
        meta = files.metadata
        self.metadata = meta
        self.layer = meta.layer
        self.position = meta.position
        self.hidden_size = files.fingerprint.hidden_size
        self.digest = files.digest
        self.logit_features = tuple(meta.params.get("logit_features") or ())
        where = f"probe artifact {files.directory}"
        if meta.kind not in PROBE_DECISIONS:
            raise ArtifactError(
                f"{where}: probe kind {meta.kind!r} has no numpy inference function (probes.inference."
                f"PROBE_DECISIONS: {', '.join(PROBE_DECISIONS)}), so ProbeScorer cannot score it; "
                "ProbeArtifact.load(...).predict can"
            )
        if meta.calibrator_kind is not None and meta.calibrator_kind not in CALIBRATOR_INFERENCE_KINDS:
            raise ArtifactError(
                f"{where}: calibrator kind {meta.calibrator_kind!r} has no numpy inference function "
                f"(probes.inference: {', '.join(CALIBRATOR_INFERENCE_KINDS)}), so ProbeScorer cannot score it; "
                "ProbeArtifact.load(...).predict can"
            )
        try:
            self.n_features = probe_input_width(meta.kind, files.probe_tensors)
            self._decision = probe_decision(meta.kind, meta.params, files.probe_tensors)
            self._calibrate = (
                None
                if meta.calibrator_kind is None
                else calibrated_probability(
                    meta.calibrator_kind, meta.calibrator_params, files.calibrator_tensors
                )
            )
        except InferenceError as err:
            raise ArtifactError(f"{where}: {err}") from None
        self.n_hidden = self.n_features - len(self.logit_features)
        files.check_hidden_size(self.n_hidden)
        try:
            self._novelty = files.novelty_model()
        except (ValueError, KeyError) as err:
            raise ArtifactError(f"{where}: novelty model: {err}") from None

    @property
    def has_novelty(self) -> bool:
        """True when the artifact carries a novelty model (artifacts trained before it existed do not)."""
        return self._novelty is not None

    def novelty(self, prompt_vectors):
        """[hidden] -> float, or [n, hidden] -> [n]: how far the question lies from the probe's training rows
        (probes.novelty: 1.0 = the cut-off; `in_domain` = novelty <= 1). The vectors are the PROMPT's last
        token state at `scorer.layer` (prompt_last), whatever position the probe itself reads."""
        if self._novelty is None:
            raise ValueError(
                "this artifact has no novelty model (trained before probecal had one): retrain it"
            )
        array = np.atleast_2d(_to_numpy(prompt_vectors))
        novelty = self._novelty.score(array)
        return float(novelty[0]) if np.ndim(prompt_vectors) == 1 else novelty

    @property
    def needs_logit_signals(self) -> bool:
        """True for a hybrid probe: p_correct needs the answer's logit signals (`logit_features`)."""
        return bool(self.logit_features)

    def p_correct(self, vectors, categories=None, logit_signals=None):
        """[hidden] -> float, or [n, hidden] -> [n] calibrated P(correct). Accepts numpy or torch (CPU/GPU).

        logit_signals: required by a hybrid probe (see the class docstring), ignored otherwise."""
        array = _to_numpy(vectors)
        single = array.ndim == 1
        array = np.atleast_2d(array)
        if array.ndim != 2 or array.shape[1] != self.n_hidden:
            hint = ""
            if self.logit_features and array.ndim == 2 and array.shape[1] == self.n_features:
                hint = "; pass the hidden state alone and the raw signals as logit_signals"
            raise ValueError(
                f"expected vectors of size {self.n_hidden} (the hidden state at layer {self.layer}, {self.position})"
                f"; got shape {tuple(np.shape(vectors))}{hint}"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError("vectors contain nan or inf")
        if self.logit_features:
            if logit_signals is not None and not isinstance(logit_signals, dict):
                logit_signals = _to_numpy(logit_signals)
            array = probe_input(array, self.logit_features, logit_signals)
            if not np.all(np.isfinite(array)):
                raise ValueError("logit_signals contain nan or inf")
        raw = self._decision(array)
        p = sigmoid(raw) if self._calibrate is None else self._calibrate(raw, categories)
        return float(p[0]) if single else p

    def abstains(self, p: float, threshold: float | None = None) -> bool:
        """True when p is below `threshold` (default: the threshold stored with the probe, if any)."""
        limit = self.metadata.abstention_threshold() if threshold is None else threshold
        return limit is not None and p < limit


def _to_numpy(vectors) -> np.ndarray:
    if hasattr(vectors, "detach"):  # torch tensor, any device / dtype
        vectors = vectors.detach().float().cpu().numpy()
    return np.asarray(vectors, dtype=np.float64)
