"""Two teachers: does a student distilled from a SigLIP and a DINOv2 teacher at once score better than
from the SigLIP one alone? And what does a second teacher cost, added to a finished store?

    python -m benchmarks.two_teachers                    # the demo, 3 seeds
    python -m benchmarks.two_teachers --seeds 5 --work /tmp/two

The demo's ten classes (`featurestore demo-data`, --per-class images each, a third held out as
configs/demo.yaml builds) and two demo teachers of different families trained on the same synthetic
corpus (`featurestore demo-teacher`, SigLIP and `--family dinov2`). Three stores over the same views:
- siglip: built with the SigLIP teacher alone;
- added: a copy of it given the DINOv2 teacher by `featurestore add-teacher`;
- joint: built with both at once, from scratch (what a rebuild costs; its arrays equal added's).
Every recipe trains the same student for the same optimizer steps, with the same seeds, and is scored
on --fresh images the build never saw, as `trainer eval` scores the exported student.pt (the grader's
224 px, ImageNet mean and std, macro-F1):
- labels: cross-entropy on the labels alone;
- siglip: the defaults on the siglip store (KD from its probe, its pooled embedding and patch grid);
- dino: the added store, KD from the DINOv2 probe and its features alone (SigLIP's weights 0);
- both: the added store, KD from the two probes' mean logits, both teachers' features (a projector
  each, targets standardised by the stored statistics), each at the default weight.
Also reported: stored bytes per view of each teacher's arrays, and the seconds of each store's making.
Finished stores and runs under --work are reused. Results: benchmarks/results/two-teachers-<machine>-
<date>.json and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import machine, md_table, write_results
from featurestore.common.errors import KdstoreError
from featurestore.common.options import from_dict, merge, to_dict
from featurestore.common.untrusted import load_yaml
from featurestore.demo import write_demo_data
from featurestore.pipeline.config import BuildConfig
from trainer import recipes
from trainer.config import FitConfig
from trainer.plan import steps_per_epoch
from trainer.sweeper import fit_or_reuse

REPO = Path(__file__).resolve().parents[1]
DEMO_BUILD, DEMO_STUDENT = REPO / "configs" / "demo.yaml", REPO / "configs" / "students" / "demo.yaml"
TEACHER_STEPS = 240
RECIPES = ("labels", "siglip", "dino", "both")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.two_teachers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default: 3)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the labelled training images; every recipe "
                   "trains the optimizer steps these take (default: 30)")
    p.add_argument("--per-class", type=int, default=40, help="images per class of the store (default: 40)")
    p.add_argument("--fresh", type=int, default=20, help="fresh images per class to score on (default: 20)")
    p.add_argument("--work", default="two-teachers-work", help="folder of the data, stores and runs (reused)")
    p.add_argument("--json", help="results file (default: benchmarks/results/two-teachers-<machine>-<date>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = run(args)
    except KdstoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    return 0


def _once(marker: Path, make) -> None:
    if not marker.is_file():
        make()
        marker.touch()


def _featurestore(*args: str) -> float:
    """One `featurestore` command in a fresh process, as a user runs it; its wall seconds."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "featurestore", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise KdstoreError(f"featurestore {' '.join(map(str, args[:2]))} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def _build(work: Path, name: str, teachers: list[str]) -> float:
    cfg = from_dict(BuildConfig, merge(load_yaml(DEMO_BUILD), {
        "images": str(work / "labelled"), "out": str(work / f"{name}.zarr"), "teacher": {"id": teachers}}))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(to_dict(cfg), f)
    try:
        return _featurestore("build", "--config", f.name)
    finally:
        Path(f.name).unlink()


def _stores(work: Path, args) -> dict:
    """The data, the two teachers and the three stores (made once); the seconds each took."""
    seconds_file = work / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}

    def record(key: str, s: float) -> None:
        seconds[key] = s
        seconds_file.write_text(json.dumps(seconds))
    _once(work / "labelled.complete", lambda: write_demo_data(work / "labelled", per_class=args.per_class, seed=0))
    _once(work / "fresh.complete", lambda: write_demo_data(work / "fresh", per_class=args.fresh, seed=1))
    for family in ("siglip", "dinov2"):
        _once(work / f"teacher-{family}.complete", lambda f=family: record(f"teacher_{f}", _featurestore(
            "demo-teacher", work / f"teacher-{f}", "--steps", TEACHER_STEPS, "--family", f)))
    siglip, dino = f"siglip={work / 'teacher-siglip'}", f"dino={work / 'teacher-dinov2'}"
    _once(work / "siglip.complete", lambda: record("build_siglip", _build(work, "siglip", [siglip])))

    def add() -> None:
        shutil.rmtree(work / "added.zarr", ignore_errors=True)
        shutil.copytree(work / "siglip.zarr", work / "added.zarr")
        extra = load_yaml(DEMO_BUILD)
        record("add_teacher", _featurestore("add-teacher", work / "added.zarr", "--images", work / "labelled",
                                            "--teacher", dino, "--workers", extra["workers"]))
    _once(work / "added.complete", add)
    _once(work / "joint.complete", lambda: record("build_joint", _build(work, "joint", [siglip, dino])))
    return seconds


def _bytes_per_view(path: Path) -> dict:
    from featurestore.store.reader import StoreReader
    with StoreReader.open(str(path)) as s:
        views = s.num_images * s.views_per_image
        out = {t.name: sum(s.stored_bytes(f.name) for f in s.fields() if f.teacher == t.name) / views
               for t in s.teachers}
        out["shared"] = sum(s.stored_bytes(f.name) for f in s.fields() if f.teacher is None) / views
        out["probe_val_macro_f1"] = {t.name: t.metrics.get("probe", {}).get("val_macro_f1") for t in s.teachers}
        return out


