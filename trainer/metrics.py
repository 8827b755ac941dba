"""Classification metrics, computed by scikit-learn (the grader's macro-F1)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    idx = list(range(len(classes)))
    p, r, f, support = precision_recall_fscore_support(labels, preds, labels=idx, zero_division=0)
    return {
        "macro_f1": float(f1_score(labels, preds, labels=idx, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(labels, preds)),
        "num_images": int(len(labels)),
        "classes": list(classes),
        "per_class": [{"index": i, "name": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(support[i])} for i, c in enumerate(classes)],
        "confusion": confusion_matrix(labels, preds, labels=idx).tolist(),
    }


def format_report(m: dict) -> str:
    lines = [f"images {m['num_images']}   macro-F1 {m['macro_f1']:.4f}   accuracy {m['accuracy']:.4f}",
             "index  precision  recall     f1  support  class"]
    for row in m["per_class"]:
        lines.append(f"{row['index']:>5}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>5.3f}"
                     f"  {row['support']:>7}  {row['name']}")
    lines.append("confusion (rows: true, columns: predicted)")
    for i, row in enumerate(m["confusion"]):
        lines.append(f"{i:>5}  " + " ".join(f"{v:>4}" for v in row))
    skipped = m.get("skipped", [])
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable file(s), not scored:")
        lines += [f"  {s['file']}: {s['reason']}" for s in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"  ... and {len(skipped) - 20} more (--json lists them all)")
    return "\n".join(lines)
