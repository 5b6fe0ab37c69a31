"""Activation store: round trip, settings checks, reuse, and resume after a killed extraction subprocess."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from extract.runner import run_extraction
from extract.store import (
    ShardData,
    StoreError,
    StoreWriter,
    open_store,
    store_dir_for,
    store_key,
)
from tests.paths import ROOT

FINGERPRINT = {"name": "tiny", "source_hash": "abc", "architecture": "X", "hidden_size": 5, "num_layers": 2}


def settings(**changes):
    base = {
        "fingerprint": FINGERPRINT,
        "layers": [0, 2],
        "positions": ["prompt_last", "answer_mean"],
        "dtype": "float16",
        "dataset_hash": "d1",
        "shard_size": 4,
        "prompt": {"template": "Q: {q}"},
    }
    return {**base, **changes}


def record(i: int, **changes) -> dict:
    """The required RowRecord fields of row i (the runner writes the optional ones too)."""
    return {
        "id": f"q{i}",
        "category": "capitals",
        "question": f"question {i}?",
        "answers": ["paris"],
        "split": "train",
        "label": i % 2,
        "model_answer": "paris",
        **changes,
    }


def fake_shard(rows: range) -> ShardData:
    rng = np.random.default_rng(rows.start)
    return ShardData(
        activations=rng.normal(size=(len(rows), 2, 2, 5)).astype(np.float32),
        records=[record(i) for i in rows],
        baselines={"mean_logprob": -rng.random(len(rows))},
        n_tokens=3 * len(rows),
    )


def test_round_trip_reads_each_site_and_records(tmp_path):
    store = run_extraction(tmp_path / "s", 10, settings(), lambda i, rows: fake_shard(rows))
    full = [fake_shard(range(a, min(a + 4, 10))) for a in (0, 4, 8)]
    acts = np.concatenate([f.activations for f in full])
    assert len(store) == 10 and store.layers == (0, 2) and store.positions == ("prompt_last", "answer_mean")
    got = store.read(2, "answer_mean")
    assert got.dtype == np.float32 and got.shape == (10, 5)
    np.testing.assert_array_equal(got, acts[:, 1, 1].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(store.column("id"), [f"q{i}" for i in range(10)])
    np.testing.assert_array_equal(
        store.baselines["mean_logprob"], np.concatenate([f.baselines["mean_logprob"] for f in full])
    )
    assert store.fingerprint.hidden_size == 5 and store.settings["prompt"] == {"template": "Q: {q}"}
    with pytest.raises(StoreError, match=r"layer 1 is not in the store .*stored layers: \[0, 2\]"):
        store.read(1, "answer_mean")
    with pytest.raises(StoreError, match="position 'answer_last'"):
        store.read(0, "answer_last")
    assert store.rows[3].domain == "capitals" and store.rows[3].answers == (
        "paris",
    )  # domain defaults to category
    with pytest.raises(
        StoreError, match="record field 'splt' does not exist; RowRecord fields: id, category"
    ):
        store.column("splt")


def test_float32_store_is_exact(tmp_path):
    store = run_extraction(tmp_path / "s", 3, settings(dtype="float32"), lambda i, rows: fake_shard(rows))
    np.testing.assert_array_equal(store.read(0, "prompt_last"), fake_shard(range(3)).activations[:, 0, 0])


def test_complete_store_is_reused_and_other_settings_are_refused(tmp_path):
    run_extraction(tmp_path / "s", 6, settings(), lambda i, rows: fake_shard(rows))

    def must_not_run(index, rows):
        raise AssertionError("a complete store was recomputed")

    assert len(run_extraction(tmp_path / "s", 6, settings(), must_not_run)) == 6
    with pytest.raises(StoreError, match="dataset_hash: store has 'd1', run has 'd2'"):
        run_extraction(tmp_path / "s", 6, settings(dataset_hash="d2"), must_not_run)
    other = settings(fingerprint={**FINGERPRINT, "name": "other"})
    assert store_dir_for(tmp_path, other).name == f"other-{store_key(other)[:12]}"
    assert store_key(other) != store_key(settings())


def test_bad_input_is_refused_before_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="is not writable"):
        StoreWriter(blocker / "store", settings(), 4)
    with pytest.raises(StoreError, match="allowed: float16, float32"):
        StoreWriter(tmp_path / "s", settings(dtype="int8"), 4)
    with pytest.raises(StoreError, match="lack \\['dataset_hash'\\]"):
        StoreWriter(tmp_path / "s", {k: v for k, v in settings().items() if k != "dataset_hash"}, 4)
    writer = StoreWriter(tmp_path / "s", settings(), 4)
    with pytest.raises(StoreError, match=r"expected \(4, 2, 2, 5\)"):
        writer.write_shard(0, np.zeros((4, 2, 2, 6)), fake_shard(range(4)).records, {})
    with pytest.raises(StoreError, match="is incomplete"):
        open_store(tmp_path / "s")


EXTRACTION_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)  # bit-identical results between the runs compared
    sys.path.insert(0, {root!r})
    from tests import tiny_models
    from extract.generation import generate_and_capture
    from extract.models import from_transformers
    from extract.settings import GenerationSpec
    from extract.runner import run_extraction
    from extract.store import ShardData

    loaded = from_transformers(tiny_models.tiny_llama(), tiny_models.word_tokenizer(), name="tiny-llama")
    words = tiny_models.WORDS
    questions = [" ".join(words[i : i + 3 + i % 4]) + " ?" for i in range(14)]
    prompts = [loaded.tokenizer.encode(q) for q in questions]
    spec = GenerationSpec(max_new_tokens=5, batch_size=2, stop_strings=["."])
    settings = {{"fingerprint": loaded.fingerprint.to_dict(), "layers": [0, 1, 3],
                "positions": ["prompt_last", "answer_last", "answer_mean"], "dtype": "float16",
                "dataset_hash": "words-14", "shard_size": 4, "generation": vars(spec)}}

    def compute_shard(index, rows):
        if os.environ.get("SLOW"):
            time.sleep(float(os.environ["SLOW"]))
        result = generate_and_capture(loaded.model, loaded.tokenizer, [prompts[i] for i in rows], [0, 1, 3],
                                      settings["positions"], spec, str.strip)
        records = [{{"id": str(i), "category": "words", "question": questions[i], "answers": ["x"], "split": "test",
                    "label": 0, **fields}} for i, fields in zip(rows, result.row_fields())]
        print("computed", CURRENT, index, flush=True)
        return ShardData(result.activations, records, result.baselines, result.n_generated_tokens)

    for CURRENT in sys.argv[1:]:  # several stores in one process: saves a torch start-up per store
        run_extraction(CURRENT, len(prompts), settings, compute_shard)
    """
)


