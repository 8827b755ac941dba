"""trainer fit | sweep | eval | export | report: the command line over the Python API (api.py), with
the flags declared by the config dataclasses."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from featurestore.common import log
from featurestore.common.errors import run_command
from featurestore.common.options import add_options, command_parser, load_config, positive, values_of, whole
from featurestore.pipeline.config import MAX_WORKERS
from trainer import api
from trainer.config import FitConfig
from trainer.recipes import RECIPES
from trainer.tables import compare_table, report_table

EPILOG = """examples:
  trainer fit --store stores/derm.zarr --out runs/shufflenet --config configs/students/shufflenet.yaml
  trainer sweep --store stores/derm.zarr --out sweeps/derm --seeds 3 [--search 20]
  trainer eval --model runs/shufflenet/student.pt --images data/val [--json]
  trainer export --run runs/shufflenet --format onnx
  trainer report runs/shufflenet
students: shufflenet_v2_x0_5/x1_0/x1_5/x2_0, mobilenet_v3_small/large, efficientnet_b0,
  regnet_y_400mf/800mf, or timm:<any timm model>
"""


def parser() -> argparse.ArgumentParser:
    p, sub, common = command_parser("trainer", "Train small students from a featurestore store (no teacher at "
                                    "training time), evaluate them as the grader does, export them.", EPILOG)
    f = sub.add_parser("fit", parents=[common], help="train a student from a store",
                       description="Train a student from a store (or --resume a run). Flags override --config; "
                       "defaults shown are the built-in ones.")
    add_options(f, FitConfig)
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    s = sub.add_parser("sweep", parents=[common], help="train recipes x seeds on one store and compare them",
                       description="Train named recipes (x seeds) on one store with the fit flags below as the "
                       "base, compare them on the store's held-out images, and keep the best run's student.pt. "
                       "Every recipe trains for the same number of optimizer steps: --steps, or what --epochs "
                       "passes take for the recipe with the most training images. "
                       "--out is the sweep directory (runs/, sweep.json, sweep.md, sweep.png, student.pt). "
                       "Finished runs are reused, so an interrupted sweep continues where it stopped.")
    add_options(s, FitConfig)
    s.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes: " + ", ".join(
        f"{k} ({v.about})" for k, v in RECIPES.items()) + "; append ':labelled' to ignore unlabelled images "
        f"(default: {','.join(RECIPES)})")
    s.add_argument("--seeds", type=whole(1, 100), default=3, help="seeds per recipe (default: 3)")
    s.add_argument("--search", type=whole(0, 10_000), default=0, help="Optuna trials tuning lr, temperature and loss "
                   "weights on the held-out images; the best trial becomes the recipe 'search' (default: 0, no search)")
    s.add_argument("--eval-images", help="also score every run's student.pt on this ImageFolder as the grader does")

    e = sub.add_parser("eval", parents=[common], help="score a TorchScript model on an image folder exactly as "
                       "the grader does")
    e.add_argument("--model", required=True, help="TorchScript .pt file (its sidecar .json is used if present)")
    e.add_argument("--images", required=True, help="ImageFolder root")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--save", help="also write the JSON report to this file")
    e.add_argument("--batch-size", type=whole(1, 4096), default=64, help="images per forward (default: 64)")
    e.add_argument("--workers", type=whole(0, MAX_WORKERS), default=2, help="decoding processes (default: 2)")
    e.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip", help="skip unreadable files and "
                   "list them in the report, or stop at the first (default: skip)")
    e.add_argument("--image-size", type=whole(16, 2048), default=224, help="the side the images are resized to "
                   "(default: 224, the grader's; another side shows what a file does off the grader's input)")

    x = sub.add_parser("export", parents=[common], help="export a run's student again (TorchScript or ONNX), or "
                       "several runs as one ensemble", description="Export a finished run's selected student again "
                       "(with its resize, TTA and logit bias), or with --ensemble one TorchScript file averaging the "
                       "logits of several runs' students, refused over --max-mb.")
    x.add_argument("--run", help="a finished run directory")
    x.add_argument("--ensemble", nargs="+", metavar="RUN", help="two or more finished runs (the same classes) to "
                   "average in one file, written to --out")
    x.add_argument("--out", help="with --ensemble: the TorchScript file to write (.pt)")
    x.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", help="(default: torchscript)")
    x.add_argument("--max-mb", type=positive, default=25.0, help="refuse a student.pt over this size (default: 25)")

    r = sub.add_parser("report", parents=[common], help="print a run's summary table, or one table comparing runs",
                       description="One run: its summary. Several runs: one row each (held-out macro-F1 from the "
                       "store, and the grader-style macro-F1 of `trainer eval --save RUN/eval.json` when present), "
                       "under the teacher probe's.")
    r.add_argument("run", nargs="+", help="finished run directories")
    r.add_argument("--eval", help="JSON written by `trainer eval --save` (one run; default: RUN/eval.json)")
    r.add_argument("--html", help="also write one self-contained HTML page of the runs side by side (scores, the "
                   "settings that differ, F1 per class, curves and confusion matrices; sortable, no network)")
    r.add_argument("--title", default="kdstore runs", help="the HTML page's title (default: kdstore runs)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser().parse_args(argv)
    log.enable()
    return run_command(f"trainer {args.command}", lambda: _run(args), args.debug,
                       next_step=lambda: _next_step(args, argv))


def _next_step(args: argparse.Namespace, argv: list[str]) -> str:
    """After an interrupted command: exactly what to run to continue."""
    if args.command != "fit":
        return "finished work is kept; run the same command to continue"
    out = Path(load_config(FitConfig, args.config, values_of(args, FitConfig)).out)
    if not (out / "checkpoints" / "last.pt").is_file():
        return "no epoch had finished; run the same command to start again"
    history = out / "metrics.jsonl"
    done = len(history.read_text().splitlines()) if history.is_file() else 0
    cmd = argv if "--resume" in argv else [*argv, "--resume"]
    return f"{done} finished epoch(s) are kept; to continue, run: trainer {shlex.join(cmd)}"


def _run(args: argparse.Namespace) -> int:
    if args.command == "fit":
        run = api.fit(config=args.config, resume=args.resume, **values_of(args, FitConfig))
        if int(os.environ.get("RANK", "0")) == 0:             # one table, whatever the ranks
            print(report_table(run.path))
        return 0
    if args.command == "sweep":
        result = api.sweep(config=args.config, recipes=args.recipes, seeds=args.seeds, search=args.search,
                           eval_images=args.eval_images, **values_of(args, FitConfig))
        print(result.table)
        return 0
    if args.command == "eval":
        from trainer.metrics import format_report
        m = api.eval(model=args.model, images=args.images, batch_size=args.batch_size, workers=args.workers,
                     on_bad_image=args.on_bad_image, image_size=args.image_size)
        if args.save:
            Path(args.save).write_text(json.dumps(m, indent=2))
        print(json.dumps(m, indent=2) if args.json else format_report(m))
        return 0
    if args.command == "export":
        print(api.export(run=args.run, format=args.format, max_mb=args.max_mb, ensemble=args.ensemble, out=args.out))
        return 0
    if len(args.run) == 1:
        print(report_table(Path(args.run[0]), args.eval))
    else:
        print(compare_table([Path(r) for r in args.run]))
    if args.html:
        from trainer.html_report import write
        print(f"wrote {write([Path(r) for r in args.run], args.html, args.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
