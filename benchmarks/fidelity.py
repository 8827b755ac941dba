"""Fidelity: does a student distilled from K stored views learn what it learns with the teacher in the loop?

    python -m benchmarks.fidelity                      # the demo: demo data, demo teacher, 3 seeds
    python -m benchmarks.fidelity --images data/train --unlabeled data/more --teacher google/medsiglip-448 \\
        --config configs/medsiglip-448.yaml --eval-images data/test --views 4,32 --seeds 3 --epochs 30

For each seed, the same student, schedule and loss weights, every recipe trained for the same number
of optimizer steps (what --epochs passes over the labelled and unlabelled images take):
- labels: cross-entropy on the labelled images alone;
- store_k<K>, for each K in --views: the default `trainer fit` recipe from a store of K views per
  image (labelled and unlabelled), built by `featurestore build` with the --config view policy;
- online: the same recipe and loss, every step on fresh views from the same view policy, scored by
  the teacher in the loop (benchmarks/online.py; the store of the largest K lends its images, its
  heads and its patch basis, so only the views differ).
Every run is scored on --eval-images, images no run saw, as `trainer eval` scores; the wall time of
each run is reported, and each store's build time once. Finished stores and runs under --work are
reused (runs by recipe, seed and steps), so an interrupted benchmark continues where it stopped and
another --epochs shares the stores. Results: --json (default
benchmarks/results/fidelity-<machine>-<date>.json) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, build_store, machine, md_table
from featurestore.common.errors import KdstoreError
from featurestore.common.options import ConfigError, from_dict, merge
from featurestore.common.untrusted import load_yaml
from featurestore.pipeline.config import BuildConfig
from featurestore.store.reader import StoreReader
from trainer import recipes
from trainer.config import FitConfig
from trainer.plan import steps_per_epoch
from trainer.sweeper import fit_or_reuse
from trainer.training import training_images

REPO = Path(__file__).resolve().parents[1]
DEMO_BUILD, DEMO_STUDENT = REPO / "configs" / "demo.yaml", REPO / "configs" / "students" / "demo.yaml"
DEMO_TEACHER_STEPS = 240                    # as `make demo` trains it


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="labelled ImageFolder (default: the demo's labelled images, made in --work)")
    p.add_argument("--unlabeled", help="folder of unlabelled images (default with the demo: its 400 unlabelled)")
    p.add_argument("--teacher", help="teacher: hub id, local directory or random:<arch> (default with the demo: "
                   "the demo teacher, trained in --work as `make demo` trains it)")
    p.add_argument("--config", help="the build's YAML: view policy, image size, chunk size, probe (default: "
                   "configs/demo.yaml); --views replaces its views.views")
    p.add_argument("--fit-config", help="the students' YAML (default: configs/students/demo.yaml); --student, "
                   "--image-size, --epochs and --batch-size override it")
    p.add_argument("--eval-images", help="labelled ImageFolder that no run sees, scored as `trainer eval` scores "
                   "(default with the demo: 200 fresh demo images)")
    p.add_argument("--views", default="4,32", help="K of each store recipe, comma-separated (default: 4,32)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default: 3)")
    p.add_argument("--epochs", type=int, default=30, help="schedule length: passes over the labelled and unlabelled "
                   "images; every recipe trains the optimizer steps these take (default: 30)")
    p.add_argument("--student", help="student model (default: the --fit-config one)")
    p.add_argument("--image-size", type=int, help="student training resolution (default: the --fit-config one)")
    p.add_argument("--batch-size", type=int, help="samples per step (default: the --fit-config one)")
    p.add_argument("--recipes", default="labels,store,online", help="which recipes to run: labels, store (one per "
                   "K), online, spread (the largest store's recipe with KD on its spread head instead of the probe; "
                   "needs --unlabeled) (default: labels,store,online)")
    p.add_argument("--work", default="fidelity-work", help="folder of the stores, the runs and the demo data; "
                   "reused when run again (default: fidelity-work)")
    p.add_argument("--json", help="results file (default: benchmarks/results/fidelity-<machine>-<date>.json); the "
                   "markdown table is written beside it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = run_fidelity(args)
    except KdstoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    return 0


def run_fidelity(args: argparse.Namespace) -> dict:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = _inputs(args, work)
    ks = sorted({int(k) for k in args.views.split(",")})
    wanted = set(args.recipes.split(","))
    builds = {k: _store(data, k, work) for k in ks}
    stores = {k: str(work / f"store_k{k}.zarr") for k in ks}
    top = stores[ks[-1]]
    base = _fit_base(args, top)
    with StoreReader.open(top) as s:
        split, n_images = s.read("split"), s.num_images
        has_patches = any(f.teacher and f.name.endswith("/patches") for f in s.fields())
        probe = s.teacher().metrics.get("probe", {})
    distilled = recipes.apply("base", base, has_patches)
    images = len(training_images(distilled, split)[0])
    steps = steps_per_epoch(images, base.optim.batch_size) * args.epochs
    settings = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "demo": data["demo"], "views": ks,
                "seeds": args.seeds, "epochs": args.epochs, "steps": steps, "training_images": images,
                "labelled_training_images": int((split >= 0).sum()), "store_images": n_images,
                "eval_images": "the demo's 200 fresh images" if data["demo"] else data["eval"],
                "teacher": "the demo teacher" if data["demo"] and not args.teacher else data["teacher"],
                "student": base.student,
                "image_size": base.image_size, "batch_size": base.optim.batch_size,
                "loss": dataclasses.asdict(distilled.loss), "teacher_probe_cv_macro_f1": probe.get("cv_macro_f1"),
                "teacher_probe_val_macro_f1": probe.get("val_macro_f1")}
    plans = {}
    if "labels" in wanted:
        plans["labels"] = (recipes.apply("labels", base, has_patches), top, None)
    if "store" in wanted:
        for k in ks:
            plans[f"store_k{k}"] = (dataclasses.replace(distilled, store=stores[k]), stores[k], None)
    if "online" in wanted:
        plans["online"] = (distilled, top, "online")
    if "spread" in wanted and data["unlabeled"]:
        plans[f"store_k{ks[-1]}_spread"] = (dataclasses.replace(distilled, head="spread"), top, None)
    out = {"recipes": {}, "settings": settings, "builds": builds}
    if data["unlabeled"]:
        out["heads"] = _head_scores(data, stores, work)
    for name, (cfg, store, kind) in plans.items():
        values, seconds = [], []
        for seed in range(args.seeds):
            run_cfg = dataclasses.replace(cfg, store=store, seed=seed,
                                          optim=dataclasses.replace(cfg.optim, steps=steps),
                                          out=str(work / "runs" / f"{steps}steps" / f"{name}-s{seed}"))
            batches = _online_batches(store, base) if kind == "online" else None
            r = fit_or_reuse(run_cfg, data["eval"], batches)
            values.append(r["eval_macro_f1"])
            seconds.append(r["seconds"])
            print(f"fidelity: {name} seed {seed}: macro-F1 {r['eval_macro_f1']:.4f} on the eval images "
                  f"({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
        row = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
               "values": values, "seconds": statistics.fmean(seconds), "steps": steps}
        if name.startswith("store_k"):
            k = int(name[len("store_k"):].split("_")[0])
            row |= {"build_seconds": builds[k]["seconds"], "teacher_views": n_images * k}
        if kind == "online":
            row["teacher_views"] = args.epochs * images     # per run: each step's views, each image once a pass
        out["recipes"][name] = row
        _write(args, out)
    return out


# ---- inputs ---------------------------------------------------------------------------------------
def _inputs(args: argparse.Namespace, work: Path) -> dict:
    """The images, teacher and configs: the flags', or the demo's (made in `work` once)."""
    demo = args.images is None
    if demo:
        from featurestore.demo import write_demo_data
        for name, per_class, seed, flat in (("labelled", 14, 0, False), ("unlabelled", 40, 2, True),
                                            ("fresh", 20, 1, False)):
            if not (work / f"{name}.complete").is_file():
                write_demo_data(work / name, per_class=per_class, seed=seed, flat=flat)
                (work / f"{name}.complete").touch()
        teacher = args.teacher or str(work / "teacher")
        if args.teacher is None and not (work / "teacher" / "config.json").is_file():
            from featurestore.demo.teacher import train_demo_teacher
            train_demo_teacher(work / "teacher", steps=DEMO_TEACHER_STEPS)
        images, unlabeled, fresh = str(work / "labelled"), str(work / "unlabelled"), str(work / "fresh")
    else:
        if not args.teacher or not args.eval_images:
            raise ConfigError("with --images, give --teacher and --eval-images too (images no run sees)")
        images, unlabeled, fresh, teacher = args.images, args.unlabeled, args.eval_images, args.teacher
    return {"demo": demo, "images": images, "unlabeled": unlabeled, "eval": fresh, "teacher": teacher,
            "config": args.config or str(DEMO_BUILD)}


def _store(data: dict, k: int, work: Path) -> dict:
    """The store of K views (built once; its build time kept beside it)."""
    out = work / f"store_k{k}.zarr"
    record = work / f"store_k{k}.build.json"
    if record.is_file() and out.is_dir():
        return json.loads(record.read_text())
    cfg = from_dict(BuildConfig, merge(load_yaml(data["config"]), {
        "images": data["images"], "unlabeled": data["unlabeled"], "out": str(out), "views": {"views": k},
        "teacher": {"id": data["teacher"]},
        "probe": {"heads": ["probe", "spread"] if data["unlabeled"] else ["probe"]}}))
    t0 = time.perf_counter()
    timing = build_store(cfg)
    timing["seconds"] = time.perf_counter() - t0
    record.write_text(json.dumps(timing))
    print(f"fidelity: built {out.name}: {timing['views']} teacher views in {timing['seconds']:.0f} s", file=sys.stderr,
          flush=True)
    return timing


def _head_scores(data: dict, stores: dict[int, str], work: Path) -> dict:
    """The teacher's heads themselves on the eval images (their canonical view, embedded once by a
    one-view build of the eval folder): the probe against the spread head, in each store (the probe
    fits K views of each labelled image, at most probe.max_rows rows)."""
    from sklearn.metrics import f1_score

    from featurestore.pipeline.heads import apply_linear
    out = work / "eval_k1.zarr"
    if not (work / "eval_k1.complete").is_file():
        cfg = from_dict(BuildConfig, merge(load_yaml(data["config"]), {
            "images": data["eval"], "out": str(out), "views": {"views": 1}, "teacher": {"id": data["teacher"],
            "zeroshot": False}, "probe": {"val_fraction": 0.0, "heads": ["probe"]}}))
        build_store(cfg)
        (work / "eval_k1.complete").touch()
    scores = {}
    with StoreReader.open(out) as e:
        x, y = e.read(e.teacher().pooled)[:, 0].astype("float32"), e.read("labels")
    for k, store in stores.items():
        with StoreReader.open(store) as s:
            for head in s.heads():
                if head in ("probe", "spread"):
                    h, m = s.head_arrays(head), s.teacher().metrics[head]
                    pred = apply_linear(x, h["weight"], h["bias"]).argmax(-1)
                    scores[f"store_k{k} {head}"] = {
                        "eval_macro_f1": float(f1_score(y, pred, average="macro")), "cv_macro_f1": m["cv_macro_f1"],
                        "val_macro_f1": m.get("val_macro_f1"), "spread_rows": m.get("spread_rows", {}).get("all")}
    return scores


def _fit_base(args: argparse.Namespace, store: str) -> FitConfig:
    d = load_yaml(args.fit_config or DEMO_STUDENT)
    over = {"student": args.student, "image_size": args.image_size}
    d = merge(d, {k: v for k, v in over.items() if v is not None})
    if args.batch_size:
        d = merge(d, {"optim": {"batch_size": args.batch_size}})
    return from_dict(FitConfig, merge(d, {"store": store, "out": "-"}))


@functools.lru_cache(maxsize=2)
def _teacher(store: str):
    from benchmarks.online import OnlineTeacher
    with StoreReader.open(store) as s:
        return OnlineTeacher(s)


def _online_batches(store: str, base: FitConfig):
    from benchmarks.online import OnlineLoader
    return functools.partial(OnlineLoader, teacher=_teacher(store))


# ---- results --------------------------------------------------------------------------------------
def _write(args: argparse.Namespace, out: dict) -> None:
    s = out["settings"]
    slug = re.sub(r"[^a-z0-9]+", "-", s["machine"].lower()).strip("-")[:60]
    path = Path(args.json) if args.json else RESULTS / f"fidelity-{args.epochs}ep-{slug}-{s['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    path.with_suffix(".md").write_text(table(out) + "\n")


def table(out: dict) -> str:
    s, rows = out["settings"], []
    online = out["recipes"].get("online")
    for name, r in out["recipes"].items():
        views = r.get("teacher_views")
        cost = "-"
        if views and online and name != "online":
            cost = f"{views:,} ({views / online['teacher_views']:.2f}x online's per run)"
        elif views:
            cost = f"{views:,} per run"
        wall = f"{r['seconds']:.0f}" + (f" + build {r['build_seconds']:.0f} once" if "build_seconds" in r else "")
        rows.append([name, f"{r['mean']:.3f} +- {r['std']:.3f}", ", ".join(f"{v:.3f}" for v in r["values"]),
                     r["steps"], wall, cost])
    head = (f"Fidelity on {'the demo' if s['demo'] else s['teacher']}: {s['student']} at {s['image_size']} px, "
            f"{s['steps']} optimizer steps ({s['epochs']} passes over {s['training_images']} images, "
            f"{s['labelled_training_images']} labelled), {s['seeds']} seeds; macro-F1 on {s['eval_images']} (no run "
            f"saw them); {s['machine']}, {s['date']}")
    text = head + "\n\n" + md_table(["recipe", "macro-F1 (mean +- std)", "per seed", "optimizer steps",
                                     "s per run", "teacher views"], rows)
    if out.get("heads"):
        text += ("\n\nThe teacher's heads themselves (fitted on the store's labelled training images; the spread "
                 "head with the unlabelled images too), macro-F1:\n\n" + md_table(
                     ["head", "eval images", "cross-validated", "held-out split", "spread rows"],
                     [[name, f"{h['eval_macro_f1']:.3f}", f"{h['cv_macro_f1']:.3f}",
                       "-" if h["val_macro_f1"] is None else f"{h['val_macro_f1']:.3f}",
                       "-" if h["spread_rows"] is None else h["spread_rows"]] for name, h in out["heads"].items()]))
    return text


# ---- `python -m benchmarks.run --only fidelity` -------------------------------------------------------
def run(profile: dict) -> dict:
    args = parser().parse_args(["--seeds", str(profile.get("fidelity_seeds", 3)),
                                "--epochs", str(profile.get("fidelity_epochs", 30))])
    return run_fidelity(args)


def rows(r: dict) -> list[list]:
    s, out = r["settings"], []
    for name, x in r["recipes"].items():
        out.append([f"fidelity: {name} ({s['steps']} steps, {s['seeds']} seeds, {s['student']})",
                    f"macro-F1 {x['mean']:.3f} +- {x['std']:.3f}",
                    "baseline" if name == "online" else
                    f"{x['mean'] - r['recipes']['online']['mean']:+.3f} against online" if "online" in r["recipes"]
                    else "-"])
    return out


if __name__ == "__main__":
    sys.exit(main())
