"""Runtime wrapper and engine-agnostic scorer on the tiny Llama: the confidence must equal the probe
applied to the hidden state a plain forward gives at the probe's site."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from extract.models import from_transformers
from probes.runtime.wrapper import ProbedModel
from probes.scorer import ProbeScorer
from tests.factories import fitted_artifact

LAYER = 2
QUESTIONS = ["what is the capital of france ?", "what is 12 + 30 ?", "which city is in asia ?"]


def make_artifact(fingerprint, position, directory, threshold=None):
    thresholds = [] if threshold is None else [{"reachable": True, "threshold": threshold}]
    settings = {"generation": {"stop_strings": ["?"]}, "prompt": {"instruction": "answer briefly"}}
    artifact = fitted_artifact(fingerprint, LAYER, position, thresholds=thresholds, extract_settings=settings)
    artifact.save(directory)
    return artifact


@pytest.fixture()
def loaded(tiny_llama, word_tokenizer):
    return from_transformers(tiny_llama, word_tokenizer, name="tiny-llama")


def plain_state(loaded, prompt_ids, answer_tokens, position):
    """The probe's input from a plain forward with output_hidden_states over prompt + answer."""
    ids = torch.tensor([prompt_ids + answer_tokens])
    with torch.no_grad():
        hidden = loaded.model(ids, output_hidden_states=True).hidden_states[LAYER][0]
    if position == "prompt_last" or not answer_tokens:
        return hidden[len(prompt_ids) - 1].numpy()
    return hidden[len(prompt_ids) + len(answer_tokens) - 1].numpy()


def test_confidence_equals_probe_on_plain_forward(loaded, tmp_path):
    artifact = make_artifact(loaded.fingerprint, "answer_last", tmp_path)
    wrapped = ProbedModel.from_transformers(loaded.model, loaded.tokenizer, tmp_path, threshold=None)
    prompts = [wrapped.question_prompt(q) for q in QUESTIONS]
    results = wrapped.generate(prompts, max_new_tokens=4)
    assert [r.layer for r in results] == [LAYER] * 3 and results[0].position == "answer_last"
    for prompt, result in zip(prompts, results, strict=True):
        prompt_ids = wrapped._encode(prompt)
        answer_tokens = loaded.tokenizer(result.text, add_special_tokens=False)["input_ids"][
            : result.completion_tokens
        ]
        vector = plain_state(loaded, prompt_ids, answer_tokens, "answer_last")
        p, score = artifact.predict(vector[None])
        assert result.p_correct == pytest.approx(p[0], rel=1e-4, abs=1e-6)
        assert result.score == pytest.approx(score[0], rel=1e-4, abs=1e-5)
        assert not result.abstained and result.threshold is None
    # batched == one at a time, and no hook is left behind
    single = [wrapped.generate(p, max_new_tokens=4)[0] for p in prompts]
    assert [r.text for r in single] == [r.text for r in results]
    np.testing.assert_allclose([r.p_correct for r in single], [r.p_correct for r in results], rtol=1e-4)
    assert not [
        h
        for m in loaded.model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks)
        for h in hooks.values()
        if getattr(h, "__module__", "").startswith(("extract", "probes"))
    ]


def test_prompt_uses_training_settings(loaded, tmp_path):
    make_artifact(loaded.fingerprint, "answer_last", tmp_path)
    wrapped = ProbedModel.from_transformers(loaded.model, loaded.tokenizer, tmp_path)
    assert wrapped.default_stop == ["?"]
    assert "answer briefly" in wrapped.question_prompt("what is the capital of france ?")


def test_abstention_threshold_from_artifact_and_override(loaded, tmp_path):
    make_artifact(loaded.fingerprint, "answer_last", tmp_path, threshold=1.01)
    wrapped = ProbedModel.from_transformers(
        loaded.model, loaded.tokenizer, tmp_path, abstention_message="idk"
    )
    result = wrapped.ask(QUESTIONS[0], max_new_tokens=3)[0]
    assert result.abstained and result.text == "idk" and result.threshold == 1.01
    never = ProbedModel.from_transformers(loaded.model, loaded.tokenizer, tmp_path, threshold=None)
    assert not never.ask(QUESTIONS[0], max_new_tokens=3)[0].abstained


