"""Issue #12: damaged stores and artifacts are caught on load with one clear message, never read.

Each test reproduces one numbered case of the issue (it failed before the fix)."""

import json
import os

import numpy as np
import pytest

from extract.runner import run_extraction
from extract.store import (
    MANIFEST_FILE,
    RowRecord,
    StoreDamagedError,
    StoreError,
    StoreWriter,
    open_store,
    verify_store,
)
from tests.unit.extract.test_store import fake_shard, record, settings

N_ROWS = 10  # shards of 4, 4, 2 rows


def build(path):
    return run_extraction(path, N_ROWS, settings(), lambda i, rows: fake_shard(rows))


def recomputing(log):
    def compute(index, rows):
        log.append(index)
        return fake_shard(rows)

    return compute


def shard(path, index):
    return path / "shards" / f"shard-{index:05d}.safetensors"


@pytest.fixture
def store_path(tmp_path):
    build(tmp_path / "s")
    return tmp_path / "s"


# ------------------------------------------------------------------------- case 1: truncated / deleted shard


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_case1_missing_or_truncated_shard_is_refused_on_open_and_recomputed_by_extract(store_path, damage):
    reference = open_store(store_path).read(2, "answer_mean")
    target = shard(store_path, 1)
    if damage == "truncate":
        os.truncate(target, 1000)
        expected = r"shards/shard-00001.safetensors has 1000 bytes, the manifest recorded \d+"
    else:
        target.unlink()
        expected = r"shards/shard-00001.safetensors is missing"
    with pytest.raises(StoreDamagedError, match=expected + ".*re-run `probecal extract`") as info:
        open_store(store_path)
    assert info.value.damaged == [1]
    computed = []
    store = run_extraction(store_path, N_ROWS, settings(), recomputing(computed))
    assert computed == [1]  # only the damaged shard, never "reusing the complete store"
    np.testing.assert_array_equal(store.read(2, "answer_mean"), reference)
    assert open_store(store_path).key == store.key  # intact again


def test_case1_shard_damaged_after_open_is_a_store_error_naming_the_file(store_path):
    store = open_store(store_path)
    os.truncate(shard(store_path, 2), 100)
    with pytest.raises(StoreError, match=r"shard-00002.safetensors: cannot read tensor 'act.L0.prompt_last'"):
        store.read(0, "prompt_last")


# ------------------------------------------------------------------------- case 2: same size, other bytes


def test_case2_overwritten_bytes_are_caught_by_the_checksum_and_recomputed(store_path):
    reference = open_store(store_path).read(0, "prompt_last")
    target = shard(store_path, 0)
    content = bytearray(target.read_bytes())
    content[-20:-10] = b"\x7f" * 10  # inside the tensor data; the header still parses
    target.write_bytes(bytes(content))
    with pytest.raises(StoreDamagedError, match="shard-00000.safetensors does not match the sha256 recorded"):
        open_store(store_path)
    with pytest.raises(StoreError, match="shard-00000.safetensors does not match the sha256"):
        verify_store(store_path)
    computed = []
    store = run_extraction(store_path, N_ROWS, settings(), recomputing(computed))
    assert computed == [0]
    np.testing.assert_array_equal(store.read(0, "prompt_last"), reference)
    assert "intact (3 shards" in verify_store(store_path)


def test_hashes_are_recorded_and_size_only_open_skips_them(store_path):
    manifest = json.loads((store_path / MANIFEST_FILE).read_text())
    assert [len(s["sha256"]) for s in manifest["shards"]] == [64, 64, 64]
    assert manifest["format_version"] == 2
    target = shard(store_path, 2)
    content = bytearray(target.read_bytes())
    content[-1] ^= 0xFF
    target.write_bytes(bytes(content))
    assert (
        len(open_store(store_path, verify_hashes=False)) == N_ROWS
    )  # the size is right: only a hash sees it


# ------------------------------------------------------------------------- case 3: damaged manifest


