"""Pictures for a run: training curves, confusion matrix, per-class F1 (PNG, matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted(k for k in history[0] if k.startswith("train_")):
        ax1.plot(epochs, [h[key] for h in history], marker="o", label=key[6:])
    ax1.set(xlabel="epoch", ylabel="loss (mean per sample)", title="training loss parts")
    ax1.legend()
    if "val_macro_f1" in history[0]:
        ax2.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", label="macro-F1")
        ax2.plot(epochs, [h["val_accuracy"] for h in history], marker="s", label="accuracy")
        ax2.set(ylim=(0, 1))
        ax2.legend()
    ax2.set(xlabel="epoch", title="validation (view 0 of held-out images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion(m: dict, path: Path) -> None:
    cm = np.array(m["confusion"])
    n = len(cm)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted index", ylabel="true index",
           title=f"confusion (macro-F1 {m['macro_f1']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def per_class_f1(m: dict, path: Path) -> None:
    names = [f"{r['index']}: {r['name'][:28]}" for r in m["per_class"]]
    f1 = [r["f1"] for r in m["per_class"]]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1))
    ax.barh(names, f1, color="tab:blue")
    ax.axvline(m["macro_f1"], color="tab:red", linestyle="--", label=f"macro-F1 {m['macro_f1']:.3f}")
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="F1")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