def test_prompt_last_probe_abstains_before_generating(loaded, tmp_path, monkeypatch):
    artifact = make_artifact(loaded.fingerprint, "prompt_last", tmp_path, threshold=1.01)
    wrapped = ProbedModel.from_transformers(
        loaded.model, loaded.tokenizer, tmp_path, abstention_message="idk"
    )

    def no_generate(*args, **kwargs):
        raise AssertionError("generate() ran although every row abstained before generating")

    monkeypatch.setattr(loaded.model, "generate", no_generate)
    results = wrapped.ask(QUESTIONS, max_new_tokens=3)
    assert all(r.abstained and r.finish_reason == "abstained" and r.text == "idk" for r in results)
    for question, result in zip(QUESTIONS, results, strict=True):
        prompt_ids = wrapped._encode(wrapped.question_prompt(question))
        p, _ = artifact.predict(plain_state(loaded, prompt_ids, [], "prompt_last")[None])
        assert result.p_correct == pytest.approx(p[0], rel=1e-4, abs=1e-6)
        assert result.completion_tokens == 0 and result.prompt_tokens == len(prompt_ids)


def test_stream_yields_text_then_result(loaded, tmp_path):
    make_artifact(loaded.fingerprint, "answer_last", tmp_path)
    wrapped = ProbedModel.from_transformers(loaded.model, loaded.tokenizer, tmp_path, threshold=None)
    prompt = wrapped.question_prompt(QUESTIONS[0])
    pieces = list(wrapped.stream(prompt, max_new_tokens=4))
    final = pieces[-1]
    assert all(isinstance(p, str) for p in pieces[:-1]) and len(pieces) > 1
    expected = wrapped.generate(prompt, max_new_tokens=4)[0]
    assert final.text == expected.text and final.p_correct == pytest.approx(expected.p_correct)
    assert "".join(pieces[:-1]).strip().startswith(expected.text.strip().split(" ")[0])


def test_artifact_for_another_model_is_refused(loaded, tiny_gpt2, word_tokenizer, tmp_path):
    make_artifact(loaded.fingerprint, "answer_last", tmp_path)
    with pytest.raises(ValueError, match="num_layers: expected 3, got 2"):
        ProbedModel.from_transformers(tiny_gpt2, word_tokenizer, tmp_path, name="tiny-llama")


def test_scorer_matches_artifact_and_imports_no_transformers(loaded, tmp_path):
    artifact = make_artifact(loaded.fingerprint, "answer_last", tmp_path, threshold=0.5)
    scorer = ProbeScorer(tmp_path)
    vectors = np.random.default_rng(1).normal(size=(4, 32))
    np.testing.assert_allclose(scorer.p_correct(vectors), artifact.predict(vectors)[0])
    assert scorer.p_correct(torch.tensor(vectors[0])) == pytest.approx(artifact.predict(vectors[:1])[0][0])
    assert scorer.abstains(0.4) and not scorer.abstains(0.6)
    with pytest.raises(ValueError, match="expected vectors of size 32"):
        scorer.p_correct(np.zeros(31))
    code = (
        "import sys, json, numpy as np; from probes.scorer import ProbeScorer; "
        f"s = ProbeScorer({str(tmp_path)!r}); p = s.p_correct(np.zeros(32)); "
        "print(json.dumps({'p': p, 'transformers': 'transformers' in sys.modules}))"
    )
    out = json.loads(
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    )
    assert out["transformers"] is False and 0 <= out["p"] <= 1


def test_server_with_the_real_wrapper(loaded, tmp_path):
    """The HTTP server around ProbedModel on the tiny model: the confidence it serves is the wrapper's."""
    from fastapi.testclient import TestClient

    from probes.serving.app import create_app
    from probes.serving.settings import ServeSettings

    make_artifact(loaded.fingerprint, "answer_last", tmp_path / "probe", threshold=0.0)
    wrapped = ProbedModel.from_transformers(loaded.model, loaded.tokenizer, tmp_path / "probe")
    prompt = wrapped.question_prompt(QUESTIONS[0])
    expected = wrapped.generate(prompt, max_new_tokens=4)[0]
    settings = ServeSettings(db_path=str(tmp_path / "db.sqlite"), batch_wait_ms=0)
    with TestClient(create_app(wrapped, settings)) as client:
        reply = client.post(
            "/v1/completions", json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 4}
        )
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["text"] == expected.text
        assert choice["confidence"]["p_correct"] == pytest.approx(expected.p_correct, rel=1e-4)
        assert choice["confidence"]["layer"] == LAYER and choice["confidence"]["abstained"] is False
        feedback = client.post("/v1/feedback", json={"id": reply.json()["id"], "correct": True})
        assert feedback.status_code == 200, feedback.text
        assert "probecal_calibration" in client.get("/metrics").text


# -- one encoder: the wrapper feeds the probe exactly the ids it was trained on ---------------------------

