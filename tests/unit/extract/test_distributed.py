"""Data-parallel extraction: 2 gloo ranks under torchrun write the same store as 1 process; a dead
rank's shards are redone on relaunch and nothing else; environment detection and its errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extract.distributed import (
    DistContext,
    DistributedError,
    detect_environment,
    is_main_process,
    rank_device,
)
from extract.runner import run_extraction
from extract.store import StoreWriter, open_store
from tests.paths import ROOT
from tests.tiny_models import save_tiny_llama
from tests.unit.extract.dist_worker import SETTINGS, fake_shard

WORKER = Path(__file__).with_name("dist_worker.py")
N_ROWS = 22  # 6 shards of 4 rows, the last one has 2


def subprocess_env() -> dict:
    # One BLAS thread in every process (torchrun's default for several workers), so the single
    # process computes with the same kernels as the ranks.
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def torchrun(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _computed(log_dir: Path) -> dict[int, list[int]]:
    """rank -> shard indices it computed (in order), from the worker's logs."""
    logs = {r: log_dir / f"rank{r}.log" for r in (0, 1)}
    return {r: [int(x) for x in p.read_text().split()] if p.exists() else [] for r, p in logs.items()}


def assert_same_store(a_dir: Path, b_dir: Path) -> None:
    """Row for row: records, every (layer, position) tensor, every baseline, settings."""
    a, b = open_store(a_dir), open_store(b_dir)
    assert a.key == b.key and len(a) == len(b) and a.records == b.records
    for layer in a.layers:
        for position in a.positions:
            np.testing.assert_array_equal(
                a.read(layer, position), b.read(layer, position), err_msg=f"layer {layer} {position}"
            )
    assert sorted(a.baselines) == sorted(b.baselines)
    for name in a.baselines:
        np.testing.assert_array_equal(a.baselines[name], b.baselines[name], err_msg=name)


def _reference(tmp_path: Path) -> Path:
    run_extraction(tmp_path / "single", N_ROWS, SETTINGS, lambda i, rows: fake_shard(rows))
    return tmp_path / "single"


def test_dead_rank_is_redone_on_relaunch_and_nothing_else(tmp_path):
    store, logs = tmp_path / "dist", tmp_path / "logs"
    logs.mkdir()
    # Rank 1 dies before its second shard (3), once rank 0 has written 0, 2 and 4: torchrun stops both.
    crashed = torchrun([str(WORKER), str(store), str(logs), str(N_ROWS), "1"], cwd=tmp_path, check=False)
    assert crashed.returncode != 0
    assert _computed(logs) == {0: [0, 2, 4], 1: [1]}
    writer = StoreWriter(store, SETTINGS, N_ROWS)
    assert writer.missing_shards() == [3, 5] and not (store / "manifest.json").exists()
    written = {i: writer.shard_path(i).stat().st_mtime_ns for i in (0, 1, 2, 4)}
    settings_file = (store / "settings.json").stat().st_mtime_ns

    for log in logs.iterdir():
        log.unlink()
    torchrun([str(WORKER), str(store), str(logs), str(N_ROWS)], cwd=tmp_path)
    # Only the two missing shards were computed, one per rank; the rest was not touched.
    assert _computed(logs) == {0: [3], 1: [5]}
    assert {i: writer.shard_path(i).stat().st_mtime_ns for i in written} == written
    assert (store / "settings.json").stat().st_mtime_ns == settings_file
    assert_same_store(store, _reference(tmp_path))


