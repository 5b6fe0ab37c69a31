"""Hybrid probes (hidden state + the model's logit signals) served everywhere a probe is: `generate`, the
/v1/score sidecar (`ProbedModel.score`, one whole forward to the LM head), `ProbeScorer` (numpy only), the
hot reload and the proxy in front of an upstream engine. The logit signals must be the ones training saw:
extract.generation's baselines of the answer, turned into features by probes.inference.logit_feature_matrix."""

import json
import subprocess
import sys

import numpy as np
import pytest

from extract.generation import BASELINE_NAMES
from extract.models import from_transformers
from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator
from probes.estimators import HybridProbe, LogisticProbe
from probes.inference import logit_feature_matrix, probe_input
from probes.runtime.wrapper import ProbedModel
from probes.scorer import ProbeScorer
from probes.serving.app import create_app
from probes.serving.serving import smoke_test
from probes.serving.settings import ServeSettings
from tests.paths import ROOT
from tests.unit.probes.serving.test_server_openai import running, sdk, stub_upstream  # noqa: F401 (the upstream engine fixture)

NAMES = tuple(sorted(BASELINE_NAMES))  # what the default run's hybrid reads, in its order
PROMPTS = ["what is the capital of france ?", "what is 12 + 30 ?", "which city is in asia ?"]
NEVER = ["w98"]  # practically never generated: answers run to the length limit


def raw_signals(rng, n) -> dict[str, np.ndarray]:
    """Plausible raw signals as generation records them (probabilities, entropies in nats, perplexity)."""
    mean_lp = -rng.exponential(1.5, n)
    return {
        "mean_logprob": mean_lp,
        "min_logprob": mean_lp - rng.exponential(1.0, n),
        "mean_entropy": rng.exponential(2.0, n),
        "first_token_prob": rng.uniform(0.05, 1.0, n),
        "sequence_prob": np.exp(3 * mean_lp),
        "perplexity": np.exp(-mean_lp),
    }


def hybrid_artifact(fingerprint, layer, position, directory, threshold=None, stop=("?",)):
    rng = np.random.default_rng(layer)
    n = 120
    hidden = rng.normal(size=(n, fingerprint.hidden_size))
    signals = raw_signals(rng, n)
    X = probe_input(hidden, NAMES, signals)
    y = (hidden[:, 0] + 2.0 * signals["mean_logprob"] + 2.0 + 0.3 * rng.normal(size=n) > 0).astype(int)
    probe = HybridProbe(logit_features=NAMES, logit_weight=2.0, C=1.0).fit(X, y)
    calibrator = PlattCalibrator().fit(probe.decision_function(X), y)
    thresholds = [] if threshold is None else [{"reachable": True, "threshold": threshold}]
    artifact = ProbeArtifact.create(
        probe,
        calibrator,
        layer,
        position,
        fingerprint,
        thresholds=thresholds,
        extract_settings={"generation": {"stop_strings": list(stop)}},
    )
    artifact.save(directory)
    return artifact, hidden, signals


def spy_signals(pm: ProbedModel) -> list:
    """Record the logit signals each scoring call hands the probe."""
    seen, score = [], pm._score

    def recording(vectors, domains=None, signals=None):
        seen.append(signals)
        return score(vectors, domains, signals)

    pm._score = recording
    return seen


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("position", ["answer_last", "answer_mean", "prompt_last"])
def test_hybrid_score_equals_generate(arch, position, tiny_llama, tiny_gpt2, word_tokenizer, tmp_path):
    model = tiny_llama if arch == "llama" else tiny_gpt2
    loaded = from_transformers(model, word_tokenizer, name="tiny")
    for layer in (0, 2, model.config.num_hidden_layers):
        hybrid_artifact(loaded.fingerprint, layer, position, tmp_path / str(layer))
        pm = ProbedModel.from_transformers(
            model, word_tokenizer, tmp_path / str(layer), threshold=None, max_batch_size=4
        )
        assert pm.logit_features == NAMES
        seen = spy_signals(pm)
        gens = pm.generate(PROMPTS, max_new_tokens=6, stop=NEVER)
        ids = [pm.prompt_ids(p) for p in PROMPTS]
        scores = pm.score(ids, [list(g.completion_ids) for g in gens], stop=NEVER)
        np.testing.assert_allclose([s.p_correct for s in scores], [g.p_correct for g in gens], atol=1e-5)
        np.testing.assert_allclose([s.score for s in scores], [g.score for g in gens], atol=1e-4)
        generated, scored = seen
        for name in BASELINE_NAMES:  # the sidecar's signals are generation's, name by name
            np.testing.assert_allclose(scored[name], generated[name], rtol=1e-4, atol=1e-6, err_msg=name)
        by_text = pm.score(PROMPTS, [g.text for g in gens], stop=NEVER)
        np.testing.assert_allclose([s.p_correct for s in by_text], [s.p_correct for s in scores], atol=1e-6)


