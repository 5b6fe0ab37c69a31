import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray download fails loudly instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tests import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def word_tokenizer():
    return tiny_models.word_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_models.tiny_llama()


@pytest.fixture(scope="session")
def tiny_gpt2():
    return tiny_models.tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_llama, word_tokenizer):
    """The tiny Llama wrapped as probecal's LoadedModel (chat template on)."""
    from extract.models import from_transformers

    return from_transformers(tiny_llama, word_tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return tiny_models.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
