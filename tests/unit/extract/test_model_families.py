"""Capture works across model families: for a tiny random model of each family, every captured
(layer, position) equals the plain `output_hidden_states` forward over the same tokens, and batched
(left padding) equals unbatched. Eager attention on both paths (Gemma's softcapping and sliding window
are eager-only features in several transformers versions); a sliding window shorter than the prompts."""

import numpy as np
import pytest
import torch

from extract.generation import generate_and_capture
from extract.hooks import find_decoder_blocks
from extract.settings import POSITIONS, GenerationSpec
from tests import tiny_models
from tests.capture_reference import check_against_plain_forward

QUESTIONS = [
    "what is the capital of france ?",
    "which city is the capital of australia ? answer briefly .",
    "what is 12 + 30 ?",
]


@pytest.fixture(scope="module")
def prompts():
    tok = tiny_models.word_tokenizer()
    ids = [tok.encode(q) for q in QUESTIONS]
    assert max(map(len, ids)) > tiny_models.SLIDING_WINDOW + 4  # the window cuts into the prompt
    return tok, ids


@pytest.mark.parametrize("family", list(tiny_models.FAMILY_CONFIGS))
def test_capture_equals_plain_forward_and_batched_equals_unbatched(family, prompts):
    tok, ids = prompts
    model = tiny_models.tiny_family_model(family)
    assert model.config._attn_implementation == "eager"
    layout = find_decoder_blocks(model)
    assert layout.num_layers == 2 and layout.final_norm is not None
    runs = [
        generate_and_capture(
            model,
            tok,
            ids,
            "all",
            POSITIONS,
            GenerationSpec(max_new_tokens=4, batch_size=batch, stop_strings=[]),
            str.strip,
        )
        for batch in (3, 1)
    ]
    batched, single = runs
    assert batched.activations.shape == (3, 3, 3, 32)
    assert batched.answers == single.answers
    np.testing.assert_allclose(batched.activations, single.activations, rtol=1e-4, atol=1e-5)
    check_against_plain_forward(model, ids, batched)


class OddLayout(torch.nn.Module):
    """A model whose blocks sit where no built-in path looks: `trunk.stages`, final norm `trunk.out_norm`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Module()
        self.trunk.stages = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh()) for _ in range(2)]
        )
        self.trunk.out_norm = torch.nn.LayerNorm(5)

    def forward(self, x):
        for stage in self.trunk.stages:
            x = stage(x)
        return self.trunk.out_norm(x)


def test_unknown_layout_error_names_the_class_and_the_fix():
    from extract.hooks import CaptureError

    with pytest.raises(CaptureError) as err:
        find_decoder_blocks(OddLayout())
    message = str(err.value)
    assert "cannot find the decoder blocks of OddLayout" in message
    assert "'trunk.stages' (2 modules)" in message  # the candidates it has
    assert "extract.hooks.register_block_path('<path>', final_norm='<path>')" in message


def test_registered_block_path_is_captured_exactly(monkeypatch):
    from extract import hooks

    monkeypatch.setattr(hooks, "_registered_paths", {})  # the registry is process-wide: keep it per test
    with pytest.raises(ValueError, match=r"blocks='trunk\.stages\[0\]' is not a dotted attribute path"):
        hooks.register_block_path("trunk.stages[0]")
    hooks.register_block_path("trunk.stages", final_norm="trunk.out_norm")
    model = OddLayout()
    layout = find_decoder_blocks(model)
    assert (
        layout.model_class == "OddLayout"
        and layout.num_layers == 2
        and layout.final_norm is model.trunk.out_norm
    )
    x = torch.randn(2, 3, 5)
    with hooks.capture_hidden_states(model, "all") as recorder, torch.no_grad():
        out = model(x)
    with torch.no_grad():
        after_first = model.trunk.stages[0](x)
    torch.testing.assert_close(recorder.last_token(0)[0], x[:, -1])
    torch.testing.assert_close(recorder.last_token(1)[0], after_first[:, -1])
    torch.testing.assert_close(recorder.last_token(2)[0], out[:, -1])  # after the final norm

    hooks.register_block_path("trunk.stages", final_norm="trunk.missing")
    with pytest.raises(hooks.CaptureError, match="final_norm='trunk.missing' is not a module of OddLayout"):
        find_decoder_blocks(model)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_wrapper_prompt_scores_equal_training_capture(family, prompts, tmp_path):
    """Pre-generation scoring (left-padded prefill) reads the same prompt_last vector as extraction's
    generate: absolute position embeddings (GPT-2) must not shift with the padding."""
    from extract.models import from_transformers
    from probes.runtime.wrapper import ProbedModel
    from tests.factories import fitted_artifact

    tok, ids = prompts
    model = tiny_models.tiny_family_model(family)
    loaded = from_transformers(model, tok, name=family)
    fitted_artifact(loaded.fingerprint, 2, "prompt_last", n=40).save(tmp_path)
    wrapped = ProbedModel.from_transformers(model, tok, tmp_path, name=family, max_batch_size=3)
    p_batched, _ = wrapped.score_prompts(ids)
    captured = generate_and_capture(
        model,
        tok,
        ids,
        [2],
        ["prompt_last"],
        GenerationSpec(max_new_tokens=1, batch_size=1, stop_strings=[]),
        str.strip,
    )
    p_trained, _ = wrapped.artifact.predict(captured.activations[:, 0, 0])
    np.testing.assert_allclose(p_batched, p_trained, rtol=1e-4, atol=1e-6)
