"""Capture exactness: hooked single-pass vectors equal a plain forward's `hidden_states`, at the right
positions, batched == unbatched, independent of batch size; baselines equal hand-computed values."""

import numpy as np
import pytest
import torch

from extract.generation import BASELINE_NAMES, generate_and_capture
from extract.hooks import CaptureError, capture_hidden_states, find_decoder_blocks
from extract.self_eval import p_true_confidence, parse_confidence, verbalized_confidence
from extract.settings import POSITIONS, GenerationSpec
from extract.tokens import answer_token_span, find_stop
from tests import tiny_models
from tests.capture_reference import check_against_plain_forward, greedy, reference, rel_err

QUESTIONS = [
    "what is the capital of france ?",
    "symbol for gold ?",
    "which city is the capital of australia ? answer briefly .",
    "how many country in europe ?",
    "what is 12 + 30 ?",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return tiny_models.tiny_llama() if request.param == "llama" else tiny_models.tiny_gpt2()


@pytest.fixture(scope="module")
def tok():
    return tiny_models.word_tokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(q) for q in QUESTIONS]


def first_words(k):
    return lambda text: " ".join(text.split()[:k])


@pytest.mark.parametrize("cut", ["first3", "whole"])
def test_vectors_equal_plain_forward_at_every_layer_and_position(model, tok, prompts, cut):
    spec = GenerationSpec(max_new_tokens=6, batch_size=3, stop_strings=[])  # mixed lengths -> left padding
    cut_answer = first_words(3) if cut == "first3" else str.strip
    result = generate_and_capture(model, tok, prompts, "all", POSITIONS, spec, cut_answer)
    assert result.activations.shape == (5, model.config.num_hidden_layers + 1, 3, 32)
    assert result.activations.dtype == np.float32
    expected_n = 3 if cut == "first3" else 6
    assert (result.n_answer_tokens == expected_n).all()
    assert result.truncated.all()  # no stop string, random model: nothing finishes within 6 tokens
    for i, prompt in enumerate(prompts):  # batched greedy text == unbatched greedy text
        assert result.answers[i] == tok.decode(greedy(model, prompt, expected_n), skip_special_tokens=True)
    check_against_plain_forward(model, prompts, result)


def test_result_does_not_depend_on_batch_size(model, tok, prompts):
    runs = [
        generate_and_capture(
            model,
            tok,
            prompts,
            [0, 1, -1],
            ["answer_mean", "prompt_last"],
            GenerationSpec(max_new_tokens=5, batch_size=b, stop_strings=[]),
            first_words(4),
        )
        for b in (1, 2, 5)
    ]
    assert runs[0].layers == (0, 1, model.config.num_hidden_layers)
    for other in runs[1:]:
        assert other.answers == runs[0].answers
        np.testing.assert_allclose(other.activations, runs[0].activations, rtol=1e-4, atol=1e-5)
        for name in BASELINE_NAMES:
            np.testing.assert_allclose(other.baselines[name], runs[0].baselines[name], rtol=1e-5)


def test_stop_string_inside_a_token_still_captures_that_token(tok, prompts):
    """The stop string begins inside generated token j: the answer's last token is token j itself, whose
    state only exists once it is fed back -- generation must run one step past the stop."""
    model = tiny_models.tiny_llama()
    words = tok.convert_ids_to_tokens(greedy(model, prompts[0], 6))
    text = " ".join(words)
    # Stop string = the last character of token j (found nowhere earlier): the stop completes in the
    # same step as token j is generated, but the answer (ending inside token j) needs token j's state.
    ends = [len(" ".join(words[: j + 1])) for j in range(len(words))]
    j = next(j for j in range(1, 5) if len(words[j]) >= 2 and text.find(words[j][-1]) == ends[j] - 1)
    spec = GenerationSpec(max_new_tokens=6, batch_size=1, stop_strings=[words[j][-1]])
    # Alone in its batch, so no other row keeps generation going past the stop.
    result = generate_and_capture(model, tok, prompts[:1], "all", POSITIONS, spec, str.strip)
    assert not result.truncated[0]
    assert result.answers[0] == text[: ends[j] - 1]  # ends inside token j
    assert result.raw_generations[0] == text[: ends[j]]
    assert result.n_answer_tokens[0] == j + 1
    check_against_plain_forward(model, prompts[:1], result)


