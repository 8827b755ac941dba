"""Phase 2 of a build: what is known before the teacher runs, written when the store is created.

The scanned images get a stratified split (cross-fitting folds 0..F-1, held out, unlabelled) and a
seeded store order; every view's parameters are drawn from (seed, image, view) alone, with mixing
partners from the image's own store chunk and group (training, held-out and unlabelled images never
mix), so whoever holds a chunk can render all its views.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurestore import views
from featurestore.pipeline.config import ProbeConfig, ViewPolicy
from featurestore.pipeline.scan import ScanResult
from featurestore.pipeline.sources import DatasetError
from featurestore.store.schema import SPLIT_HELD_OUT, SPLIT_UNLABELED
from featurestore.store.writer import StoreWriter


@dataclass
class Index:
    """The arrays written when a store is created, in store order."""
    order: np.ndarray            # store position -> scanned image
    labels: np.ndarray           # (N,) int16, -1 unlabelled
    split: np.ndarray            # (N,) int8
    ids: list[str]
    sha256: np.ndarray           # (N, 32) uint8
    params: np.ndarray           # (N, K, P) float32


def assign(labels: np.ndarray, folds: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split per scanned image (fold 0..F-1, held out, unlabelled) and a seeded store order."""
    rng = np.random.default_rng([seed, 1])
    split = np.full(len(labels), SPLIT_UNLABELED, dtype=np.int8)
    offset = 0                            # round-robin continues across classes: folds stay balanced
    for c in np.unique(labels[labels >= 0]):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(idx))) if len(idx) > folds else 0
        split[idx[:n_val]] = SPLIT_HELD_OUT
        split[idx[n_val:]] = (offset + np.arange(len(idx) - n_val)) % folds
        offset += len(idx) - n_val
    if (split >= 0).sum() < folds:
        raise DatasetError(f"{int((split >= 0).sum())} training images are too few for {folds}-fold cross-fitting")
    order = np.random.default_rng([seed, 2]).permutation(len(labels))
    return split, order


def make_index(res: ScanResult, probe: ProbeConfig, policy: ViewPolicy, chunk: int) -> Index:
    labels = np.array([s.label for s in res.valid], dtype=np.int16)
    split, order = assign(labels, probe.folds, probe.val_fraction, probe.seed)
    labels, split, n = labels[order], split[order], len(order)
    groups = views.mixing_groups(split)
    params = np.concatenate([views.sample_params(policy, a, min(a + chunk, n), groups[a:a + chunk])
                             for a in range(0, n, chunk)])
    return Index(order, labels, split, [res.valid[j].rel for j in order],
                 np.stack([np.frombuffer(bytes.fromhex(res.sha256[j]), np.uint8) for j in order]), params)


def write_index(store: StoreWriter, index: Index) -> None:
    store.write("labels", 0, index.labels)
    store.write("split", 0, index.split)
    store.write("ids", 0, np.array(index.ids, dtype=object))
    store.write("sha256", 0, index.sha256)
    store.write("views/params", 0, index.params)
