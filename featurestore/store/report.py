"""`inspect`: what is in a store, how big, how good the teacher is."""
from __future__ import annotations

from collections import Counter

from featurestore.store.reader import ChunkError, StoreReader
from featurestore.store.schema import SPLIT_HELD_OUT

SHOW_SKIPPED = 20


def summarize(store: StoreReader) -> dict:
    a = store.attrs
    n, k = store.num_images, store.views_per_image
    labels, split = store.read("labels"), store.read("split")
    field_rows, per_view_bytes, total = [], 0, 0
    for f in store.fields():
        stored = store.stored_bytes(f.name)
        total += stored
        per_view_bytes += stored if f.per_view else 0
        field_rows.append({"name": f.name, "shape": list(store.shape(f.name)), "dtype": f.dtype,
                           "stored_bytes": stored, "bytes_per_view": stored / max(n * k, 1)})
    skipped = a["report"]["skipped"]
    reasons = Counter(_reason_kind(s["reason"]) for s in skipped)
    done = store.done()
    from featurestore.store.integrity import index_problems
    try:
        problems = [p.line() for p in index_problems(store)]
    except ChunkError as e:
        problems = [str(e)]
    return {
        "path": store.path, "backend": store.backend.kind, "format_version": a["format_version"],
        "complete": store.complete, "chunks_done": int(done.sum()), "num_chunks": int(len(done)),
        "num_images": n, "views_per_image": k, "image_size": a["image_size"], "chunk_size": a["chunk_size"],
        "classes": store.classes,
        "class_counts": [{"index": i, "name": c, "train": int(((labels == i) & (split >= 0)).sum()),
                          "heldout": int(((labels == i) & (split == SPLIT_HELD_OUT)).sum())}
                         for i, c in enumerate(store.classes)],
        "unlabeled": int((labels < 0).sum()),
        "teachers": (teachers := [teacher_summary(store, t, n * k) for t in store.teachers]),
        "teacher": teachers[0], "heads": teachers[0]["heads"],        # the first teacher's, as version 2 had one
        "probe": teachers[0]["probe"], "spread": teachers[0]["spread"], "zeroshot": teachers[0]["zeroshot"],
        "patch_grid": a["patch_grid"], "dropped": a.get("dropped", []),
        "fields": field_rows,
        "bytes_per_view": per_view_bytes / max(n * k, 1),
        "bytes_per_view_with_images": total / max(n * k, 1),
        "total_bytes": total,
        "files_found": a["report"]["files_found"],
        "skipped": {"count": len(skipped), "reasons": dict(reasons), "files": skipped},
        "converted": a["report"]["converted"], "notes": a["report"].get("notes", []),
        "last_build": a.get("last_build"),
        "view_policy": a["view_policy"], "created": a["created"], "git_sha": a["git_sha"],
        "package_version": a["package_version"], "digest": a.get("digest"), "problems": problems,
    }


def teacher_summary(store: StoreReader, t, views: int) -> dict:
    """One teacher of a store: what it is, its widths and heads, their quality, its bytes per view."""
    info, metrics = t.info, t.metrics
    mine = [f.name for f in store.fields() if f.teacher == t.name and f.per_view]
    return {"name": t.name, "id": info["id"], "family": info.get("family", "siglip"), "weights": info["weights"],
            "revision": info["revision"], "dtype": info["dtype"], "image_size": info["image_size"],
            "embed_dim": t.embed_dim, "token_dim": t.token_dim, "patch_dim": t.patch_dim,
            "patch_variance_kept": t.attrs.get("patch_variance_kept"), "heads": store.heads(t.name),
            "probe": metrics.get("probe", {}), "spread": metrics.get("spread", {}),
            "zeroshot": metrics.get("zeroshot", {}),
            "bytes_per_view": sum(store.stored_bytes(name) for name in mine) / max(views, 1)}


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0]