def test_case3_damaged_manifest_names_the_file_and_the_repair(store_path):
    manifest_file = store_path / MANIFEST_FILE
    text = manifest_file.read_text()
    manifest_file.write_text(text[: len(text) // 2])
    message = rf"{manifest_file} is damaged \(invalid JSON at line 1, column \d+.*delete it and re-run `probecal extract`"  # noqa: E501
    with pytest.raises(StoreError, match=message):
        open_store(store_path)
    with pytest.raises(StoreError, match=message):  # extract does not guess either
        run_extraction(store_path, N_ROWS, settings(), recomputing([]))
    manifest_file.unlink()  # the repair the message gives: nothing is recomputed
    computed = []
    run_extraction(store_path, N_ROWS, settings(), recomputing(computed))
    assert computed == [] and len(open_store(store_path)) == N_ROWS
    manifest_file.write_text('{"format_version": 2}')
    with pytest.raises(StoreError, match=r"manifest.json is damaged \(expected the keys format_version, key"):
        open_store(store_path)


def test_format1_store_is_refused_then_upgraded_without_recomputing(store_path, tmp_path):
    manifest_file = store_path / MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text())
    old = {
        **manifest,
        "format_version": 1,
        "shards": [{"file": s["file"], "rows": s["rows"]} for s in manifest["shards"]],
        "records": [{k: v for k, v in r.items() if k != "domain"} for r in manifest["records"]],
    }
    manifest_file.write_text(json.dumps(old))
    with pytest.raises(
        StoreError, match=r"format_version 1 records no shard checksums.*probecal verify .* --rehash"
    ):
        open_store(store_path)
    assert "intact" in verify_store(store_path, rehash=True)
    assert open_store(store_path).rows[0].domain == "capitals"  # old records: domain = category
    manifest_file.write_text(json.dumps(old))
    computed = []
    run_extraction(store_path, N_ROWS, settings(), recomputing(computed))
    assert computed == [] and json.loads(manifest_file.read_text())["format_version"] == 2


def test_another_stores_manifest_is_not_repaired(store_path):
    shard(store_path, 1).unlink()
    with pytest.raises(StoreError, match="dataset_hash: store has 'd1', run has 'd2'"):
        run_extraction(store_path, N_ROWS, settings(dataset_hash="d2"), recomputing([]))
    assert (store_path / MANIFEST_FILE).exists()  # left as found


# ------------------------------------------------------------------------- issue #11: the typed row record


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"lable": 1},
            r"shard 0, row 2: unknown record field\(s\) \['lable'\]; RowRecord fields: id, category",
        ),
        ({"split": None}, r"shard 0, row 2: field 'split' = None \(NoneType\); expected str"),
        ({"label": 2}, r"field 'label' = 2; allowed: 0, 1"),
        ({"answers": "paris"}, r"field 'answers' = 'paris' \(str\); expected tuple\[str, ...\]"),
        ({"truncated": 1}, r"field 'truncated' = 1 \(int\); expected bool"),
    ],
)
def test_row_records_are_validated_on_write(tmp_path, changes, message):
    writer = StoreWriter(tmp_path / "s", settings(), 4)
    records = [record(i) for i in range(4)]
    records[2] = {**records[2], **changes}
    with pytest.raises(StoreError, match=message):
        writer.write_shard(0, fake_shard(range(4)).activations, records, {})


def test_missing_required_field_lists_the_required_ones(tmp_path):
    writer = StoreWriter(tmp_path / "s", settings(), 4)
    records = [{k: v for k, v in record(i).items() if k != "split"} for i in range(4)]
    with pytest.raises(
        StoreError,
        match=r"row 0: missing record field\(s\) \['split'\] \(required: id, category, "
        r"question, answers, split, label, model_answer\)",
    ):
        writer.write_shard(0, fake_shard(range(4)).activations, records, {})


def test_row_record_round_trip_and_numpy_values():
    row = RowRecord.from_dict(
        {**record(1), "label": np.int64(1), "f1": np.float32(0.5), "truncated": np.bool_(True)}
    )
    assert (row.label, row.f1, row.truncated, row.domain) == (1, 0.5, True, "capitals")
    assert type(row.label) is int and type(row.truncated) is bool
    assert RowRecord.from_dict(row.to_dict()) == row
    with pytest.raises(AttributeError):
        row.label = 0


# ------------------------------------------------------------------------- cases 4 and 5: probe artifacts


