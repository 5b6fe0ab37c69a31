"""probes.domains: k-means domain clusters recover planted groups, assign deterministically, travel in the
artifact under its digest, and a recalibrated child keeps them."""

import json

import numpy as np
import pytest

from probes.artifact import ArtifactError, ProbeArtifact
from probes.domains import DomainClusters, fit_domain_clusters, purity
from tests.unit.probes.test_recalibration import parent_artifact

HIDDEN = 16


def planted(n_per_group=60, groups=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(groups, HIDDEN))
    truth = np.repeat(np.arange(groups), n_per_group)
    return centres[truth] + rng.normal(size=(len(truth), HIDDEN)), truth.astype(str)


def test_clusters_recover_planted_groups_and_assign_deterministically():
    X, truth = planted()
    clusters = fit_domain_clusters(X, n_clusters=4, seed=0)
    assigned = clusters.assign(X)
    assert purity(assigned, truth) == 1.0
    assert set(assigned) == {"cluster-0", "cluster-1", "cluster-2", "cluster-3"}
    again = fit_domain_clusters(X, n_clusters=4, seed=0)
    np.testing.assert_array_equal(again.centroids, clusters.centroids)
    np.testing.assert_array_equal(clusters.assign(X[::-1]), assigned[::-1])  # a row's domain is its own
    assert clusters.assign(X[0]).tolist() == [assigned[0]]
    assert purity(np.zeros(len(truth)), truth) == pytest.approx(0.25)


def test_bad_inputs_are_named():
    X, _ = planted(5, 2)
    with pytest.raises(ValueError, match="n_clusters=20 must be between 1 and the number of rows"):
        fit_domain_clusters(X, n_clusters=20)
    clusters = fit_domain_clusters(X, n_clusters=2)
    with pytest.raises(ValueError, match="read vectors of size 16"):
        clusters.assign(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="lack"):
        DomainClusters.from_tensors({"mean": np.zeros(3)})


def test_clusters_travel_in_the_artifact_under_its_digest(tmp_path):
    X, truth = planted()
    clusters = fit_domain_clusters(X, n_clusters=4, seed=0)
    artifact = parent_artifact()
    with_clusters = artifact.with_domains(clusters)
    assert with_clusters.digest != artifact.digest  # the clusters are part of the identity
    with_clusters.save(tmp_path / "a")
    loaded = ProbeArtifact.load(tmp_path / "a")
    np.testing.assert_array_equal(loaded.domains.assign(X), clusters.assign(X))
    assert loaded.digest == with_clusters.digest
    assert ProbeArtifact.load(artifact.save(tmp_path / "b")).domains is None
    # editing a centroid is detected by the digest
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "a" / "probe.safetensors")
    tensors["domains.centroids"] = tensors["domains.centroids"] + 1.0
    save_file(tensors, tmp_path / "a" / "probe.safetensors")
    with pytest.raises(ArtifactError, match="changed after it was saved"):
        ProbeArtifact.load(tmp_path / "a")
    assert json.loads((tmp_path / "b" / "probe.json").read_text())  # untouched sibling still readable


def test_a_recalibrated_child_keeps_the_parent_clusters():
    from probes.recalibration import make_rows, recalibrate

    X, _ = planted()
    clusters = fit_domain_clusters(X, n_clusters=3, seed=1)
    parent = parent_artifact().with_domains(clusters)
    rng = np.random.default_rng(0)
    s = rng.normal(size=100)
    y = (rng.random(100) < 1 / (1 + np.exp(-s))).astype(int)
    result = recalibrate(parent, make_rows(s, y, clusters.assign(X[:100])), kind="shrinkage", n_bootstrap=50)
    assert result.artifact.domains is clusters
