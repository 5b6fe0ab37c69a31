"""`extract.engine=openai`: answers from an OpenAI-compatible engine, states from probecal's own forward.

The stub engine (tests/greedy_engine.py) generates greedily with the same tiny model on loopback, so its
answers equal transformers' generation and the two stores must be equal: records (answers, grades, flags),
baselines and states to float rounding.
"""

import numpy as np
import pytest

from extract.data import QARow
from extract.engine import EngineAnswer, EngineError, OpenAIEngine, completion_ids
from extract.runner import extract_to_store
from extract.settings import ExtractSpec, GenerationSpec
from tests import tiny_models
from tests.greedy_engine import GreedyEngine

SUBJECTS = ["france", "germany", "italy", "spain", "australia"]
KINDS = ["capital", "currency", "continent", "city"]
N_ROWS = 12


def _rows(n: int = N_ROWS) -> list[QARow]:
    return [
        QARow(
            id=f"q{i}",
            category=KINDS[i % 4],
            question=f"what is the {KINDS[i % 4]} of {SUBJECTS[i % 5]} ?",
            answers=("paris", "berlin"),
        )
        for i in range(n)
    ]


def _spec(tmp_path, engine: str = "hf", url: str = "", stops=("\n",), **changes) -> ExtractSpec:
    # the tiny model answers "w97 4 30 au w96 sydney" to every question: with "\n" as the stop string every
    # answer runs to max_new_tokens (truncated)
    generation = GenerationSpec(max_new_tokens=6, batch_size=5, stop_strings=list(stops))
    return ExtractSpec(
        layers=[0, 2, 3],
        store_dtype="float32",
        shard_size=4,
        generation=generation,
        store_root=str(tmp_path / engine),
        engine=engine,
        engine_url=url,
        engine_timeout_s=1.0,
        engine_concurrency=changes.pop("engine_concurrency", 3),
        **changes,
    )


@pytest.fixture(scope="module")
def engine(word_tokenizer):
    # its own copy of the same weights: the stub's generate never runs inside the extraction's hooks
    with GreedyEngine(tiny_models.tiny_llama(), word_tokenizer) as stub:
        yield stub


@pytest.fixture(autouse=True)
def healthy(engine):
    engine.mode, engine.fail_after = None, None
    yield


@pytest.fixture(scope="module")
def hf_store(tiny_loaded, tmp_path_factory):
    return extract_to_store(tiny_loaded, _rows(), spec=_spec(tmp_path_factory.mktemp("hf")), data_name="q")


def _assert_same_store(a, b, tol=1e-5):
    assert a.records == b.records
    assert len(a) == len(b) == N_ROWS
    for name in a.baselines:
        np.testing.assert_allclose(b.baselines[name], a.baselines[name], rtol=tol, atol=tol, err_msg=name)
    for layer in a.layers:
        for position in a.positions:
            np.testing.assert_allclose(
                b.read(layer, position), a.read(layer, position), atol=tol, err_msg=f"{layer} {position}"
            )


@pytest.mark.parametrize(
    "case, stops, answer",
    [
        ("truncated", ["\n"], "w97 4 30 au w96 sydney"),  # runs to max_new_tokens
        ("stop string", ["w96"], "w97 4 30 au"),
        ("empty", ["w97"], ""),  # states fall back to prompt_last, signals on the first token
        ("eos", ["\n"], "w97 4 30"),  # "au" made an EOS id: generation stops there
    ],
)
def test_engine_store_equals_hf_store_on_the_same_answers(
    word_tokenizer, engine, tmp_path, case, stops, answer
):
    from extract.models import from_transformers

    model = tiny_models.tiny_llama()
    if case == "eos":
        model.generation_config.eos_token_id = [2, word_tokenizer.convert_tokens_to_ids("au")]
    loaded = from_transformers(model, word_tokenizer, name="tiny-llama")
    hf = extract_to_store(loaded, _rows(), spec=_spec(tmp_path, stops=stops), data_name="q")
    spec = _spec(tmp_path, "openai", engine.url, stops=stops)
    store = extract_to_store(loaded, _rows(), spec=spec, data_name="q")
    _assert_same_store(hf, store)
    records = store.records
    assert {r["model_answer"] for r in records} == {answer}
    assert all(r["truncated"] == (case == "truncated") for r in records)
    assert all(r["empty_answer"] == (case == "empty") for r in records)
    assert not any(r["answer_reencoded"] for r in records)
    if case == "eos":
        assert engine.bodies[-1]["stop_token_ids"] == [2, word_tokenizer.convert_tokens_to_ids("au")]


