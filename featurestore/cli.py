"""featurestore build | inspect | verify | demo-data."""
from __future__ import annotations

import argparse
import json
import sys

from .config import BuildConfig, ConfigError, document_defaults, load_config

FLAGS = {  # flag dest -> build config key
    "images": "images", "manifest": "manifest", "classes_file": "classes_file", "out": "out",
    "on_bad_image": "on_bad_image", "workers": "workers", "device": "device",
    "teacher": "teacher.id", "revision": "teacher.revision", "dtype": "teacher.dtype",
    "batch_size": "teacher.batch_size", "prompt_template": "teacher.prompt_template", "zeroshot": "teacher.zeroshot",
    "views": "views.views", "view_seed": "views.seed", "mix_prob": "views.mix_prob",
    "patch_grid": "store.patch_grid", "image_size": "store.image_size", "chunk_size": "store.chunk_size",
    "compression": "store.compression", "folds": "probe.folds", "val_fraction": "probe.val_fraction",
}

EPILOG = """examples:
  featurestore demo-data data/demo
  featurestore build --images data/train --out stores/derm.zarr --teacher google/medsiglip-448 --views 32 --patch-grid 8
  featurestore build --images data/demo --out stores/demo.zarr --teacher random:tiny --views 4
  featurestore inspect stores/derm.zarr [--json]
  featurestore verify stores/derm.zarr
multi-process (each rank owns whole shards; Zarr stores only):
  accelerate launch --num_processes 2 -m featurestore build ...     # GPU box, one GPU per rank
  torchrun --nproc_per_node 2 -m featurestore build ...              # same, also on CPU-only machines
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featurestore", description="Run a vision teacher once over K augmented "
                                "views of every image and store its outputs for offline distillation.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build (or resume) a store", description="Build a store, or resume an "
                       "interrupted build with the same command. Flags override --config; defaults shown are the "
                       "built-in ones.")
    b.add_argument("--config", help="YAML build config; flags below override it")
    b.add_argument("--images", help="ImageFolder root (one subfolder per class), or the root for manifest paths")
    b.add_argument("--manifest", help="CSV with columns path,label instead of an ImageFolder")
    b.add_argument("--classes", dest="classes_file", help="file with one class name per line, in index order "
                   "(default: sorted() of the names, as torchvision's ImageFolder)")
    b.add_argument("--out", help="store path: *.zarr (default backend, also fsspec URLs) or *.h5")
    b.add_argument("--teacher", help="hub id, local directory (save_pretrained), or random:medsiglip-448 / random:tiny")
    b.add_argument("--revision", help="hub revision (branch, tag or commit) of the teacher")
    b.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="teacher compute dtype "
                   "(auto: bfloat16 on GPU, float32 on CPU)")
    b.add_argument("--batch-size", type=int, help="views per teacher forward (0: 64 on GPU, 16 on CPU)")
    b.add_argument("--views", type=int, help="K, views per image (view 0 is the whole image)")
    b.add_argument("--view-seed", type=int, help="seed of the view parameters")
    b.add_argument("--mix-prob", type=float, help="probability that a view is mixed (mixup/cutmix) with a partner")
    b.add_argument("--patch-grid", type=int, help="store patch tokens average-pooled to g x g (0: none)")
    b.add_argument("--image-size", type=int, help="S: side of the stored squashed images the student renders from")
    b.add_argument("--chunk-size", type=int, help="images per chunk (one Zarr shard, one unit of resume)")
    b.add_argument("--compression", help="zarr: none|zstd|blosc, hdf5: none|gzip|lzf (default: zstd / lzf)")
    b.add_argument("--folds", type=int, help="cross-fitting folds of the linear probe")
    b.add_argument("--val-fraction", type=float, help="fraction of each class held out for validation")
    b.add_argument("--prompt-template", help="zero-shot prompt with {name} for the class name")
    b.add_argument("--no-zeroshot", dest="zeroshot", action="store_false", default=None,
                   help="skip the text tower even if the model has one")
    b.add_argument("--on-bad-image", choices=["skip", "fail"], help="skip bad files (listed in the report) or stop")
    b.add_argument("--workers", type=int, help="decoding processes")
    b.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    b.add_argument("--overwrite", action="store_true", help="delete an existing store at --out and start again")
    document_defaults(b, FLAGS, BuildConfig())

    i = sub.add_parser("inspect", help="what is in a store, how big, how good the teacher is")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="print one JSON object")

    v = sub.add_parser("verify", help="check that every chunk is complete and finite (exit 1 if not)")
    v.add_argument("store")

    d = sub.add_parser("demo-data", help="write a synthetic 10-class ImageFolder of JPEG/PNG files")
    d.add_argument("out")
    d.add_argument("--per-class", type=int, default=40, help="images per class")
    d.add_argument("--seed", type=int, default=0)
    return p


def build_config(args: argparse.Namespace) -> BuildConfig:
    return load_config(BuildConfig, args.config, args, FLAGS)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .schema import StoreError
    from .sources import DatasetError
    from .teacher import TeacherError
    try:
        return _run(args)
    except (ConfigError, DatasetError, StoreError, TeacherError) as e:
        print(f"featurestore {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        from .build import build
        build(build_config(args), overwrite=args.overwrite)
        return 0
    if args.command == "demo-data":
        from .demo import write_demo_data
        out = write_demo_data(args.out, args.per_class, args.seed)
        print(f"wrote {10 * args.per_class} images to {out}")
        return 0
    from .report import format_summary, summarize, verify
    from .store import Store
    with Store.open(args.store) as store:
        if args.command == "inspect":
            s = summarize(store)
            print(json.dumps(s, indent=2) if args.json else format_summary(s))
            return 0
        problems = verify(store)
    if problems:
        print(f"{args.store}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{args.store}: OK, every chunk complete and finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
