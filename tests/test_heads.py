"""Cross-fitted probe: an image is never scored by a probe that saw it; unlabelled images never fit it."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from featurestore.pipeline.heads import apply_linear, cross_fit_probe, fit_linear, l2_normalize
from featurestore.store.reader import StoreReader


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
        pooled = s.read("teachers/siglip/pooled").astype(np.float32)
        logits, split, labels = s.read("teachers/siglip/logits/probe"), s.read("split"), s.read("labels")
        h = s.head_arrays("probe")
        metrics = s.teacher().metrics["probe"]
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


def test_a_class_weighted_probe_matches_sklearn_and_favours_the_small_class():
    """--probe-class-weight balanced is scikit-learn's class_weight='balanced', folded the same way; on a
    6:1 imbalance it predicts the small class more often than the unweighted probe."""
    rng = np.random.default_rng(2)
    y = np.array([0] * 120 + [1] * 20 + [2] * 60)
    x = l2_normalize(rng.standard_normal((200, 16)) + 0.6 * np.eye(16)[y])
    w, b = fit_linear(x, y, 3, 1.0, 0, class_weight="balanced")
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=0, class_weight="balanced").fit(scaler.transform(x), y)
    np.testing.assert_allclose(x @ w.T + b, clf.decision_function(scaler.transform(x)), atol=1e-4)
    plain_w, plain_b = fit_linear(x, y, 3, 1.0, 0)
    assert ((x @ w.T + b).argmax(1) == 1).sum() > ((x @ plain_w.T + plain_b).argmax(1) == 1).sum()


def test_tiny_dataset_one_image_per_class():
    """Folds stay balanced across classes, and probes that saw few classes still score everything."""
    from featurestore.pipeline.index import assign
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
    from featurestore.pipeline.index import assign
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


def _elongated_classes(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4 classes, each a long thin cloud in 32 dims (a manifold the unlabelled images fill in), 12 labels
    in 2 folds, 100 held out, the rest unlabelled: (x, true classes, labels, split)."""
    rng = np.random.default_rng(seed)
    c, d, per = 4, 32, 120
    centres = 0.5 * rng.standard_normal((c, d))
    direction = rng.standard_normal((c, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    t = rng.uniform(-6, 6, (c, per))
    x = centres[:, None] + t[..., None] * direction[:, None] + 0.1 * rng.standard_normal((c, per, d))
    y = np.repeat(np.arange(c), per)
    order = np.random.default_rng(seed + 10).permutation(c * per)
    split, labels = np.full(c * per, -2, np.int8), np.full(c * per, -1)
    split[order[:12]], split[order[12:112]] = np.arange(12) % 2, -1
    labels[order[:112]] = y[order[:112]]
    return x.reshape(-1, d).astype(np.float32), y, labels, split


def test_the_spread_head_learns_from_unlabelled_images_where_they_trace_the_classes():
    from featurestore.pipeline.heads import fit_probes, fit_spread
    probe, spread = [], []
    for seed in range(4):
        x, y, labels, split = _elongated_classes(seed)
        train, held = np.flatnonzero(split >= 0), split == -1
        rows = l2_normalize(x[train])
        p = fit_probes(rows, labels[train], split[train], [0, 1], 4)
        s, added = fit_spread(rows, labels[train], split[train], l2_normalize(x), labels, split, 4, 10, 0.5)
        assert 0 < added["fold0"] <= (split != -1).sum() and added["all"] <= (split == -2).sum()
        for heads, h in ((probe, p), (spread, s)):
            heads.append(f1_score(y[held], apply_linear(x[held], h.weight, h.bias).argmax(-1), average="macro"))
    assert np.mean(spread) > np.mean(probe) + 0.03, (probe, spread)


def test_the_spread_head_is_cross_fitted():
    """The head that scores fold f never saw fold f's labels: changing them leaves it as it was."""
    from featurestore.pipeline.heads import fit_spread
    x, _, labels, split = _elongated_classes(1)
    train = np.flatnonzero(split >= 0)
    rows = l2_normalize(x[train])

    def fit(lab):
        return fit_spread(rows, lab[train], split[train], l2_normalize(x), lab, split, 4, 10, 0.5)[0]
    a = fit(labels)
    other = labels.copy()
    fold0 = split == 0
    other[fold0] = (labels[fold0] + 1) % 4
    b = fit(other)
    np.testing.assert_array_equal(a.fold_weight[0], b.fold_weight[0])
    assert not np.allclose(a.fold_weight[1], b.fold_weight[1]) and not np.allclose(a.weight, b.weight)


@pytest.mark.slow(8)
def test_a_build_with_the_spread_head_stores_it_and_a_student_can_follow_it(tmp_path, demo_images, unlabeled_images,
                                                                          capsys):
    from conftest import SMALL, run_cli

    from featurestore.common.options import ConfigError
    from trainer.cli import main as trainer_main
    out = tmp_path / "spread.zarr"
    assert run_cli("build", "--images", demo_images, "--out", tmp_path / "x.zarr", *SMALL, "--heads",
                   "probe,spread") == 2
    assert "--unlabeled" in capsys.readouterr().err
    assert run_cli("build", "--images", demo_images, "--unlabeled", unlabeled_images, "--out", out, *SMALL,
                   "--heads", "spread") == 0
    with StoreReader.open(out) as s:
        assert s.teacher().heads[:2] == ["probe", "spread"]
        split, pooled = s.read("split"), s.read("teachers/siglip/pooled").astype(np.float32)
        logits, h = s.read("teachers/siglip/logits/spread"), s.head_arrays("spread")
        m, labels = s.teacher().metrics["spread"], s.read("labels").astype(np.int64)
    # the stored head is the one fit_spread makes from the stored embeddings
    from featurestore.pipeline.heads import fit_spread
    train = np.flatnonzero(split >= 0)
    k = pooled.shape[1]
    again, added = fit_spread(l2_normalize(pooled[train].reshape(-1, pooled.shape[-1])), np.repeat(labels[train], k),
                              np.repeat(split[train], k), l2_normalize(pooled[:, 0]), labels, split, 10, 10, 0.5)
    np.testing.assert_allclose(h["weight"], again.weight, atol=1e-4)
    np.testing.assert_allclose(h["fold_weight"], again.fold_weight, atol=1e-4)
    assert m["spread_rows"] == added and set(added) == {"fold0", "fold1", "all"} and "cv_macro_f1" in m
    for f in range(h["fold_weight"].shape[0]):
        np.testing.assert_allclose(logits[split == f], apply_linear(pooled[split == f], h["fold_weight"][f],
                                                                     h["fold_bias"][f]), atol=1e-5)
    capsys.readouterr()
    assert run_cli("inspect", out) == 0
    assert "spread     cross-validated macro-F1" in capsys.readouterr().out
    assert trainer_main(["fit", "--store", str(out), "--out", str(tmp_path / "run"), "--head", "spread", "--cpu",
                         "--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16",
                         "--steps", "2"]) == 0
    try:
        from featurestore.pipeline.config import ProbeConfig
        ProbeConfig(heads=["probe", "bogus"]).validate()
    except ConfigError as e:
        assert "probe,spread" in str(e)
    else:
        raise AssertionError("an unknown head was accepted")
