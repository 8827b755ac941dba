"""trainer fit | eval | export | report."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from featurestore.config import ConfigError, document_defaults, load_config

FLAGS = {  # flag dest -> run config key
    "store": "store", "out": "out", "student": "student", "pretrained": "pretrained", "image_size": "image_size",
    "head": "head", "seed": "seed", "mixed_precision": "mixed_precision", "cpu": "cpu",
    "channels_last": "channels_last", "compile": "compile", "train_on_all": "train_on_all", "max_mb": "max_mb",
    "ram_budget_gb": "ram_budget_gb", "onnx": "onnx",
    "epochs": "optim.epochs", "batch_size": "optim.batch_size", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "warmup_epochs": "optim.warmup_epochs", "ema": "optim.ema",
    "w_ce": "loss.ce", "w_kd": "loss.kd", "w_dist": "loss.dist", "w_pooled": "loss.pooled", "w_patches": "loss.patches",
    "temperature": "loss.temperature", "label_smoothing": "loss.label_smoothing",
}

EPILOG = """examples:
  trainer fit --store stores/derm.zarr --out runs/shufflenet --student shufflenet_v2_x1_0 --epochs 30
  trainer eval --model runs/shufflenet/student.pt --images data/val [--json]
  trainer export --run runs/shufflenet --format onnx
  trainer report runs/shufflenet
students: shufflenet_v2_x0_5/x1_0/x1_5/x2_0, mobilenet_v3_small/large, efficientnet_b0,
  regnet_y_400mf/800mf, or timm:<any timm model>
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description="Train small students from a featurestore store "
                                "(no teacher at training time), evaluate them as the grader does, export them.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="train a student from a store", description="Train a student from a store "
                       "(or --resume a run). Flags override --config; defaults shown are the built-in ones.")
    f.add_argument("--config", help="YAML run config (configs/students/*.yaml); flags override it")
    f.add_argument("--store", help="featurestore store (.zarr or .h5)")
    f.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, student.pt, plots)")
    from trainer.students import available
    f.add_argument("--student", help="one of " + ", ".join(available()))
    f.add_argument("--pretrained", action="store_true", default=None, help="start from ImageNet weights found locally")
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
    f.add_argument("--seed", type=int, help="seed of the student's weights and of the data order")
    f.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="autocast dtype (GPU)")
    f.add_argument("--cpu", action="store_true", default=None, help="train on the CPU even if a GPU is present")
    f.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    f.add_argument("--compile", action="store_true", default=None, help="torch.compile the training model")
    f.add_argument("--train-on-all", action="store_true", default=None,
                   help="train on held-out images too (final model; no validation)")
    f.add_argument("--max-mb", type=float, help="refuse to export a student.pt larger than this")
    f.add_argument("--ram-budget-gb", type=float, help="keep stored images in RAM up to this size, else stream")
    f.add_argument("--onnx", action="store_true", default=None, help="also export student.onnx")
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    from trainer.config import FitConfig
    document_defaults(f, FLAGS, FitConfig())

    e = sub.add_parser("eval", help="score a TorchScript model on an image folder exactly as the grader does")
    e.add_argument("--model", required=True, help="TorchScript .pt file (its sidecar .json is used if present)")
    e.add_argument("--images", required=True, help="ImageFolder root")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--save", help="also write the JSON report to this file")
    e.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    e.add_argument("--workers", type=int, default=2, help="decoding processes (default: 2)")

    x = sub.add_parser("export", help="export a run's best student again (TorchScript or ONNX)")
    x.add_argument("--run", required=True, help="a finished run directory")
    x.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", help="(default: torchscript)")
    x.add_argument("--max-mb", type=float, default=25.0, help="refuse a student.pt over this size (default: 25)")

    r = sub.add_parser("report", help="print a run's summary table")
    r.add_argument("run", help="a finished run directory")
    r.add_argument("--eval", help="JSON written by `trainer eval --save`")
    return p


def fit_config(args: argparse.Namespace):
    from trainer.config import FitConfig
    return load_config(FitConfig, args.config, args, FLAGS)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from featurestore.schema import StoreError
    from trainer.evaluate import EvalError
    from trainer.export import ExportError
    from trainer.students import StudentError
    try:
        return _run(args)
    except (ConfigError, StoreError, StudentError, ExportError, EvalError) as e:
        print(f"trainer {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "fit":
        from trainer.fit import fit
        out = fit(fit_config(args), resume=args.resume)
        print(report_table(out))
        return 0
    if args.command == "eval":
        from trainer.evaluate import evaluate
        from trainer.metrics import format_report
        m = evaluate(args.model, args.images, args.batch_size, args.workers)
        if args.save:
            Path(args.save).write_text(json.dumps(m, indent=2))
        print(json.dumps(m, indent=2) if args.json else format_report(m))
        return 0
    if args.command == "export":
        from trainer.export_run import export_run
        print(export_run(Path(args.run), args.format, args.max_mb))
        return 0
    print(report_table(Path(args.run), args.eval))
    return 0


def report_table(run: Path, eval_json: str | None = None) -> str:
    path = Path(run) / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{run} has no summary.json (the run did not finish)")
    s = json.loads(path.read_text())
    rows = [("student", s["student"]),
            ("teacher probe macro-F1 (cross-validated)", _f(s.get("teacher_probe_cv_macro_f1"))),
            ("teacher probe macro-F1 (held-out)", _f(s.get("teacher_probe_val_macro_f1"))),
            ("student macro-F1 (held-out, from store)", _f(s.get("val_macro_f1")))]
    if eval_json:
        e = json.loads(Path(eval_json).read_text())
        rows.append((f"student macro-F1 (grader eval, {e['num_images']} images)", _f(e["macro_f1"])))
    rows += [("student.pt size (MB)", f"{s['size_mb']:.2f}"), ("time per epoch (s)", f"{s['seconds_per_epoch']:.1f}"),
             ("training samples/s", f"{s['samples_per_s']:.0f}"), ("best epoch", str(s["best_epoch"]))]
    width, vw = max(len(k) for k, _ in rows), max(len(v) for _, v in rows)
    return "\n".join([f"| {'':<{width}} | {'value':<{vw}} |", f"|{'-' * (width + 2)}|{'-' * (vw + 2)}|"] +
                     [f"| {k:<{width}} | {v:<{vw}} |" for k, v in rows])


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