def test_engine_request_and_store_key(tiny_loaded, hf_store, engine, tmp_path):
    store = extract_to_store(tiny_loaded, _rows(), spec=_spec(tmp_path, "openai", engine.url), data_name="q")
    # what the engine was asked: the ONE prompt encoder's ids, greedy, the budget, EOS ids, token ids back
    body = engine.bodies[-1]
    assert body["temperature"] == 0 and body["max_tokens"] == 6 and body["return_token_ids"] is True
    assert body["stop_token_ids"] == [2] and body["model"] == "tiny"
    assert isinstance(body["prompt"], list) and all(isinstance(t, int) for t in body["prompt"])
    # the engine is in the store's key: an hf store is not reused for an engine's answers
    assert store.settings["engine"] == {"kind": "openai", "model": "tiny", "owned_by": "stub"}
    assert "engine" not in hf_store.settings and store.path.name != hf_store.path.name


def test_text_only_engine_is_re_encoded_and_recorded(tiny_loaded, hf_store, engine, tmp_path):
    """No token ids: the text is re-encoded (the word tokenizer round-trips, so the store is still equal) and
    every row says so."""
    engine.mode = "text_only"
    store = extract_to_store(tiny_loaded, _rows(), spec=_spec(tmp_path, "openai", engine.url), data_name="q")
    assert all(r["answer_reencoded"] for r in store.records)
    strip = [{k: v for k, v in r.items() if k != "answer_reencoded"} for r in store.records]
    assert strip == [{k: v for k, v in r.items() if k != "answer_reencoded"} for r in hf_store.records]
    np.testing.assert_allclose(store.read(3, "answer_mean"), hf_store.read(3, "answer_mean"), atol=1e-5)


@pytest.mark.parametrize(
    "mode, what",
    [
        ("e500", "answered HTTP 500: engine core died"),
        ("badjson", "sent an answer that is not JSON (b'<html>gateway</html>')"),
        ("nochoices", "sent an answer without a usable 'choices' list"),
        ("hang", "sent no complete answer within 1 s (extract.engine_timeout_s)"),
        ("cut", "cut its answer short (17 of 5,000 bytes)"),
        ("huge", "sent an answer over 1,000,000 bytes"),
        ("foreign", "sent token ids outside the model's vocabulary (0..98): does it serve this model?"),
    ],
)
def test_bad_engine_answers_end_the_run_with_one_line(tiny_loaded, engine, tmp_path, monkeypatch, mode, what):
    monkeypatch.setattr("extract.engine.MAX_BODY_BYTES", 1_000_000)
    engine.mode = mode
    spec = _spec(tmp_path, "openai", engine.url, engine_concurrency=1)
    with pytest.raises(EngineError) as err:
        extract_to_store(tiny_loaded, _rows(), spec=spec, data_name="q")
    message = str(err.value)
    assert message == (
        f"extract.engine_url={engine.url}: question q0: the engine {what}. "
        "Rows already stored are kept: rerun to resume once the engine answers"
    )


def test_failure_keeps_written_shards_and_the_rerun_resumes(tiny_loaded, hf_store, engine, tmp_path):
    spec = _spec(tmp_path, "openai", engine.url, engine_concurrency=1)
    engine.fail_after = engine.completions + 9  # shards 0 and 1 (rows 0-7) are written, row 9 fails
    with pytest.raises(EngineError, match="question q9: the engine answered HTTP 500"):
        extract_to_store(tiny_loaded, _rows(), spec=spec, data_name="q")
    engine.fail_after, served = None, engine.completions
    store = extract_to_store(tiny_loaded, _rows(), spec=spec, data_name="q")
    assert engine.completions - served == N_ROWS - 8  # only the missing shard rows were asked again
    _assert_same_store(hf_store, store)
    # a complete store is reused without asking the engine anything
    served = engine.completions
    assert extract_to_store(tiny_loaded, _rows(), spec=spec, data_name="q").path == store.path
    assert engine.completions == served


