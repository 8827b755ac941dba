"""Phase 4 of a build: teacher heads computed from the stored embeddings.

probe: multinomial logistic regression on L2-normalised pooled embeddings, cross-fitted. Images of
fold f are scored by the probe fitted on the other folds, so training-set logits are as honest as
held-out ones; held-out and unlabelled images (split < 0) are scored by the probe fitted on all
folds. Only labelled training images ever reach a fit. Each probe is stored as (W, b) acting on the
L2-normalised embedding: logits = W @ normalize(e) + b.

spread (optional, `--heads probe,spread`): the probe refitted with the unlabelled images too. Labels
spread over a k-nearest-neighbour graph of the canonical view's normalised embeddings (scikit-learn's
LabelSpreading) give each unlabelled image a class and a confidence; the probe is refitted on the
labelled rows plus the confident spread ones. Cross-fitted like the probe: the head that scores fold f
spreads only the other folds' labels, and fold f's images join its graph unlabelled, so no image's
logits come from a head that saw its label. Held-out images stay out of every graph. Stored the same
way as the probe (heads/spread, teacher/logits/spread).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler
from sklearn.semi_supervised import LabelSpreading
from threadpoolctl import threadpool_limits

from featurestore.common.log import logger
from featurestore.pipeline.config import ProbeConfig
from featurestore.store.schema import SPLIT_HELD_OUT, SPLIT_UNLABELED, bad_target_rows
from featurestore.store.writer import StoreWriter

T = TypeVar("T")


@dataclass
class Probes:
    fold_weight: np.ndarray     # (F, C, D): the probe that scores fold f
    fold_bias: np.ndarray       # (F, C)
    weight: np.ndarray          # (C, D): probe on all training folds, scores split < 0
    bias: np.ndarray            # (C,)

    def score(self, pooled: np.ndarray, split: np.ndarray) -> np.ndarray:
        """pooled (n, K, D) raw, split (n,) -> logits (n, K, C) from each image's own probe."""
        out = np.empty(pooled.shape[:2] + (self.weight.shape[0],), np.float32)
        for f in np.unique(split):
            m = split == f
            w, b = (self.fold_weight[f], self.fold_bias[f]) if f >= 0 else (self.weight, self.bias)
            out[m] = apply_linear(pooled[m], w, b)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias, "fold_weight": self.fold_weight, "fold_bias": self.fold_bias}


