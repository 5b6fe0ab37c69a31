"""Real packaged model (SmolLM2-135M-Instruct): `extract.engine=openai` against a stub engine that generates
greedily with the same model builds the store `hf` extraction builds: the same answers, grades and flags,
states at every stored layer and position and the logit baselines to float rounding."""

import numpy as np
import pytest

from extract.data import DataSpec, load_rows
from extract.models import ModelSpec, load_model
from extract.runner import extract_to_store
from extract.settings import ExtractSpec
from tests.greedy_engine import GreedyEngine
from tests.paths import TEST_DEVICE

pytestmark = pytest.mark.integration


def test_engine_store_equals_hf_store(tmp_path):
    loaded = load_model(ModelSpec(name="smollm2-135m-instruct", device=TEST_DEVICE, dtype="float32"))
    rows = load_rows(DataSpec(limit=8))
    stores = {}
    with GreedyEngine(loaded.model, loaded.tokenizer) as engine:
        for name in ("hf", "openai"):
            spec = ExtractSpec(
                layers=[0, 12, 30], store_dtype="float32", shard_size=4, store_root=str(tmp_path / name),
                engine=name, engine_url=engine.url, engine_concurrency=2,
            )  # fmt: skip
            stores[name] = extract_to_store(loaded, rows, spec=spec, data_name="facts")
    hf, served = stores["hf"], stores["openai"]
    assert served.records == hf.records
    assert sum(r["label"] for r in hf.records) > 0 and any(r["model_answer"] for r in hf.records)
    for layer in hf.layers:
        for position in hf.positions:
            a, b = hf.read(layer, position), served.read(layer, position)
            scale = np.abs(a).max()
            assert np.abs(a - b).max() <= 1e-5 * max(scale, 1.0), (
                layer,
                position,
                np.abs(a - b).max(),
                scale,
            )
    for name, values in hf.baselines.items():
        np.testing.assert_allclose(served.baselines[name], values, rtol=1e-4, atol=1e-5, err_msg=name)