def test_engine_is_checked_before_any_work(tiny_loaded, tmp_path):
    url = _closed_port_url()
    with pytest.raises(
        EngineError, match=rf"extract.engine_url={url}: GET /models: the engine cannot be reached"
    ):
        extract_to_store(tiny_loaded, _rows(), spec=_spec(tmp_path, "openai", url), data_name="q")
    assert not (tmp_path / "openai").exists()
    for changes, field in [
        ({"engine_url": "localhost:8000"}, "extract.engine_url='localhost:8000'"),
        ({"engine_url": "http://x/v1", "engine_timeout_s": 0}, "extract.engine_timeout_s=0"),
        ({"engine_url": "http://x/v1", "engine_concurrency": 0}, "extract.engine_concurrency=0"),
        ({"engine": "vllm"}, "extract.engine='vllm'; allowed: hf, openai"),
    ]:
        spec = ExtractSpec(**{"engine": "openai", **changes})
        with pytest.raises(ValueError, match=field):
            spec.check()
    sampled = ExtractSpec(
        engine="openai", engine_url="http://x/v1", generation=GenerationSpec(do_sample=True)
    )
    with pytest.raises(ValueError, match="decodes greedily"):
        sampled.check()


def test_engine_model_must_be_served(engine):
    assert OpenAIEngine.connect(engine.url).model == "tiny"
    with pytest.raises(EngineError, match=r"extract.engine_model='big': the engine at .* serves \['tiny'\]"):
        OpenAIEngine.connect(engine.url, "big")


def test_completion_ids_rules():
    def encode(text):
        return [7] * len(text.split())

    eos = [2, 5]
    assert completion_ids(EngineAnswer("a b", [3, 4, 2], "stop"), encode, eos) == ([3, 4, 2], False)
    # an engine that stopped at EOS without returning it: hf's generation holds it
    assert completion_ids(EngineAnswer("a b", [3, 4], "stop"), encode, eos) == ([3, 4, 2], False)
    assert completion_ids(EngineAnswer("a b", None, "stop"), encode, eos) == ([7, 7, 2], True)
    assert completion_ids(EngineAnswer("a b", None, "length"), encode, eos) == ([7, 7], True)
    assert completion_ids(EngineAnswer("", [], "stop"), encode, eos) == ([2], False)


def _closed_port_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def _cli(args, tmp_path, capsys):
    from probes.cli import main as cli

    try:
        code = cli.main([*args, f"hydra.run.dir={tmp_path / 'run'}"])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def test_cli_checks_the_engine_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PROBECAL_DEBUG", raising=False)
    monkeypatch.setattr("extract.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    url = _closed_port_url()
    code, err = _cli(["extract", "extract.engine=openai", f"extract.engine_url={url}"], tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(
        f"probecal extract: error: extract.engine_url={url}: GET /models: the engine cannot be reached"
    )


def test_cli_bad_engine_answer_is_one_line_exit_2(tmp_path, capsys, monkeypatch, engine, tiny_llama_dir):
    import json

    monkeypatch.delenv("PROBECAL_DEBUG", raising=False)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({**r.__dict__, "answers": list(r.answers)}) + "\n" for r in _rows(3)))
    engine.mode = "e500"
    args = [
        "extract",
        "model=hf",
        f"model.path={tiny_llama_dir}",
        "model.device=cpu",
        "data=jsonl",
        f"data.path={data}",
        f"extract.store_root={tmp_path / 'stores'}",
        "extract.engine=openai",
        f"extract.engine_url={engine.url}",
        "extract.engine_concurrency=1",
    ]
    code, err = _cli(args, tmp_path, capsys)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and "Traceback" not in err
    assert errors == [
        f"probecal extract: error: extract.engine_url={engine.url}: question q0: the engine answered HTTP 500: "
        "engine core died. Rows already stored are kept: rerun to resume once the engine answers "
        "(PROBECAL_DEBUG=1 shows the traceback)"
    ]