@dataclass
class ProbeResult:
    logits: np.ndarray          # (N, K, C) float32, cross-fitted
    probes: Probes
    metrics: dict


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fit_linear(x: np.ndarray, y: np.ndarray, num_classes: int, c: float, seed: int,
               class_weight: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit on normalised rows x (n, D); returns (W (C, D), b (C,)) acting on unscaled x. class_weight:
    "balanced" weighs each class's rows by n / (classes x rows of that class), scikit-learn's rule."""
    w = np.full((num_classes, x.shape[1]), 0.0, dtype=np.float64)
    b = np.full(num_classes, -30.0, dtype=np.float64)         # classes absent from training: never chosen
    present = np.unique(y)
    if len(present) == 1:                                     # one class seen: a constant probe
        b[present] = 0.0
        return w.astype(np.float32), b.astype(np.float32)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed,
                             class_weight="balanced" if class_weight == "balanced" else None)
    # one BLAS/OpenMP thread: lbfgs makes thousands of small products, which threads slow down (on
    # 1,440 x 1,152 rows: 1.8 s on one thread, 7.8 s on 2, 127 s with 4 threads on 2 cores; 17,280
    # rows: 24 s on one thread, 58 s on 2), and a many-core GPU box slows the most
    with threadpool_limits(1):
        clf.fit(scaler.transform(x), y)
    coef = clf.coef_ if len(clf.classes_) > 2 else np.vstack([-clf.coef_, clf.coef_]) / 2
    icpt = clf.intercept_ if len(clf.classes_) > 2 else np.array([-clf.intercept_[0], clf.intercept_[0]]) / 2
    w[clf.classes_] = coef / scaler.scale_
    b[clf.classes_] = icpt - (coef / scaler.scale_) @ scaler.mean_
    return w.astype(np.float32), b.astype(np.float32)


def apply_linear(emb: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """emb (..., D) raw pooled -> logits (..., C)."""
    return (l2_normalize(emb) @ w.T + b).astype(np.float32)


def views_per_row(num_train: int, k: int, max_rows: int) -> int:
    """m: views 0..m-1 of each training image are fitting rows, so that rows <= max_rows."""
    return max(1, min(k, max_rows // max(num_train, 1)))


def at_once(jobs: list[Callable[[], T]]) -> list[T]:
    """Independent fits side by side on threads, one BLAS thread each (the limit is set around them
    all, so that no fit's exit restores another's threads): the same results as one after another,
    in the jobs' order. The heads phase waits on the longest fit rather than on their sum."""
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [job() for job in jobs]
    with threadpool_limits(1), ThreadPoolExecutor(workers, thread_name_prefix="fit") as pool:
        return list(pool.map(lambda job: job(), jobs))


def cross_fitted(fit: Callable[[int | None], tuple[np.ndarray, np.ndarray]], folds: list[int]) -> Probes:
    """The head that scores each fold, fit(f) never seeing fold f's labels, and the head on every fold,
    fit(None); all fitted side by side."""
    *per_fold, (w, b) = at_once([lambda f=f: fit(f) for f in folds] + [lambda: fit(None)])
    fold_w = np.zeros((max(folds, default=-1) + 1,) + w.shape, dtype=np.float32)
    fold_b = np.zeros((len(fold_w),) + b.shape, dtype=np.float32)
    for f, (fw, fb) in zip(folds, per_fold):
        fold_w[f], fold_b[f] = fw, fb
    return Probes(fold_w, fold_b, w, b)


def fit_probes(x: np.ndarray, y: np.ndarray, row_fold: np.ndarray, folds: list[int], num_classes: int,
               c: float = 1.0, seed: int = 0, class_weight: str | None = None) -> Probes:
    """x (rows, D) normalised fitting rows of labelled training images, y (rows,), row_fold (rows,)."""
    def fit(f: int | None):
        keep = row_fold != f if f is not None else slice(None)
        return fit_linear(x[keep], y[keep], num_classes, c, seed, class_weight)
    return cross_fitted(fit, folds)


def probe_metrics(labels: np.ndarray, split: np.ndarray, view0_logits: np.ndarray, num_classes: int,
                  c: float, folds: int) -> dict:
    """Cross-validated (training folds) and held-out metrics on the canonical view; unlabelled excluded."""
    metrics = {"c": c, "folds": folds}
    train, held = split >= 0, (split == SPLIT_HELD_OUT) & (labels >= 0)
    pred = view0_logits.argmax(-1)
    metrics |= _metrics("cv", labels[train], pred[train], num_classes)
    if held.any():
        metrics |= _metrics("val", labels[held], pred[held], num_classes)
    return metrics


def cross_fit_probe(pooled: np.ndarray, labels: np.ndarray, split: np.ndarray, num_classes: int,
                    c: float = 1.0, max_rows: int = 200_000, seed: int = 0) -> ProbeResult:
    """In memory: pooled (N, K, D); labels (N,); split (N,) fold 0..F-1, or < 0 (never fitted on)."""
    folds = sorted(int(f) for f in np.unique(split) if f >= 0)
    train = np.flatnonzero(split >= 0)
    m = views_per_row(len(train), pooled.shape[1], max_rows)
    x = l2_normalize(pooled[train, :m].reshape(-1, pooled.shape[-1]))
    probes = fit_probes(x, np.repeat(labels[train], m), np.repeat(split[train], m), folds, num_classes, c, seed)
    logits = probes.score(pooled, split)
    return ProbeResult(logits, probes, probe_metrics(labels, split, logits[:, 0], num_classes, c, len(folds)))


def spread_labels(x: np.ndarray, y: np.ndarray, neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows x (n, D) normalised, y (n,) a class or -1 (unknown) -> each row's spread class and its
    confidence (the spread distribution's largest share; 0 where nothing reached the row)."""
    ls = LabelSpreading(kernel="knn", n_neighbors=max(1, min(neighbors, len(x) - 1)), alpha=0.2, max_iter=100)
    with threadpool_limits(1):
        ls.fit(x, y)
    dist = np.nan_to_num(ls.label_distributions_, nan=0.0)
    return ls.classes_[dist.argmax(1)], dist.max(1)


def fit_spread(x: np.ndarray, y: np.ndarray, row_fold: np.ndarray, x0: np.ndarray, labels: np.ndarray,
               split: np.ndarray, num_classes: int, neighbors: int, confidence: float, c: float = 1.0,
               seed: int = 0, class_weight: str | None = None) -> tuple[Probes, dict]:
    """The spread head. x, y, row_fold: the probe's fitting rows (labelled training images); x0 (N, D)
    the normalised canonical view of every image, labels and split (N,). Returns the probes and, per
    fit, how many spread rows joined it."""
    folds = sorted(int(f) for f in np.unique(split) if f >= 0)
    added = {}

    def fit(hidden: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The head that never saw fold `hidden`'s labels (None: every fold's)."""
        known, pool = split >= 0, split == SPLIT_UNLABELED
        if hidden is not None:
            known, pool = known & (split != hidden), pool | (split == hidden)
        graph = np.flatnonzero(known | pool)
        cls, conf = spread_labels(x0[graph], np.where(known[graph], labels[graph], -1), neighbors)
        take = pool[graph] & (conf >= confidence)
        added["all" if hidden is None else f"fold{hidden}"] = int(take.sum())
        keep = row_fold != hidden if hidden is not None else np.ones(len(y), bool)
        return fit_linear(np.concatenate([x[keep], x0[graph[take]]]), np.concatenate([y[keep], cls[take]]),
                          num_classes, c, seed, class_weight)

    return cross_fitted(fit, folds), dict(sorted(added.items()))


def _metrics(prefix: str, y: np.ndarray, pred: np.ndarray, num_classes: int) -> dict:
    labels = list(range(num_classes))
    return {f"{prefix}_macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
            f"{prefix}_accuracy": float(accuracy_score(y, pred))}


def zeroshot_metrics(view0_logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Zero-shot head quality on the canonical view of every labelled image."""
    m = labels >= 0
    return _metrics("zeroshot", labels[m], view0_logits[m].argmax(-1), num_classes)


def zeroshot_from_pooled(pooled: np.ndarray, head: dict[str, np.ndarray]) -> np.ndarray:
    """SigLIP's zero-shot logits of stored pooled embeddings (..., D) -> (..., C) float32:
    exp(logit_scale) * cos(image, class) + logit_bias, in float64 so that the result does not depend
    on how many threads sum it."""
    x = pooled.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    text = head["text_embeds"].astype(np.float64)
    scale, bias = (float(np.asarray(head[k]).item()) for k in ("logit_scale", "logit_bias"))
    return (x @ text.T * np.exp(scale) + bias).astype(np.float32)


def fit_heads(store: StoreWriter, probe: ProbeConfig, teacher: str,
              zeroshot: dict[str, np.ndarray] | None = None) -> dict:
    """The heads phase of one teacher, from its stored embeddings, in one place whatever the ranks: a
    cross-fitted probe from at most probe.max_rows pooled rows, then scoring chunk by chunk (memory stays
    bounded whatever N x K x D), the zero-shot head's logits when there is one, and the statistics its
    targets are standardised with; returns the heads' metrics."""
    r = store.reader
    t = r.teacher(teacher)
    labels, split = r.read("labels").astype(np.int64), r.read("split")
    c, k, n = len(r.classes), r.views_per_image, r.num_images
    train = np.flatnonzero(split >= 0)
    m = views_per_row(len(train), k, probe.max_rows)
    logger.info(f"fitting the cross-fitted probe of {teacher} on {len(train)} labelled training images x {m} view(s)")
    rows = []
    for ch in range(r.num_chunks):
        a, b = r.chunk_range(ch)
        sel = train[(train >= a) & (train < b)] - a
        if len(sel):
            rows.append(np.stack([r.read_view(t.pooled, ch, v)[sel] for v in range(m)], 1))   # (s, m, D)
    raw = np.concatenate(rows).reshape(len(train) * m, -1).astype(np.float32)
    write_stats(store, t, raw, train)
    x = l2_normalize(raw)
    folds = sorted(int(f) for f in np.unique(split[train]))
    y, row_fold = np.repeat(labels[train], m), np.repeat(split[train], m)
    probes = fit_probes(x, y, row_fold, folds, c, probe.c, probe.seed, probe.class_weight)
    heads = {"probe": probes}
    spread_rows = {}
    if "spread" in probe.heads:
        x0 = l2_normalize(np.concatenate([r.read_view(t.pooled, ch, 0) for ch in range(r.num_chunks)]))
        logger.info(f"fitting the spread head: labels spread to {int((split == SPLIT_UNLABELED).sum())} unlabelled "
                    f"images over {probe.spread_neighbors} neighbours")
        heads["spread"], spread_rows = fit_spread(x, y, row_fold, x0, labels, split, c, probe.spread_neighbors,
                                                  probe.spread_confidence, probe.c, probe.seed,
                                                  probe.class_weight)
        del x0
    del x, raw, rows
    view0 = {name: np.empty((n, c), np.float32) for name in heads}
    zeroshot0 = np.empty((n, c), np.float32) if zeroshot is not None else None
    degenerate = 0                                  # zero-shot views whose logits no student could learn from
    for ch in range(r.num_chunks):
        a, b = r.chunk_range(ch)
        pooled = r.read(t.pooled, a, b)                                                       # (chunk, K, D)
        for name, head in heads.items():
            logits = head.score(pooled, split[a:b])                                           # (chunk, K, C)
            store.write(t.logits(name), a, logits)
            view0[name][a:b] = logits[:, 0]
        if zeroshot is not None:
            z = zeroshot_from_pooled(pooled, zeroshot)                                        # (chunk, K, C)
            store.write(t.logits("zeroshot"), a, z)
            zeroshot0[a:b] = z[:, 0]
            degenerate += sum(int(rows.sum()) for _, rows in bad_target_rows(z, lead=2))
    metrics = {}
    for name, head in heads.items():
        store.write_head(teacher, name, head.arrays())
        metrics[name] = probe_metrics(labels, split, view0[name], c, probe.c, len(folds))
    if spread_rows:
        metrics["spread"] |= {"neighbors": probe.spread_neighbors, "confidence": probe.spread_confidence,
                              "spread_rows": spread_rows}
    if degenerate:
        why = (f"the zero-shot head is left out: its logits are constant (or not finite) for {degenerate} of {n * k} "
               "views, so they carry nothing a student could learn (the class prompts embed all but identically "
               f"under {t.info['id']}; other --prompts may help)")
        logger.warning(why)
        store.drop_head(teacher, "zeroshot", why)
    elif zeroshot0 is not None:
        metrics["zeroshot"] = zeroshot_metrics(zeroshot0, labels, c)
    return metrics


def write_stats(store: StoreWriter, t, pooled: np.ndarray, train: np.ndarray) -> None:
    """Per-dimension mean and standard deviation of a teacher's targets, over the probe's fitting rows
    (pooled) and the canonical view of the labelled training images (patch grid): what `trainer fit`
    standardises each teacher's feature targets with, so that teachers of different scales weigh alike."""
    if t.stats_key("pooled_mean") is None:
        return                                                    # a version 2 store keeps no statistics
    r = store.reader
    out = {"pooled_mean": pooled.mean(0), "pooled_std": pooled.std(0)}
    if r.attrs["patch_grid"]:
        grids = []
        for ch in range(r.num_chunks):
            a, b = r.chunk_range(ch)
            sel = train[(train >= a) & (train < b)] - a
            if len(sel):
                grids.append(r.read_view(t.patches, ch, 0)[sel].astype(np.float32).reshape(-1, t.patch_dim))
        cells = np.concatenate(grids)
        out |= {"patches_mean": cells.mean(0), "patches_std": cells.std(0)}
    for name, value in out.items():
        store.write_small(t.stats_key(name), np.maximum(value, 1e-6) if name.endswith("std") else value)
    store.set_teacher_attrs(t.name, {"stats": True})
