"""`inspect` (what is in a store, how big, how good the teacher is) and `verify` (is it whole)."""
from __future__ import annotations

from collections import Counter

import numpy as np

from . import views
from .store import Store


def summarize(store: Store) -> dict:
    a = store.attrs
    n, k = store.num_images, store.views_per_image
    labels, split = store.read("labels"), store.read("split")
    field_rows, per_view_bytes, total = [], 0, 0
    for f in store.fields():
        arr = store[f.name]
        stored = store.stored_bytes(f.name)
        total += stored
        per_view_bytes += stored if f.per_view else 0
        field_rows.append({"name": f.name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                           "stored_bytes": stored, "bytes_per_view": stored / max(n * k, 1)})
    skipped = a["report"]["skipped"]
    reasons = Counter(_reason_kind(s["reason"]) for s in skipped)
    metrics = a.get("metrics", {})
    done = store.done()
    return {
        "path": store.path, "backend": store.backend, "format_version": a["format_version"],
        "complete": store.complete, "chunks_done": int(done.sum()), "num_chunks": int(len(done)),
        "num_images": n, "views_per_image": k, "image_size": a["image_size"], "chunk_size": a["chunk_size"],
        "classes": store.classes,
        "class_counts": [{"index": i, "name": c, "train": int(((labels == i) & (split >= 0)).sum()),
                          "heldout": int(((labels == i) & (split < 0)).sum())} for i, c in enumerate(store.classes)],
        "teacher": {"id": a["teacher"]["id"], "weights": a["teacher"]["weights"],
                    "revision": a["teacher"]["revision"], "dtype": a["teacher"]["dtype"],
                    "image_size": a["teacher"]["image_size"], "embed_dim": a["embed_dim"]},
        "heads": store.heads(), "patch_grid": a["patch_grid"],
        "fields": field_rows,
        "bytes_per_view": per_view_bytes / max(n * k, 1),
        "bytes_per_view_with_images": total / max(n * k, 1),
        "total_bytes": total,
        "files_found": a["report"]["files_found"],
        "skipped": {"count": len(skipped), "reasons": dict(reasons), "files": skipped},
        "converted": a["report"]["converted"],
        "probe": metrics.get("probe", {}),
        "zeroshot": metrics.get("zeroshot", {}),
        "view_policy": a["view_policy"], "created": a["created"], "git_sha": a["git_sha"],
        "package_version": a["package_version"],
    }


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0]


def format_summary(s: dict) -> str:
    mb = 1024 * 1024
    lines = []
    if s["teacher"]["weights"] == "random":
        lines += ["!" * 72, f"!! RANDOM TEACHER WEIGHTS ({s['teacher']['id']}): outputs carry no knowledge;",
                  "!! fine for demos, tests and benchmarks, useless for distillation.", "!" * 72]
    state = "complete" if s["complete"] else f"INCOMPLETE ({s['chunks_done']}/{s['num_chunks']} chunks done)"
    lines += [
        f"store      {s['path']}  ({s['backend']}, format {s['format_version']}, {state})",
        f"teacher    {s['teacher']['id']}  weights={s['teacher']['weights']}  revision={s['teacher']['revision']}"
        f"  dtype={s['teacher']['dtype']}  input={s['teacher']['image_size']}px  D={s['teacher']['embed_dim']}",
        f"images     {s['num_images']} stored at {s['image_size']}x{s['image_size']}, {s['views_per_image']} views each,"
        f" chunks of {s['chunk_size']}; {s['files_found']} files found, {s['skipped']['count']} skipped",
    ]
    if s["skipped"]["count"]:
        lines.append("skipped    " + ", ".join(f"{r}: {c}" for r, c in sorted(s["skipped"]["reasons"].items())))
    if s["converted"]:
        lines.append("converted  " + ", ".join(f"{r}: {c}" for r, c in sorted(s["converted"].items())))
    lines.append("classes    index  train  held-out  name")
    for row in s["class_counts"]:
        lines.append(f"           {row['index']:>5}  {row['train']:>5}  {row['heldout']:>8}  {row['name']}")
    lines.append("fields     name                         shape                      dtype     MB      B/view")
    for f in s["fields"]:
        lines.append(f"           {f['name']:<28} {str(tuple(f['shape'])):<26} {f['dtype']:<8} "
                     f"{f['stored_bytes'] / mb:>7.2f} {f['bytes_per_view']:>10.1f}")
    lines.append(f"size       {s['total_bytes'] / mb:.2f} MB on disk; {s['bytes_per_view']:.0f} bytes per view "
                 f"(teacher outputs + params), {s['bytes_per_view_with_images']:.0f} with images")
    p = s["probe"]
    if p:
        line = (f"probe      cross-validated macro-F1 {p['cv_macro_f1']:.3f}, accuracy {p['cv_accuracy']:.3f}"
                f" ({p['folds']} folds)")
        if "val_macro_f1" in p:
            line += f"; held-out macro-F1 {p['val_macro_f1']:.3f}, accuracy {p['val_accuracy']:.3f}"
        lines.append(line)
    z = s["zeroshot"]
    if z:
        lines.append(f"zero-shot  macro-F1 {z['zeroshot_macro_f1']:.3f}, accuracy {z['zeroshot_accuracy']:.3f}")
    return "\n".join(lines)


def verify(store: Store) -> list[str]:
    """Every problem found, as sentences; an empty list means the store is whole."""
    problems = []
    done = store.done()
    if not done.all():
        problems.append(f"{int((~done).sum())} of {len(done)} chunks are not done: "
                        f"{np.flatnonzero(~done)[:10].tolist()}")
    if not store.complete:
        problems.append("the heads were not fitted (build did not finish)")
    c, n = len(store.classes), store.num_images
    labels, split = store.read("labels"), store.read("split")
    if labels.min() < 0 or labels.max() >= c:
        problems.append(f"labels outside 0..{c - 1}")
    folds = store.attrs["identity"]["probe"]["folds"]
    if split.min() < -1 or split.max() >= folds:
        problems.append(f"split values outside -1..{folds - 1}")
    ids = store.ids()
    if len(ids) != n or len(set(ids)) != n:
        problems.append("ids are missing or repeated")
    canon = views.canonical_params()
    float_fields = [f.name for f in store.fields() if f.dtype.startswith("float")]
    for chunk in range(store.num_chunks):
        if not done[chunk]:
            continue
        a, b = store.chunk_range(chunk)
        for name in float_fields:
            if name == "teacher/logits/probe" and not store.complete:
                continue
            x = store.read(name, a, b)
            if not np.isfinite(x).all():
                problems.append(f"{name}: non-finite values in images {a}..{b - 1}")
        params = store.read("views/params", a, b)
        if not np.allclose(params[:, 0], canon):
            problems.append(f"views/params: view 0 is not canonical in images {a}..{b - 1}")
        box = params[..., :4]
        if (box < 0).any() or (box > 1).any() or (box[..., 2] <= box[..., 0]).any() or (box[..., 3] <= box[..., 1]).any():
            problems.append(f"views/params: invalid crop boxes in images {a}..{b - 1}")
        partner = params[..., views.COL["mix_partner"]]
        if ((partner >= 0) & ((partner < a) | (partner >= b))).any():
            problems.append(f"views/params: mix partners outside their chunk in images {a}..{b - 1}")
        pooled = store.read("teacher/pooled", a, b)
        if (np.abs(pooled).sum(-1) == 0).any():
            problems.append(f"teacher/pooled: all-zero embeddings (never written) in images {a}..{b - 1}")
    return problems
