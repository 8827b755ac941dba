"""The trainer's metrics are scikit-learn's (the grader's), computed without loading it."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from trainer.metrics import classification


@pytest.mark.parametrize("seed", range(6))
def test_classification_equals_scikit_learn_with_absent_and_never_predicted_classes(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    present = rng.choice(n, size=max(1, n - int(rng.integers(0, 3))), replace=False)   # some classes absent
    labels = rng.choice(present, size=int(rng.integers(1, 60)))
    preds = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(0, n, len(labels)))
    if seed % 2:
        preds = np.minimum(preds, n - 2)                                 # a class that is never predicted
    m = classification(labels, preds, [f"c{i}" for i in range(n)])
    idx = list(range(n))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, labels=idx, average="macro", zero_division=0),
                                          abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    p, r, f, support = precision_recall_fscore_support(labels, preds, labels=idx, zero_division=0)
    np.testing.assert_allclose([c["precision"] for c in m["per_class"]], p, atol=1e-12)
    np.testing.assert_allclose([c["recall"] for c in m["per_class"]], r, atol=1e-12)
    np.testing.assert_allclose([c["f1"] for c in m["per_class"]], f, atol=1e-12)
    assert [c["support"] for c in m["per_class"]] == support.tolist()
    assert m["confusion"] == confusion_matrix(labels, preds, labels=idx).tolist()


def test_a_prediction_outside_the_classes_is_refused():
    with pytest.raises(ValueError, match="outside 0..2"):
        classification(np.array([0, 1]), np.array([0, 3]), ["a", "b", "c"])