def test_hybrid_score_cuts_at_the_stop_string_and_the_signals_matter(tiny_llama, word_tokenizer, tmp_path):
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    hybrid_artifact(loaded.fingerprint, 2, "answer_mean", tmp_path)
    pm = ProbedModel.from_transformers(tiny_llama, word_tokenizer, tmp_path, threshold=None)
    full = pm.generate(PROMPTS[0], max_new_tokens=8, stop=NEVER)[0]
    stop = [full.text.split()[3]]
    short = pm.generate(PROMPTS[0], max_new_tokens=8, stop=stop)[0]
    (scored,) = pm.score([PROMPTS[0]], [list(full.completion_ids)], stop=stop)
    assert scored.p_correct == pytest.approx(short.p_correct, abs=1e-5)
    # the same hidden state with other logit signals scores differently: the signals reach the probe
    seen = spy_signals(pm)
    pm.score([PROMPTS[0]], [list(full.completion_ids)], stop=stop)
    vectors_p = pm.artifact.predict(
        probe_input(np.zeros((1, 32)), NAMES, {k: v * 0.5 for k, v in seen[0].items()})
    )
    assert vectors_p[0][0] != pytest.approx(
        pm.artifact.predict(probe_input(np.zeros((1, 32)), NAMES, seen[0]))[0][0]
    )


def test_empty_answers_are_scored_like_generation(tiny_llama, word_tokenizer, tmp_path):
    """An answer cut to nothing (the stop string first) is scored on its first token, as generation does."""
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    hybrid_artifact(loaded.fingerprint, 2, "answer_last", tmp_path)
    pm = ProbedModel.from_transformers(tiny_llama, word_tokenizer, tmp_path, threshold=None)
    full = pm.generate(PROMPTS, max_new_tokens=4, stop=NEVER)
    stops = [[g.text.split()[0]] for g in full]  # each row's first word: an empty graded answer
    for prompt, gen, stop in zip(PROMPTS, full, stops, strict=True):
        short = pm.generate(prompt, max_new_tokens=4, stop=stop)[0]
        assert short.text.strip() == ""
        (scored,) = pm.score([prompt], [list(gen.completion_ids)], stop=stop)
        assert scored.answer_tokens[0] == scored.answer_tokens[1]
        assert scored.p_correct == pytest.approx(short.p_correct, abs=1e-5)


def test_hybrid_score_runs_the_lm_head_and_hidden_only_probes_still_stop_early(
    tiny_llama, word_tokenizer, tmp_path
):
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    hybrid_artifact(loaded.fingerprint, 1, "answer_last", tmp_path / "hybrid")
    pm = ProbedModel.from_transformers(tiny_llama, word_tokenizer, tmp_path / "hybrid", threshold=None)
    ran = []
    handle = tiny_llama.lm_head.register_forward_hook(lambda m, a, o: ran.append("lm_head"))
    try:
        pm.score(PROMPTS, ["paris", "42", "rome"])
        assert ran == ["lm_head"]
        rng = np.random.default_rng(0)
        X = rng.normal(size=(40, 32))
        y = (X[:, 0] > 0).astype(int)
        ProbeArtifact.create(LogisticProbe(C=1.0).fit(X, y), None, 1, "answer_last", loaded.fingerprint).save(
            tmp_path / "plain"
        )
        pm.swap_artifact(pm.load_artifact(tmp_path / "plain"))  # hot reload: hybrid -> hidden-only
        assert pm.logit_features == ()
        pm.score(PROMPTS, ["paris", "42", "rome"])
        assert ran == ["lm_head"]  # the hidden-only probe's forward stopped at its layer
    finally:
        handle.remove()


def test_hot_reload_accepts_a_hybrid_artifact(tiny_llama, word_tokenizer, tmp_path):
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 32))
    ProbeArtifact.create(
        LogisticProbe(C=1.0).fit(X, (X[:, 0] > 0).astype(int)), None, 2, "answer_last", loaded.fingerprint
    ).save(tmp_path / "plain")
    hybrid_artifact(loaded.fingerprint, 2, "answer_mean", tmp_path / "hybrid")
    pm = ProbedModel.from_transformers(tiny_llama, word_tokenizer, tmp_path / "plain", threshold=None)
    new = pm.load_artifact(tmp_path / "hybrid")
    smoke_test(new)  # what POST /admin/reload runs before swapping
    pm.swap_artifact(new)
    assert pm.logit_features == NAMES and pm.artifact_digest == new.digest
    gen = pm.generate(PROMPTS[1], max_new_tokens=5, stop=NEVER)[0]
    (scored,) = pm.score([PROMPTS[1]], [list(gen.completion_ids)], stop=NEVER)
    assert scored.p_correct == pytest.approx(gen.p_correct, abs=1e-5) and gen.artifact == new.digest