def test_stop_string_token_and_eos_end_the_answer(tok, prompts, monkeypatch):
    model = tiny_models.tiny_llama()
    tokens = [greedy(model, p, 6) for p in prompts[:2]]
    words0 = tok.convert_ids_to_tokens(tokens[0])
    # Row 0 stops at a whole-word stop string; row 1 emits "EOS" (its 3rd token, made EOS here).
    eos = tokens[1][2]
    monkeypatch.setattr(model.generation_config, "eos_token_id", eos)
    stop = " " + words0[3]
    n0 = tok.decode(tokens[0]).find(stop)
    # The seeded tiny model's greedy outputs make the scenario possible; a change to the model factory that
    # breaks it must fail here, not skip silently.
    assert eos not in tokens[0][:4] and n0 >= 0, "the tiny model's outputs no longer allow this scenario"
    spec = GenerationSpec(max_new_tokens=6, batch_size=2, stop_strings=[stop])
    result = generate_and_capture(model, tok, prompts[:2], "all", POSITIONS, spec, str.strip)
    assert list(result.n_answer_tokens) == [len(tok.decode(tokens[0])[:n0].split()), tokens[1].index(eos)]
    assert not result.truncated.any()
    assert result.answers[1] == tok.decode(tokens[1][: tokens[1].index(eos)])
    check_against_plain_forward(model, prompts[:2], result)


def test_stop_string_at_the_end_of_the_prompt_does_not_stop_generation(model, tok, prompts):
    spec = GenerationSpec(max_new_tokens=4, batch_size=5, stop_strings=["?"])
    result = generate_and_capture(model, tok, prompts, "all", ["answer_last"], spec, str.strip)
    for i, prompt in enumerate(prompts):
        text = tok.decode(greedy(model, prompt, 4))
        assert result.answers[i] == text.split("?")[0].strip()


def test_baselines_equal_hand_computed_logprobs(model, tok, prompts):
    spec = GenerationSpec(max_new_tokens=5, batch_size=5, stop_strings=[])
    result = generate_and_capture(model, tok, prompts, [1], ["answer_last"], spec, first_words(4))
    for i, prompt in enumerate(prompts):
        tokens = greedy(model, prompt, 4)
        _, logp = reference(model, prompt, tokens)
        steps = logp[len(prompt) - 1 : len(prompt) + 3]  # distributions that produced answer tokens 0..3
        lp = steps.gather(-1, torch.tensor(tokens)[:, None])[:, 0].double().numpy()
        entropy = -(steps.exp() * steps).sum(-1).double().numpy()
        want = {
            "mean_logprob": lp.mean(),
            "min_logprob": lp.min(),
            "mean_entropy": entropy.mean(),
            "first_token_prob": float(steps[0].exp().max()),
            "sequence_prob": np.exp(lp.sum()),
            "perplexity": np.exp(-lp.mean()),
        }
        for name, value in want.items():
            assert result.baselines[name][i] == pytest.approx(value, rel=1e-4), name


def test_empty_answer_falls_back_to_prompt_last(tok, prompts):
    model = tiny_models.tiny_llama()
    spec = GenerationSpec(max_new_tokens=3, batch_size=5, stop_strings=[])
    result = generate_and_capture(model, tok, prompts, "all", POSITIONS, spec, lambda text: "")
    assert result.empty_answer.all() and (result.n_answer_tokens == 0).all()
    np.testing.assert_array_equal(result.activations[:, :, 1], result.activations[:, :, 0])
    np.testing.assert_array_equal(result.activations[:, :, 2], result.activations[:, :, 0])
    assert all(np.isfinite(v).all() for v in result.baselines.values())


def test_answer_token_span_on_hand_built_sequences(tok):
    tokens = tok.encode("the capital is paris . and")  # 6 word tokens
    text = tok.decode(tokens).split(" .")[0]  # "the capital is paris": the text before the stop " ."
    assert answer_token_span(tok, tokens, text, "the capital is paris") == (0, 4, True)
    assert answer_token_span(tok, tokens, text, " paris ") == (3, 4, True)
    assert answer_token_span(tok, tokens, text, "capital is") == (1, 3, True)
    assert answer_token_span(tok, tokens, text, "") == (0, 0, True)
    assert answer_token_span(tok, tokens, text, "PARIS!") == (0, 4, False)  # not in the text: whole text
    # A span ending inside a token includes that token.
    assert answer_token_span(tok, tokens, text, "the capital is par") == (0, 4, True)


