"""A store's labels, categories, domains and split masks, and the probe's input matrix from it.

Splits are the ones recorded in the store (`split` per row, seeded and stratified by category): the layer
sweep and the probe use `train` only, the calibrator and the abstention threshold use `calibration`, and every
in-domain number uses `test`. Rows of the never-fit domains (probecal.heldout: unanswerable, benign_refusal) are
in no split mask: they are measured apart (probes.evaluation.refusal_gap). Rows the model refused (RowRecord.refused)
are left out of `train` and `calibration` (a refusal is its own outcome, not a wrong answer to learn from; served
answers carry `model_refused`) but stay in `test` as wrong answers.
`store` is an `extract.store.ActivationStore` (or anything with its `column`,
`read`, `baselines` and `path`): training never imports `extract`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probecal.heldout import NEVER_FIT_DOMAINS
from probecal.splits import SPLITS
from probes.inference import logit_feature_matrix


def row_domains(store: Any) -> np.ndarray:
    """[n] domain of each row: the record's `domain`, else (older stores, empty values) its category."""
    categories = store.column("category").astype(str)
    try:
        domains = store.column("domain").astype(str)
    except (RuntimeError, KeyError):  # a store written before records had a domain (StoreError)
        return categories
    return np.where(domains == "", categories, domains)


def row_refused(store: Any) -> np.ndarray:
    """[n] bool: the model refused (RowRecord.refused; False for stores written before the field existed)."""
    try:
        return store.column("refused").astype(bool)
    except (RuntimeError, KeyError):  # a record class without the field (StoreError)
        return np.zeros(len(store), bool)


def fit_exclusions(domains: np.ndarray, refused: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(never_fit [n], not_for_fit [n]): rows of NEVER_FIT_DOMAINS (in no split), and those or refused rows
    (kept out of train and calibration)."""
    never_fit = np.isin(np.asarray(domains).astype(str), NEVER_FIT_DOMAINS)
    return never_fit, never_fit | np.asarray(refused, bool)


def probe_features(probe: Any, store: Any, layer: int, position: str) -> np.ndarray:
    """X [n, hidden (+ m)]: the hidden state at the probe's site, then the logit signals a hybrid probe reads."""
    X = store.read(layer, position)
    names = getattr(probe, "logit_features", None)
    if not names:
        return X
    return np.hstack([X, logit_feature_matrix(store.baselines, list(names))]).astype(np.float32)


@dataclass
class SplitData:
    y: np.ndarray  # [n] 1 = correct
    categories: np.ndarray  # [n] str
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # split name -> [n] bool
    domains: np.ndarray | None = None  # [n] str, groups of related categories (None = the categories)

    @classmethod
    def from_store(cls, store: Any, splits: Sequence[str] | None = None) -> SplitData:
        """The store's labels and categories, split by `splits` [n] ("train" | "calibration" | "test").

        splits: None = the splits recorded at extraction. The split seed and fractions are not part of the
        store's settings key (splitting needs no new activations), so a reused store can carry the splits of
        an earlier run: the CLI passes the ones the current data config assigns.
        """
        split = store.column("split") if splits is None else np.asarray(splits, dtype=str)
        if split.shape != (len(store),):
            raise ValueError(
                f"{len(split)} splits given for the {len(store)} rows of the store at {store.path}"
            )
        unknown = sorted(set(split.tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split name(s) {unknown}; allowed: {', '.join(SPLITS)}")
        domains = row_domains(store)
        never_fit, not_for_fit = fit_exclusions(domains, row_refused(store))
        masks = {name: (split == name) & ~(never_fit if name == "test" else not_for_fit) for name in SPLITS}
        return cls(store.column("label").astype(int), store.column("category").astype(str), masks, domains)

    @property
    def calibration_groups(self) -> np.ndarray:
        """[n] what a per-domain calibrator is keyed by: the domain (serving looks it up by the request's
        domain tag), or the category for data without domains."""
        return self.domains if self.domains is not None else self.categories

    def sizes(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.masks.items()}

    def check_split(self, name: str) -> None:
        """A probe needs both correct and wrong answers in the split it is fit or calibrated on."""
        mask = self.masks[name]
        labels = set(np.unique(self.y[mask]).tolist())
        if mask.sum() == 0 or labels != {0, 1}:
            raise ValueError(
                f"the {name} split has {int(mask.sum())} rows with labels {sorted(labels)}: a probe needs both "
                "correct and wrong answers there (use more data or other split fractions)"
            )
