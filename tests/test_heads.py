"""Cross-fitted probe: an image is never scored by a probe that saw it; unlabelled images never fit it."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from featurestore.heads import apply_linear, cross_fit_probe, fit_linear, l2_normalize
from featurestore.reader import StoreReader


def test_cross_fitting_does_not_leak_on_memorisable_noise():
    """Random embeddings, random labels: a probe that saw an image memorises it; cross-fitted ones can't."""
    rng = np.random.default_rng(0)
    n, k, d, c = 240, 2, 256, 4
    base = rng.standard_normal((n, 1, d))
    pooled = (base + 0.1 * rng.standard_normal((n, k, d))).astype(np.float32)     # views of one image agree
    labels = rng.integers(0, c, n)
    split = np.where(np.arange(n) < 200, np.arange(n) % 4, -1).astype(np.int8)
    res = cross_fit_probe(pooled, labels, split, c, c=100.0)
    train = split >= 0
    in_sample = apply_linear(pooled[train], res.probes.weight, res.probes.bias)[:, 0].argmax(-1)
    assert (in_sample == labels[train]).mean() > 0.95                      # the full probe memorised
    cross = res.logits[train, 0].argmax(-1)
    assert (cross == labels[train]).mean() < 0.45                           # chance is 0.25
    assert res.metrics["cv_accuracy"] == (cross == labels[train]).mean()


def test_stored_logits_come_from_the_right_fold_probe(small_store):
    """Built chunk by chunk from at most probe.max_rows rows, the stored probe equals a refit by hand."""
    with StoreReader.open(small_store) as s:
        pooled = s.read("teacher/pooled").astype(np.float32)
        logits, split, labels = s.read("teacher/logits/probe"), s.read("split"), s.read("labels")
        h = s.head_arrays("probe")
        metrics = s.attrs["metrics"]["probe"]
    assert (split == -2).sum() > 0 and (labels[split == -2] == -1).all()      # the store has unlabelled images
    for f in range(h["fold_weight"].shape[0]):
        m = split == f
        np.testing.assert_allclose(logits[m], apply_linear(pooled[m], h["fold_weight"][f], h["fold_bias"][f]),
                                   atol=1e-5)
        # refitting without fold f reproduces the stored probe: fold f was not in its training rows
        fit = (split >= 0) & (split != f)
        x = l2_normalize(pooled[fit].reshape(-1, pooled.shape[-1]))
        w, b = fit_linear(x, np.repeat(labels[fit], pooled.shape[1]), len(h["bias"]), 1.0, 0)
        np.testing.assert_allclose(w, h["fold_weight"][f], atol=1e-4)
    held = split < 0                        # held-out and unlabelled: the probe on all folds
    np.testing.assert_allclose(logits[held], apply_linear(pooled[held], h["weight"], h["bias"]), atol=1e-5)
    train = split >= 0
    x = l2_normalize(pooled[train].reshape(-1, pooled.shape[-1]))       # refit on labelled training images only
    w, b = fit_linear(x, np.repeat(labels[train], pooled.shape[1]), len(h["bias"]), 1.0, 0)
    np.testing.assert_allclose(w, h["weight"], atol=1e-4)
    assert metrics["cv_macro_f1"] == f1_score(labels[train], logits[train, 0].argmax(-1), average="macro",
                                              labels=list(range(10)), zero_division=0)


def test_fit_linear_matches_sklearn_pipeline():
    """The folded (W, b) on unscaled rows equals StandardScaler + LogisticRegression's decision function."""
    rng = np.random.default_rng(1)
    x = l2_normalize(rng.standard_normal((120, 16)))
    y = rng.integers(0, 3, 120)
    w, b = fit_linear(x, y, 3, 1.0, 0)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit(scaler.transform(x), y)
    np.testing.assert_allclose(x @ w.T + b, clf.decision_function(scaler.transform(x)), atol=1e-4)


def test_tiny_dataset_one_image_per_class():
    """Folds stay balanced across classes, and probes that saw few classes still score everything."""
    from featurestore.index import assign
    labels = np.arange(10)
    split, _ = assign(labels, folds=5, val_fraction=0.1, seed=0)
    assert (split >= 0).all() and np.bincount(split, minlength=5).tolist() == [2] * 5
    pooled = np.random.default_rng(0).standard_normal((10, 2, 16)).astype(np.float32)
    res = cross_fit_probe(pooled, labels, split, 10)
    assert np.isfinite(res.logits).all() and res.metrics["folds"] == 5
    one_class = cross_fit_probe(pooled[:4], np.zeros(4, int), np.array([0, 1, 0, 1], np.int8), 3)
    assert (one_class.logits.argmax(-1) == 0).all()


def test_unlabelled_images_never_reach_the_fit_or_the_metrics():
    """Adding unlabelled rows (label -1, split -2) with any embeddings changes neither the probes nor
    the metrics; they are scored by the probe fitted on all folds."""
    from featurestore.index import assign
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 12)
    split, _ = assign(labels, folds=3, val_fraction=0.2, seed=0)
    pooled = (rng.standard_normal((48, 2, 16)) + labels[:, None, None]).astype(np.float32)
    base = cross_fit_probe(pooled, labels, split, 4)
    extra = rng.standard_normal((20, 2, 16)).astype(np.float32) * 50           # wild embeddings
    with_unl = cross_fit_probe(np.concatenate([pooled, extra]), np.concatenate([labels, -np.ones(20, int)]),
                               np.concatenate([split, np.full(20, -2, np.int8)]), 4)
    np.testing.assert_array_equal(with_unl.probes.weight, base.probes.weight)
    np.testing.assert_array_equal(with_unl.probes.fold_weight, base.probes.fold_weight)
    assert with_unl.metrics == base.metrics
    np.testing.assert_allclose(with_unl.logits[48:], apply_linear(extra, base.probes.weight, base.probes.bias))
    lab_split, _ = assign(np.concatenate([labels, -np.ones(20, int)]), folds=3, val_fraction=0.2, seed=0)
    assert (lab_split[48:] == -2).all() and np.array_equal(lab_split[:48], split)
