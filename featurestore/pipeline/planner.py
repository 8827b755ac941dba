"""`featurestore plan`: what a build will cost, before any GPU time is paid.

- Views: images found (labelled and unlabelled) x K.
- Bytes: a sample of the images goes through the real pipeline (the teacher, the stored dtypes, the
  codec and checksums) into a temporary store of the same layout; bytes per image and per view are
  measured per array there and scaled to N and K, plus the store's fixed metadata.
- Time: FLOPs per view counted by torch's FlopCounterMode on the meta device, over the dense
  tensor-core peak of common GPUs at an assumed utilisation; and this machine, measured on the sample.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featurestore import views
from featurestore.common.options import to_dict
from featurestore.pipeline.config import BuildConfig
from featurestore.pipeline.pca import Moments, fit_basis
from featurestore.pipeline.sources import BadImage, decode, discover, squash
from featurestore.store.backends import backend_class
from featurestore.store.schema import FORMAT_VERSION, SPLIT_HELD_OUT, TeacherLayout, fields, store_attrs
from featurestore.store.writer import StoreWriter
from featurestore.teachers import check_patch_grid, describe, flops_per_view, zeroshot_logits

# dense tensor-core peak (TFLOP/s) in the dtype `--dtype auto` picks on each card
GPUS = {"T4": (65.0, "float16"), "V100": (125.0, "float16"), "L4": (121.0, "bfloat16"),
        "A100": (312.0, "bfloat16"), "H100 SXM": (989.0, "bfloat16")}
UTILISATION = 0.4                     # assumed share of the peak a ViT forward pass reaches


def plan(cfg: BuildConfig, sample_images: int = 8) -> dict:
    cfg.validate(out=False)
    listing = discover(cfg.images, cfg.manifest, cfg.classes_file, cfg.unlabeled, cfg.allow_outside_paths)
    n, k = len(listing.sources), cfg.views.views
    unlabeled = sum(1 for s in listing.sources if s.label < 0)
    from featurestore.pipeline.builder import resolve_teachers
    entries = resolve_teachers(cfg.teacher.entries(), cfg.teacher.revision)
    per = {}
    for name, spec in entries:
        family, config = describe(spec, cfg.teacher.revision)
        check_patch_grid(cfg.store.patch_grid, spec, cfg.teacher.revision)
        per[name] = {"id": spec, "family": family.family, "flops_per_view": flops_per_view(family, config),
                     "image_size": getattr(family.vision_config(config), "image_size", None),
                     "embed_dim": family.widths(config)[0]}
    flops = sum(t["flops_per_view"] for t in per.values())
    first = next(iter(per.values()))
    out = {"num_images": n, "labelled": n - unlabeled, "unlabeled": unlabeled, "views_per_image": k, "views": n * k,
           "teacher": first["id"], "teacher_image_size": first["image_size"], "embed_dim": first["embed_dim"],
           "family": first["family"], "teachers": per,
           "flops_per_view": flops, "backend": backend_class(cfg.out or "plan.zarr").kind,
           "gpu_estimates": {name: {"peak_tflops": peak, "dtype": dtype,
                                    "seconds": n * k * flops / (peak * 1e12 * UTILISATION)}
                             for name, (peak, dtype) in GPUS.items()},
           "utilisation_assumed": UTILISATION, "views_advice": views_advice(k)}
    if sample_images > 0:
        out |= _measure(cfg, entries, listing, min(sample_images, n), n, k)
    return out


def views_advice(k: int, passes: int = 30) -> list[str]:
    """How many views are enough, as the fidelity benchmark measured it on the demo (students from
    stores of 4 and 32 views against the teacher in the loop, 3 seeds, the same steps each)."""
    shown = passes / k
    return [f"K = {k}: `trainer fit`'s {passes} passes show each stored view {shown:.1f} time(s)"
            + (" (at least once: enough)." if shown <= 1 else f"; K = {passes} would show each about once."),
            "On the demo (python -m benchmarks.fidelity, 3 seeds), K = 32 over 30 passes matched the teacher in",
            "the loop (macro-F1 0.842 against 0.847) and K = 4, each view shown 7.5 times, lost 0.034 on the",
            "mean: take K at least the passes you will train."]


def _measure(cfg: BuildConfig, entries: list[tuple[str, str]], listing, m: int, n: int, k: int) -> dict:
    """Run each teacher over 2 views of m sample images; write a store of the real layout and K (the
    teacher outputs of those views fill the other view slots: each view is its own stored chunk, so
    its bytes do not depend on its neighbours) and measure the stored bytes of each array."""
    from featurestore.pipeline.builder import teacher_attrs
    from featurestore.teachers import load_teacher
    pick = np.sort(np.random.default_rng([cfg.views.seed, 7]).choice(len(listing.sources), m, replace=False))
    s = cfg.store.image_size
    teachers = {name: load_teacher(spec, cfg.teacher.revision, cfg.device, cfg.teacher.dtype) for name, spec in entries}
    side = max(2 * max(t.pre.size, s) for t in teachers.values())
    decoded = []
    for j in pick:
        try:
            decoded.append(decode(listing.sources[j].path, cfg.min_side, cfg.max_pixels, side).rgb)
        except BadImage:
            continue
    m, kv = len(decoded), min(k, 2)
    partners = [np.array([j for j in range(m) if j != i]) for i in range(m)]
    params = np.stack([[views.sample_view(cfg.views, i, v, partners[i]) for v in range(k)] for i in range(m)])
    ran = params[:, [0] + list(range(1, k))[:kv - 1]]                                       # (m, kv, P)
    ran[..., views.COL["mix_mode"]] = views.MIX_NONE                                        # no partners here
    flat = torch.from_numpy(np.ascontiguousarray(ran).reshape(m * kv, -1))
    index = torch.arange(m).repeat_interleave(kv)
    g = cfg.store.patch_grid
    fill = np.arange(k) % kv                                                                # view slot -> view run
    c = len(listing.classes)
    arrays = {"images": np.stack([squash(x, s) for x in decoded]), "views/params": params}
    layouts, seconds = {}, 0.0
    for name, teacher in teachers.items():
        sources = [torch.from_numpy(x).permute(2, 0, 1).contiguous().to(teacher.device) for x in decoded]
        teacher.encode(teacher.render(sources, index[:1], flat[:1]), g)                 # warm-up
        t0 = time.perf_counter()
        pooled, patches = teacher.encode(teacher.render(sources, index, flat), g)     # (m*kv, D), (m*kv, g, g, D')
        seconds += time.perf_counter() - t0

        def per_view(x: torch.Tensor) -> np.ndarray:
            return x.cpu().numpy().reshape((m, kv) + tuple(x.shape[1:]))[:, fill]
        attrs = teacher_attrs(teacher, cfg, listing.classes, g)
        t = TeacherLayout(name, attrs, FORMAT_VERSION)
        layouts[name] = attrs
        arrays[t.pooled] = per_view(pooled.to(torch.float16))
        probe_w = torch.randn(c, pooled.shape[-1], generator=torch.Generator().manual_seed(0), device="cpu")
        for head in attrs["heads"]:
            if head == "zeroshot":
                text = torch.nn.functional.normalize(torch.randn(c, pooled.shape[-1]), dim=-1).to(pooled.device)
                arrays[t.logits(head)] = per_view(zeroshot_logits(pooled, text, 2.3, -10.0))
            else:
                arrays[t.logits(head)] = per_view(torch.nn.functional.normalize(pooled.cpu(), dim=-1) @ probe_w.T * 8)
        if g:
            dim = t.patch_dim
            if dim != t.token_dim:
                moments = Moments(t.token_dim)
                moments.add(patches)
                patches = fit_basis(moments, min(dim, moments.n - 1)).project(patches)
                patches = torch.nn.functional.pad(patches, (0, dim - patches.shape[-1]))
            arrays[t.patches] = per_view(patches.to(torch.float16))
    attrs = store_attrs(classes=listing.classes, num_images=m, views=k, image_size=s,
                        chunk_size=min(m, cfg.store.chunk_size), patch_grid=g, param_names=list(views.PARAM_NAMES),
                        teachers=layouts, config=to_dict(cfg),
                        id_bytes=max(len(x.rel.encode()) for x in listing.sources))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("sample" + (".h5" if backend_class(cfg.out or "").kind == "hdf5" else ".zarr"))
        store = StoreWriter.create(path, attrs, cfg.store.compression)
        for f in fields(attrs):
            if f.name in arrays:
                store.write(f.name, 0, arrays[f.name])
        store.write("ids", 0, np.array([listing.sources[j].rel for j in pick[:m]], dtype=object))
        rng = np.random.default_rng(0)                             # what real labels, folds and digests look like
        store.write("labels", 0, rng.integers(0, c, m).astype(np.int16))
        store.write("split", 0, rng.integers(SPLIT_HELD_OUT, cfg.probe.folds, m).astype(np.int8))
        store.write("sha256", 0, rng.integers(0, 256, (m, 32)).astype(np.uint8))
        store.mark_done(0, teachers=list(teachers))
        store.flush()
        stored = {f.name: store.backend.payload_bytes(f.name) for f in fields(attrs)}
        store.close()
        disk = _disk_bytes(path)
    per_view_bytes = {name: b / (m * k) for name, b in stored.items() if name in arrays and name != "images"}
    per_image = {name: b / m for name, b in stored.items() if name not in per_view_bytes}
    field_bytes = {name: b * n * k for name, b in per_view_bytes.items()}
    field_bytes |= {name: b * n for name, b in per_image.items()}
    overhead = max(disk - sum(stored.values()), 0)
    first = next(iter(teachers.values()))
    return {"sample_images": m, "sample_views": m * kv, "bytes_per_view": sum(per_view_bytes.values()),
            "bytes_per_view_with_images": sum(per_view_bytes.values()) + per_image.get("images", 0) / k,
            "bytes_per_view_by_teacher": {name: sum(b for f, b in per_view_bytes.items() if f.startswith(
                TeacherLayout(name, layouts[name], FORMAT_VERSION).root + "/")) for name in teachers},
            "fields": field_bytes, "store_bytes": sum(field_bytes.values()) + overhead,
            "this_machine": {"device": str(first.device), "dtype": first.info.dtype,
                             "views_per_s": m * kv / seconds, "seconds": n * k * seconds / (m * kv)}}


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _size(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def format_plan(p: dict) -> str:
    lines = [f"plan      {p['num_images']:,} images ({p['labelled']:,} labelled, {p['unlabeled']:,} unlabelled) x "
             f"{p['views_per_image']} views = {p['views']:,} views",
             f"teacher   {p['teacher']}: {p['flops_per_view'] / 1e12:.3f} TFLOP per view (counted on the meta "
             f"device), {p['teacher_image_size']} px input, D = {p['embed_dim']}"]
    if "fields" in p:
        lines.append(f"store     ({p['backend']}; measured on {p['sample_views']} views of {p['sample_images']} "
                     "sample images through the real codec and checksums)")
        for name, b in p["fields"].items():
            lines.append(f"          {name:<28} {_size(b):>10}")
        lines += [f"          {'whole store':<28} {_size(p['store_bytes']):>10}",
                  f"per view  {_size(p['bytes_per_view'])} of teacher outputs and params, "
                  f"{_size(p['bytes_per_view_with_images'])} with the images"]
    lines += [f"views     {line}" if i == 0 else f"          {line}" for i, line in enumerate(p["views_advice"])]
    lines.append(f"teacher pass, estimated as FLOPs / ({100 * p['utilisation_assumed']:.0f}% of each card's dense "
                 "peak):")
    for name, e in p["gpu_estimates"].items():
        lines.append(f"          {name:<10} {e['peak_tflops']:>6.0f} TFLOP/s {e['dtype']:<9} "
                     f"{_duration(e['seconds']):>10}")
    if "this_machine" in p:
        t = p["this_machine"]
        lines.append(f"          this machine ({t['device']}, {t['dtype']}): {t['views_per_s']:.2f} views/s measured "
                     f"-> {_duration(t['seconds'])}")
    return "\n".join(lines)