def format_summary(s: dict) -> str:
    mb = 1024 * 1024
    lines = []
    for t in s["teachers"]:
        if t["weights"] == "random":
            lines += ["!" * 72, f"!! RANDOM TEACHER WEIGHTS ({t['name']}: {t['id']}): outputs carry no knowledge;",
                      "!! fine for demos, tests and benchmarks, useless for distillation.", "!" * 72]
    if s["problems"]:
        lines += ["!" * 72, f"!! THIS STORE HAS {len(s['problems'])} PROBLEM(S); `trainer fit` refuses it and "
                  "`featurestore verify` lists them:"] + [f"!!   {p}" for p in s["problems"][:5]] + ["!" * 72]
    state = "complete" if s["complete"] else f"INCOMPLETE ({s['chunks_done']}/{s['num_chunks']} chunks done)"
    lines.append(f"store      {s['path']}  ({s['backend']}, format {s['format_version']}, {state})")
    for t in s["teachers"]:
        lines.append(f"teacher    {t['name']}: {t['id']}  ({t['family']})  weights={t['weights']}  "
                     f"revision={t['revision']}  dtype={t['dtype']}  input={t['image_size']}px  D={t['embed_dim']}  "
                     f"heads={','.join(t['heads'])}  {t['bytes_per_view']:.0f} B/view")
    lines.append(f"images     {s['num_images']} stored at {s['image_size']}x{s['image_size']}, "
                 f"{s['views_per_image']} views each, chunks of {s['chunk_size']}; {s['files_found']} files found, "
                 f"{s['skipped']['count']} skipped")
    if s["skipped"]["count"]:
        lines.append("skipped    " + ", ".join(f"{r}: {c}" for r, c in sorted(s["skipped"]["reasons"].items())))
        files = s["skipped"]["files"]
        lines += [f"           {f['id']}: {f['reason']}" for f in files[:SHOW_SKIPPED]]
        if len(files) > SHOW_SKIPPED:
            lines.append(f"           ... and {len(files) - SHOW_SKIPPED} more (inspect --json lists them all)")
    if s["converted"]:
        lines.append("converted  " + ", ".join(f"{r}: {c}" for r, c in sorted(s["converted"].items())))
    for note in s["notes"][:SHOW_SKIPPED]:
        lines.append(f"note       {note['id']}: {note['note']}")
    lines.append("classes    index  train  held-out  name")
    for row in s["class_counts"]:
        lines.append(f"           {row['index']:>5}  {row['train']:>5}  {row['heldout']:>8}  {row['name']}")
    if s["unlabeled"]:
        lines.append(f"           {s['unlabeled']} unlabelled images (teacher terms only)")
    if s["patch_grid"]:
        for t in s["teachers"]:
            line = f"patches    {t['name']}: {s['patch_grid']}x{s['patch_grid']} grid, {t['patch_dim']} dims"
            if t["patch_variance_kept"] is not None and t["patch_dim"] != t["token_dim"]:
                line += (f" (PCA of {t['token_dim']}; the basis keeps {100 * t['patch_variance_kept']:.1f}% "
                         "of the patch-token variance)")
            lines.append(line)
    if s["dropped"]:
        lines.append("slim       dropped " + ", ".join(s["dropped"]))
    lines.append("fields     name                         shape                      dtype     MB      B/view")
    for f in s["fields"]:
        lines.append(f"           {f['name']:<28} {str(tuple(f['shape'])):<26} {f['dtype']:<8} "
                     f"{f['stored_bytes'] / mb:>7.2f} {f['bytes_per_view']:>10.1f}")
    lines.append(f"size       {s['total_bytes'] / mb:.2f} MB on disk; {s['bytes_per_view']:.0f} bytes per view "
                 f"(teacher outputs + params), {s['bytes_per_view_with_images']:.0f} with images")
    for t in s["teachers"]:
        who = f" of {t['name']}" if len(s["teachers"]) > 1 else ""
        for name, note in (("probe", lambda m: f"{m['folds']} folds"),
                           ("spread", lambda m: f"+{m['spread_rows']['all']} spread rows")):
            m = t.get(name)
            if m:
                line = (f"{name:<10} cross-validated macro-F1{who} {m['cv_macro_f1']:.3f}, accuracy "
                        f"{m['cv_accuracy']:.3f} ({note(m)})")
                if "val_macro_f1" in m:
                    line += f"; held-out macro-F1 {m['val_macro_f1']:.3f}, accuracy {m['val_accuracy']:.3f}"
                lines.append(line)
        z = t["zeroshot"]
        if z:
            lines.append(f"zero-shot  macro-F1{who} {z['zeroshot_macro_f1']:.3f}, accuracy "
                         f"{z['zeroshot_accuracy']:.3f}")
    if s.get("last_build"):
        lines.append(format_build(s["last_build"]))
    lines.append(f"digest     {s['digest']} (`featurestore verify --digest` checks a copy against it)" if s["digest"]
                 else "digest     none recorded (built by an older kdstore, or not finished); `featurestore verify` "
                 "computes it")
    return "\n".join(lines)


def format_build(b: dict) -> str:
    """The last build (or resume) of the store: where the time went, the teacher pass by stage."""
    t = b["seconds"]
    ranks = f", rank 0 of {b['ranks']}" if b["ranks"] > 1 else ""
    stages = ", ".join(f"{k} {v:.1f}" for k, v in b["stages"].items())
    return (f"last build {b['views']} views on {b['device']}{ranks}, batch {b['batch']}, "
            f"{'compiled' if b['compiled'] else 'eager'}: model load {t.get('load_s', 0):.1f} s, compile "
            f"{t.get('compile_s', 0):.1f} s, teacher pass {t.get('pass_s', 0):.1f} s ({stages}), heads "
            f"{t.get('heads_s', 0):.1f} s")
