"""Teacher heads computed from the stored embeddings.

probe: multinomial logistic regression on L2-normalised pooled embeddings, cross-fitted. Images of
fold f are scored by the probe fitted on the other folds, so training-set logits are as honest as
held-out ones; held-out images (split -1) are scored by the probe fitted on all folds. Each probe
is stored as (W, b) acting on the L2-normalised embedding: logits = W @ normalize(e) + b.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler


@dataclass
class ProbeResult:
    logits: np.ndarray          # (N, K, C) float32, cross-fitted
    fold_weight: np.ndarray     # (F, C, D): probe that scores fold f
    fold_bias: np.ndarray       # (F, C)
    weight: np.ndarray          # (C, D): probe on all training folds, scores held-out images
    bias: np.ndarray            # (C,)
    metrics: dict


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fit_linear(x: np.ndarray, y: np.ndarray, num_classes: int, c: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit on normalised rows x (n, D); returns (W (C, D), b (C,)) acting on unscaled x."""
    w = np.full((num_classes, x.shape[1]), 0.0, dtype=np.float64)
    b = np.full(num_classes, -30.0, dtype=np.float64)         # classes absent from training: never chosen
    present = np.unique(y)
    if len(present) == 1:                                     # one class seen: a constant probe
        b[present] = 0.0
        return w.astype(np.float32), b.astype(np.float32)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(scaler.transform(x), y)
    coef = clf.coef_ if len(clf.classes_) > 2 else np.vstack([-clf.coef_, clf.coef_]) / 2
    icpt = clf.intercept_ if len(clf.classes_) > 2 else np.array([-clf.intercept_[0], clf.intercept_[0]]) / 2
    w[clf.classes_] = coef / scaler.scale_
    b[clf.classes_] = icpt - (coef / scaler.scale_) @ scaler.mean_
    return w.astype(np.float32), b.astype(np.float32)


def apply_linear(emb: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """emb (..., D) raw pooled -> logits (..., C)."""
    return (l2_normalize(emb) @ w.T + b).astype(np.float32)


def _rows(pooled: np.ndarray, labels: np.ndarray, idx: np.ndarray, max_rows: int):
    """Training rows: views 0..m-1 of each image in idx, m chosen to stay under max_rows."""
    k = pooled.shape[1]
    m = max(1, min(k, max_rows // max(len(idx), 1)))
    x = l2_normalize(pooled[idx, :m].reshape(-1, pooled.shape[-1]))
    y = np.repeat(labels[idx], m)
    return x, y


def cross_fit_probe(pooled: np.ndarray, labels: np.ndarray, split: np.ndarray, num_classes: int,
                    c: float = 1.0, max_rows: int = 200_000, seed: int = 0) -> ProbeResult:
    """pooled (N, K, D) float; labels (N,); split (N,) fold 0..F-1 or -1 for held-out."""
    folds = sorted(int(f) for f in np.unique(split) if f >= 0)
    n, k, d = pooled.shape
    logits = np.zeros((n, k, num_classes), dtype=np.float32)
    fold_w = np.zeros((len(folds), num_classes, d), dtype=np.float32)
    fold_b = np.zeros((len(folds), num_classes), dtype=np.float32)
    train = np.flatnonzero(split >= 0)
    for f in folds:
        fit_idx = np.flatnonzero((split >= 0) & (split != f))
        w, b = fit_linear(*_rows(pooled, labels, fit_idx, max_rows), num_classes, c, seed)
        fold_w[f], fold_b[f] = w, b
        scored = np.flatnonzero(split == f)
        logits[scored] = apply_linear(pooled[scored], w, b)
    w, b = fit_linear(*_rows(pooled, labels, train, max_rows), num_classes, c, seed)
    held = np.flatnonzero(split < 0)
    logits[held] = apply_linear(pooled[held], w, b)
    metrics = {"c": c, "folds": len(folds)}
    metrics |= _metrics("cv", labels[train], logits[train, 0].argmax(-1), num_classes)
    if len(held):
        metrics |= _metrics("val", labels[held], logits[held, 0].argmax(-1), num_classes)
    return ProbeResult(logits, fold_w, fold_b, w, b, metrics)


def _metrics(prefix: str, y: np.ndarray, pred: np.ndarray, num_classes: int) -> dict:
    labels = list(range(num_classes))
    return {f"{prefix}_macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
            f"{prefix}_accuracy": float(accuracy_score(y, pred))}


def zeroshot_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Zero-shot head quality on the canonical view of every image."""
    return _metrics("zeroshot", labels, logits[:, 0].argmax(-1), num_classes)