def run_script(script, stores, env_extra=None, wait=True):
    """Run the extraction script on `stores`; returns {store: [computed shard indices]}."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, stores)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if not wait:
        return proc
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    computed = {str(s): [] for s in stores}
    for line in out.splitlines():
        if line.startswith("computed"):
            _, store, index = line.split()
            computed[store].append(int(index))
    return computed


def test_killed_extraction_resumes_to_the_same_store(tmp_path):
    script = tmp_path / "extract_tiny.py"
    script.write_text(EXTRACTION_SCRIPT.format(root=str(ROOT)))
    store = tmp_path / "resumed"
    proc = run_script(script, [store], {"SLOW": "0.6"}, wait=False)
    shards = store / "shards"
    deadline = time.monotonic() + 90
    while len(list(shards.glob("shard-*.safetensors"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the extraction ended before it was killed"
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(int(p.stem.split("-")[1]) for p in shards.glob("shard-*.safetensors"))
    assert 2 <= len(done_before) < 4 and not (store / "manifest.json").exists()

    fresh = tmp_path / "fresh"
    computed = run_script(script, [store, fresh])  # resume the killed run, then an uninterrupted one
    assert computed[str(store)] == [i for i in range(4) if i not in done_before]  # completed shards skipped
    assert computed[str(fresh)] == [0, 1, 2, 3]

    a, b = open_store(store), open_store(fresh)
    assert a.records == b.records and len(a) == 14
    for layer in (0, 1, 3):
        for position in a.positions:
            np.testing.assert_array_equal(a.read(layer, position), b.read(layer, position))
    for name in b.baselines:
        np.testing.assert_array_equal(a.baselines[name], b.baselines[name])
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["settings"]["fingerprint"]["name"] == "tiny-llama"
