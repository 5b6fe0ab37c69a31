"""Real packaged model (SmolLM2-135M-Instruct): `ProbedModel.score` of the tokens the wrapper generated gives
the generation's confidence to 1e-5, at every position, with answers cut at the stop string (and trailing
tokens after it ignored), per-domain calibration included. The probe is fitted in the test on synthetic data
at one layer (its values do not matter, only that both paths read the same vector); artifacts are swapped
with `swap_artifact`, the hot-reload path of the server."""

import numpy as np
import pytest

from extract.models import ModelSpec, load_model
from extract.prompts import Question
from probes.artifact import ProbeArtifact
from probes.calibration import PerCategoryCalibrator, PlattCalibrator
from probes.estimators import PROBES
from probes.runtime.wrapper import ProbedModel
from tests.paths import TEST_DEVICE

pytestmark = pytest.mark.integration

LAYER = 12
QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "What is 2 + 2?"]
DOMAINS = ["med", None, "law"]
STOP = ["."]  # SmolLM2 answers in sentences: the stop string cuts them


def _platt(a: float, b: float) -> PlattCalibrator:
    calibrator = PlattCalibrator()
    calibrator.a_, calibrator.b_ = np.float64(a), np.float64(b)
    return calibrator


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelSpec(name="smollm2-135m-instruct", device=TEST_DEVICE))


@pytest.fixture(scope="module")
def probe(smollm2):
    rng = np.random.default_rng(0)
    hidden = smollm2.fingerprint.hidden_size
    X = rng.normal(size=(64, hidden)).astype(np.float32)
    y = (X[:, :8].sum(1) > 0).astype(int)
    return PROBES["logistic"](Cs=(0.01,), cv=3).fit(X, y)


def _artifact(probe, fingerprint, position: str) -> ProbeArtifact:
    calibrator = PerCategoryCalibrator(base="platt")
    calibrator.global_ = _platt(0.3, 0.1)
    calibrator.per_category_ = {"med": _platt(0.2, -0.5)}
    return ProbeArtifact.create(
        probe,
        calibrator,
        LAYER,
        position,
        fingerprint,
        training_data_hash="synthetic",
        split_sizes={"train": 64},
    )


@pytest.mark.parametrize("position", ["answer_mean", "answer_last", "prompt_last"])
def test_score_equals_generation_score(smollm2, probe, position):
    art = _artifact(probe, smollm2.fingerprint, position)
    pm = ProbedModel(smollm2, _artifact(probe, smollm2.fingerprint, "answer_last"), threshold=None)
    pm.swap_artifact(art)  # what POST /admin/reload does between two batches
    assert (pm.layer, pm.position, pm.artifact_digest) == (LAYER, position, art.digest)
    gens = pm.ask(QUESTIONS, max_new_tokens=20, stop=STOP, domains=DOMAINS)
    assert any(g.finish_reason == "stop" and g.completion_tokens < 20 for g in gens)  # cut at the stop string
    prompts = [pm.prompt_ids(Question(q)) for q in QUESTIONS]
    tok = smollm2.tokenizer
    trailing = tok(" And then some more words follow.", add_special_tokens=False)["input_ids"]
    completions = [list(g.completion_ids) + (trailing if g.finish_reason == "stop" else []) for g in gens]
    scores = pm.score(prompts, completions, stop=STOP, domains=DOMAINS)
    for g, s in zip(gens, scores, strict=True):
        assert s.p_correct == pytest.approx(g.p_correct, abs=1e-5), (g.text, s.answer_text)
        assert s.score == pytest.approx(g.score, abs=1e-4)
        assert s.artifact == g.artifact == art.digest
    # the domain tag matters: "med" has its own calibrator, "law" falls back to the global one
    unscoped = pm.score(prompts, completions, stop=STOP)
    assert unscoped[0].p_correct != pytest.approx(scores[0].p_correct, abs=1e-6)
    assert unscoped[2].p_correct == pytest.approx(scores[2].p_correct, abs=1e-12)