@pytest.fixture
def artifact_dir(tmp_path):
    from tests.unit.probes.test_artifact import make_artifact

    make_artifact().save(tmp_path / "probe")
    return tmp_path / "probe"


def edit(directory, change):
    path = directory / "probe.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=1))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(layer=d["layer"] + 1),  # the server would read a layer the probe never saw
        lambda d: d["thresholds"][0].update(threshold=0.01),
        lambda d: d.update(parent={"digest": "0" * 64, "recalibration": {}}),  # forged lineage
    ],
    ids=["layer", "threshold", "parent"],
)
def test_case4_edited_metadata_is_refused_by_load_and_the_scorer(artifact_dir, change):
    from probes.artifact import ArtifactError, ProbeArtifact
    from probes.scorer import ProbeScorer

    edit(artifact_dir, change)
    message = rf"probe artifact {artifact_dir}: probe.json or probe.safetensors changed after it was saved .*retrain"
    with pytest.raises(ArtifactError, match=message):
        ProbeArtifact.load(artifact_dir)  # what evaluate and serve (wrapper) call
    with pytest.raises(ArtifactError, match=message):
        ProbeScorer(artifact_dir)


def test_case5_deleted_digest_and_flipped_tensors_are_refused(artifact_dir):
    from probes.artifact import ArtifactError, ProbeArtifact

    edit(artifact_dir, lambda d: d.pop("digest"))
    tensors = artifact_dir / "probe.safetensors"
    content = bytearray(tensors.read_bytes())
    content[-5] ^= 0xFF
    tensors.write_bytes(bytes(content))
    with pytest.raises(
        ArtifactError, match=r"probe.json: no 'digest': the artifact cannot be checked and is refused"
    ):
        ProbeArtifact.load(artifact_dir)


def as_format1(directory, tensors_sha256=True):
    """Rewrite a saved artifact the way probecal wrote it before the digest (format 1)."""
    import hashlib

    def change(document):
        document.pop("digest")
        document.pop("parent")
        document["format_version"] = 1
        if tensors_sha256:
            document["tensors_sha256"] = hashlib.sha256(
                (directory / "probe.safetensors").read_bytes()
            ).hexdigest()

    edit(directory, change)


def test_format1_artifact_is_refused_until_rehashed(artifact_dir):
    from probes.artifact import ArtifactError, ProbeArtifact, rehash_format1

    as_format1(artifact_dir)
    with pytest.raises(
        ArtifactError, match=rf"format_version 1 has no digest.*`probecal verify {artifact_dir} --rehash`"
    ):
        ProbeArtifact.load(artifact_dir)
    assert "upgraded to format 2 (tensors matched their recorded sha256)" in rehash_format1(artifact_dir)
    loaded = ProbeArtifact.load(artifact_dir)
    assert loaded.metadata.parent is None and len(loaded.digest) == 64
    with pytest.raises(ArtifactError, match="--rehash only upgrades format_version 1 artifacts"):
        rehash_format1(artifact_dir)  # a current artifact that fails its digest is never re-signed


def test_rehash_refuses_format1_tensors_that_changed(artifact_dir):
    from probes.artifact import ArtifactError, rehash_format1

    as_format1(artifact_dir)
    tensors = artifact_dir / "probe.safetensors"
    content = bytearray(tensors.read_bytes())
    content[-5] ^= 0xFF
    tensors.write_bytes(bytes(content))
    with pytest.raises(ArtifactError, match="does not match the tensors_sha256 recorded"):
        rehash_format1(artifact_dir)


def test_recalibrated_artifact_has_its_own_digest_and_records_its_parent(artifact_dir, tmp_path):
    from probes.artifact import ProbeArtifact

    parent = ProbeArtifact.load(artifact_dir)
    lineage = {"digest": parent.digest, "recalibration": {"data_hash": "ab" * 32, "rows": 120}}
    child = parent.with_metadata(parent=lineage, thresholds=[])
    assert child.digest != parent.digest
    child.save(tmp_path / "child")
    loaded = ProbeArtifact.load(tmp_path / "child")
    assert loaded.digest == child.digest and loaded.metadata.parent == lineage