TOKENIZER_CASES = {
    # name: (word_tokenizer kwargs, chat); "bos in template + tokenizer adds bos" is the Llama 3 / Gemma case
    "chat-template-and-tokenizer-both-bos": ({"add_bos": True, "template_bos": True}, True),
    "chat-template-bos-only": ({"add_bos": False, "template_bos": True}, True),
    "chat-no-bos-at-all": ({"add_bos": False, "template_bos": False}, True),
    "chat-tokenizer-bos-only": ({"add_bos": True, "template_bos": False}, True),
    "base-few-shot-tokenizer-bos": ({"add_bos": True}, False),
    "base-few-shot-no-bos": ({"add_bos": False}, False),
}


def fed_ids(model, monkeypatch):
    """Record the unpadded prompt ids of every row passed to model.generate / model.forward."""
    seen: list[list[int]] = []
    real_generate = model.generate

    def recording_generate(*args, input_ids=None, attention_mask=None, **kwargs):
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            seen.append([t for t, m in zip(row, mask, strict=True) if m])
        return real_generate(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    return seen


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_ask_feeds_exactly_the_training_ids(case, tiny_llama, monkeypatch, tmp_path):
    from extract.data import QARow
    from extract.prompts import Question, build_prompt_ids
    from tests import tiny_models

    kwargs, chat = TOKENIZER_CASES[case]
    tok = tiny_models.word_tokenizer(chat=chat, **kwargs)
    loaded = from_transformers(tiny_llama, tok, name="tiny-llama", chat=chat)
    make_artifact(loaded.fingerprint, "answer_last", tmp_path)
    wrapped = ProbedModel.from_transformers(tiny_llama, tok, tmp_path, threshold=None)
    assert wrapped.loaded.uses_chat_template is chat
    rows = [QARow(f"q{i}", "geo", q, ("x",)) for i, q in enumerate(QUESTIONS)]
    trained = build_prompt_ids(rows, tok, chat, wrapped.prompt_spec)

    seen = fed_ids(tiny_llama, monkeypatch)
    results = wrapped.ask(QUESTIONS, max_new_tokens=2)
    assert seen == trained
    assert [r.prompt_tokens for r in results] == [len(ids) for ids in trained]
    assert [wrapped.count_tokens(Question(q)) for q in QUESTIONS] == [len(ids) for ids in trained]

    bos_expected = kwargs.get("template_bos", False) if chat else kwargs["add_bos"]
    if case == "chat-tokenizer-bos-only":
        bos_expected = False  # the chat template decides, as apply_chat_template(tokenize=True) does
    for ids in trained:
        assert ids.count(tok.bos_token_id) == int(bos_expected), ids
        assert (ids[0] == tok.bos_token_id) is bos_expected

    # The rendered training text sent as a raw completion prompt: never a second BOS.
    seen.clear()
    wrapped.generate([wrapped.question_prompt(q) for q in QUESTIONS], max_new_tokens=2)
    for ids, want in zip(seen, trained, strict=True):
        assert ids.count(tok.bos_token_id) <= 1
        if bos_expected or not kwargs["add_bos"]:
            assert ids == want


def test_chat_messages_and_raw_text_get_bos_once(tiny_llama, monkeypatch, tmp_path):
    from tests import tiny_models

    tok = tiny_models.word_tokenizer(add_bos=True, template_bos=True)
    make_artifact(from_transformers(tiny_llama, tok, name="tiny-llama").fingerprint, "answer_last", tmp_path)
    wrapped = ProbedModel.from_transformers(tiny_llama, tok, tmp_path, threshold=None)
    seen = fed_ids(tiny_llama, monkeypatch)
    messages = [{"role": "user", "content": "what is 12 + 30 ?"}]
    wrapped.generate([messages, "what is 12 + 30 ?", "<s> what is 12 + 30 ?"], max_new_tokens=2)
    chat, raw, raw_with_bos = seen
    assert (
        chat
        == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert chat.count(1) == 1 and chat[0] == 1
    assert raw == raw_with_bos == [1, *tok("what is 12 + 30 ?", add_special_tokens=False)["input_ids"]]
    assert wrapped.count_tokens(messages) == len(chat) and wrapped.count_tokens("what is") == 3


def test_model_refused_marks_a_declining_answer(loaded, tmp_path):
    from probes.serving.serving import confidence

    make_artifact(loaded.fingerprint, "answer_last", tmp_path)
    wrapped = ProbedModel.from_transformers(loaded.model, loaded.tokenizer, tmp_path, threshold=None)
    prompt = wrapped.question_prompt(QUESTIONS[0])
    declined, answered = wrapped.score([prompt, prompt], [" i don't know", " paris"])
    assert declined.model_refused and declined.answer_text == "i don't know"
    assert not answered.model_refused
    generated = wrapped.generate(prompt, max_new_tokens=3)[0]
    assert confidence(generated)["model_refused"] is generated.model_refused
