"""trainer fit | sweep | eval | export | report."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from featurestore.config import ConfigError, document_defaults, load_config
from featurestore.errors import command_parser, run_command

FLAGS = {  # flag dest -> run config key (the Python API takes the same names)
    "store": "store", "out": "out", "student": "student", "pretrained": "pretrained", "image_size": "image_size",
    "head": "head", "seed": "seed", "unlabeled": "unlabeled", "device": "device", "mixed_precision": "mixed_precision",
    "cpu": "cpu", "channels_last": "channels_last", "compile": "compile", "train_on_all": "train_on_all",
    "max_mb": "max_mb", "ram_budget_gb": "ram_budget_gb", "buffer_chunks": "buffer_chunks", "onnx": "onnx",
    "loader_workers": "loader_workers",
    "epochs": "optim.epochs", "batch_size": "optim.batch_size", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "warmup_epochs": "optim.warmup_epochs", "ema": "optim.ema",
    "w_ce": "loss.ce", "w_kd": "loss.kd", "w_dist": "loss.dist", "w_pooled": "loss.pooled", "w_patches": "loss.patches",
    "temperature": "loss.temperature", "label_smoothing": "loss.label_smoothing", "kd_gate": "loss.kd_gate",
}

EPILOG = """examples:
  trainer fit --store stores/derm.zarr --out runs/shufflenet --config configs/students/shufflenet.yaml
  trainer sweep --store stores/derm.zarr --out sweeps/derm --seeds 3 [--search 20]
  trainer eval --model runs/shufflenet/student.pt --images data/val [--json]
  trainer export --run runs/shufflenet --format onnx
  trainer report runs/shufflenet
students: shufflenet_v2_x0_5/x1_0/x1_5/x2_0, mobilenet_v3_small/large, efficientnet_b0,
  regnet_y_400mf/800mf, or timm:<any timm model>
