"""Capture exactness on the real packaged model (SmolLM2-135M-Instruct, BPE tokenizer, chat template)."""

import numpy as np
import pytest
import torch

from extract.generation import generate_and_capture
from extract.models import ModelSpec, load_model
from extract.settings import POSITIONS, GenerationSpec
from tests.paths import TEST_DEVICE

pytestmark = pytest.mark.integration

QUESTIONS = ["What is the capital of France?", "What is the chemical symbol for gold?", "What is 12 + 30?"]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelSpec(name="smollm2-135m-instruct", device=TEST_DEVICE, dtype="float32"))


def chat_ids(tok, question):
    messages = [{"role": "user", "content": f"{question} Answer briefly."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_captured_states_equal_a_plain_forward(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    prompts = [chat_ids(tok, q) for q in QUESTIONS]  # different lengths: left padding in the batch
    spec = GenerationSpec(max_new_tokens=12, batch_size=3, stop_strings=["\n", "."])
    layers = [0, 15, 30]
    result = generate_and_capture(model, tok, prompts, layers, POSITIONS, spec, str.strip)
    assert "Paris" in result.answers[0]
    assert not result.empty_answer.any()
    for i, prompt in enumerate(prompts):
        n = int(result.n_answer_tokens[i])
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n + 2, do_sample=False, pad_token_id=tok.pad_token_id
        )
        tokens = out[0, len(prompt) :].tolist()
        # The answer's tokens (BPE: leading spaces merged into words) decode to the graded answer.
        assert tok.decode(tokens[:n], skip_special_tokens=True).strip() == result.answers[i]
        with torch.no_grad():
            hidden = model(
                input_ids=torch.tensor([prompt + tokens[:n]]), output_hidden_states=True
            ).hidden_states
        P = len(prompt)
        for li, layer in enumerate(layers):
            h = hidden[layer][0]
            want = {"prompt_last": h[P - 1], "answer_last": h[P + n - 1], "answer_mean": h[P : P + n].mean(0)}
            for p, position in enumerate(POSITIONS):
                ref = want[position]
                err = float((torch.as_tensor(result.activations[i, li, p]) - ref).norm() / ref.norm())
                assert err < 1e-4, (i, position, layer, err)
    assert np.isfinite(result.baselines["mean_logprob"]).all()
