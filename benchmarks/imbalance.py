"""Imbalance: which recipe gives the best macro-F1 of the exported file on imbalanced classes?

    python -m benchmarks.imbalance                       # the demo with the reference imbalance, 3 seeds
    python -m benchmarks.imbalance --recipes default,logit_adjust --seeds 5

The demo's ten classes drawn with the reference dataset's imbalance (`featurestore demo-data
--class-counts reference`: 2,381 nevi down to 563 atopic dermatitis, 4.2x), labelled images only, as
the reference data is: --per-class images per class on average for the store (a third held out, as
configs/demo.yaml builds), and 20 on average for the fresh images every run is scored on, as `trainer
eval` scores the exported student.pt (the grader's 224 px, ImageNet mean/std, macro-F1), with the same
imbalance. Every recipe trains the same student for the same number of optimizer steps, with the same
seeds:
- labels: cross-entropy on the labels alone (the baseline every accuracy claim is made against);
- default: `trainer fit`'s defaults before any imbalance-aware term (CE + confidence-gated KD + pooled);
- logit_adjust: default + `--logit-adjust 1` (Menon et al. 2021);
- balanced_sampling: default + `--sampling balanced`;
- balanced_probe: default, from a store whose probe was fitted with `--probe-class-weight balanced`;
- bias: default + `--calibrate bias` (a per-class logit bias for macro-F1, cross-fitted);
- tta: default + `--tta flip`;
- combined: logit_adjust + bias + tta;
- ensemble: one file averaging the three seeds of `default` (`trainer export --ensemble`), scored once.
Reported per recipe: macro-F1 mean +- std over the seeds, the mean F1 of the three smallest classes,
the file's MB. Finished stores and runs under --work are reused. Results: benchmarks/results/
imbalance-<machine>-<date>.json and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import build_store, machine, md_table, write_results
from featurestore.common.errors import KdstoreError
from featurestore.common.options import from_dict, merge
from featurestore.common.untrusted import load_yaml
from featurestore.demo import REFERENCE_CLASSES, REFERENCE_COUNTS, class_counts, write_demo_data
from featurestore.pipeline.config import BuildConfig
from trainer import recipes
from trainer.config import FitConfig
from trainer.plan import steps_per_epoch
from trainer.sweeper import fit_or_reuse

REPO = Path(__file__).resolve().parents[1]
DEMO_BUILD, DEMO_STUDENT = REPO / "configs" / "demo.yaml", REPO / "configs" / "students" / "demo.yaml"
DEMO_TEACHER_STEPS = 240
SMALLEST = sorted(range(len(REFERENCE_COUNTS)), key=lambda c: REFERENCE_COUNTS[c])[:3]
RECIPES = ("labels", "default", "logit_adjust", "balanced_sampling", "balanced_probe", "bias", "tta", "combined",
           "ensemble")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.imbalance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default: 3)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the labelled training images; every recipe "
                   "trains the optimizer steps these take (default: 30)")
    p.add_argument("--per-class", type=int, default=40, help="mean images per class of the store (default: 40)")
    p.add_argument("--image-size", type=int, help="student training resolution (default: configs/students/demo.yaml's)")
    p.add_argument("--work", default="imbalance-work", help="folder of the data, stores and runs (reused)")
    p.add_argument("--json", help="results file (default: benchmarks/results/imbalance-<machine>-<date>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = run_imbalance(args)
    except KdstoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    return 0


def _data(work: Path, per_class: int) -> dict:
    """The demo teacher, the imbalanced labelled images and the fresh ones (made once)."""
    made = {}
    for name, mean, seed in (("labelled", per_class, 0), ("fresh", 20, 1)):
        counts = class_counts(mean, "reference")
        if not (work / f"{name}.complete").is_file():
            write_demo_data(work / name, seed=seed, counts=counts)
            (work / f"{name}.complete").touch()
        made[name] = counts
    if not (work / "teacher" / "config.json").is_file():
        from featurestore.demo.teacher import train_demo_teacher
        train_demo_teacher(work / "teacher", steps=DEMO_TEACHER_STEPS)
    return made


def _store(work: Path, name: str, probe: dict) -> str:
    out = work / f"{name}.zarr"
    if not (work / f"{name}.complete").is_file():
        cfg = from_dict(BuildConfig, merge(load_yaml(DEMO_BUILD), {
            "images": str(work / "labelled"), "out": str(out), "teacher": {"id": str(work / "teacher")},
            "probe": probe}))
        build_store(cfg)
        (work / f"{name}.complete").touch()
    return str(out)


def _recipe(name: str, base: FitConfig, stores: dict[str, str]) -> FitConfig:
    """Each recipe's config; `default` is pinned to the defaults before any imbalance-aware term, whatever
    the built-in defaults are now."""
    default = recipes.apply("base", base, has_patches=True)
    loss = dataclasses.replace(default.loss, logit_adjust=0.0)
    default = dataclasses.replace(default, loss=loss, sampling="uniform", calibrate="none", tta="none")
    return {
        "labels": lambda: recipes.apply("labels", base, has_patches=True),
        "default": lambda: default,
        "logit_adjust": lambda: dataclasses.replace(default, loss=dataclasses.replace(loss, logit_adjust=1.0)),
        "balanced_sampling": lambda: dataclasses.replace(default, sampling="balanced"),
        "balanced_probe": lambda: dataclasses.replace(default, store=stores["balanced_probe"]),
        "bias": lambda: dataclasses.replace(default, calibrate="bias"),
        "tta": lambda: dataclasses.replace(default, tta="flip"),
        "combined": lambda: dataclasses.replace(default, loss=dataclasses.replace(loss, logit_adjust=1.0),
                                                calibrate="bias", tta="flip"),
    }[name]()


def _eval_record(run: Path) -> dict:
    e = json.loads((run / "eval.json").read_text())
    return {"macro_f1": e["macro_f1"], "smallest_f1": statistics.fmean(e["per_class"][c]["f1"] for c in _smallest(e)),
            "size_mb": e["size_mb"]}


def _smallest(e: dict) -> list[int]:
    """Indices, in the file's class order, of the three classes smallest in the reference data."""
    names = [REFERENCE_CLASSES[c] for c in SMALLEST]
    return [e["classes"].index(n) for n in names]