"""


def add_fit_flags(f: argparse.ArgumentParser) -> None:
    f.add_argument("--config", help="YAML run config (configs/students/*.yaml); flags override it")
    f.add_argument("--store", help="featurestore store (.zarr or .h5)")
    from trainer.students import available
    f.add_argument("--student", help="one of " + ", ".join(available()))
    f.add_argument("--pretrained", action="store_true", default=None, help="start from ImageNet weights "
                   "(downloaded once, then taken from the local cache; default: random initialisation)")
    f.add_argument("--image-size", type=int, help="training resolution (the grader uses 224)")
    f.add_argument("--head", choices=["probe", "zeroshot"], help="teacher head whose logits KD follows")
    f.add_argument("--epochs", type=int, help="passes over the training images (one stored view each)")
    f.add_argument("--batch-size", type=int, help="samples per step (per process)")
    f.add_argument("--lr", type=float, help="peak AdamW learning rate")
    f.add_argument("--weight-decay", type=float, help="AdamW weight decay (not on biases and norms)")
    f.add_argument("--warmup-epochs", type=float, help="linear warm-up length, then cosine decay")
    f.add_argument("--ema", type=float, help="EMA decay per step (0: off); the EMA weights are exported")
    f.add_argument("--temperature", type=float, help="KD/DIST temperature T")
    f.add_argument("--w-ce", type=float, help="weight of cross-entropy on the labels")
    f.add_argument("--w-kd", type=float, help="weight of Hinton KD on the teacher logits")
    f.add_argument("--w-dist", type=float, help="weight of the DIST loss")
    f.add_argument("--w-pooled", type=float, help="weight of the pooled-embedding cosine loss")
    f.add_argument("--w-patches", type=float, help="weight of the patch-grid cosine loss")
    f.add_argument("--label-smoothing", type=float, help="label smoothing of the cross-entropy term")
    f.add_argument("--kd-gate", choices=["none", "correct", "confidence"], help="which views KD trusts: all (none); "
                   "labelled ones only where the teacher's top class is the label (correct); each weighted by the "
                   "teacher's probability of the view's label, or of its own top class when unlabelled (confidence)")
    f.add_argument("--seed", type=int, help="seed of the student's weights and of the data order")
    f.add_argument("--no-unlabeled", dest="unlabeled", action="store_false", default=None,
                   help="ignore the store's unlabelled images (default: they train the teacher terms)")
    f.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    f.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], help="autocast dtype (auto: bf16 "
                   "where the GPU has it natively, fp16 on older GPUs and mps, none on CPU)")
    f.add_argument("--cpu", action="store_true", default=None, help="train on the CPU even if a GPU is present")
    f.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format "
                   "(default: off)")
    f.add_argument("--compile", action="store_true", default=None, help="torch.compile the training model "
                   "(default: off)")
    f.add_argument("--train-on-all", action="store_true", default=None,
                   help="train on held-out images too (final model; no validation; default: off)")
    f.add_argument("--max-mb", type=float, help="refuse to export a student.pt larger than this")
    f.add_argument("--ram-budget-gb", type=float, help="read everything the run needs into RAM when it fits, "
                   "else stream chunks (same batches either way)")
    f.add_argument("--buffer-chunks", type=int, help="shuffle window in whole chunks (memory ~ 2 windows)")
    f.add_argument("--loader-workers", type=int, help="training on a CPU: processes that render the views "
                   "beside the training loop (one core each; 0 renders them in the loop). Same batches either way")
    f.add_argument("--onnx", action="store_true", default=None, help="also export student.onnx (default: off)")
    from trainer.config import FitConfig
    document_defaults(f, FLAGS, FitConfig())


def _parser() -> argparse.ArgumentParser:
    p, sub, common = command_parser("trainer", "Train small students from a featurestore store (no teacher at "
                                    "training time), evaluate them as the grader does, export them.", EPILOG)
    f = sub.add_parser("fit", parents=[common], help="train a student from a store",
                       description="Train a student from a store (or --resume a run). Flags override --config; "
                       "defaults shown are the built-in ones.")
    add_fit_flags(f)
    f.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, student.pt, plots)")
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    from trainer.recipes import RECIPES
    s = sub.add_parser("sweep", parents=[common], help="train recipes x seeds on one store and compare them",
                       description="Train named recipes (x seeds) on one store with the fit flags below as the "
                       "base, compare them on the store's held-out images, and keep the best run's student.pt. "
                       "Finished runs are reused, so an interrupted sweep continues where it stopped.")
    add_fit_flags(s)
    s.add_argument("--out", help="sweep directory (runs/, sweep.json, sweep.md, sweep.png, student.pt)")
    s.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes: " + ", ".join(
        f"{k} ({v.about})" for k, v in RECIPES.items()) + "; append ':labelled' to ignore unlabelled images "
        f"(default: {','.join(RECIPES)})")
    s.add_argument("--seeds", type=int, default=3, help="seeds per recipe (default: 3)")
    s.add_argument("--search", type=int, default=0, help="Optuna trials tuning lr, temperature and loss weights on "
                   "the held-out images; the best trial becomes the recipe 'search' (default: 0, no search)")
    s.add_argument("--eval-images", help="also score every run's student.pt on this ImageFolder as the grader does")

    e = sub.add_parser("eval", parents=[common], help="score a TorchScript model on an image folder exactly as "
                       "the grader does")
    e.add_argument("--model", required=True, help="TorchScript .pt file (its sidecar .json is used if present)")
    e.add_argument("--images", required=True, help="ImageFolder root")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--save", help="also write the JSON report to this file")
    e.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    e.add_argument("--workers", type=int, default=2, help="decoding processes (default: 2)")
    e.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip", help="skip unreadable files and "
                   "list them in the report, or stop at the first (default: skip)")

    x = sub.add_parser("export", parents=[common], help="export a run's best student again (TorchScript or ONNX)")
    x.add_argument("--run", required=True, help="a finished run directory")
    x.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", help="(default: torchscript)")
    x.add_argument("--max-mb", type=float, default=25.0, help="refuse a student.pt over this size (default: 25)")

    r = sub.add_parser("report", parents=[common], help="print a run's summary table, or one table comparing runs",
                       description="One run: its summary. Several runs: one row each (held-out macro-F1 from the "
                       "store, and the grader-style macro-F1 of `trainer eval --save RUN/eval.json` when present), "
                       "under the teacher probe's.")
    r.add_argument("run", nargs="+", help="finished run directories")
    r.add_argument("--eval", help="JSON written by `trainer eval --save` (one run; default: RUN/eval.json)")
    return p


def fit_config(args: argparse.Namespace):
    from trainer.config import FitConfig
    return load_config(FitConfig, args.config, args, FLAGS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = _parser().parse_args(argv)
    run: dict[str, str] = {}                      # the run folder, once known
    return run_command(f"trainer {args.command}", lambda: _run(args, run), args.debug,
                       next_step=lambda: _next_step(run.get("out"), argv))


def _next_step(out: str | None, argv: list[str]) -> str:
    """After an interrupted command: exactly what to run to continue."""
    if out is None:
        return "finished work is kept; run the same command to continue"
    history = Path(out) / "metrics.jsonl"
    if not (Path(out) / "checkpoints" / "last.pt").is_file():
        return "no epoch had finished; run the same command to start again"
    done = len(history.read_text().splitlines()) if history.is_file() else 0
    cmd = argv if "--resume" in argv else [*argv, "--resume"]
    return f"{done} finished epoch(s) are kept; to continue, run: trainer {shlex.join(cmd)}"


def _run(args: argparse.Namespace, run: dict[str, str]) -> int:
    if args.command == "fit":
        from trainer.training import fit
        cfg = fit_config(args)
        run["out"] = cfg.out
        out = fit(cfg, resume=args.resume)
        print(report_table(out))
        return 0
    if args.command == "sweep":
        from trainer.sweeper import sweep
        result = sweep(fit_config(args), args.recipes.split(","), args.seeds, args.search, args.eval_images)
        print(result.table)
        return 0
    if args.command == "eval":
        from trainer.evaluate import evaluate
        from trainer.metrics import format_report
        m = evaluate(args.model, args.images, args.batch_size, args.workers, args.on_bad_image)
        if args.save:
            Path(args.save).write_text(json.dumps(m, indent=2))
        print(json.dumps(m, indent=2) if args.json else format_report(m))
        return 0
    if args.command == "export":
        from trainer.export_run import export_run
        print(export_run(Path(args.run), args.format, args.max_mb))
        return 0
    if len(args.run) == 1:
        print(report_table(Path(args.run[0]), args.eval))
    else:
        print(compare_table([Path(r) for r in args.run]))
    return 0


def _summary(run: Path) -> dict:
    path = Path(run) / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{run} has no summary.json (the run did not finish)")
    return json.loads(path.read_text())


def compare_table(runs: list[Path]) -> str:
    """One row per run, under the teacher probe's held-out macro-F1 (from the first run's store)."""
    rows, fresh = [], None
    for run in runs:
        s = _summary(run)
        e = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else None
        fresh = fresh or (e and e["num_images"])
        rows.append((run.name, s["student"], _f(s.get("val_macro_f1")), _f(e["macro_f1"]) if e else "-",
                     f"{s['size_mb']:.2f}"))
    teacher = _summary(runs[0]).get("teacher_probe_val_macro_f1")
    rows.insert(0, ("teacher probe", "-", _f(teacher), "-", "-"))
    return md_table(["run", "student", "held-out macro-F1", f"macro-F1 on {fresh or 'fresh'} fresh images", "MB"], rows)


def report_table(run: Path, eval_json: str | None = None) -> str:
    s = _summary(run)
    if eval_json is None and (Path(run) / "eval.json").is_file():
        eval_json = str(Path(run) / "eval.json")
    rows = [("student", s["student"]),
            ("teacher probe macro-F1 (cross-validated)", _f(s.get("teacher_probe_cv_macro_f1"))),
            ("teacher probe macro-F1 (held-out)", _f(s.get("teacher_probe_val_macro_f1"))),
            ("student macro-F1 (held-out, from store)", _f(s.get("val_macro_f1")))]
    if eval_json:
        e = json.loads(Path(eval_json).read_text())
        rows.append((f"student macro-F1 (grader eval, {e['num_images']} images)", _f(e["macro_f1"])))
    rows += [("student.pt size (MB)", f"{s['size_mb']:.2f}"), ("time per epoch (s)", f"{s['seconds_per_epoch']:.1f}"),
             ("training samples/s", f"{s['samples_per_s']:.0f}"), ("best epoch", str(s["best_epoch"]))]
    return md_table(["", "value"], rows)


def md_table(header: list[str], rows: list[tuple]) -> str:
    cols = list(zip(header, *rows))
    width = [max(len(str(v)) for v in col) for col in cols]
    line = lambda r: "| " + " | ".join(f"{str(v):<{w}}" for v, w in zip(r, width)) + " |"   # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(r) for r in rows])


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
