"""A per-class logit bias for macro-F1, and the class priors the imbalance-aware terms use.

Macro-F1 rewards the small classes as much as the large ones, and the argmax of a model trained on
imbalanced data favours the large ones. `fit_bias` shifts each class's logit by a constant b_c chosen
to maximise macro-F1 of argmax(logits + b) on labelled predictions (coordinate ascent over the
classes on a grid of the logits' spread, a few rounds, ties to the smaller shift). `cross_fitted_gain`
says whether that helps on images the bias did not see: the held-out images are split in two
stratified halves, a bias fitted on each scores the other, and the macro-F1 of those predictions is
compared with the unbiased one. `trainer fit --calibrate bias` folds the bias (fitted on every
held-out image) into the exported file only where that cross-fitted gain is positive.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.metrics import macro_f1

ROUNDS = 3
GRID = np.linspace(-2.0, 2.0, 41)           # in units of the logits' standard deviation


def fit_bias(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C,) bias maximising macro-F1 of argmax(logits + bias) over (n, C) logits and their labels."""
    c = logits.shape[1]
    grid = GRID * max(float(logits.std()), 1e-6)
    order = np.argsort(np.abs(grid), kind="stable")              # ties go to the smaller shift
    bias = np.zeros(c)
    best = macro_f1(labels, logits.argmax(1), c)
    for _ in range(ROUNDS):
        moved = False
        for k in range(c):
            keep = bias[k]
            for v in grid[order]:
                bias[k] = v
                f1 = macro_f1(labels, (logits + bias).argmax(1), c)
                if f1 > best + 1e-12:
                    best, keep, moved = f1, v, True
            bias[k] = keep
        if not moved:
            break
    return bias.astype(np.float32)


@dataclass
class BiasChoice:
    bias: np.ndarray             # (C,) what the exported file adds (zeros when it did not help)
    applied: bool
    f1_without: float            # cross-fitted macro-F1 on the held-out images, without and with a bias
    f1_with: float

    def record(self) -> dict:
        return {"applied": self.applied, "cross_fitted_macro_f1_without": self.f1_without,
                "cross_fitted_macro_f1_with": self.f1_with, "bias": [float(v) for v in self.bias]}


def choose_bias(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> BiasChoice:
    """The bias to export: fitted on all of (logits, labels) where a bias fitted on one stratified half
    raises macro-F1 on the other (both ways round), else none."""
    c = logits.shape[1]
    rng = np.random.default_rng([seed, 7])
    half = np.zeros(len(labels), bool)
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        half[idx[: len(idx) // 2]] = True
    preds = logits.argmax(1).copy()
    for fit, score in ((half, ~half), (~half, half)):
        if fit.any() and score.any():
            preds[score] = (logits[score] + fit_bias(logits[fit], labels[fit])).argmax(1)
    without, with_bias = macro_f1(labels, logits.argmax(1), c), macro_f1(labels, preds, c)
    applied = with_bias > without
    bias = fit_bias(logits, labels) if applied else np.zeros(c, np.float32)
    return BiasChoice(bias, applied, without, with_bias)


def class_prior(labels: np.ndarray, c: int) -> np.ndarray:
    """(C,) class frequencies of labelled images (label >= 0), each class counted at least once."""
    counts = np.bincount(labels[labels >= 0], minlength=c).astype(np.float64) + 1.0
    return counts / counts.sum()