def test_find_stop_takes_the_earliest_then_longest():
    assert find_stop("paris. and\nmore", ["\n", "."]) == (5, 6)
    assert find_stop("a\n\nb", ["\n", "\n\n"]) == (1, 3)
    assert find_stop("nothing here", ["\n", ""]) is None


def test_single_layer_recorder_for_the_runtime_wrapper(tok, prompts):
    model = tiny_models.tiny_llama()
    with capture_hidden_states(model, [2]) as rec:
        out = model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    vectors = rec.last_token(2)  # [calls, batch, hidden]: prefill + 3 fed tokens
    assert vectors.shape == (4, 1, 32)
    hidden, _ = reference(model, prompts[0], out[0, len(prompts[0]) :].tolist())
    P = len(prompts[0])
    for call in range(4):
        assert rel_err(vectors[call, 0], hidden[2][P - 1 + call]) < 1e-5


def test_hooks_are_removed_even_on_error(tok):
    model = tiny_models.tiny_llama()
    layout = find_decoder_blocks(model)
    modules = [*layout.blocks, layout.final_norm]
    with pytest.raises(RuntimeError, match="boom"), capture_hidden_states(model, "all"):
        assert any(m._forward_hooks or m._forward_pre_hooks for m in modules)
        raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def test_layouts_of_llama_and_gpt2():
    llama, gpt2 = find_decoder_blocks(tiny_models.tiny_llama()), find_decoder_blocks(tiny_models.tiny_gpt2())
    assert (llama.num_layers, type(llama.final_norm).__name__) == (3, "LlamaRMSNorm")
    assert (gpt2.num_layers, type(gpt2.final_norm).__name__) == (2, "LayerNorm")


def test_bad_requests_fail_before_generation(tok, prompts):
    model = tiny_models.tiny_llama()
    spec = GenerationSpec(max_new_tokens=2)
    with pytest.raises(CaptureError, match=r"layer 4 is out of range .*valid layers are 0\.\.3"):
        generate_and_capture(model, tok, prompts, [0, 4], POSITIONS, spec, str.strip)
    with pytest.raises(CaptureError, match="allowed: prompt_last, answer_last, answer_mean"):
        generate_and_capture(model, tok, prompts, "all", ["answer_first"], spec, str.strip)
    with pytest.raises(CaptureError, match=r"prompt_ids\[1\] is empty"):
        generate_and_capture(model, tok, [prompts[0], []], "all", POSITIONS, spec, str.strip)
    with pytest.raises(CaptureError, match="cannot find the decoder blocks of Linear"):
        find_decoder_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("reply", "value"),
    [
        ("85", 0.85),
        (" 85%", 0.85),
        ("I am 70 percent sure", 0.70),
        ("0.9", 0.9),
        ("100", 1.0),
        ("Confidence: 0", 0.0),
        ("150", None),
        ("high", None),
        ("", None),
    ],
)
def test_parse_confidence(reply, value):
    assert parse_confidence(reply) == (pytest.approx(value) if value is not None else None)


def test_self_evaluation_baselines(tok):
    model = tiny_models.tiny_llama()
    questions, answers = QUESTIONS[:3], ["paris", "au", "canberra"]
    p_true = p_true_confidence(model, tok, questions, answers, uses_chat_template=True, batch_size=3)
    one_by_one = p_true_confidence(model, tok, questions, answers, uses_chat_template=True, batch_size=1)
    assert p_true.shape == (3,) and ((p_true > 0) & (p_true < 1)).all()
    np.testing.assert_allclose(p_true, one_by_one, rtol=1e-5)  # left padding does not change it
    scores, unparseable = verbalized_confidence(model, tok, questions, answers, uses_chat_template=False)
    assert scores.shape == (3,) and unparseable == int(np.isnan(scores).sum())
    assert ((scores[~np.isnan(scores)] >= 0) & (scores[~np.isnan(scores)] <= 1)).all()
