"""Classification metrics as the grader scores them (scikit-learn's macro-F1, zero_division=0), computed
from the confusion matrix so that a training or evaluation process does not load scikit-learn; the tests
hold them to scikit-learn's own functions."""
from __future__ import annotations

import numpy as np


def confusion(labels: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
    """n x n counts, rows the true class, columns the predicted one."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    bad = (labels < 0) | (labels >= n) | (preds < 0) | (preds >= n)
    if bad.any():
        raise ValueError(f"class indices outside 0..{n - 1}: {sorted(set(labels[bad]) | set(preds[bad]))[:5]}")
    return np.bincount(labels * n + preds, minlength=n * n).reshape(n, n)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def macro_f1(labels: np.ndarray, preds: np.ndarray, n: int) -> float:
    """Macro-F1 over n classes (scikit-learn's, zero_division=0), from the confusion matrix alone."""
    cm = confusion(labels, preds, n)
    tp, predicted, support = np.diag(cm).astype(float), cm.sum(0).astype(float), cm.sum(1).astype(float)
    return float(_ratio(2 * tp, predicted + support).mean())


def classification(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    cm = confusion(labels, preds, len(classes))
    tp, predicted, support = np.diag(cm).astype(float), cm.sum(0).astype(float), cm.sum(1)
    p, r = _ratio(tp, predicted), _ratio(tp, support.astype(float))
    f = _ratio(2 * tp, predicted + support)                  # 2tp / (2tp + fp + fn)
    return {
        "macro_f1": float(f.mean()),
        "accuracy": float(tp.sum() / max(int(cm.sum()), 1)),
        "num_images": int(len(labels)),
        "classes": list(classes),
        "per_class": [{"index": i, "name": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(support[i])} for i, c in enumerate(classes)],
        "confusion": cm.tolist(),
    }


def format_report(m: dict) -> str:
    head = f"images {m['num_images']}   macro-F1 {m['macro_f1']:.4f}   accuracy {m['accuracy']:.4f}"
    if "size_mb" in m:
        head += f"   model {m['size_mb']:.2f} MB"
    if m.get("image_size"):
        head += f"   at {m['image_size']} px"
    lines = [head, "index  precision  recall     f1  support  class"]
    for row in m["per_class"]:
        lines.append(f"{row['index']:>5}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>5.3f}"
                     f"  {row['support']:>7}  {row['name']}")
    if m.get("weakest"):
        f1 = {r["name"]: r["f1"] for r in m["per_class"]}
        lines.append("weakest    " + ", ".join(f"{name} ({f1[name]:.3f})" for name in m["weakest"]))
    lines.append("confusion (rows: true, columns: predicted)")
    for i, row in enumerate(m["confusion"]):
        lines.append(f"{i:>5}  " + " ".join(f"{v:>4}" for v in row))
    skipped = m.get("skipped", [])
    if skipped:
        lines.append(f"skipped {len(skipped)} file(s), not scored (unreadable, or links not followed):")
        lines += [f"  {s['file']}: {s['reason']}" for s in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"  ... and {len(skipped) - 20} more (--json lists them all)")
    return "\n".join(lines)