def _same_arrays(a: Path, b: Path) -> bool:
    from featurestore.store.reader import StoreReader
    with StoreReader.open(str(a)) as x, StoreReader.open(str(b)) as y:
        names = [f.name for f in x.fields()]
        if names != [f.name for f in y.fields()] or x.small_keys() != y.small_keys():
            return False
        return (all(np.array_equal(x.read(n), y.read(n), equal_nan=n != "ids") for n in names)
                and all(np.array_equal(x.small(k), y.small(k)) for k in x.small_keys()))


def _recipe(name: str, base: FitConfig, work: Path) -> FitConfig:
    default = recipes.apply("base", base, has_patches=True)
    w = default.loss
    added = str(work / "added.zarr")
    return {
        "labels": lambda: recipes.apply("labels", base, has_patches=True),
        "siglip": lambda: default,
        "dino": lambda: dataclasses.replace(default, store=added, kd_teacher="dino", loss=dataclasses.replace(
            w, pooled={"siglip": 0.0, "dino": w.pooled}, patches={"siglip": 0.0, "dino": w.patches})),
        "both": lambda: dataclasses.replace(default, store=added, kd_teacher="mean"),
    }[name]()


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    wanted = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(wanted) - set(RECIPES))
    if unknown:
        raise KdstoreError(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    seconds = _stores(work, args)
    d = load_yaml(DEMO_STUDENT)
    if not d.get("loss", {}).get("patches"):
        d = merge(d, {"loss": {"patches": 0.5}})          # the patch grid is stored: its term on, for every recipe
    base = from_dict(FitConfig, merge(d, {"store": str(work / "siglip.zarr"), "out": "-", "unlabeled": False}))
    from featurestore.store.reader import StoreReader
    with StoreReader.open(str(work / "siglip.zarr")) as s:
        split = s.read("split")
    steps = steps_per_epoch(int((split >= 0).sum()), base.optim.batch_size) * args.epochs
    settings = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "seeds": args.seeds, "steps": steps,
                "student": base.student, "image_size": base.image_size, "per_class": args.per_class,
                "labelled_training_images": int((split >= 0).sum()), "held_out_images": int((split == -1).sum()),
                "fresh_images": 10 * args.fresh, "teacher_steps": TEACHER_STEPS}
    out = {"settings": settings, "seconds": seconds, "bytes_per_view": _bytes_per_view(work / "added.zarr"),
           "added_equals_joint": _same_arrays(work / "added.zarr", work / "joint.zarr"), "recipes": {}}
    fresh = str(work / "fresh")
    for name in wanted:
        cfg = _recipe(name, base, work)
        rows = []
        for seed in range(args.seeds):
            run_dir = work / "runs" / f"{steps}steps" / f"{name}-s{seed}"
            r = fit_or_reuse(dataclasses.replace(cfg, seed=seed, out=str(run_dir),
                                                 optim=dataclasses.replace(cfg.optim, steps=steps)), fresh)
            rows.append({"macro_f1": r["eval_macro_f1"], "seconds": r["seconds"]})
            print(f"two teachers: {name} seed {seed}: macro-F1 {r['eval_macro_f1']:.4f} on the fresh images "
                  f"({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
        f1 = [r["macro_f1"] for r in rows]
        out["recipes"][name] = {"mean": statistics.fmean(f1), "std": statistics.stdev(f1) if len(f1) > 1 else 0.0,
                                "values": f1, "seconds": statistics.fmean(r["seconds"] for r in rows), "steps": steps}
        _write(args, out)
    return out


def _write(args: argparse.Namespace, out: dict) -> None:
    write_results("two-teachers", out | {"machine": out["settings"]["machine"]}, table(out), args.json)


def table(out: dict) -> str:
    s, sec, b = out["settings"], out["seconds"], out["bytes_per_view"]
    base = out["recipes"].get("siglip")
    rows = [[name, f"{r['mean']:.3f} +- {r['std']:.3f}",
             f"{r['mean'] - base['mean']:+.3f}" if base and name != "siglip" else "-",
             ", ".join(f"{v:.3f}" for v in r["values"]), f"{r['seconds']:.0f}", r["steps"]]
            for name, r in out["recipes"].items()]
    head = (f"Two teachers on the demo ({s['per_class']} images per class, {s['labelled_training_images']} for "
            f"training, {s['held_out_images']} held out): {s['student']} at {s['image_size']} px, {s['steps']} "
            f"optimizer steps, {s['seeds']} seeds; macro-F1 of the exported student.pt on {s['fresh_images']} fresh "
            f"images, scored as the grader scores; {s['machine']}, {s['date']}")
    cost = md_table(["", "seconds", "stored bytes per view"], [
        ["build, SigLIP teacher alone", f"{sec.get('build_siglip', 0):.0f}", f"{b['shared'] + b['siglip']:.0f}"],
        ["add-teacher DINOv2 to it", f"{sec.get('add_teacher', 0):.0f}", f"+{b['dino']:.0f}"],
        ["build both at once (a rebuild)", f"{sec.get('build_joint', 0):.0f}",
         f"{b['shared'] + b['siglip'] + b['dino']:.0f}"]])
    probe = ", ".join(f"{k} {v:.3f}" for k, v in b["probe_val_macro_f1"].items() if v is not None)
    return (head + "\n\n" + md_table(["recipe", "macro-F1 (mean +- std)", "against siglip", "per seed",
                                      "seconds per run", "optimizer steps"], rows)
            + f"\n\nStores (the teachers' probes, held-out macro-F1: {probe}; add-teacher's arrays equal the joint "
            f"build's: {out['added_equals_joint']}):\n\n" + cost)


if __name__ == "__main__":
    sys.exit(main())