def test_settings_mismatch_is_raised_on_every_rank(tmp_path):
    store, logs = tmp_path / "dist", tmp_path / "logs"
    logs.mkdir()
    StoreWriter(store, {**SETTINGS, "dataset_hash": "other"}, N_ROWS)  # a store made with other settings
    proc = torchrun([str(WORKER), str(store), str(logs), str(N_ROWS)], cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "dataset_hash: store has 'other', run has 'd1'" in out  # rank 0's own error
    assert "rank 0 could not open the store" in out  # what rank 1 raises instead of hanging
    assert _computed(logs) == {0: [], 1: []}


def _questions(path: Path, n: int) -> None:
    import json

    subjects = ["france", "germany", "italy", "spain", "australia"]
    kinds = ["capital", "currency", "continent", "city"]
    rows = [
        {
            "id": f"q{i}",
            "category": kinds[i % 4],
            "question": f"what is the {kinds[i % 4]} of {subjects[i % 5]} ?",
            "answers": ["paris"],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _extract_in_process(model_dir: Path, data: Path, store_root: Path) -> Path:
    """What `probecal extract` with the overrides below does, in this process with one thread."""
    import torch

    from extract.data import DataSpec
    from extract.models import ModelSpec, load_model
    from extract.runner import extract_to_store, rows_and_splits
    from extract.settings import ExtractSpec, GenerationSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(ModelSpec(name="tiny-llama", path=str(model_dir), device="cpu"))
        rows, splits = rows_and_splits(DataSpec(name="jsonl", path=str(data)))
        spec = ExtractSpec(
            shard_size=4, generation=GenerationSpec(max_new_tokens=5), store_root=str(store_root)
        )
        return extract_to_store(loaded, rows, splits, spec, "jsonl").path
    finally:
        torch.set_num_threads(threads)


def test_cli_extract_under_torchrun_equals_single_process(tmp_path):
    """`probecal extract` on the tiny Llama: 2 gloo ranks vs 1 process, same store row for row."""
    model_dir = save_tiny_llama(tmp_path / "tiny")
    data = tmp_path / "q.jsonl"
    _questions(data, 20)
    dist = torchrun(
        [
            "-m",
            "probes.cli",
            "extract",
            "model=hf",
            f"model.path={model_dir}",
            "model.name=tiny-llama",
            "model.device=cpu",
            "data=jsonl",
            f"data.path={data}",
            "extract.shard_size=4",
            "extract.generation.max_new_tokens=5",
            f"extract.store_root={tmp_path / 'dist'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    out = dist.stdout + dist.stderr
    assert "rank 0: 3 of 5 missing shard(s) to compute: [0, 2, 4]" in out
    assert "rank 1: 2 of 5 missing shard(s) to compute: [1, 3]" in out
    assert dist.stdout.count("activation store:") == 1  # only rank 0 reports
    assert (tmp_path / "run" / "store.txt").exists()

    (dist_store,) = (tmp_path / "dist").iterdir()
    single_store = _extract_in_process(model_dir, data, tmp_path / "single")
    assert dist_store.name == single_store.name  # same settings, same key
    assert len(open_store(dist_store)) == 20
    assert_same_store(dist_store, single_store)


def test_environment_detection():
    assert detect_environment({}) == DistContext()
    assert detect_environment({"WORLD_SIZE": "1"}).enabled is False
    ctx = detect_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (3, 4, 1, False)
    assert ctx.share(range(10)) == [3, 7] and DistContext(0, 4).share(range(10)) == [0, 4, 8]
    assert detect_environment({"WORLD_SIZE": "2", "RANK": "1"}).local_rank == 1  # LOCAL_RANK defaults to RANK
    assert is_main_process({}) and not is_main_process({"WORLD_SIZE": "2", "RANK": "1"})
    # On a CPU machine (or with an explicit device) the configured device is kept.
    assert rank_device(ctx, "cpu") == "cpu"
    assert rank_device(DistContext(), "auto") == "auto"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2: must be in 0..1 \(WORLD_SIZE=2\)"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be >= 1"),
    ],
)
def test_bad_environment_is_named(env, message):
    with pytest.raises(DistributedError, match=message):
        detect_environment(env)


def test_cuda_rank_without_a_gpu_for_it_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device(DistContext(1, 4, local_rank=1), "auto") == "cuda:1"
    assert rank_device(DistContext(1, 4, local_rank=1), "cuda") == "cuda:1"
    assert rank_device(DistContext(1, 4, local_rank=1), "cuda:0") == "cuda:0"  # explicit: kept
    with pytest.raises(DistributedError, match=r"LOCAL_RANK=2 but this node has 2 CUDA device\(s\)"):
        rank_device(DistContext(2, 4, local_rank=2), "auto")


# ---- Large models: one model split over devices (device_map="auto") --------------------------------


def test_capture_under_an_accelerate_device_map_equals_the_plain_model(tmp_path, word_tokenizer):
    """Blocks dispatched by accelerate (two of them offloaded to disk: their weights sit on the meta
    device between calls and accelerate's hooks wrap their forward) still record the exact states.
    CPU only: the execution device is the CPU for every block here (see the report for the limit)."""
    import torch
    from accelerate import dispatch_model

    from extract.generation import generate_and_capture
    from extract.settings import POSITIONS, GenerationSpec
    from tests.tiny_models import tiny_llama

    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    split = dispatch_model(tiny_llama(), device_map=device_map, offload_dir=str(tmp_path))
    assert split.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    prompts = [word_tokenizer.encode(q) for q in ("what is the capital of france ?", "symbol for gold ?")]
    spec = GenerationSpec(max_new_tokens=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = generate_and_capture(tiny_llama(), word_tokenizer, prompts, "all", POSITIONS, spec, str.strip)
        dispatched = generate_and_capture(split, word_tokenizer, prompts, "all", POSITIONS, spec, str.strip)
    finally:
        torch.set_num_threads(threads)
    assert dispatched.answers == plain.answers
    np.testing.assert_array_equal(dispatched.activations, plain.activations)
    for name, values in plain.baselines.items():
        np.testing.assert_array_equal(dispatched.baselines[name], values, err_msg=name)


def test_recorder_stacks_layers_recorded_on_different_devices():
    """With blocks on different GPUs each layer's states arrive on its block's device; stacking them
    must gather them on one device. Two devices here: meta and cpu (the only pair a CPU box has)."""
    import torch

    from extract.hooks import Recorder

    # Values cannot be copied out of meta, so the meta layer comes first: everything gathers there.
    recorder = Recorder([0, 2])
    for _ in range(3):
        recorder.record(0, torch.zeros((2, 4, 5), device="meta"))  # [batch, seq, hidden]
        recorder.record(2, torch.ones((2, 1, 5)))
    stacked = recorder.stacked()
    assert stacked.shape == (3, 2, 2, 5) and stacked.device.type == "meta"
    assert recorder.stacked(calls=2).shape == (2, 2, 2, 5)