def test_prompt_last_hybrid_scores_after_generation_only(tiny_llama, word_tokenizer, tmp_path):
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    hybrid_artifact(loaded.fingerprint, 2, "prompt_last", tmp_path, threshold=0.99)
    pm = ProbedModel.from_transformers(tiny_llama, word_tokenizer, tmp_path)
    assert pm.threshold == 0.99 and not pm.abstain_before_generating
    with pytest.raises(ValueError, match="cannot score a prompt before generation"):
        pm.score_prompts([pm.prompt_ids(PROMPTS[0])])
    (gen,) = pm.generate(PROMPTS[0], max_new_tokens=4, stop=NEVER)
    assert gen.finish_reason != "abstained" and gen.completion_tokens > 0  # generated, then scored
    assert gen.abstained == (gen.p_correct < 0.99)


def test_scorer_takes_logit_signals_and_equals_the_artifact(tmp_path, tiny_llama, word_tokenizer):
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    artifact, hidden, signals = hybrid_artifact(loaded.fingerprint, 2, "answer_last", tmp_path)
    scorer = ProbeScorer(tmp_path)
    assert scorer.needs_logit_signals and scorer.logit_features == NAMES and scorer.n_hidden == 32
    expected = artifact.predict(probe_input(hidden, NAMES, signals))[0]
    np.testing.assert_allclose(scorer.p_correct(hidden, logit_signals=signals), expected, rtol=0, atol=1e-12)
    as_array = np.column_stack([signals[name] for name in NAMES])  # columns in scorer.logit_features order
    np.testing.assert_allclose(scorer.p_correct(hidden, logit_signals=as_array), expected, rtol=0, atol=1e-12)
    one = scorer.p_correct(hidden[0], logit_signals={k: float(v[0]) for k, v in signals.items()})
    assert one == pytest.approx(expected[0], abs=1e-12)
    with pytest.raises(ValueError, match="reads the model's logit signals"):
        scorer.p_correct(hidden)
    with pytest.raises(ValueError, match=r"logit_signals lack \['sequence_prob'\]"):
        scorer.p_correct(hidden, logit_signals={k: v for k, v in signals.items() if k != "sequence_prob"})
    with pytest.raises(ValueError, match=r"must be \[n, 6\]"):
        scorer.p_correct(hidden, logit_signals=as_array[:, :5])
    with pytest.raises(ValueError, match="pass the hidden state alone"):
        scorer.p_correct(probe_input(hidden, NAMES, signals))


def test_hybrid_scorer_loads_numpy_and_safetensors_only(tmp_path, tiny_llama, word_tokenizer):
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    artifact, hidden, signals = hybrid_artifact(loaded.fingerprint, 2, "answer_last", tmp_path)
    expected = artifact.predict(probe_input(hidden[:3], NAMES, {k: v[:3] for k, v in signals.items()}))[0]
    code = (
        "import json, sys, numpy as np\n"
        "from probes.scorer import ProbeScorer\n"
        f"s = ProbeScorer({str(tmp_path)!r})\n"
        f"p = s.p_correct(np.array({hidden[:3].tolist()!r}), logit_signals={ {k: v[:3].tolist() for k, v in signals.items()}!r})\n"  # noqa: E501
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'torch', 'transformers')]\n"
        "print(json.dumps({'p': p.tolist(), 'heavy': sorted(heavy)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    np.testing.assert_allclose(result["p"], expected, rtol=0, atol=1e-12)


def test_logit_feature_matrix_is_the_one_training_uses():
    from probes.training import splits  # builds the hybrid's training features

    assert splits.logit_feature_matrix is logit_feature_matrix


def test_proxy_scores_upstream_answers_with_a_hybrid_probe(
    tmp_path,
    stub_upstream,  # noqa: F811
    tiny_llama,
    word_tokenizer,
):
    """serve.upstream: the engine's answers go through the sidecar path, which runs the hybrid's full forward."""
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny")
    hybrid_artifact(loaded.fingerprint, 2, "answer_mean", tmp_path / "probe", stop=("?",))
    pm = ProbedModel.from_transformers(tiny_llama, word_tokenizer, tmp_path / "probe", threshold=None)
    settings = ServeSettings(
        db_path=str(tmp_path / "f.sqlite"),
        batch_wait_ms=1,
        upstream=f"{stub_upstream}/v1",
        upstream_timeout_s=5.0,
        model_name="tiny",
    )
    with running(create_app(pm, settings)) as base:
        reply = sdk(base).completions.create(model="tiny", prompt=PROMPTS[0])
    choice = reply.choices[0]
    assert choice.text.startswith("answer to:")  # the upstream's text
    (direct,) = pm.score([PROMPTS[0]], [choice.text])
    assert choice.confidence["p_correct"] == pytest.approx(direct.p_correct, abs=1e-6)
