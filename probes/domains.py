"""Domains for requests without a client tag: k-means clusters of a prompt-side representation.

    clusters = fit_domain_clusters(X_prompt [n, hidden], n_clusters=8, seed=0)   # at training time
    clusters.assign(X_prompt [m, hidden]) -> ["cluster-3", ...]                  # at serving time

X_prompt is the hidden state at the probe's layer at position DOMAIN_POSITION (prompt_last: the last prompt
token, known before the answer is generated, so every request has it). The clusters travel in the probe
artifact (tensors "domains.mean", "domains.scale", "domains.centroids": covered by its digest) and the assigned
name "cluster-<i>" is used as the domain everywhere a client tag would be (per-domain calibration, feedback,
/metrics). A client's `metadata.domain` always wins. Assignment is deterministic: nearest centroid in the
standardized space, ties to the lowest index. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probes.novelty import NOVELTY_POSITION

# clusters read the question's own state, the one the novelty model reads
DOMAIN_POSITION = NOVELTY_POSITION
CLUSTER_PREFIX = "cluster-"
TENSOR_NAMES = ("mean", "scale", "centroids")
# prompt states stored with served responses (the feedback database) to refit the clusters on: float16, as
# the activation store keeps them (2 bytes per hidden unit), little-endian
STATE_DTYPE = np.dtype("<f2")


def encode_state(state) -> bytes | None:
    """[hidden] vector -> float16 bytes (None stays None)."""
    return None if state is None else np.asarray(state, dtype=STATE_DTYPE).reshape(-1).tobytes()


def decode_state(blob: bytes | None) -> np.ndarray | None:
    """float16 bytes -> [hidden] float32 vector (None stays None)."""
    return None if blob is None else np.frombuffer(blob, dtype=STATE_DTYPE).astype(np.float32)


@dataclass(frozen=True)
class DomainClusters:
    """Standardization (mean [hidden], scale [hidden]) and centroids [k, hidden] in the standardized space."""

    mean: np.ndarray
    scale: np.ndarray
    centroids: np.ndarray

    def __post_init__(self) -> None:
        k, width = np.shape(self.centroids) if np.ndim(self.centroids) == 2 else (0, -1)
        if k == 0 or np.shape(self.mean) != (width,) or np.shape(self.scale) != (width,):
            raise ValueError(
                f"domain clusters: centroids {np.shape(self.centroids)}, mean {np.shape(self.mean)}, "
                f"scale {np.shape(self.scale)} do not fit together ([k, hidden], [hidden], [hidden])"
            )

    @property
    def names(self) -> list[str]:
        return [f"{CLUSTER_PREFIX}{i}" for i in range(len(self.centroids))]

    def nearest(self, X) -> np.ndarray:
        """[m] index of each row's nearest centroid (X [m, hidden] or [hidden])."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if X.shape[1] != len(self.mean):
            raise ValueError(
                f"domain clusters read vectors of size {len(self.mean)} (the {DOMAIN_POSITION} hidden state at "
                f"the probe's layer); got shape {X.shape}"
            )
        Z = (X - self.mean) / self.scale
        distances = (Z**2).sum(axis=1)[:, None] - 2 * Z @ self.centroids.T + (self.centroids**2).sum(axis=1)
        return np.argmin(distances, axis=1)

    def assign(self, X) -> np.ndarray:
        """[m] domain name "cluster-<i>" of each row."""
        return np.asarray(self.names, dtype=object)[self.nearest(X)].astype(str)

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(getattr(self, name), dtype=np.float64) for name in TENSOR_NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> DomainClusters:
        missing = sorted(set(TENSOR_NAMES) - set(tensors))
        if missing:
            raise ValueError(f"domain cluster tensors lack {missing}")
        return cls(*(np.asarray(tensors[name], dtype=np.float64) for name in TENSOR_NAMES))


def fit_domain_clusters(X, n_clusters: int = 8, seed: int = 0, n_iter: int = 100) -> DomainClusters:
    """k-means (k-means++ seeding, Lloyd iterations) on the standardized rows of X [n, hidden]; seeded, so the
    same X and seed give the same clusters. An empty cluster is re-seeded at the row farthest from its centroid."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or not np.all(np.isfinite(X)):
        raise ValueError(f"domain clusters need finite vectors [n, hidden]; got shape {X.shape}")
    if not 1 <= n_clusters <= len(X):
        raise ValueError(f"n_clusters={n_clusters} must be between 1 and the number of rows ({len(X)})")
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Z = (X - mean) / scale
    rng = np.random.default_rng(seed)
    centroids = [Z[rng.integers(len(Z))]]
    for _ in range(1, n_clusters):
        d2 = np.min([((Z - c) ** 2).sum(axis=1) for c in centroids], axis=0)
        centroids.append(Z[rng.choice(len(Z), p=d2 / d2.sum())] if d2.sum() > 0 else Z[rng.integers(len(Z))])
    centroids = np.array(centroids)
    labels = np.full(len(Z), -1)
    for _ in range(n_iter):
        clusters = DomainClusters(mean, scale, centroids)
        new = clusters.nearest(X)
        if np.array_equal(new, labels):
            break
        labels = new
        for i in range(n_clusters):
            members = labels == i
            if members.any():
                centroids[i] = Z[members].mean(axis=0)
            else:
                far = np.argmax(((Z - centroids[labels]) ** 2).sum(axis=1))
                centroids[i], labels[far] = Z[far], i
    return DomainClusters(mean, scale, centroids)


def purity(assigned, truth) -> float:
    """Share of rows whose cluster's majority true label is their own (1 = every cluster holds one label)."""
    assigned, truth = np.asarray(assigned).astype(str), np.asarray(truth).astype(str)
    total = 0
    for cluster in np.unique(assigned):
        _, counts = np.unique(truth[assigned == cluster], return_counts=True)
        total += counts.max()
    return total / len(assigned)