def run_imbalance(args: argparse.Namespace) -> dict:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    counts = _data(work, args.per_class)
    wanted = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(wanted) - set(RECIPES))
    if unknown:
        raise KdstoreError(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    stores = {"default": _store(work, "store", {})}
    if "balanced_probe" in wanted:
        stores["balanced_probe"] = _store(work, "store_balanced_probe", {"class_weight": "balanced"})
    d = load_yaml(DEMO_STUDENT)
    if args.image_size:
        d = merge(d, {"image_size": args.image_size})
    base = from_dict(FitConfig, merge(d, {"store": stores["default"], "out": "-", "unlabeled": False}))
    from featurestore.store.reader import StoreReader
    with StoreReader.open(stores["default"]) as s:
        split, probe = s.read("split"), s.teacher().metrics["probe"]
    steps = steps_per_epoch(int((split >= 0).sum()), base.optim.batch_size) * args.epochs
    settings = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "seeds": args.seeds, "steps": steps,
                "epochs": args.epochs, "student": base.student, "image_size": base.image_size,
                "store_class_counts": counts["labelled"], "fresh_class_counts": counts["fresh"],
                "labelled_training_images": int((split >= 0).sum()), "held_out_images": int((split == -1).sum()),
                "teacher_probe_val_macro_f1": probe.get("val_macro_f1"),
                "smallest_classes": [REFERENCE_CLASSES[c] for c in SMALLEST]}
    out = {"settings": settings, "recipes": {}}
    fresh = str(work / "fresh")
    for name in wanted:
        if name == "ensemble":
            continue
        cfg = _recipe(name, base, stores)
        rows = []
        for seed in range(args.seeds):
            run = work / "runs" / f"{steps}steps" / f"{name}-s{seed}"
            run_cfg = dataclasses.replace(cfg, seed=seed, optim=dataclasses.replace(cfg.optim, steps=steps),
                                          out=str(run))
            r = fit_or_reuse(run_cfg, fresh)
            rows.append(_eval_record(run) | {"seconds": r["seconds"]})
            print(f"imbalance: {name} seed {seed}: macro-F1 {rows[-1]['macro_f1']:.4f} on the fresh images "
                  f"({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
        out["recipes"][name] = _summarise(rows, steps)
        _write(args, out)
    if "ensemble" in wanted:
        out["recipes"]["ensemble"] = _ensemble(work, steps, args.seeds, fresh)
        _write(args, out)
    return out


def _ensemble(work: Path, steps: int, seeds: int, fresh: str) -> dict:
    from trainer.evaluate import evaluate
    from trainer.exporter import export_ensemble
    runs = [work / "runs" / f"{steps}steps" / f"default-s{seed}" for seed in range(seeds)]
    path = work / "runs" / f"{steps}steps" / "ensemble.pt"
    export_ensemble(runs, path, 25.0)
    e = evaluate(path, fresh, workers=0)
    (path.with_suffix(".eval.json")).write_text(json.dumps(e, indent=2))
    row = {"macro_f1": e["macro_f1"], "smallest_f1": statistics.fmean(e["per_class"][c]["f1"] for c in _smallest(e)),
           "size_mb": e["size_mb"], "seconds": 0.0}
    print(f"imbalance: ensemble of {seeds}: macro-F1 {row['macro_f1']:.4f}", file=sys.stderr, flush=True)
    return _summarise([row], steps) | {"members": [str(r) for r in runs]}


def _summarise(rows: list[dict], steps: int) -> dict:
    f1 = [r["macro_f1"] for r in rows]
    return {"mean": statistics.fmean(f1), "std": statistics.stdev(f1) if len(f1) > 1 else 0.0, "values": f1,
            "smallest_f1": statistics.fmean(r["smallest_f1"] for r in rows), "size_mb": rows[0]["size_mb"],
            "seconds": statistics.fmean(r["seconds"] for r in rows), "steps": steps}


def _write(args: argparse.Namespace, out: dict) -> None:
    write_results("imbalance", out | {"machine": out["settings"]["machine"]}, table(out), args.json)


def table(out: dict) -> str:
    s = out["settings"]
    base = out["recipes"].get("default")
    rows = []
    for name, r in out["recipes"].items():
        gain = f"{r['mean'] - base['mean']:+.3f}" if base and name != "default" else "-"
        rows.append([name, f"{r['mean']:.3f} +- {r['std']:.3f}", gain, ", ".join(f"{v:.3f}" for v in r["values"]),
                     f"{r['smallest_f1']:.3f}", f"{r['size_mb']:.2f}", r["steps"]])
    head = (f"Imbalance on the demo with the reference class counts ({', '.join(map(str, s['store_class_counts']))} "
            f"images per class in the store, {s['labelled_training_images']} for training, {s['held_out_images']} held "
            f"out): {s['student']} at {s['image_size']} px, {s['steps']} optimizer steps, {s['seeds']} seeds; "
            f"macro-F1 of the exported student.pt on {sum(s['fresh_class_counts'])} fresh images with the same "
            f"imbalance, scored as the grader scores; smallest classes: {', '.join(s['smallest_classes'])}; "
            f"{s['machine']}, {s['date']}")
    return head + "\n\n" + md_table(["recipe", "macro-F1 (mean +- std)", "against default", "per seed",
                                     "F1 of the 3 smallest classes", "MB", "optimizer steps"], rows)


if __name__ == "__main__":
    sys.exit(main())
