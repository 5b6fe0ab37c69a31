"""train.domain_clusters: train_probe fits k-means domain clusters on the train split's prompt_last states at
the probe's layer and saves them with the artifact (digest-covered); a shrinkage calibrator trains end to end."""

from dataclasses import replace

import numpy as np
import pytest

from probes.artifact import ProbeArtifact
from probes.calibration import ShrinkageCalibrator
from probes.domains import DOMAIN_POSITION, fit_domain_clusters, purity
from probes.estimators import LogisticProbe
from probes.training import TrainSpec, train_probe
from probes.training.splits import SplitData
from tests.pipeline_fixtures import write_synthetic_store

SPEC = TrainSpec(n_folds=3, n_bootstrap=50, select="cv", domain_clusters=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic")


def test_train_probe_saves_domain_clusters_and_a_shrinkage_calibrator(store, tmp_path):
    result = train_probe(store, LogisticProbe(), ShrinkageCalibrator(), SPEC, seed=0)
    artifact = result.artifact
    layer = artifact.metadata.layer
    data = SplitData.from_store(store)
    train = data.masks["train"]
    expected = fit_domain_clusters(store.read(layer, DOMAIN_POSITION)[train], 3, seed=0)
    np.testing.assert_array_equal(artifact.domains.centroids, expected.centroids)
    loaded = ProbeArtifact.load(artifact.save(tmp_path / "probe"))
    X = store.read(layer, DOMAIN_POSITION)
    names = loaded.domains.assign(X)
    assert set(names) <= {"cluster-0", "cluster-1", "cluster-2"}
    assert 0 < purity(names, data.categories) <= 1
    assert isinstance(loaded.calibrator, ShrinkageCalibrator) and loaded.calibrator.offsets_
    assert ProbeArtifact.load(artifact.save(tmp_path / "again")).digest == loaded.digest


def test_domain_clusters_need_the_prompt_last_position(store, monkeypatch):
    spec = replace(SPEC, positions=[p for p in store.positions if p != DOMAIN_POSITION])
    stored = tuple(store.positions)
    monkeypatch.setattr(
        type(store), "positions", property(lambda self: tuple(p for p in stored if p != DOMAIN_POSITION))
    )
    with pytest.raises(ValueError, match="train.domain_clusters=3 clusters the prompt_last state"):
        train_probe(store, LogisticProbe(), ShrinkageCalibrator(), spec)
