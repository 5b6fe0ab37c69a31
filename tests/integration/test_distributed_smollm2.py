"""SmolLM2-135M-Instruct: `probecal extract` with 2 gloo ranks under torchrun equals one process."""

from pathlib import Path

import pytest

from extract.store import open_store
from tests.unit.extract.test_distributed import assert_same_store, torchrun

pytestmark = pytest.mark.integration

N_QUESTIONS = 8
LAYERS = [0, 15, 30]


def test_two_ranks_equal_one_process_on_smollm2(tmp_path: Path):
    import torch

    from extract.data import DataSpec
    from extract.models import ModelSpec, load_model
    from extract.runner import extract_to_store, rows_and_splits
    from extract.settings import ExtractSpec, GenerationSpec

    proc = torchrun(
        [
            "-m",
            "probes.cli",
            "extract",
            "model.device=cpu",
            f"data.limit={N_QUESTIONS}",
            "extract.shard_size=2",
            f"extract.layers=[{','.join(map(str, LAYERS))}]",
            "extract.generation.max_new_tokens=12",
            f"extract.store_root={tmp_path / 'dist'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert "rank 0: 2 of 4 missing shard(s) to compute: [0, 2]" in out
    assert "rank 1: 2 of 4 missing shard(s) to compute: [1, 3]" in out
    (dist_store,) = (tmp_path / "dist").iterdir()

    # The same extraction in this process, one thread like every torchrun worker.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(ModelSpec(name="smollm2-135m-instruct", device="cpu"))
        rows, splits = rows_and_splits(DataSpec(name="facts", limit=N_QUESTIONS))
        spec = ExtractSpec(
            layers=LAYERS,
            shard_size=2,
            generation=GenerationSpec(max_new_tokens=12),
            store_root=str(tmp_path / "single"),
        )
        single_store = extract_to_store(loaded, rows, splits, spec, "facts").path
    finally:
        torch.set_num_threads(threads)
    assert dist_store.name == single_store.name
    store = open_store(dist_store)
    assert len(store) == N_QUESTIONS and store.fingerprint.num_layers == 30
    assert_same_store(dist_store, single_store)
